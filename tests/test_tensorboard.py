"""The tensorboard plugin: a real run's event files, read back with TensorBoard's own reader,
hold exactly the numbers metrics.jsonl holds; without tensorboard the plugin is silent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import convnet.core as cn
from convnet.plugins.tensorboard.hooks import ENGINE_KEYS  # what the engine adds to an evaluation's record

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("tb")
    # 4 steps an epoch: two epoch evaluations, then a stop mid-epoch and the final evaluation.
    recipe = cn.load_recipe(str(TINY), overrides=["train.epochs=3", "train.max_steps=10", "train.log_every=3"])
    cn.train(recipe, out=out)
    return out


@pytest.fixture(scope="module")
def events(run_folder) -> EventAccumulator:
    acc = EventAccumulator(str(run_folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _records(run_folder: Path) -> list[dict]:
    return [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]


def _series(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_loss_and_lr_at_every_logged_step(run_folder, events) -> None:
    train = [r for r in _records(run_folder) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 3, 6, 9]
    for key in ("loss", "lr"):
        # Event files store float32: compare at its precision.
        assert _series(events, f"train/{key}") == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train]


def test_every_evaluation_number_per_epoch_and_final(run_folder, events) -> None:
    records = _records(run_folder)
    for kind, prefix in (("eval", "eval"), ("final", "final")):
        chosen = [r for r in records if r["kind"] == kind]
        assert chosen, kind
        names = {k for r in chosen for k, v in r.items() if k not in ENGINE_KEYS and isinstance(v, int | float)}
        assert {"top1_error", "samples"} <= names
        for name in names:
            expected = [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in chosen]
            assert _series(events, f"{prefix}/{name}") == expected, name
    evaluation_tags = {t for t in events.Tags()["scalars"] if t.startswith(("eval/", "final/"))}
    assert not {t for t in evaluation_tags if t.split("/")[1] in ENGINE_KEYS}
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]


def test_first_convolution_filters_as_an_image(run_folder, events) -> None:
    images = events.Images("filters/conv1")
    evaluation_steps = [r["step"] for r in _records(run_folder) if r["kind"] in ("eval", "final")]
    assert [i.step for i in images] == evaluation_steps
    # tiny's conv1: 8 kernels of 3x3, magnified to 24x24 with 2-pixel gaps, 8 to a row.
    assert (images[-1].height, images[-1].width) == (2 + 24 + 2, 2 + 8 * (24 + 2))


@pytest.mark.parametrize("first_end", [4, 6])
def test_after_a_resume_the_events_hold_what_metrics_jsonl_holds(tmp_path, one_torch_thread, first_end) -> None:
    """A run that ended at step 4 (an epoch's end) or 6 (mid-epoch), continued to step 10: its
    end is no longer an end (metrics.jsonl drops it), and the events drop it too; what
    metrics.jsonl keeps of that step (the train record of 6, the evaluation of epoch 1 at 4 and
    its filter image) is in the events once."""
    sets = ["train.epochs=3", "train.log_every=3"]
    cn.train(cn.load_recipe(str(TINY), [*sets, f"train.max_steps={first_end}"]), out=tmp_path)
    last = tmp_path / "checkpoints" / "last.safetensors"
    cn.train(cn.load_recipe(str(TINY), [*sets, "train.max_steps=10"]), out=tmp_path, resume=last)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = _records(tmp_path)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 3, 6, 9]
    assert _series(acc, "train/loss") == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    for kind in ("eval", "final"):
        chosen = [r for r in records if r["kind"] == kind]
        expected = [(r["step"], pytest.approx(r["top1_error"], rel=1e-6)) for r in chosen]
        assert _series(acc, f"{kind}/top1_error") == expected, kind
    assert [r["step"] for r in records if r["kind"] in ("eval", "final")] == [4, 8, 10]
    assert [i.step for i in acc.Images("filters/conv1")] == [4, 8, 10]


def test_a_fresh_run_drops_old_events_and_keeps_the_users_files(tmp_path, run_folder, one_torch_thread) -> None:
    """tensorboard/ in a folder that holds no run: another run's event files go (they would mix
    with this run's curves), a file of the user's stays."""
    import shutil

    board = tmp_path / "tensorboard"
    board.mkdir()
    (board / "notes.txt").write_text("mine", encoding="utf-8")
    stale = next((run_folder / "tensorboard").glob("events.out.tfevents.*"))
    shutil.copy(stale, board / stale.name)
    cn.train(cn.load_recipe(str(TINY), ["train.max_steps=2", "train.log_every=1"]), out=tmp_path)
    assert (board / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert not (board / stale.name).exists()
    acc = EventAccumulator(str(board), size_guidance={"scalars": 0})
    acc.Reload()
    assert [step for step, _ in _series(acc, "train/loss")] == [1, 2]


def test_without_tensorboard_the_plugin_registers_nothing_and_says_nothing() -> None:
    code = (
        "import sys, warnings\n"
        "sys.modules['tensorboard'] = None  # as if not installed: imports of it fail, find_spec says None\n"
        "warnings.simplefilter('error')\n"
        "from convnet.core import plugins\n"
        "pm, registries = plugins.create_manager(strict=True)\n"
        "module = pm.get_plugin('tensorboard')\n"
        "assert module is not None, pm.list_name_plugin()\n"
        "print(sorted(i.plugin_name for i in pm.hook.convnet_step_end.get_hookimpls()))\n"
        "print(registries.problems)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    step_end_plugins, problems = proc.stdout.splitlines()
    assert "tensorboard" not in step_end_plugins
    assert problems == "[]"
    assert proc.stderr == ""
