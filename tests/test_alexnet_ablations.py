"""The ablation recipes differ from their baseline in exactly the ablated part; the runner writes its comparison."""

from __future__ import annotations

import json

import pytest

from convnet.core.model import build_model, describe
from convnet.core.recipe import load_recipe
from convnet.plugins.alexnet.ablate import ABLATIONS, compare, epochs_to, main, run_ablation, summarise_arm


def layers(name, registries):
    recipe = load_recipe(name, registries=registries)
    return recipe, describe(build_model(recipe, device="meta", registries=registries))


def kinds(rows):
    return [r["layer"] for r in rows]


def test_each_variant_changes_only_its_ablated_part(registries):
    base, rows = layers("ablation-digits", registries)
    assert base.data.dataset.name == "digits" and base.model.towers == 2
    assert kinds(rows).count("lrn") == 2 and kinds(rows).count("dropout") == 2 and "tanh" not in kinds(rows)

    _, tanh = layers("ablation-tanh", registries)
    assert [k.replace("tanh", "relu") for k in kinds(tanh)] == kinds(rows) and "relu" not in kinds(tanh)

    _, no_lrn = layers("ablation-no-lrn", registries)
    assert kinds(no_lrn) == [k for k in kinds(rows) if k != "lrn"]

    _, no_drop = layers("ablation-no-dropout", registries)
    assert kinds(no_drop) == [k for k in kinds(rows) if k != "dropout"]

    _, pool2 = layers("ablation-no-overlap-pool", registries)
    base_pools = [r["out_shape"] for r in rows if r["layer"] == "maxpool"]
    assert [r["out_shape"] for r in pool2 if r["layer"] == "maxpool"] == base_pools  # same sizes, as 55 -> 27
    assert sum(r["params"] for r in pool2) == sum(r["params"] for r in rows)

    one, halved = layers("ablation-1tower", registries)
    assert one.model.towers == 1
    widths = {r["id"]: r["out_shape"][0] for r in rows if r["layer"] == "conv"}
    assert {r["id"]: r["out_shape"][0] for r in halved if r["layer"] == "conv"} == {
        k: (v if k == "conv5" else v // 2) for k, v in widths.items()
    }


@pytest.mark.parametrize(
    "name", sorted({recipe for ab in ABLATIONS.values() for _, recipe in ab.arms} - {"ablation-digits"})
)
def test_each_ablation_edits_the_baseline_by_id_instead_of_copying_it(name):
    """The ablated part is all an ablation recipe says: its layers are edits of the baseline's."""
    import tomllib

    from convnet.core.recipe import locate

    text, _, _ = locate(name)
    raw = tomllib.loads(text)
    assert raw["extends"] == "ablation-digits"
    assert isinstance(raw["model"]["layers"], dict) and len(raw["model"]["layers"]) <= 7
    assert len(text.splitlines()) <= 15


def test_epochs_to_threshold():
    evals = [
        {"epoch": 0, "train_top1_error": 0.6},
        {"epoch": 1, "train_top1_error": 0.26},
        {"epoch": 2, "train_top1_error": 0.25},
    ]
    assert epochs_to(evals, "train_top1_error", 0.25) == 3
    assert epochs_to(evals[:2], "train_top1_error", 0.25) is None


def test_relu_vs_tanh_comparison_reports_the_speedup():
    ab = ABLATIONS["relu-vs-tanh"]
    runs = {"relu": (2, 0.1), "tanh": (6, 0.2)}
    arms = {
        arm: summarise_arm([{"epochs_to_25pct_train_error": epochs, "val_top1_error": error, "val_samples": 100}], 0.25)
        for arm, (epochs, error) in runs.items()
    }
    diff, line = compare(ab, arms)
    assert diff["speedup"] == 3.0 and "after 2 epoch(s) with relu" in line and "(3.00x)" in line
    assert "six times faster" in line


def test_runner_trains_both_arms_and_writes_the_comparison(tmp_path, registries):
    out = tmp_path / "no-lrn"
    quick = ["train.max_steps=2", "data.eval_batch_size=512", 'evaluate=[{name = "topk", k = [1, 5]}]']
    result = run_ablation("no-lrn", out, overrides=quick, registries=registries)
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["line"] == (out / "comparison.txt").read_text().strip() == result["line"]
    a, b = saved["arms"]["lrn"], saved["arms"]["no-lrn"]
    assert a["recipe"] == "ablation-digits" and b["recipe"] == "ablation-no-lrn"
    assert (out / "lrn" / "seed0" / "metrics.jsonl").exists() and (out / "no-lrn" / "seed0" / "eval.json").exists()
    change = round(100 * (a["val_top1_error"] - b["val_top1_error"]), 2)
    assert saved["comparison"]["top1_change_points"] == change
    cache: dict = {}
    again = run_ablation("no-lrn", out, overrides=quick, registries=registries, reuse=True, cache=cache)
    assert again["line"] == saved["line"] and again["arms"]["lrn"]["runs"][0]["seconds"] is None
    # `all --reuse`: the baseline read for one ablation is every other's first arm, not trained again
    pool = run_ablation(
        "no-overlap-pool", tmp_path / "pool", overrides=quick, registries=registries, reuse=True, cache=cache
    )
    assert pool["arms"]["overlap-3x3s2"]["runs"] == again["arms"]["lrn"]["runs"]
    assert not (tmp_path / "pool" / "overlap-3x3s2").exists()
    (out / "comparison.txt").write_text("stale\n")
    assert main(["no-lrn", "--out", str(out), "--recompare"]) == 0
    assert (out / "comparison.txt").read_text().strip() == saved["line"]
    assert "paper: response normalisation reduces top-1" in saved["line"]


def test_unknown_ablation_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["no-such-thing"])
    assert "invalid choice" in capsys.readouterr().err


def test_recompare_without_a_comparison_names_the_file(tmp_path, capsys):
    assert main(["no-lrn", "--out", str(tmp_path), "--recompare"]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"ablate: error: {tmp_path / 'comparison.json'}: not found; train the arms first (without --recompare)\n"
    )
