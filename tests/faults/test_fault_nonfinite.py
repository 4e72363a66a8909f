"""A NaN/inf loss (forced by an absurd lr): stop naming the step, keep the last good checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from faultkit import TINY
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core import checkpoint as ckpt
from convnet.core import data as cdata
from convnet.core import plugins
from convnet.core.cli import main
from convnet.core.errors import NonFiniteLossError

ABSURD = ("train.optimizer.lr=1e10", "train.checkpoint_every=1")  # blows up in epoch 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, capsys, ledger
) -> None:
    out = tmp_path / "nan"
    code = main(["run", str(TINY), *_sets(*ABSURD), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    found = re.search(r"step (\d+) \(epoch (\d+)\): (loss is (nan|inf|-inf)|.*non-finite.*); stopped", err)
    assert found, err
    bad_step = int(found.group(1))
    last = out / "checkpoints" / "last.safetensors"
    assert f"the last good checkpoint {last} is untouched" in err
    # It holds exactly the step before, bit for bit what a run stopped there by max_steps holds.
    tensors, meta = ckpt.load(last)
    assert ckpt.state_of(meta, last)["step"] == bad_step - 1
    ref = tmp_path / "ref"
    cn.train(cn.load_recipe(TINY, [*ABSURD, f"train.max_steps={bad_step - 1}"]), out=ref)
    expected = load_file(str(ref / "checkpoints" / "last.safetensors"))
    for name, value in tensors.items():
        if name.startswith(("model/", "optimizer/")):
            assert torch.isfinite(value).all(), name
            assert value.numpy().tobytes() == expected[name].numpy().tobytes(), name
    # and it resumes: with a sane lr the run goes on from there
    code = main(
        ["run", str(TINY), *_sets(*ABSURD, "train.max_steps=8"), "--out", str(out), "--quiet", "--resume", str(last)]
    )
    assert code == 1 and f"step {bad_step} " in capsys.readouterr().err  # same data, same step: deterministic
    ledger.record(
        "NaN/inf loss (lr = 1e10), on_nonfinite = stop",
        f"stopped at step {bad_step} naming it, exit 1, last checkpoint = step before, bitwise",
    )


@pytest.fixture
def poisoned(tmp_path_factory, monkeypatch):
    """Registries that see the fixture plugin whose dataset has NaN training images."""
    from fixtures.plugin_install import install

    monkeypatch.syspath_prepend(str(install(["good-extra"], tmp_path_factory.mktemp("site"))))
    return plugins.create_manager()


POISON = ('data.dataset={name = "fixture_constant", size = 64, poison = [5, 40]}',)


def _poisoned_batches(recipe) -> list[int]:
    """Steps (1-based) whose batch holds a poisoned sample, from the engine's own batch order."""
    steps, step = [], 0
    for epoch in range(recipe.train.epochs):
        for batch in cdata.train_batches(64, recipe.data.batch_size, recipe.seed, epoch):
            step += 1
            if {5, 40} & set(batch):
                steps.append(step)
    return steps


def test_skip_batch_skips_and_counts(tmp_path: Path, poisoned, capsys, ledger) -> None:
    pm, regs = poisoned
    recipe = cn.load_recipe(TINY, [*POISON, "train.on_nonfinite=skip-batch"], regs)
    bad = _poisoned_batches(recipe)
    assert len(bad) == 6 or len(bad) == 5  # two poisoned samples an epoch, maybe in one batch
    summary = cn.Run(recipe, out=tmp_path, registries=regs, pm=pm).train()
    assert summary["step"] == 12 and summary["skipped_nonfinite"] == len(bad)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    nonfinite = [r["step"] for r in records if r["kind"] == "train" and not math.isfinite(r["loss"])]
    assert nonfinite == bad
    assert f"skipped {len(bad)} batch(es) whose loss was not finite" in capsys.readouterr().err
    tensors, _ = ckpt.load(tmp_path / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "optimizer/")))
    ledger.record(
        "NaN input batches, on_nonfinite = skip-batch",
        f"run completed, the {len(bad)} poisoned batches of 12 skipped and counted",
    )
    # the same data with the default policy stops at the first poisoned batch, naming it
    recipe = cn.load_recipe(TINY, [*POISON], regs)
    with pytest.raises(NonFiniteLossError, match=f"^step {bad[0]} .*loss is nan; stopped"):
        cn.Run(recipe, out=tmp_path / "stop", registries=regs, pm=pm).train()
    ledger.record("NaN input batches, on_nonfinite = stop", f"stopped at step {bad[0]} naming it")


def test_skip_batch_cannot_skip_an_update_that_overflows(tmp_path: Path, capsys, ledger) -> None:
    code = main(["run", str(TINY), *_sets(*ABSURD, "train.on_nonfinite=skip-batch"), "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "the update made weights non-finite" in err and "is untouched" in err
    tensors, _ = ckpt.load(tmp_path / "checkpoints" / "last.safetensors")
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("model/", "optimizer/")))
    ledger.record(
        "weights overflow (lr = 1e10), on_nonfinite = skip-batch", "stopped naming the step; last checkpoint finite"
    )
