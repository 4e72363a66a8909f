"""`convnet report` and the end-of-run report (issue 7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from convnet.core.cli import main
from convnet.core.hookspecs import hookimpl
from convnet.core.recipe import load_recipe
from convnet.core.report import ReportError, curves, render
from convnet.core.run_folder import write_run_json


def write_metrics(folder, records) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


RECORDS = [
    {"kind": "train", "step": 1, "epoch": 0, "loss": 2.3, "lr": 0.01},
    {"kind": "train", "step": 10, "epoch": 0, "loss": 1.9, "lr": 0.01},
    {"kind": "eval", "epoch": 0, "step": 10, "lr": 0.01, "top1_error": 0.6, "top5_error": 0.2},
    {"kind": "train", "step": 20, "epoch": 1, "loss": 1.2, "lr": 0.001},
    {"kind": "eval", "epoch": 1, "step": 20, "lr": 0.001, "top1_error": 0.3, "top5_error": 0.05},
    {"kind": "final", "epoch": 2, "step": 20, "top1_error": 0.3},
]


def test_curves_are_in_epochs():
    c = curves(RECORDS)
    assert c["unit"] == "epoch"
    assert c["loss"] == [(0.1, 2.3), (1.0, 1.9), (2.0, 1.2)]
    assert c["errors"]["top1_error"] == [(1.0, 0.6), (2.0, 0.3)]
    assert c["lr"] == [(0.1, 0.01), (1.0, 0.01), (1.0, 0.01), (2.0, 0.001), (2.0, 0.001)]
    no_eval = curves([r for r in RECORDS if r["kind"] == "train"])
    assert no_eval["unit"] == "step" and no_eval["loss"][0] == (1.0, 2.3)


def test_a_run_stopped_mid_epoch_plots_its_final_evaluation_where_it_stopped():
    """A max_steps stop at step 25 (2.5 epochs): its final numbers are the network's last, not
    the last epoch's evaluation repeated."""
    mid_epoch = [*RECORDS[:5], {"kind": "final", "epoch": 2, "step": 25, "top1_error": 0.25, "tencrop_error": 0.2}]
    c = curves(mid_epoch)
    assert c["errors"]["top1_error"] == [(1.0, 0.6), (2.0, 0.3), (2.5, 0.25)]
    assert c["errors"]["tencrop_error"] == [(2.5, 0.2)]


def test_report_makes_pngs_and_an_index(tmp_path, capsys):
    from PIL import Image

    run = tmp_path / "run"
    write_metrics(run, RECORDS)
    (run / "recipe.toml").write_text('name = "x<y"\n[model]\ninput = [3, 32, 32]\n', encoding="utf-8")
    (run / "eval.json").write_text(json.dumps({"top1_error": 0.3, "most_confused": ["4->6: 19"]}), encoding="utf-8")
    Image.new("RGB", (10, 6), (255, 0, 0)).save(run / "filters_conv1.png")
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("loss", "lr", "error"):
        path = run / "plots" / f"{name}.png"
        assert str(path) in printed
        with Image.open(path) as im:
            assert im.size == (640, 400)
            colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
            assert len(colours) > 10  # something was drawn
    page = (run / "index.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == ["plots/error.png", "plots/loss.png", "plots/lr.png", "filters_conv1.png"]
    assert "x&lt;y" in page and "30.00 %" in page and "4-&gt;6: 19" in page
    assert '<a href="eval.json">' in page


def test_report_bad_inputs(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    run = tmp_path / "bad"
    write_metrics(run, RECORDS[:2])
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": \n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:3: not a JSON object"):
        render(run)
    (run / "metrics.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ReportError, match=r"metrics.jsonl:1: expected a JSON object, found list"):
        render(run)


def test_a_last_line_cut_short_is_left_out_and_an_unwritable_folder_is_one_line(tmp_path, capsys):
    """A kill or a full disk mid-write leaves a last line without its newline: the runs a user
    most needs to look at still get their curves."""
    run = tmp_path / "killed"
    write_metrics(run, RECORDS[:3])
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "step": 1')
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}:4: the last line is cut short; left out" in err
    assert (run / "plots" / "loss.png").is_file()
    full = tmp_path / "full"
    write_metrics(full, RECORDS)
    (full / "plots").write_text("not a folder", encoding="utf-8")  # as a read-only or full disk would
    assert main(["report", str(full)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{full}: cannot write the report (" in err[0] and "writable" in err[0]


def test_all_evaluators_on_the_digits_recipe_and_the_end_of_run_report(tmp_path, capsys):
    """`convnet run alexnet-digits-eval` (3 steps, 16x16 digits): every evaluator runs, the report follows."""
    from PIL import Image

    run = tmp_path / "run"
    sets = [
        "train.max_steps=3",
        "model.input=[3, 16, 16]",
        "data.dataset.val_fraction=0.05",
        "evaluate[3].train_limit=256",
    ]
    argv = ["run", "alexnet-digits-eval", "--out", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    final = json.loads((run / "eval.json").read_text())
    for key in (
        "top1_error",
        "centre_top1_error",
        "tencrop_top1_error",
        "ensemble_top1_error",
        "filters_conv1_colour_specificity",
        "neighbours_label_agreement",
        "most_confused",
    ):
        assert key in final
    assert final["centre_top1_error"] == final["top1_error"]  # ten-crop's centre view is the plain image
    for name in ("plots/loss.png", "plots/lr.png", "filters_conv1.png", "neighbours.png"):
        with Image.open(run / name) as im:
            assert im.size[0] > 100
    page = (run / "index.html").read_text(encoding="utf-8")
    assert "filters_conv1.png" in page and "neighbours.png" in page and "tencrop_top1_error" in page
    neighbours = json.loads((run / "neighbours.json").read_text())
    assert neighbours["train_images"] == 256 and len(neighbours["queries"]) == 8
    assert len(json.loads((run / "confusion.json").read_text())["pairs"]) <= 10


def test_a_failing_report_does_not_lose_the_run(tmp_path, capsys, monkeypatch):
    """A plotting error is a warning: training, checkpoints and eval.json are kept."""
    from convnet.core import report
    from convnet.core.engine import train
    from convnet.core.recipe import load_recipe

    def broken(run):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(report, "render", broken)
    recipe = load_recipe(
        "alexnet-digits", ["train.max_steps=2", "model.input=[3, 16, 16]", "data.dataset.val_fraction=0.1"]
    )
    summary = train(recipe, out=tmp_path / "run")
    assert summary["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()
    assert (tmp_path / "run" / "eval.json").is_file()
    assert "the report for" in capsys.readouterr().err


# ------------------------------------------------------------------ issue 17: a live, complete report

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


def test_every_scalar_of_every_evaluator_is_plotted(tmp_path):
    from convnet.core.report import figure, plot_curves

    records = [
        {"kind": "train", "step": 5, "epoch": 0, "loss": 2.0, "lr": 0.1},
        {
            "kind": "eval",
            "epoch": 0,
            "step": 10,
            "lr": 0.1,
            "skipped_samples": 0,
            "samples": 50,
            "top1_error": 0.5,
            "my_plugin_score": 0.25,
            "my_list": [1, 2],
        },
        {
            "kind": "eval",
            "epoch": 1,
            "step": 20,
            "lr": 0.1,
            "skipped_samples": 2,
            "samples": 48,
            "top1_error": 0.4,
            "my_plugin_score": 0.5,
        },
        {
            "kind": "final",
            "epoch": 2,
            "step": 20,
            "top1_error": 0.4,
            "tencrop_top1_error": 0.35,
            "neighbours_label_agreement": 0.75,
            "skipped_nonfinite": 0,
        },
    ]
    c = curves(records)
    assert c["metrics"]["error"] == {"top1_error": [(1.0, 0.5), (2.0, 0.4)], "tencrop_top1_error": [(2.0, 0.35)]}
    assert c["metrics"]["my_plugin_score"] == {"my_plugin_score": [(1.0, 0.25), (2.0, 0.5)]}
    assert c["metrics"]["neighbours_label_agreement"] == {"neighbours_label_agreement": [(2.0, 0.75)]}
    assert set(c["metrics"]["samples"]) == {"samples", "skipped_samples", "skipped_nonfinite"}
    assert "my_list" not in str(c["metrics"])
    made = {p.name for p in plot_curves(records, tmp_path / "plots")}
    assert made == {
        "loss.png",
        "lr.png",
        "error.png",
        "samples.png",
        "my_plugin_score.png",
        "neighbours_label_agreement.png",
    }
    fig = figure("validation error", "epoch", "error (%)", {"top1_error": [(1.0, 0.5)]}, percent=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["top1_error"]  # a legend for one series
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("epoch", "error (%)", "validation error")
    assert not list((tmp_path / "plots").glob(".*"))  # written through temp files, none left behind


def test_index_shows_the_run_its_versions_and_skip_counts(tmp_path, registries):
    run = tmp_path / "run"
    write_metrics(run, [*RECORDS[:3], {**RECORDS[4], "skipped_samples": 3}])
    page = render(run) and (run / "index.html").read_text(encoding="utf-8")
    assert "<tr><th>command</th><td>unknown</td></tr>" in page and "Latest evaluation (epoch 2)" in page
    assert "skipped_samples (sum over epochs)</th><td>3</td>" in page and "running" in page
    # run.json as the engine writes it (its components name the distributions that supplied them)
    info = write_run_json(run, load_recipe("alexnet-digits"), registries, "convnet run alexnet-digits")
    components = [*info["components"], {"kind": "layer", "name": "swish", "distribution": "convnet-swish 1.2"}]
    info |= {
        "command": "convnet run alexnet-digits --set train.epochs=2",
        "started": "2026-11-29T10:00:00+00:00",
        "convnet_version": "0.1.0",
        "components": components,
    }
    (run / "run.json").write_text(json.dumps(info))
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(RECORDS[5]) + "\n")
    (run / "eval.json").write_text(json.dumps({"top1_error": 0.3}))
    render(run)
    page = (run / "index.html").read_text(encoding="utf-8")
    for shown in (
        "convnet run alexnet-digits --set train.epochs=2",
        "2026-11-29",
        "0.1.0",
        "convnet-swish 1.2",
        info["components"][0]["distribution"],  # the built-in components' (convnet's own)
        "Final metrics",
        "finished",
        '<a href="metrics.jsonl">',
        '<a href="eval.json">',
        '<a href="run.json">',
    ):
        assert shown in page, shown


class _ReadsTheReport:
    """At each epoch's end, what the run folder's report says (a hook plugin)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bool, str]] = []

    @hookimpl
    def convnet_epoch_end(self, run, epoch, metrics) -> None:
        index = run.out / "index.html"
        page = index.read_text(encoding="utf-8") if index.is_file() else ""
        self.seen.append((epoch, (run.out / "plots" / "error.png").is_file(), page))


def test_the_report_is_written_during_the_run(tmp_path):
    from convnet.core import plugins
    from convnet.core.engine import Run
    from convnet.core.recipe import load_recipe

    pm, regs = plugins.create_manager()
    reader = _ReadsTheReport()
    pm.register(reader)
    recipe = load_recipe(str(TINY), ["train.epochs=2", 'evaluate=[{name = "topk", k = [1]}]'], regs)
    Run(recipe, out=tmp_path / "run", registries=regs, pm=pm, quiet=True).train()
    epoch, has_plot, page = reader.seen[0]
    assert epoch == 0 and has_plot and "Latest evaluation (epoch 1)" in page and "top1_error" in page
    final = (tmp_path / "run" / "index.html").read_text(encoding="utf-8")
    assert "Final metrics" in final


def test_the_epoch_line_shows_every_number_of_the_evaluation():
    from convnet.plugins.log import _fmt

    line = _fmt(
        {
            "kind": "eval",
            "epoch": 0,
            "step": 10,
            "lr": 0.01,
            "skipped_samples": 0,
            "top1_error": 0.5,
            "my_plugin_score": 0.125,
            "confusion": ["4->6"],
            "flag": True,
        }
    )
    assert line == "skipped_samples=0 top1_error=0.5 my_plugin_score=0.125 lr=0.01"


def test_read_metrics_is_public_and_takes_a_path_as_text(tmp_path):
    import convnet.core as cn

    write_metrics(tmp_path, RECORDS)
    assert cn.read_metrics(str(tmp_path / "metrics.jsonl")) == RECORDS
