"""``convnet report RUN_FOLDER``: learning curves as PNG and an index.html for a run folder.

Reads ``metrics.jsonl`` (train records: loss and lr by step; eval and final records: every
evaluator's numbers), ``recipe.toml``, ``eval.json`` and ``run.json`` (command, start, versions)
where present; writes ``plots/loss.png``, ``plots/lr.png``, ``plots/error.png`` (every
``*_error``), ``plots/samples.png`` (counts) and one ``plots/<metric>.png`` per other number, and
``index.html``, which shows the run, its skip counts, the final (or latest) metrics, the recipe
and every PNG in the folder (the evaluators' images included). The engine renders after every
evaluation, so the page follows a long run; each file is replaced atomically. Plotting uses
matplotlib's Agg canvas directly, so it needs no display and never touches pyplot's global state.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from convnet.core.checkpoint import usual_mode
from convnet.core.errors import ConvnetError


class ReportError(ConvnetError):
    """A run folder that cannot be reported on: names the file and the fault."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; one error naming the file and line for a bad line."""
    path = Path(path)
    records = []
    try:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
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
            if number == len(lines) and not text.endswith("\n"):  # a write cut short by a kill or a full disk
                print(f"convnet: warning: {path}:{number}: the last line is cut short; left out", file=sys.stderr)
                break
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


NOT_METRICS = {"kind", "epoch", "step", "lr", "time"}


def family(key: str) -> str:
    """The figure a scalar goes into: every ``*_error`` together, every count (``samples``,
    ``*_samples``) together, any other number in a figure of its own."""
    if key.endswith("_error"):
        return "error"
    if key == "samples" or key.endswith("_samples") or key.startswith("skipped_"):
        return "samples"
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in key)


FAMILY_LABELS = {"error": ("validation error", "error (%)"), "samples": ("samples per evaluation", "samples")}


def curves(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The series to plot: x in epochs (fractional for train steps) when known, else steps.

    ``metrics``: family -> series name -> points, every scalar number of the eval records and,
    for the end-of-run evaluators, of the final record (``errors`` is the ``error`` family).
    """
    spe = _steps_per_epoch(records)
    unit = "epoch" if spe else "step"

    def x_of(r: dict[str, Any]) -> float | None:
        step = _number(r.get("step"))
        if step is None:
            return None
        return step / spe if spe else step

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") in ("eval", "final")]
    out: dict[str, Any] = {"unit": unit, "loss": [], "lr": [], "metrics": {}}
    for r in train:
        x = x_of(r)
        if x is None:
            continue
        if _number(r.get("loss")) is not None:
            out["loss"].append((x, float(r["loss"])))
        if _number(r.get("lr")) is not None:
            out["lr"].append((x, float(r["lr"])))
    for r in evals:
        final = r.get("kind") == "final"
        if spe and not final and _number(r.get("epoch")) is not None:  # an eval record's epoch is the one just done
            x = float(r["epoch"]) + 1
        else:  # the final evaluation is where training stopped, mid-epoch too
            x = x_of(r)
        if x is None:
            continue
        if not final and _number(r.get("lr")) is not None:  # the rate after the epoch's schedule step
            out["lr"].append((x, float(r["lr"])))
        for key, value in r.items():
            if key in NOT_METRICS or _number(value) is None:
                continue
            series = out["metrics"].setdefault(family(key), {}).setdefault(key, [])
            if final and series and math.isclose(series[-1][0], x):  # the last epoch's evaluation, repeated
                continue
            series.append((x, float(value)))
    out["lr"].sort(key=lambda p: p[0])
    out["errors"] = out["metrics"].get("error", {})
    return out


def figure(
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, list[tuple[float, float]]],
    logy: bool = False,
    percent: bool = False,
    steps: bool = False,
) -> Any:
    """A matplotlib Figure (Agg canvas) of the series, titled, both axes labelled, with a legend
    (also for one series: the legend names what is drawn)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in series.items():
        xs = [p[0] for p in points]
        ys = [p[1] * (100 if percent else 1) for p in points]
        ax.plot(
            xs,
            ys,
            marker="o" if len(points) < 30 else None,
            markersize=3,
            label=label,
            drawstyle="steps-post" if steps else "default",
        )
    if logy and all(p[1] > 0 for pts in series.values() for p in pts):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, list[tuple[float, float]]],
    logy: bool = False,
    percent: bool = False,
    steps: bool = False,
) -> Path:
    fig = figure(title, xlabel, ylabel, series, logy, percent, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _replace(path: Path, write: Any) -> None:
    """``write(temp file)`` beside ``path``, then ``os.replace``: a reader (a browser, a copy
    during a run) sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def plot_curves(records: list[dict[str, Any]], plots: Path) -> list[Path]:
    """loss.png, lr.png, error.png and one figure per other metric family (those with data)."""
    c = curves(records)
    xlabel = c["unit"]
    made = []
    if c["loss"]:
        made.append(_plot(plots / "loss.png", "training loss", xlabel, "cross-entropy", {"loss": c["loss"]}))
    if c["lr"]:
        made.append(_plot(plots / "lr.png", "learning rate", xlabel, "lr", {"lr": c["lr"]}, logy=True, steps=True))
    for name, series in c["metrics"].items():
        title, ylabel = FAMILY_LABELS.get(name, (name.replace("_", " "), name))
        stem = name if name not in ("loss", "lr") else f"metric_{name}"
        made.append(_plot(plots / f"{stem}.png", title, xlabel, ylabel, series, percent=name == "error"))
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


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em} pre{background:#f4f4f4;padding:1em;"
    "overflow:auto;max-height:30em} table{border-collapse:collapse} th,td{border:1px solid #ccc;"
    "padding:.2em .6em;text-align:left} figure{display:inline-block;margin:1em} img{max-width:100%}"
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None


def _when(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO 8601 string (run.json's ``started``)."""
    if _number(value) is not None:
        return float(value)
    if isinstance(value, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def run_info(run: Path, records: list[dict[str, Any]]) -> dict[str, str]:
    """What the page says about the run: from ``run.json`` (command, started, convnet_version,
    the distributions that supplied its components) where the engine wrote one, else from the
    records; "unknown" where neither says."""
    info_path = run / "run.json"
    meta = _read_json(info_path) if info_path.is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    command = meta.get("command")
    if isinstance(command, list):
        command = " ".join(str(part) for part in command)
    started = _when(meta.get("started"))
    metrics = run / "metrics.jsonl"
    updated = metrics.stat().st_mtime if metrics.is_file() else None
    finished = any(r.get("kind") == "final" for r in records)
    # run.json's "components": per component, the "distribution version" that supplied it.
    components = meta.get("components")
    rows = components if isinstance(components, list) else []
    distributions = sorted({str(r["distribution"]) for r in rows if isinstance(r, dict) and r.get("distribution")})
    shown = ", ".join(distributions) or "unknown"
    steps = [r["step"] for r in records if _number(r.get("step")) is not None]
    epochs = [r["epoch"] for r in records if r.get("kind") == "eval" and _number(r.get("epoch")) is not None]
    fmt = "%Y-%m-%d %H:%M:%S %Z"
    return {
        "command": str(command) if command else "unknown",
        "started": time.strftime(fmt, time.localtime(started)) if started is not None else "unknown",
        "status": "finished" if finished else "running (or stopped before its end)",
        "last update": time.strftime(fmt, time.localtime(updated)) if updated is not None else "unknown",
        "duration": _duration(updated - started) if started is not None and updated is not None else "unknown",
        "progress": (
            f"step {max(steps)}, {int(max(epochs)) + 1} epoch(s) evaluated"
            if epochs
            else f"step {max(steps)}"
            if steps
            else "no records yet"
        ),
        "convnet version": str(meta.get("convnet_version") or "unknown"),
        "plugins": shown,
    }


def skip_counts(records: list[dict[str, Any]]) -> dict[str, str]:
    """Every ``skipped_*`` count: summed over the epochs' eval records, and the final record's."""
    per_epoch: dict[str, float] = {}
    final: dict[str, float] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("skipped") and _number(value) is not None:
                if r.get("kind") == "eval":
                    per_epoch[key] = per_epoch.get(key, 0) + float(value)
                elif r.get("kind") == "final":
                    final[key] = float(value)
    out = {f"{key} (sum over epochs)": f"{value:g}" for key, value in per_epoch.items()}
    out.update({f"{key} (end of run)": f"{value:g}" for key, value in final.items()})
    return out


def _rows(values: dict[str, str]) -> str:
    rows = [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in values.items()]
    return "<table>\n" + "\n".join(rows) + "\n</table>" if rows else "<p>(none)</p>"


def write_index(run: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """index.html: the run (command, times, versions), skip counts, final metrics (or the latest
    evaluation while the run goes on), links to the result files, every PNG, the recipe."""
    recipe_path, eval_path = run / "recipe.toml", run / "eval.json"
    if records is None:
        records = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    recipe = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else "(no recipe.toml in this folder)"
    metrics: dict[str, Any] = {}
    heading = "Final metrics"
    finished = any(r.get("kind") == "final" for r in records) or not records
    if eval_path.is_file() and finished:  # during a resumed run, eval.json is the previous end's
        loaded = _read_json(eval_path)
        metrics = loaded if isinstance(loaded, dict) else {"eval.json": loaded}
    else:
        latest = [r for r in records if r.get("kind") == "eval"]
        if latest:
            heading = f"Latest evaluation (epoch {int(latest[-1].get('epoch', 0)) + 1})"
            metrics = {k: v for k, v in latest[-1].items() if k != "kind"}
    pngs = sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png"))
    pngs.sort(key=lambda p: (not p.startswith("plots/"), p))
    files = ["metrics.jsonl", "eval.json", "run.json", "recipe.toml"]
    files += sorted(p.name for p in run.glob("*.json") if p.name not in files)
    links = " ".join(f'<a href="{html.escape(p)}">{html.escape(p)}</a>' for p in files if (run / p).is_file())
    figures = "\n".join(
        f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}"><figcaption>{html.escape(p)}</figcaption></figure>'
        for p in pngs
    )
    title = html.escape(run.name)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>convnet run {title}</title><style>{STYLE}</style></head>
<body>
<h1>convnet run {title}</h1>
{_rows(run_info(run, records))}
<h2>Skipped samples and batches</h2>
{_rows(skip_counts(records))}
<h2>{html.escape(heading)}</h2>
{_metrics_table(metrics)}
<p>{links}</p>
<h2>Images</h2>
{figures or "<p>(no images)</p>"}
<h2>Recipe</h2>
<pre>{html.escape(recipe)}</pre>
</body></html>
"""
    path = run / "index.html"
    _replace(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
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
    records = read_metrics(metrics)
    try:
        made = plot_curves(records, run / "plots")
        made.append(write_index(run, records))
    except OSError as exc:
        raise ReportError(
            f"{run}: cannot write the report ({exc.strerror or exc}); copy the run folder somewhere writable"
        ) from None
    return made


# run folder -> (when the last live render ended, what it cost), both in seconds
_LIVE: dict[str, tuple[float, float]] = {}
LIVE_OVERHEAD = 0.05


def render_live(run: str | Path) -> list[Path]:
    """``render`` during a run, after an evaluation: the first time, then whenever the time since
    the last render is at least 1 / LIVE_OVERHEAD times what that render cost, so the report
    takes at most about 5 % of a run (ImageNet's hour-long epochs: every epoch; the digits'
    two-second epochs: every few). The end of a run always renders (``render``)."""
    key = str(Path(run).resolve())
    now = time.monotonic()
    last = _LIVE.get(key)
    if last is not None and now - last[0] < last[1] / LIVE_OVERHEAD:
        return []
    made = render(run)
    end = time.monotonic()
    _LIVE[key] = (end, end - now)
    return made
