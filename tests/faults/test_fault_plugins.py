"""Broken third-party plugins, installed for real (``pip install --target``), never take the rest down.

The packages live in tests/fixtures/plugins/: one raises at import, one registers a name the
built-ins already have (after registering a name of its own), one registers options that are
not an attrs class, and one is well behaved. Each broken one gives one message naming the
plugin (entry point) and its distribution; everything else loads; ``--strict`` fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
from faultkit import CONVNET, env
from fixtures.plugin_install import install

from convnet.core import plugins
from convnet.core.errors import PluginError

BROKEN = {
    "raises-at-import": (
        "plugin 'raises_at_import' (convnet_fixture_raises_at_import, distribution "
        "convnet-fixture-raises-at-import 0.0.1) failed to import: ImportError: "
    ),
    "duplicate-name": (
        "layer 'relu' is registered twice: by plugin 'layers' (distribution convnet ",
        "and by plugin 'duplicate_name' (distribution convnet-fixture-duplicate-name 0.0.1)",
    ),
    "not-attrs": (
        "plugin 'not_attrs' (distribution convnet-fixture-not-attrs 0.0.1) registered layer "
        "'plain_options_layer' with options",
        "which is not an attrs class",
    ),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """One folder per broken package (each also holding the good one), and one with all of them."""
    sites = {name: install([name, "good-extra"], tmp_path_factory.mktemp(name)) for name in BROKEN}
    sites["all"] = install([*BROKEN, "good-extra"], tmp_path_factory.mktemp("all"))
    return sites


def _fragments(name: str) -> tuple[str, ...]:
    value = BROKEN[name]
    return (value,) if isinstance(value, str) else value


def _load(folder: Path, monkeypatch, strict: bool = False):
    monkeypatch.syspath_prepend(str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _pm, regs = plugins.create_manager(strict=strict)
    return regs, [str(w.message) for w in caught if issubclass(w.category, plugins.PluginWarning)]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_plugin_is_named_and_the_rest_loads(name: str, site, registries, monkeypatch, ledger) -> None:
    regs, warned = _load(site[name], monkeypatch)
    assert len(regs.problems) == 1 and warned == regs.problems
    assert all(fragment in regs.problems[0] for fragment in _fragments(name)), regs.problems[0]
    for kind, registry in registries.items():  # every built-in still there, from convnet itself
        assert set(registry.names()) <= set(regs[kind].names()), kind
        for entry in registry:
            assert regs[kind].get(entry.name).distribution == entry.distribution
    assert "fixture_constant" in regs.dataset  # the good third-party plugin loaded
    assert "fixture_identity" not in regs.layer and "plain_options_layer" not in regs.layer  # nothing half-loaded
    with pytest.raises(PluginError) as info:
        _load(site[name], monkeypatch, strict=True)
    assert all(fragment in str(info.value) for fragment in _fragments(name))
    ledger.record(f"third-party plugin: {name}", "named with its distribution, the rest loaded, --strict failed")


def test_all_broken_plugins_at_once_through_the_cli(site, ledger) -> None:
    run_env = env()
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site["all"]), run_env.get("PYTHONPATH")]))
    proc = subprocess.run([*CONVNET, "plugins", "--json"], capture_output=True, text=True, env=run_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    assert len(listing["problems"]) == 3
    for name in BROKEN:
        assert any(all(f in p for f in _fragments(name)) for p in listing["problems"]), name
    names = {(r["kind"], r["name"]): r["distribution"] for r in listing["components"]}
    assert names[("dataset", "fixture_constant")] == "convnet-fixture-good-extra 0.0.1"
    assert names[("layer", "relu")].startswith("convnet ")
    strict = subprocess.run([*CONVNET, "--strict", "plugins"], capture_output=True, text=True, env=run_env, timeout=120)
    lines = strict.stderr.strip().splitlines()
    assert strict.returncode == 2 and len(lines) == 1 and lines[0].startswith("convnet: error: plugin ")
    assert "Traceback" not in strict.stderr
    ledger.record(
        "third-party plugins: all three broken at once (CLI)", "3 problems listed, the rest loaded, --strict exit 2"
    )


def _with(site_folder: Path) -> dict[str, str]:
    run_env = env()
    run_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site_folder), run_env.get("PYTHONPATH")]))
    return run_env


TINY = Path(__file__).parents[1] / "fixtures" / "recipes" / "tiny.toml"


@pytest.mark.parametrize(
    "command",
    [
        ["show", str(TINY)],
        ["summary", str(TINY)],
        ["recipes"],
        ["plugins"],
        ["run", str(TINY), "--set", "train.max_steps=1", "--quiet"],
    ],
)
def test_every_command_names_a_plugin_that_failed(command, site, tmp_path, ledger) -> None:
    extra = ["--out", str(tmp_path / "run")] if command[0] == "run" else []
    proc = subprocess.run(
        [*CONVNET, *command, *extra], capture_output=True, text=True, env=_with(site["all"]), timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("convnet: warning: ")]
    assert len(warned) == 3, proc.stderr
    for name in BROKEN:
        assert any(all(f in line for f in _fragments(name)) for line in warned), (name, warned)
    ledger.record(f"broken plugins seen by `convnet {command[0]}`", "each named on stderr, the command worked")


def test_a_component_of_a_failed_plugin_is_named_as_such(site, tmp_path) -> None:
    """Not 'did you mean': the plugin that would provide it failed, and the message says so."""
    dup = subprocess.run(
        [*CONVNET, "show", str(TINY), "--set", "model.layers[1].name=fixture_identity"],
        capture_output=True,
        text=True,
        env=_with(site["duplicate-name"]),
        timeout=120,
    )
    assert dup.returncode == 2
    error = dup.stderr.strip().splitlines()[-1]
    assert "layer 'fixture_identity' comes from plugin 'duplicate_name' (distribution " in error, error
    assert "which failed to load: layer 'relu' is registered twice" in error and "did you mean" not in error
    broken = subprocess.run(
        [*CONVNET, "show", str(TINY), "--set", "model.layers[1].name=elu"],
        capture_output=True,
        text=True,
        env=_with(site["raises-at-import"]),
        timeout=120,
    )
    error = broken.stderr.strip().splitlines()[-1]
    assert broken.returncode == 2 and "unknown layer 'elu'" in error and "did you mean" not in error, error
    assert "a plugin that failed to load may provide it: plugin 'raises_at_import'" in error, error


def _convnet(args: list[str], run_env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CONVNET, *args], capture_output=True, text=True, env=run_env, timeout=300)


def test_a_run_folder_names_its_plugins_and_eval_without_them_says_what_to_install(site, tmp_path, ledger) -> None:
    recipe = tmp_path / "constant.toml"
    recipe.write_text(TINY.read_text() + "\n")
    sets = ["--set", 'data.dataset={name = "fixture_constant", size = 16}', "--set", "train.max_steps=2"]
    out = tmp_path / "run"
    done = _convnet(["run", str(recipe), *sets, "--out", str(out), "--quiet"], _with(site["all"]))
    assert done.returncode == 0, done.stderr
    used = json.loads((out / "run.json").read_text())
    assert {
        "kind": "dataset",
        "name": "fixture_constant",
        "plugin": "good_extra",
        "distribution": "convnet-fixture-good-extra 0.0.1",
    } in used["components"]
    assert used["convnet_version"] and used["command"].startswith("convnet run ")
    checkpoint = str(out / "checkpoints" / "last.safetensors")
    for args in (
        ["eval", str(out / "recipe.toml"), "--checkpoint", checkpoint, "--out", str(tmp_path / "ev")],
        ["run", str(out / "recipe.toml"), "--out", str(out), "--resume", checkpoint],
    ):
        proc = _convnet(args, env())
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == (
            "convnet: error: dataset 'fixture_constant' came from the distribution "
            "convnet-fixture-good-extra 0.0.1 (plugin 'good_extra'), which is not installed here: "
            "pip install 'convnet-fixture-good-extra==0.0.1'"
        ), lines[0]
    ledger.record("eval / resume without the plugin a run used", "one line: the distribution and its pip install")
    two = tmp_path / "two"  # a recipe using two of its components: still one line, one install
    sets += ["--set", "model.layers[5].name=fixture_passthrough"]
    done = _convnet(["run", str(recipe), *sets, "--out", str(two), "--quiet"], _with(site["all"]))
    assert done.returncode == 0, done.stderr
    checkpoint = str(two / "checkpoints" / "last.safetensors")
    proc = _convnet(
        ["eval", str(two / "recipe.toml"), "--checkpoint", checkpoint, "--out", str(tmp_path / "ev2")], env()
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == (
        "convnet: error: components layer 'fixture_passthrough', dataset 'fixture_constant' came from the "
        "distribution convnet-fixture-good-extra 0.0.1 (plugin 'good_extra'), which is not installed here: "
        "pip install 'convnet-fixture-good-extra==0.0.1'"
    ), lines[0]


@pytest.mark.parametrize("where", ["hook", "dataset in a worker"])
def test_a_plugins_own_error_at_run_time_is_named_after_its_traceback(where, site, tmp_path, ledger) -> None:
    """A third party's bug is its author's to fix: the traceback stays (they need it), and the
    last line names the plugin and its distribution, not convnet."""
    sets = ["--set", "train.max_steps=3", "--set", "data.workers=2"]
    if where == "hook":
        sets += ["--set", 'data.dataset={name = "fixture_constant", size = 64}']
        run_env = dict(_with(site["all"]), CONVNET_FIXTURE_FAIL_AT_STEP="2")
    else:
        sets += ["--set", 'data.dataset={name = "fixture_constant", size = 64, fail_at = 5}']
        run_env = _with(site["all"])
    proc = subprocess.run(
        [*CONVNET, "run", str(TINY), *sets, "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=300,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert last.startswith("convnet: error: plugin 'good_extra' (distribution convnet-fixture-good-extra 0.0.1)"), (
        proc.stderr
    )
    expected = "the step_end hook fails at step 2" if where == "hook" else "sample 5 cannot be made"
    assert last.endswith(f"failed: RuntimeError: fixture: {expected}"), last
    if where == "hook":
        assert " at " in last and "convnet_fixture_good_extra" in last  # the file and line
    ledger.record(f"a plugin's bug at run time ({where})", "its traceback, then one line naming the plugin")
