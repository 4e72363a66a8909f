"""``convnet report RUN_FOLDER``: learning curves as PNG and an index.html for a run folder.

Reads ``metrics.jsonl`` (train records: loss and lr by step; eval records: errors by epoch),
``recipe.toml`` and ``eval.json``; writes ``plots/loss.png``, ``plots/lr.png``,
``plots/error.png`` and ``index.html``, which shows the recipe, the final metrics and every PNG
in the folder (the evaluators' images included). Plotting uses matplotlib's Agg canvas
directly, so it needs no display and never touches pyplot's global state.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from convnet.core.errors import ConvnetError


class ReportError(ConvnetError):
    """A run folder that cannot be reported on: names the file and the fault."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; one error naming the file and line for a bad line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text (is it a metrics.jsonl?)") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _steps_per_epoch(records: list[dict[str, Any]]) -> float | None:
    """From the eval records: steps done by the end of each epoch (epoch e ends at step s)."""
    for r in records:
        if r.get("kind") == "eval" and _number(r.get("step")) and _number(r.get("epoch")) is not None:
            return float(r["step"]) / (float(r["epoch"]) + 1)
    return None


def curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The series to plot: x in epochs (fractional for train steps) when known, else steps."""
    spe = _steps_per_epoch(records)
    unit = "epoch" if spe else "step"

    def x_of(r: dict[str, Any]) -> float | None:
        step = _number(r.get("step"))
        if step is None:
            return None
        return step / spe if spe else step

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out: dict[str, Any] = {"unit": unit, "loss": [], "lr": [], "errors": {}}
    for r in train:
        x = x_of(r)
        if x is None:
            continue
        if _number(r.get("loss")) is not None:
            out["loss"].append((x, float(r["loss"])))
        if _number(r.get("lr")) is not None:
            out["lr"].append((x, float(r["lr"])))
    for r in evals:
        x = (float(r["epoch"]) + 1) if spe and _number(r.get("epoch")) is not None else x_of(r)
        if x is None:
            continue
        if _number(r.get("lr")) is not None:  # the rate after the epoch's schedule step
            out["lr"].append((x, float(r["lr"])))
        for key, value in r.items():
            if key.endswith("_error") and _number(value) is not None:
                out["errors"].setdefault(key, []).append((x, float(value)))
    out["lr"].sort(key=lambda p: p[0])
    return out


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
          logy: bool = False, percent: bool = False, steps: bool = False) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in series.items():
        xs = [p[0] for p in points]
        ys = [p[1] * (100 if percent else 1) for p in points]
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label,
                drawstyle="steps-post" if steps else "default")
    if logy and all(p[1] > 0 for pts in series.values() for p in pts):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_curves(records: list[dict[str, Any]], plots: Path) -> list[Path]:
    """loss.png, lr.png and error.png (those that have data) under ``plots``."""
    c = curves(records)
    xlabel = c["unit"]
    made = []
    if c["loss"]:
        made.append(_plot(plots / "loss.png", "training loss", xlabel, "cross-entropy", {"loss": c["loss"]}))
    if c["lr"]:
        made.append(_plot(plots / "lr.png", "learning rate", xlabel, "lr", {"lr": c["lr"]}, logy=True,
                          steps=True))
    if c["errors"]:
        made.append(_plot(plots / "error.png", "validation error", xlabel, "error (%)", c["errors"], percent=True))
    return made


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, float) and key.endswith("_error"):
            shown = f"{value * 100:.2f} %"
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            shown = json.dumps(value)
        else:
            shown = str(value)
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(shown)}</td></tr>")
    return "<table>\n" + "\n".join(rows) + "\n</table>" if rows else "<p>(none)</p>"


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em} pre{background:#f4f4f4;padding:1em;"
         "overflow:auto;max-height:30em} table{border-collapse:collapse} th,td{border:1px solid #ccc;"
         "padding:.2em .6em;text-align:left} figure{display:inline-block;margin:1em} img{max-width:100%}")


def write_index(run: Path) -> Path:
    """index.html: recipe, final metrics, every PNG (relative links), other result files."""
    recipe_path, eval_path = run / "recipe.toml", run / "eval.json"
    recipe = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else "(no recipe.toml in this folder)"
    metrics: dict[str, Any] = {}
    if eval_path.is_file():
        try:
            loaded = json.loads(eval_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReportError(f"{eval_path}: not valid JSON ({exc})") from None
        metrics = loaded if isinstance(loaded, dict) else {"eval.json": loaded}
    pngs = sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png"))
    pngs.sort(key=lambda p: (not p.startswith("plots/"), p))
    jsons = sorted(p.relative_to(run).as_posix() for p in run.glob("*.json"))
    figures = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}">'
                        f"<figcaption>{html.escape(p)}</figcaption></figure>" for p in pngs)
    links = " ".join(f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in jsons)
    title = html.escape(run.name)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>convnet run {title}</title><style>{STYLE}</style></head>
<body>
<h1>convnet run {title}</h1>
<h2>Final metrics</h2>
{_metrics_table(metrics)}
<p>{links}</p>
<h2>Images</h2>
{figures or "<p>(no images)</p>"}
<h2>Recipe</h2>
<pre>{html.escape(recipe)}</pre>
</body></html>
"""
    path = run / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def render(run: str | Path) -> list[Path]:
    """Curves and index.html for a run folder; returns the files written."""
    run = Path(run)
    if not run.exists():
        raise ReportError(f"{run}: no such run folder")
    if not run.is_dir():
        raise ReportError(f"{run}: not a folder (give the run folder, which holds metrics.jsonl)")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{run}: no metrics.jsonl here; is this a run folder (convnet run --out DIR)?")
    made = plot_curves(read_metrics(metrics), run / "plots")
    made.append(write_index(run))
    return made
