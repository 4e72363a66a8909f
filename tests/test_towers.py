"""The Figure 3 experiment (`convnet towers`) and the ablations on another recipe's data
(`ablate --data`): their statistics on known inputs, and tiny real runs of both commands."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from convnet.core.cli import main as cli_main
from convnet.plugins.alexnet import towers
from convnet.plugins.alexnet.ablate import run_ablation
from convnet.plugins.evaluate.filters import colour_specificity as evaluators_specificity

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two photographs (the ones scikit-learn ships: no extra needed), few patches, one short epoch.
TINY = [
    'data.dataset.photos=["china", "flower"]',
    "model.num_classes=2",
    "data.dataset.train_per_photo=16",
    "data.dataset.val_per_photo=4",
    "data.batch_size=8",
    "train.epochs=1",
]


def test_colour_specificity_is_the_filters_evaluators() -> None:
    kernels = torch.randn(12, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    kernels[0] = kernels[0, :1]  # grey: 0
    assert torch.equal(towers.colour_specificity(kernels), evaluators_specificity(kernels))
    assert float(towers.colour_specificity(kernels)[0]) == 0.0


def test_a_split_as_in_the_paper_is_recognised_and_significant() -> None:
    grey = [0.05 + 0.01 * (i % 5) for i in range(16)]
    colour = [0.85 + 0.01 * (i % 5) for i in range(16)]
    split = towers.split_numbers(grey + colour)
    assert split["split_as_in_paper"] and split["separated"] and split["more_colour_specific"] == 1
    assert split["permutation_p"] == pytest.approx(1 / (1 + towers.PERMUTATIONS))  # no random split does as well
    assert split["groups"][0] == {"mean": pytest.approx(sum(grey) / 16), "agnostic_share": 1.0, "specific_share": 0.0}
    assert split["difference"] == pytest.approx(0.8)


def test_learned_says_how_far_the_kernels_moved() -> None:
    w = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    assert towers.learned(w, w) == pytest.approx({"norm_ratio": 1.0, "cosine_to_init": 1.0})
    assert towers.learned(w, -3 * w) == pytest.approx({"norm_ratio": 3.0, "cosine_to_init": -1.0})


def test_halves_that_differ_by_chance_are_not_separated() -> None:
    scores = torch.rand(64, generator=torch.Generator().manual_seed(1)).tolist()
    interleaved = towers.split_numbers(sorted(scores)[0::2] + sorted(scores)[1::2])
    assert not interleaved["separated"] and interleaved["permutation_p"] > 0.5
    assert not interleaved["split_as_in_paper"]


def test_convnet_towers_trains_both_arms_and_writes_the_report(tmp_path: Path, capsys) -> None:
    sets = [arg for o in TINY for arg in ("--set", o)]
    assert cli_main(["towers", "--out", str(tmp_path), "--seeds", "0", "1", *sets]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "towers.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["runs"]) == {"two-towers", "one-tower"}
    for arm, recipe in towers.ARMS:
        runs = result["runs"][arm]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["recipe"] == recipe for r in runs)
        assert all(len(r["kernels"]) == 64 and len(r["split"]["groups"]) == 2 for r in runs)
        saved = tomllib.loads((tmp_path / arm / "seed1" / "recipe.toml").read_text())
        assert saved["seed"] == 1 and saved["model"]["towers"] == (2 if arm == "two-towers" else 1)
    two = result["runs"]["two-towers"][0]
    filters = json.loads((tmp_path / "two-towers" / "seed0" / "filters_conv1.json").read_text())
    assert [g["mean"] for g in two["split"]["groups"]] == pytest.approx(filters["tower_colour_specificity"])
    # both arms start from the same conv1 kernels for a seed: the control differs in training only
    one = result["runs"]["one-tower"][0]
    assert one["split_at_init"] == two["split_at_init"]
    assert result["summary"]["two-towers"]["seeds"] == 2
    moved = [r["learned"] for arm in result["runs"].values() for r in arm]
    assert len(moved) == 4 and all(m["norm_ratio"] > 0 and -1 <= m["cosine_to_init"] < 1 for m in moved)
    assert "split as in the paper in" in printed and (tmp_path / "towers.txt").read_text() in printed + "\n"
    for picture in ("towers_filters.png", "towers_specificity.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --reuse reads the finished runs instead of training them again
    before = (tmp_path / "one-tower" / "seed0" / "metrics.jsonl").stat().st_mtime_ns
    assert cli_main(["towers", "--out", str(tmp_path), "--seeds", "0", "--reuse", *sets]) == 0
    assert (tmp_path / "one-tower" / "seed0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_ablation_arms_train_on_the_data_of_another_recipe(tmp_path: Path, registries) -> None:
    result = run_ablation("no-lrn", tmp_path, seeds=[0], overrides=TINY, registries=registries, data="ablation-photos")
    assert result["data"] == "ablation-photos"
    for arm in ("lrn", "no-lrn"):
        saved = tomllib.loads((tmp_path / arm / "seed0" / "recipe.toml").read_text())
        assert saved["data"]["dataset"]["name"] == "photos" and saved["data"]["dataset"]["patch"] == 26
        assert [a["name"] for a in saved["data"]["train_augment"]] == [
            "random-crop",
            "hflip",
            "pca-lighting",
            "mean-rgb",
        ]
        kinds = [layer["name"] for layer in saved["model"]["layers"]]
        assert kinds.count("lrn") == (2 if arm == "lrn" else 0)  # the arms still differ in their network
        assert result["arms"][arm]["runs"][0]["val_samples"] == 8
