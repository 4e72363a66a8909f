"""The paper's ablations as pairs of recipes: train both arms, write the comparison.

    python -m convnet.plugins.alexnet.ablate NAME [--out DIR] [--seeds 0 1] [--set KEY=VALUE]...
    python -m convnet.plugins.alexnet.ablate all --out runs/ablations
    python -m convnet.plugins.alexnet.ablate all --data ablation-photos --out runs/ablations-photos

Each arm is an ordinary ``convnet run`` of a bundled recipe (its own run folder under
``DIR/<arm>/seed<k>``); ``DIR/comparison.json`` holds the numbers and ``DIR/comparison.txt``
one line of text. The paper's claims come with each ablation, to put the measured
numbers beside them (docs/ablations.md). ``--data RECIPE`` trains every arm on that recipe's
``[data]`` table instead of its own (``ablation-photos``: colour photographs, docs/photos.md),
so the same pairs of networks are compared on another dataset.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from convnet.core import (
    ConvnetError,
    RecipeError,
    add_overrides_argument,
    load_plugins,
    load_recipe,
    read_metrics,
    train,
)


@attrs.frozen
class Ablation:
    name: str
    arms: tuple[tuple[str, str], tuple[str, str]]  # (label, recipe): the paper's choice first
    measure: str  # "val" (final validation error), "epochs-to-train-error", "gap" (val - train error)
    paper: str
    threshold: float = 0.25


ABLATIONS = {
    a.name: a
    for a in (
        Ablation(
            "relu-vs-tanh",
            (("relu", "ablation-digits"), ("tanh", "ablation-tanh")),
            "epochs-to-train-error",
            "a four-layer CNN with ReLUs reaches 25% training error on CIFAR-10 six times faster than with "
            "tanh (Figure 1)",
        ),
        Ablation(
            "no-lrn",
            (("lrn", "ablation-digits"), ("no-lrn", "ablation-no-lrn")),
            "val",
            "response normalisation reduces top-1 and top-5 error by 1.4 and 1.2 points (ILSVRC-2012 val)",
        ),
        Ablation(
            "no-overlap-pool",
            (("overlap-3x3s2", "ablation-digits"), ("no-overlap-2x2s2", "ablation-no-overlap-pool")),
            "val",
            "overlapping pooling (3x3 stride 2) reduces top-1 and top-5 error by 0.4 and 0.3 points "
            "against 2x2 stride 2, and overfits slightly less",
        ),
        Ablation(
            "one-vs-two-towers",
            (("two-towers", "ablation-digits"), ("one-tower-half", "ablation-1tower")),
            "val",
            "the two-GPU net is 1.7 (top-1) and 1.2 (top-5) points better than a one-GPU net with half the "
            "kernels in each convolutional layer",
        ),
        Ablation(
            "no-dropout",
            (("dropout", "ablation-digits"), ("no-dropout", "ablation-no-dropout")),
            "gap",
            "without dropout the network overfits substantially; dropout roughly doubles the iterations "
            "needed to converge",
        ),
    )
}


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvnetError(f"{path}: not found; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvnetError(f"{path}: cannot be read ({exc}); {what}") from None


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]


def epochs_to(evals: list[dict[str, Any]], key: str, threshold: float) -> int | None:
    """The first epoch (1-based) after which ``key`` is at most ``threshold``."""
    for r in evals:
        if r.get(key) is not None and r[key] <= threshold:
            return int(r["epoch"]) + 1
    return None


def arm_result(run_dir: Path, final: dict[str, Any], threshold: float, seconds: float | None) -> dict[str, Any]:
    evals = read_evals(run_dir)
    out = {
        "run": str(run_dir),
        "seconds": None if seconds is None else round(seconds, 1),
        "epochs": len(evals),
        "val_top1_error": final.get("top1_error"),
        "val_top5_error": final.get("top5_error"),
        "val_samples": final.get("samples"),
        "train_top1_error": final.get("train_top1_error"),
        "train_error_curve": [r.get("train_top1_error") for r in evals],
        "val_error_curve": [r.get("top1_error") for r in evals],
        f"epochs_to_{round(threshold * 100)}pct_train_error": epochs_to(evals, "train_top1_error", threshold),
    }
    if out["val_top1_error"] is not None and out["train_top1_error"] is not None:
        out["gap"] = out["val_top1_error"] - out["train_top1_error"]
    return out


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if len(vals) == len(values) and vals else None


def summarise_arm(runs: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    key = f"epochs_to_{round(threshold * 100)}pct_train_error"
    summary = {
        k: _mean([r[k] for r in runs])
        for k in ("val_top1_error", "val_top5_error", "train_top1_error", "gap", key)
        if all(k in r for r in runs)
    }
    n = runs[0].get("val_samples") or 0
    p = summary.get("val_top1_error")
    if n and p is not None:  # binomial standard error of one run's validation error
        summary["val_top1_stderr"] = math.sqrt(max(p * (1 - p), 1e-12) / n)
    summary["runs"] = runs
    return summary


def compare(ablation: Ablation, arms: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    (a, _), (b, _) = ablation.arms
    ra, rb = arms[a], arms[b]
    pts = lambda x: None if x is None else round(100 * x, 2)  # noqa: E731
    diff: dict[str, Any] = {}
    if ablation.measure == "epochs-to-train-error":
        key = f"epochs_to_{round(ablation.threshold * 100)}pct_train_error"
        ea, eb = ra.get(key), rb.get(key)
        diff = {f"{a}_epochs": ea, f"{b}_epochs": eb, "speedup": (eb / ea) if ea and eb else None}
        reach = lambda e: f"after {e:g} epoch(s)" if e is not None else "never"  # noqa: E731
        line = (
            f"{ablation.name}: {round(ablation.threshold * 100)}% training error {reach(ea)} with {a}, "
            f"{reach(eb)} with {b}"
            + (f" ({diff['speedup']:.2f}x)" if diff["speedup"] else "")
            + f"; paper: {ablation.paper}"
        )
    else:
        # The paper's choice minus the ablated one: negative = the paper's choice is better.
        d1 = None if ra.get("val_top1_error") is None else ra["val_top1_error"] - rb["val_top1_error"]
        d5 = None if ra.get("val_top5_error") is None else ra["val_top5_error"] - rb["val_top5_error"]
        diff = {
            "top1_change_points": pts(d1),
            "top5_change_points": pts(d5),
            "stderr_points": pts(ra.get("val_top1_stderr")),
        }
        line = (
            f"{ablation.name}: val top-1 error {pts(ra.get('val_top1_error'))}% with {a}, "
            f"{pts(rb.get('val_top1_error'))}% with {b}: {a} changes it by {pts(d1):+g} points, top-5 by "
            f"{'n/a' if d5 is None else format(pts(d5), '+g')} (negative = {a} better; "
            f"one run's standard error ~{pts(ra.get('val_top1_stderr'))} points)"
        )
        if ablation.measure == "gap":
            diff.update({f"{a}_gap_points": pts(ra.get("gap")), f"{b}_gap_points": pts(rb.get("gap"))})
            line += f"; train/val gap {pts(ra.get('gap'))} points with {a}, {pts(rb.get('gap'))} with {b}"
        line += f"; paper: {ablation.paper}"
    return diff, line


def recompare(out: str | Path) -> dict[str, Any]:
    """Recompute the comparison of finished arms from ``out/comparison.json`` (no training)."""
    path = Path(out) / "comparison.json"
    result = _read_json(path, "train the arms first (without --recompare)")
    if not isinstance(result, dict) or result.get("ablation") not in ABLATIONS or "arms" not in result:
        raise ConvnetError(f"{path}: not an ablation's comparison (no known 'ablation' and its 'arms')")
    diff, line = compare(ABLATIONS[result["ablation"]], result["arms"])
    result.update(comparison=diff, line=line)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (Path(out) / "comparison.txt").write_text(line + "\n", encoding="utf-8")
    return result


def run_ablation(
    name: str,
    out: str | Path,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    quiet: bool = True,
    registries=None,
    cache: dict | None = None,
    reuse: bool = False,
    data: str | None = None,
) -> dict[str, Any]:
    """Train both arms for each seed; write ``comparison.json`` and ``comparison.txt`` in ``out``.

    ``data`` names a recipe whose ``[data]`` table (dataset, augmentation, batch size) replaces
    every arm's own: the arms differ in their network only, on any dataset of the same classes.
    ``data.*`` overrides then apply to that recipe only (the arms' own data is not used).

    ``cache`` (shared between calls) reuses a run of the same recipe, seed and overrides:
    every ablation's first arm is the same baseline. With ``reuse`` an arm whose run folder
    already holds a finished run (``eval.json``) is read, not trained again."""
    if name not in ABLATIONS:
        raise RecipeError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    ablation = ABLATIONS[name]
    regs = registries if registries is not None else load_plugins()
    out = Path(out)
    data_table, key_overrides = None, tuple(overrides)
    if data is not None:  # `--set data.*` then changes that recipe's data table, the rest every recipe
        data_table = load_recipe(data, overrides, regs).data
        overrides = [o for o in overrides if not o.strip().startswith("data.")]
    arms: dict[str, dict[str, Any]] = {}
    for label, recipe_name in ablation.arms:
        runs = []
        for seed in seeds:
            key = (recipe_name, seed, key_overrides, data)
            if cache is not None and key in cache:
                runs.append(cache[key])
                continue
            recipe = load_recipe(recipe_name, [*overrides, f"seed={seed}"], regs)
            if data_table is not None:
                recipe = attrs.evolve(recipe, data=copy.deepcopy(data_table))
            run_dir = out / label / f"seed{seed}"
            if reuse and (run_dir / "eval.json").exists():
                final = _read_json(run_dir / "eval.json", "train that arm again (without --reuse)")
                runs.append(arm_result(run_dir, final, ablation.threshold, None))
                if cache is not None:  # the shared baseline: read once, not trained again for the next ablation
                    cache[key] = runs[-1]
                continue
            start = time.perf_counter()
            # The arms' folders are this runner's own: an arm trained again replaces its old run.
            final = train(recipe, out=run_dir, quiet=quiet, registries=regs, overwrite=True)
            runs.append(arm_result(run_dir, final, ablation.threshold, time.perf_counter() - start))
            if cache is not None:
                cache[key] = runs[-1]
        arms[label] = summarise_arm(runs, ablation.threshold) | {"recipe": recipe_name}
    diff, line = compare(ablation, arms)
    result = {
        "ablation": name,
        "measure": ablation.measure,
        "paper": ablation.paper,
        "seeds": list(seeds),
        "overrides": list(key_overrides),
        "data": data,
        "arms": arms,
        "comparison": diff,
        "line": line,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "comparison.txt").write_text(line + "\n", encoding="utf-8")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convnet.plugins.alexnet.ablate",
        description="Run one of the paper's ablations (on digits, or the data of --data) and write the comparison.",
    )
    p.add_argument("name", choices=[*ABLATIONS, "all"])
    p.add_argument("--out", default=None, help="folder (default runs/ablations/<name>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_overrides_argument(p, help="override a value in both arms' recipes (repeatable)")
    p.add_argument(
        "--data",
        metavar="RECIPE",
        default=None,
        help="train every arm on this recipe's [data] table (e.g. ablation-photos) instead of its own",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read arms whose run folder already holds a finished run instead of training them",
    )
    p.add_argument(
        "--recompare", action="store_true", help="only rewrite the comparison of arms already trained in the folder"
    )
    args = p.parse_args(argv)
    names = list(ABLATIONS) if args.name == "all" else [args.name]
    base = Path(args.out) if args.out else Path("runs") / "ablations"
    cache: dict = {}
    try:
        for name in names:
            where = base / name if (args.name == "all" or not args.out) else base
            if args.recompare:
                result = recompare(where)
            else:
                result = run_ablation(
                    name, where, args.seeds, args.overrides, cache=cache, reuse=args.reuse, data=args.data
                )
            print(result["line"])
            print(f"  written: {where / 'comparison.json'}")
    except ConvnetError as exc:
        print(f"ablate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
