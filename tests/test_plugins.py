"""The third-party plugin examples/convnet-swish, installed for real, used like a built-in.

tox installs it into the test venv (commands_pre). When it is not installed (a bare
``pytest`` in a fresh venv) the session installs it with ``pip install --target`` into a
temporary folder put on the path: its entry point is then found exactly as in site-packages.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import convnet.core as cn
from convnet.core import plugins
from convnet.core.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
SWISH = ["model.layers[1].name=swish", "model.layers[5].name=swish", "model.layers[5].beta=2.0"]


@pytest.fixture(scope="module")
def swish_path(tmp_path_factory) -> str | None:
    """None when convnet-swish is installed in this environment, else a folder holding it."""
    try:
        md.distribution("convnet-swish")
        return None
    except md.PackageNotFoundError:
        pass
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("src") / "convnet-swish"
    import shutil

    shutil.copytree(ROOT / "examples" / "convnet-swish", build, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(build)], check=True
    )
    return str(target)


@pytest.fixture
def swish(swish_path, monkeypatch):
    """Fresh plugin manager and registries that see convnet-swish."""
    if swish_path:
        monkeypatch.syspath_prepend(swish_path)
    plugins.reset()
    yield plugins.create_manager()
    plugins.reset()


def _env(swish_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if swish_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [swish_path, env.get("PYTHONPATH")]))
    return env


def test_swish_is_registered_with_its_distribution(swish) -> None:
    _, regs = swish
    entry = regs.layer.get("swish")
    assert entry.plugin == "swish" and entry.distribution.startswith("convnet-swish ")
    assert entry.options.__module__ == "convnet_swish"
    assert not regs.problems


def test_a_recipe_using_swish_trains(swish, tmp_path: Path) -> None:
    pm, regs = swish
    recipe = cn.load_recipe(TINY, [*SWISH, "train.max_steps=4"], regs)
    assert recipe.model.layers[5].options.beta == 2.0
    run = cn.Run(recipe, out=tmp_path, registries=regs, pm=pm)
    summary = run.train()
    assert summary["step"] == 4
    kinds = [type(m).__name__ for m in run.parts.network.layers.values()]
    assert kinds.count("Swish") == 2 and "ReLU" not in kinds and "Tanh" not in kinds
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line
    ]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    x = torch.linspace(-3, 3, 7)
    # ids stay with their layers through --set: the sixth layer (tanh1) is now a swish
    assert torch.allclose(run.parts.network.layers["tanh1"](x), x * torch.sigmoid(2.0 * x))


def test_convnet_plugins_lists_swish_with_its_distribution(swish_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "convnet.core", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=_env(swish_path),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["components"]
    swish = [r for r in rows if r["name"] == "swish"]
    assert swish == [
        {
            "kind": "layer",
            "name": "swish",
            "description": "swish activation x * sigmoid(beta x)",
            "plugin": "swish",
            "distribution": "convnet-swish 0.1.0",
        }
    ]
    assert {r["distribution"].split()[0] for r in rows} >= {"convnet", "convnet-swish"}


def test_convnet_run_with_swish_from_the_command_line(swish_path, tmp_path: Path) -> None:
    sets = [a for s in [*SWISH, "train.max_steps=2"] for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "convnet.core", "run", str(TINY), *sets, "--out", str(tmp_path), "--quiet"],
        capture_output=True,
        text=True,
        env=_env(swish_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "after 2 steps" in proc.stdout and f"run folder: {tmp_path}" in proc.stdout
    assert 'name = "swish"' in (tmp_path / "recipe.toml").read_text()


def test_plugins_text_listing(capsys) -> None:
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "layer:" in out and "dataset:" in out
    assert any(
        line.split()[0] == "conv" and "[layers from convnet " in line
        for line in out.splitlines()
        if line.startswith("  ")
    )


# ------------------------------------------------------------------ the contract, in process


class _Recorder:
    """A hook-only plugin (registered directly on a real plugin manager) that records the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @cn.hookimpl
    def convnet_train_start(self, run) -> None:
        self.calls.append("train_start")

    @cn.hookimpl
    def convnet_step_end(self, run, step) -> None:
        self.calls.append(f"step_end {step}")

    @cn.hookimpl
    def convnet_evaluation_end(self, run, epoch, final) -> None:
        self.calls.append(f"evaluation_end {epoch} {final}")

    @cn.hookimpl
    def convnet_epoch_end(self, run, epoch) -> None:
        self.calls.append(f"epoch_end {epoch}")

    @cn.hookimpl
    def convnet_should_stop(self, run, epoch) -> None:
        self.calls.append(f"should_stop {epoch}")

    @cn.hookimpl
    def convnet_save_state(self, run) -> None:
        self.calls.append(f"save_state {run.step}")

    @cn.hookimpl
    def convnet_train_end(self, run, summary) -> None:
        self.calls.append(f"train_end {summary['step']}")
        with pytest.raises(AttributeError, match="read-only"):
            run.step = 0


def test_hooks_fire_in_the_documented_order(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    recorder = _Recorder()
    pm.register(recorder, name="recorder")
    recipe = cn.load_recipe(TINY, ["train.epochs=2", "train.max_steps=6"], regs)
    cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    assert recorder.calls == [
        "train_start",
        "step_end 1",
        "step_end 2",
        "step_end 3",
        "step_end 4",
        "evaluation_end 0 False",
        "save_state 4",
        "epoch_end 0",
        "should_stop 0",
        "step_end 5",
        "step_end 6",
        "save_state 6",
        "evaluation_end 1 True",
        "train_end 6",
    ]


class _Averager:
    """Keeps a running average of the weights in a nested dict, plus the live weights as they are
    (sharing their memory), a list and plain numbers: all must come back on --resume."""

    def __init__(self, bad: object = None) -> None:
        self.loaded: dict | None = None
        self.bad = bad

    @cn.hookimpl
    def convnet_save_state(self, run) -> dict:
        weights = run.model_state()
        state = {
            "ema": {"decay": 0.9, "weights": {k: v * 0.5 for k, v in weights.items()}},
            "live": dict(weights),
            "history": [torch.tensor([float(run.step)]), {"step": run.step}],
            "step": run.step,
        }
        if self.bad is not None:
            state["bad"] = self.bad
        return state

    @cn.hookimpl
    def convnet_load_state(self, run, state) -> None:
        self.loaded = state


def test_plugin_state_with_nested_and_shared_tensors_survives_a_resume(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    pm.register(_Averager(), name="averager")
    recipe = cn.load_recipe(TINY, ["train.max_steps=4"], regs)
    cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    last = tmp_path / "checkpoints" / "last.safetensors"
    weights = cn.model_tensors(cn.load_checkpoint(last)[0])
    again = _Averager()
    pm2, regs2 = plugins.create_manager()
    pm2.register(again, name="averager")
    recipe = cn.load_recipe(TINY, ["train.max_steps=5"], regs2)
    cn.Run(recipe, out=tmp_path, resume=last, registries=regs2, pm=pm2, quiet=True).train()
    state = again.loaded
    assert state is not None and state["step"] == 4 and state["ema"]["decay"] == 0.9
    assert state["ema"]["weights"].keys() == state["live"].keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(state["live"][name], value) and torch.equal(state["ema"]["weights"][name], value * 0.5)
    assert torch.equal(state["history"][0], torch.tensor([4.0])) and state["history"][1] == {"step": 4}


def test_plugin_state_that_cannot_be_saved_names_the_plugin_and_key(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    pm.register(_Averager(bad={"when": object()}), name="averager")
    recipe = cn.load_recipe(TINY, ["train.max_steps=4"], regs)
    with pytest.raises(cn.PluginError) as caught:
        cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    assert str(caught.value).startswith("plugin 'averager': convnet_save_state's 'bad' cannot be saved (")
    assert not (tmp_path / "checkpoints" / "last.safetensors").exists()


def test_a_recipe_can_disable_a_hook_only_plugin(tmp_path: Path, capsys) -> None:
    pm, regs = plugins.create_manager()
    recorder = _Recorder()
    pm.register(recorder, name="recorder")
    recipe = cn.load_recipe(TINY, ["train.max_steps=4", 'plugins.disable=["recorder", "log"]'], regs)
    cn.Run(recipe, out=tmp_path / "a", registries=regs, pm=pm).train()
    assert recorder.calls == [] and "epoch 1/" not in capsys.readouterr().err
    with pytest.raises(cn.RecipeError, match=r"plugins.disable\[0\]: plugin 'layers' registers components"):
        cn.Run(
            cn.load_recipe(TINY, ['plugins.disable=["layers"]'], regs), out=tmp_path / "b", registries=regs, pm=pm
        ).train()
    with pytest.raises(cn.RecipeError, match=r"plugins.disable\[0\]: no plugin named 'nope' is loaded"):
        cn.Run(cn.load_recipe(TINY, ['plugins.disable=["nope"]'], regs), out=tmp_path / "c", registries=regs, pm=pm)
    from convnet.core.cli import main

    for command in ("show", "summary"):  # a recipe shown is one that runs
        assert main([command, str(TINY), "--set", 'plugins.disable=["nope"]']) == 2
        assert "plugins.disable[0]: no plugin named 'nope' is loaded" in capsys.readouterr().err


@pytest.mark.parametrize(
    "result, error",
    [
        (lambda: {"spread": torch.ones(3)}, r"evaluate\[1\] \(bad\): result 'spread' is a tensor of shape \[3\]"),
        (lambda: {"when": object()}, r"evaluate\[1\] \(bad\): result 'when' is a object, which cannot be saved"),
        (lambda: ["not", "a dict"], r"evaluate\[1\] \(bad\): the evaluator returned list, not a dict"),
    ],
)
def test_an_evaluator_result_that_cannot_be_saved_names_the_evaluator_and_key(result, error, tmp_path) -> None:
    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-evaluators", "tests")
    regs.evaluator.add("bad", lambda options, ctx: lambda ev_ctx: result(), regs.evaluator.get("topk").options)
    recipe = cn.load_recipe(TINY, ["train.max_steps=4", 'evaluate=[{name = "topk"}, {name = "bad"}]'], regs)
    with pytest.raises(cn.PluginError, match=error):
        cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    # the epoch's steps were saved before the evaluation failed: nothing trained is lost
    saved = cn.load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")[1]
    assert json.loads(saved["convnet.state"])["step"] == 4


def test_a_zero_dim_tensor_result_is_converted(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-evaluators", "tests")
    regs.evaluator.add(
        "scalar", lambda options, ctx: lambda ev_ctx: {"answer": torch.tensor(42.5)}, regs.evaluator.get("topk").options
    )
    recipe = cn.load_recipe(TINY, ["train.max_steps=4", 'evaluate=[{name = "scalar"}]'], regs)
    summary = cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    assert summary["answer"] == 42.5 and isinstance(summary["answer"], float)


def test_a_monitor_no_per_epoch_evaluator_reports_is_refused_before_training(tmp_path: Path) -> None:
    """train.monitor feeds the plateau schedule and best.safetensors: a typo, or a metric that
    only an end-of-run evaluator reports, would leave both idle for the whole run."""
    _, regs = plugins.create_manager()
    for monitor, evaluate, message in [
        ("top1_eror", '[{name = "topk"}]', "'top1_eror' is not a result of the recipe's evaluators"),
        ("tencrop_top1_error", '[{name = "topk"}, {name = "ten-crop"}]', "is reported only at the end of the run"),
    ]:
        recipe = cn.load_recipe(TINY, [f"train.monitor={monitor!r}", f"evaluate={evaluate}"], regs)
        with pytest.raises(cn.RecipeError, match=message) as caught:
            cn.Run(recipe, out=tmp_path / monitor, registries=regs, quiet=True).train()
        assert str(caught.value).startswith("train.monitor: ")
        assert "run after every epoch report samples, top1_error;" in str(caught.value)  # 4 classes: no top-5
        assert not (tmp_path / monitor / "checkpoints" / "last.safetensors").exists()
        if monitor == "top1_eror":
            assert str(caught.value).endswith("; did you mean 'top1_error'?")


def test_a_monitor_an_undeclared_evaluator_does_not_report_is_named_once(tmp_path: Path, capsys) -> None:
    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-evaluators", "tests")
    regs.evaluator.add("plain", lambda options, ctx: lambda ev_ctx: {"answer": 1.0}, regs.evaluator.get("topk").options)
    recipe = cn.load_recipe(TINY, ["train.epochs=2", 'evaluate=[{name = "plain"}]'], regs)
    cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    warned = [line for line in capsys.readouterr().err.splitlines() if "train.monitor" in line]
    assert warned == [
        "convnet: warning: train.monitor 'top1_error' is not among this evaluation's results (answer): "
        "the schedule is told None and best.safetensors is not kept"
    ]
    assert not (tmp_path / "checkpoints" / "best.safetensors").exists()


def _raise(exc: Exception):
    def factory(options, ctx):
        raise exc

    return factory


@pytest.mark.parametrize(
    "kind, like, override",
    [
        ("dataset", "synthetic", 'data.dataset.name="broken"'),
        ("augmenter", "hflip", 'data.train_augment=[{name = "broken"}]'),
        ("evaluator", "topk", 'evaluate=[{name = "broken"}]'),
        ("optimizer", "paper-sgd", 'train.optimizer.name="broken"'),
        ("schedule", "plateau", 'train.schedule.name="broken"'),
        ("strategy", "single", 'parallel.strategy="broken"'),
        ("layer", "tanh", 'model.layers.tanh1.name="broken"'),
    ],
)
def test_a_factory_that_raises_is_one_line_naming_its_plugin(kind, like, override, tmp_path: Path) -> None:
    """A plugin's bug (here an AttributeError) is the plugin's fault, not the recipe's: one
    PluginError naming the recipe path, the component, its plugin and the exception."""
    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-factories", "tests")
    regs[kind].add(
        "broken", _raise(AttributeError("'LayerContext' object has no attribute 'x'")), regs[kind].get(like).options
    )
    with pytest.raises(cn.PluginError) as caught:  # a layer's factory runs when the recipe loads
        recipe = cn.load_recipe(TINY, ["train.max_steps=1", override], regs)
        cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()
    message = str(caught.value)
    assert f"{kind} 'broken' from plugin 'test-factories'" in message, message
    assert message.endswith("failed: AttributeError: 'LayerContext' object has no attribute 'x'"), message


def test_an_augmenter_factory_that_returns_no_callable_is_named_at_build(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-factories", "tests")
    regs.augmenter.add("inert", lambda options, ctx: object(), regs.augmenter.get("hflip").options)
    recipe = cn.load_recipe(TINY, ["train.max_steps=1", 'data.train_augment=[{name = "inert"}]'], regs)
    with pytest.raises(
        cn.PluginError, match=r"^data.train_augment\[0\]: augmenter 'inert' from plugin 'test-factories'"
    ):
        cn.Run(recipe, out=tmp_path, registries=regs, pm=pm, quiet=True).train()


def test_plugins_shows_a_components_options_with_types_and_defaults(capsys) -> None:
    assert cli_main(["plugins", "schedule", "cosine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("schedule cosine: per step: linear warm-up") and "[optim from convnet " in out
    assert "  warmup_steps: int = 0\n" in out and "  min_lr: float = 0.0\n" in out
    assert cli_main(["plugins", "layer", "flatten"]) == 0 and "(no options)" in capsys.readouterr().out
    assert cli_main(["plugins", "layer", "relu"]) == 0 and "  inplace: bool = True\n" in capsys.readouterr().out
    assert cli_main(["plugins", "layer", "rleu"]) == 2
    assert "did you mean 'relu'?" in capsys.readouterr().err


def test_plugins_lists_hooks_and_commands_per_plugin(capsys) -> None:
    assert cli_main(["plugins", "--json"]) == 0
    table = {row["name"]: row for row in json.loads(capsys.readouterr().out)["plugins"]}
    assert table["alexnet"]["commands"] == ["convert", "towers"]
    assert {"convnet_train_start", "convnet_step_end", "convnet_epoch_end"} <= set(table["log"]["hooks"])
    assert table["layers"]["components"] >= 8 and table["log"]["components"] == 0


def test_implementing_the_deprecated_hook_warns_with_pythons_default_filters(tmp_path):
    """A plugin is library code, where Python hides DeprecationWarning: the author of a plugin
    implementing convnet_evaluation_done must still see that it moved, with no -W flag."""
    (tmp_path / "old_plugin.py").write_text(
        textwrap.dedent(
            """
            from convnet.core import hookimpl

            @hookimpl
            def convnet_evaluation_done(run, epoch, results):
                pass
            """
        ),
        encoding="utf-8",
    )
    script = "\n".join(
        [
            "import old_plugin",
            "from convnet.core import plugins",
            "pm, _ = plugins.create_manager()",
            "pm.register(old_plugin)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert "convnet_evaluation_done is deprecated: implement convnet_evaluation_end" in done.stderr


class _BadCommands:
    @cn.hookimpl
    def convnet_add_commands(self, subparsers) -> None:
        raise RuntimeError("boom adding commands")


def test_a_plugin_whose_commands_fail_is_a_problem_and_fatal_under_strict(capsys) -> None:
    pm = plugins.manager()
    pm.register(_BadCommands(), name="bad_commands")
    try:
        problem = "plugin 'bad_commands' could not add its commands: RuntimeError: boom adding commands"
        assert cli_main(["plugins", "--json"]) == 0
        captured = capsys.readouterr()
        assert f"convnet: warning: {problem}" in captured.err
        assert problem in json.loads(captured.out)["problems"]
        assert cli_main(["--strict", "plugins"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"convnet: error: {problem}"
        with pytest.raises(SystemExit):  # its command is missing: argparse's error says why
            cli_main(["bad-command"])
        err = capsys.readouterr().err
        assert f"convnet: warning: {problem}" in err and "invalid choice: 'bad-command'" in err
    finally:
        pm.unregister(name="bad_commands")
        for regs in (plugins.registries(), plugins.registries(strict=True)):
            regs.problems[:] = [p for p in regs.problems if "bad_commands" not in p]


def test_culprit_names_only_a_plugins_own_code(tmp_path: Path, monkeypatch) -> None:
    """The innermost frame that is a plugin's or convnet's decides: a plugin calling convnet code
    that fails is convnet's bug; a library under a plugin's project folder (its virtualenv) or a
    package whose name only starts like the plugin's is not the plugin."""
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "__init__.py").write_text(
        "from convnet.core import plugins\n"
        "def own():\n    raise RuntimeError('acme broke')\n"
        "def calls_convnet():\n    plugins.report_problems(None)\n"
    )
    (tmp_path / "acme_extra").mkdir()
    (tmp_path / "acme_extra" / "__init__.py").write_text("def other():\n    raise RuntimeError('not acme')\n")
    lib = tmp_path / "acme" / "venv" / "lib" / "python3.11" / "site-packages" / "somelib"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("def fails():\n    raise RuntimeError('a library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(lib.parent))
    import acme
    import acme_extra
    import somelib

    monkeypatch.setattr(plugins, "_entry_points", lambda: [md.EntryPoint("acme", "acme", "convnet")])

    def blamed(call) -> str | None:
        try:
            call()
        except Exception as exc:
            return plugins.culprit(exc)
        raise AssertionError("did not raise")

    assert blamed(acme.own).startswith(f"plugin 'acme' (distribution <unknown distribution>) at {tmp_path}")
    assert blamed(acme.calls_convnet) is None
    assert blamed(acme_extra.other) is None and blamed(somelib.fails) is None
    worker = RuntimeError(
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        f'  File "{tmp_path}/acme_extra/__init__.py", line 2, in other\nRuntimeError: not acme'
    )
    assert plugins.culprit(worker) is None
    worker = RuntimeError(worker.args[0].replace("acme_extra", "acme"))
    assert (
        plugins.culprit(worker)
        == f"plugin 'acme' (distribution <unknown distribution>) at {tmp_path}/acme/__init__.py:2"
    )
