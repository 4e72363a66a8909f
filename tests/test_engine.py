"""The train loop: determinism under the seed, max_steps, evaluation each epoch, the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core.engine import Run

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(out: Path) -> dict[str, bytes]:
    return {
        k: v.numpy().tobytes()
        for k, v in load_file(str(out / "checkpoints" / "last.safetensors")).items()
        if k.startswith("model/")
    }


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cn.train(cn.load_recipe(TINY, ["train.max_steps=5", f"seed={seed}"]), out=tmp_path / name)
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert _weights(tmp_path / "a") != _weights(tmp_path / "c")
    assert [r["loss"] for r in _records(tmp_path / "a") if r["kind"] == "train"] == [
        r["loss"] for r in _records(tmp_path / "b") if r["kind"] == "train"
    ]


def test_epochs_evaluations_and_the_plateau_schedule(tmp_path: Path) -> None:
    """tiny.toml's plateau (patience 0, threshold 1.0): after the first epoch sets the baseline, no
    epoch counts as an improvement, so lr / 10 at the end of every later epoch."""
    summary = cn.train(cn.load_recipe(TINY), out=tmp_path)
    assert (summary["epoch"], summary["step"]) == (3, 12)
    records = _records(tmp_path)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and [r["step"] for r in evals] == [4, 8, 12]
    assert [r["lr"] for r in evals] == pytest.approx([0.05, 0.005, 0.0005])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["lr"] for r in train] == pytest.approx([0.05] * 8 + [0.005] * 4)
    assert records[-1]["kind"] == "final" and 0 <= records[-1]["top1_error"] <= 1
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()


def test_max_steps_stops_inside_an_epoch(tmp_path: Path) -> None:
    summary = cn.train(cn.load_recipe(TINY, ["train.max_steps=6"]), out=tmp_path)
    assert (summary["step"], summary["epoch"]) == (6, 1)
    records = _records(tmp_path)
    assert max(r["step"] for r in records if r["kind"] == "train") == 6
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [0]


@attrs.define
class _FigureOptions:
    file: str = "figure.json"


class _WritesAFigure(cn.Evaluator):
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, ctx: cn.EvalContext) -> dict:
        if ctx.out is not None and self.name:
            (ctx.out / self.name).write_text("{}", encoding="utf-8")
        return {}


def test_overwrite_replaces_an_evaluators_files_and_keeps_what_was_there_before_the_run(tmp_path: Path, capsys) -> None:
    """An evaluator's file is the run's too: a fresh start names it, --overwrite replaces it (so
    the new run's report cannot show it as its own); a file the user kept there stays."""
    from convnet.core import plugins

    pm, regs = plugins.create_manager()
    regs.current_plugin = ("test-figure", "tests")
    regs.evaluator.add("figure", lambda o, recipe: _WritesAFigure(o.file), _FigureOptions, "writes a file")
    pm.register(_HookFolderAndAUser(), "test-hook-folder")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")

    def run(name: str, overwrite: bool = False) -> None:
        sets = ["train.max_steps=2", f"evaluate=[{{name='figure', file='{name}'}}]"]
        recipe = cn.load_recipe(str(TINY), sets, registries=regs)
        Run(recipe, out=out, registries=regs, pm=pm, quiet=True, overwrite=overwrite).train()

    run("figure.json")
    noted = (out / ".outputs").read_text(encoding="utf-8").splitlines()
    assert {"figure.json", "hook-folder"} <= set(noted)
    assert not {"notes.txt", "user-during-run.txt"} & set(noted)  # there before, or a user's meanwhile
    assert (out / "user-during-run.txt").is_file()
    with pytest.raises(cn.RecipeError, match=r"already holds a run \(.*figure\.json"):
        run("")
    run("", overwrite=True)
    assert f"replacing {out / 'figure.json'}" in capsys.readouterr().err
    assert not (out / "figure.json").exists() and (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert (out / "user-during-run.txt").read_text(encoding="utf-8") == "mine too"


class _HookFolderAndAUser:
    """A plugin whose train-start hook makes a folder (the run's), and, standing for a user who
    saves a file into the run folder while it trains, a torch forward hook that writes one
    outside any plugin call (not the run's)."""

    @cn.hookimpl
    def convnet_train_start(self, run) -> None:
        (run.out / "hook-folder").mkdir(exist_ok=True)
        out = run.out

        def user_writes(module, args, output) -> None:
            (out / "user-during-run.txt").write_text("mine too", encoding="utf-8")

        self.handle = torch.nn.modules.module.register_module_forward_hook(user_writes)

    @cn.hookimpl
    def convnet_train_end(self, run, summary) -> None:
        self.handle.remove()


def test_an_overwrite_whose_resume_is_refused_keeps_the_old_run(tmp_path: Path) -> None:
    """--overwrite replaces the folder's run only once the new run was built and its checkpoint
    restored: a checkpoint from another recipe is refused and the old run is left as it was."""
    old, other = tmp_path / "old", tmp_path / "other"
    cn.train(cn.load_recipe(TINY, ["train.max_steps=2"]), out=old)
    cn.train(cn.load_recipe(TINY, ["train.max_steps=2", "train.optimizer.lr=0.02"]), out=other)
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
    resumed = Run(
        cn.load_recipe(TINY, ["train.max_steps=4"]),
        out=old,
        resume=other / "checkpoints" / "last.safetensors",
        quiet=True,
        overwrite=True,
    )
    with pytest.raises(cn.ConvnetError, match="train.optimizer.lr"):
        resumed.train()
    after = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    # and a crop that does not give model.input is found before anything is replaced
    cropped = cn.load_recipe(TINY, ["train.max_steps=4", "data.train_augment=[{name='center-crop', size=6}]"])
    with pytest.raises(cn.RecipeError, match=r"give \[3, 6, 6\] images but model.input is \[3, 8, 8\]"):
        Run(cropped, out=old, quiet=True, overwrite=True).train()
    after = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_a_folder_holding_a_runs_names_but_no_run_is_never_replaced(tmp_path: Path) -> None:
    """A user's own plots/ is not a run's: refused with or without --overwrite, left as it was."""
    out = tmp_path / "mine"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "figure1.png").write_bytes(b"not a run's")
    for overwrite in (False, True):
        with pytest.raises(cn.RecipeError, match=r"mine: holds plots, which a run writes, but no run"):
            Run(cn.load_recipe(TINY, ["train.max_steps=1"]), out=out, quiet=True, overwrite=overwrite).train()
    assert (out / "plots" / "figure1.png").read_bytes() == b"not a run's"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["plots"]
    afile = tmp_path / "afile"
    afile.write_text("mine", encoding="utf-8")
    with pytest.raises(cn.RecipeError, match=r"afile: --out is a file, not a folder"):
        Run(cn.load_recipe(TINY, ["train.max_steps=1"]), out=afile, quiet=True).train()
    assert afile.read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("split", ["train", "eval"])
def test_images_not_of_model_input_shape_stop_as_a_recipe_error(tmp_path: Path, split: str) -> None:
    """A crop that does not give model.input is named with the recipe paths, not found as a shape
    error inside a layer."""
    crop = f"data.{split}_augment=[{{name='center-crop', size=6}}]"
    with pytest.raises(
        cn.RecipeError,
        match=rf"data.dataset and data.{split}_augment give \[3, 6, 6\] images but model.input is \[3, 8, 8\]",
    ):
        cn.train(cn.load_recipe(TINY, ["train.max_steps=1", crop]), out=tmp_path / split)
