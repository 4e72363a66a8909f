"""The bundled default recipe's data and a short run of it that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import convnet.core as cn
from convnet.core import data as cdata
from convnet.core.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_digits_split_is_real_fixed_and_disjoint(registries) -> None:
    recipe = cn.load_recipe("alexnet-digits", ["model.input=[3,16,16]"], registries)
    a = cdata.build_dataset(recipe, registries)
    b = cdata.build_dataset(recipe, registries)
    assert (len(a.train), len(a.val), a.num_classes) == (1438, 359, 10)
    image, label = a.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and 0 <= label < 10
    assert all(torch.equal(a.val[i][0], b.val[i][0]) for i in range(0, 359, 37))
    train = {a.train[i][0].numpy().tobytes() for i in range(len(a.train))}
    assert not any(a.val[i][0].numpy().tobytes() in train for i in range(len(a.val)))
    labels = torch.tensor([a.val[i][1] for i in range(len(a.val))])
    assert torch.bincount(labels, minlength=10).min() >= 20  # every digit is in the validation set


def test_digits_needs_grey_or_rgb_input(registries) -> None:
    recipe = cn.load_recipe("alexnet-digits", ["model.input=[2,16,16]"], registries, validate_model=False)
    with pytest.raises(RecipeError, match="data.dataset: .*1 or 3 channels"):
        cdata.build_dataset(recipe, registries)


def test_a_short_digits_run_learns(tmp_path: Path) -> None:
    """Three epochs of the default recipe at 16x16: validation error far below chance (90 %)."""
    recipe = cn.load_recipe("alexnet-digits", ["train.epochs=3", "model.input=[3,16,16]"])
    summary = cn.train(recipe, out=tmp_path)
    assert summary["epoch"] == 3 and summary["step"] == 3 * (1438 // 64)
    assert summary["top1_error"] < 0.35, summary
    assert summary["top5_error"] < 0.10, summary
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < 0.6 * losses[0] and losses[0] == pytest.approx(2.3026, abs=0.5)  # starts at ln 10
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert json.loads((tmp_path / "eval.json").read_text())["top1_error"] == summary["top1_error"]
