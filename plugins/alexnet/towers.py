"""The paper's Figure 3 as an experiment: do the two towers' first-layer kernels specialise,
one colour-agnostic and the other colour-specific?

    convnet towers --out runs/towers --seeds 0 1 2 3 4
    python -m convnet.plugins.alexnet.towers --out runs/towers --seeds 0 1 2

For each seed it trains the two-tower network (``alexnet-photos``) and the control, one tower
of the same width (``alexnet-photos-1tower``), each an ordinary run under ``OUT/<arm>/seed<k>``,
and reads the ``filters`` evaluator's per-kernel colour specificity (``filters_conv1.json``).
The control has no towers; its conv1 kernels are split into the same two halves (the first
and the second half of the channels, as a tower split would take them), so its difference
between halves is what chance gives a network whose kernels nothing separates.

Per run it reports each group's mean specificity (random kernels score about 2/3), the share
of colour-agnostic kernels (specificity < 1/3) and colour-specific ones (> 2/3), the same
numbers at initialisation, how far training moved the kernels from their initial values (norm
ratio and cosine: a score says something about learning only when they moved), and a
permutation test: the share of random equal splits of the run's kernels whose means differ at
least as much as the two groups' do. A seed counts as
"split as in the paper" when one group's kernels are mostly (> 1/2) colour-agnostic and the
other's mostly colour-specific; as "separated" when the permutation p-value is below 0.01.

Written into OUT: ``towers.json`` (every number), ``towers.txt`` (the table and the verdict),
``towers_filters.png`` (each run's filters picture, the two arms side by side, a row per seed)
and ``towers_specificity.png`` (every kernel's specificity, per tower or half, per run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from convnet.core import (
    ConvnetError,
    build_model,
    generator,
    load_checkpoint,
    load_plugins,
    load_recipe,
    model_tensors,
    train,
)

ARMS = (("two-towers", "alexnet-photos"), ("one-tower", "alexnet-photos-1tower"))
LAYER = "conv1"
AGNOSTIC, SPECIFIC = 1 / 3, 2 / 3  # kernel thresholds: below half the random level / above it
PERMUTATIONS = 10_000


def colour_specificity(kernels: torch.Tensor) -> torch.Tensor:
    """Per kernel of ``[K, 3, kh, kw]``: variance across RGB / total variance, as the ``filters``
    evaluator defines it (docs/evaluation.md); used here for the kernels at initialisation."""
    w = kernels.double().flatten(2)
    colour = (w - w.mean(1, keepdim=True)).pow(2).sum((1, 2))
    total = (w - w.mean((1, 2), keepdim=True)).pow(2).sum((1, 2))
    return torch.where(total > 0, colour / total.clamp_min(1e-300), torch.zeros_like(total))


def permutation_p(scores: Sequence[float], permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Share of random equal splits of ``scores`` whose group means differ at least as much as
    the first half's and the second half's do (with the observed split counted, so never 0)."""
    s = torch.tensor(scores, dtype=torch.float64)
    half = len(s) // 2
    observed = abs(float(s[:half].mean() - s[half:].mean()))
    order = torch.rand(permutations, len(s), generator=generator(seed, 0x7065)).argsort(1)
    shuffled = s[order]
    diffs = (shuffled[:, :half].mean(1) - shuffled[:, half:].mean(1)).abs()
    return (1 + int((diffs >= observed - 1e-12).sum())) / (1 + permutations)


def group_numbers(scores: Sequence[float]) -> dict[str, float]:
    n = len(scores)
    return {
        "mean": statistics.fmean(scores),
        "agnostic_share": sum(s < AGNOSTIC for s in scores) / n,
        "specific_share": sum(s > SPECIFIC for s in scores) / n,
    }


def split_numbers(scores: Sequence[float]) -> dict[str, Any]:
    """The two halves of a run's kernels (its towers, or the control's halves) compared."""
    half = len(scores) // 2
    groups = [group_numbers(scores[:half]), group_numbers(scores[half:])]
    means = [g["mean"] for g in groups]
    shares = [(g["agnostic_share"], g["specific_share"]) for g in groups]
    as_paper = any(a[0] > 0.5 and b[1] > 0.5 for a, b in (shares, shares[::-1]))
    p = permutation_p(scores)
    return {
        "groups": groups,
        "difference": abs(means[0] - means[1]),
        "more_colour_specific": int(means[1] > means[0]),
        "permutation_p": p,
        "separated": p < 0.01,
        "split_as_in_paper": as_paper,
    }


def initial_kernels(recipe_name: str, seed: int, overrides: Sequence[str], registries) -> torch.Tensor:
    recipe = load_recipe(recipe_name, [*overrides, f"seed={seed}"], registries)
    return build_model(recipe, registries=registries).state_dict()[f"layers.{LAYER}.weight"]


def learned(initial: torch.Tensor, final: torch.Tensor) -> dict[str, float]:
    """How far training moved the kernels: a score measures what was learned only when the final
    kernels are not the initial ones slightly changed (on grey digits they were: docs/evaluation.md)."""
    a, b = initial.double().flatten(), final.double().flatten()
    return {"norm_ratio": float(b.norm() / a.norm()), "cosine_to_init": float(a @ b / (a.norm() * b.norm()))}


def read_run(run_dir: Path) -> dict[str, Any]:
    final = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    filters = json.loads((run_dir / f"filters_{LAYER}.json").read_text(encoding="utf-8"))
    return {
        "run": str(run_dir),
        "val_top1_error": final.get("top1_error"),
        "val_top5_error": final.get("top5_error"),
        "kernels": filters["kernel_colour_specificity"],
        "towers": filters["towers"],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm, rs in runs.items():
        splits = [r["split"] for r in rs]
        out[arm] = {
            "seeds": len(rs),
            "val_top1_error": spread([r["val_top1_error"] for r in rs]),
            # the more and the less colour-specific group of each run, then over runs
            "higher_group_mean": spread([max(g["mean"] for g in s["groups"]) for s in splits]),
            "lower_group_mean": spread([min(g["mean"] for g in s["groups"]) for s in splits]),
            "difference": spread([s["difference"] for s in splits]),
            "difference_at_init": spread([r["split_at_init"]["difference"] for r in rs]),
            "norm_ratio_to_init": spread([r["learned"]["norm_ratio"] for r in rs]),
            "cosine_to_init": spread([r["learned"]["cosine_to_init"] for r in rs]),
            "separated": sum(s["separated"] for s in splits),
            "split_as_in_paper": sum(s["split_as_in_paper"] for s in splits),
        }
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "colour specificity of conv1 kernels (random kernels ~0.667); groups: towers 1/2 (two-towers), "
        "channel halves 1/2 (one-tower)",
        f"{'arm':<11} {'seed':>4} {'val top-1':>9} {'group 1':>8} {'group 2':>8} {'diff':>6} {'at init':>7} "
        f"{'agnostic 1/2':>13} {'specific 1/2':>13} {'perm. p':>8}  split as paper",
    ]
    for arm, rs in result["runs"].items():
        for r in rs:
            s = r["split"]
            g1, g2 = s["groups"]
            lines.append(
                f"{arm:<11} {r['seed']:>4} {100 * r['val_top1_error']:>8.2f}% {g1['mean']:>8.3f} {g2['mean']:>8.3f} "
                f"{s['difference']:>6.3f} {r['split_at_init']['difference']:>7.3f} "
                f"{g1['agnostic_share']:>6.0%} /{g2['agnostic_share']:>4.0%} "
                f"{g1['specific_share']:>6.0%} /{g2['specific_share']:>4.0%} {s['permutation_p']:>8.4f}  "
                f"{'yes' if s['split_as_in_paper'] else 'no'}"
            )
    for arm, a in result["summary"].items():
        d, hi, lo = a["difference"], a["higher_group_mean"], a["lower_group_mean"]
        lines.append(
            f"{arm}: {a['seeds']} seed(s); val top-1 {100 * a['val_top1_error']['mean']:.2f} "
            f"± {100 * a['val_top1_error']['std']:.2f}%; groups {lo['mean']:.3f} ± {lo['std']:.3f} and "
            f"{hi['mean']:.3f} ± {hi['std']:.3f}; difference {d['mean']:.3f} ± {d['std']:.3f} "
            f"(at init {a['difference_at_init']['mean']:.3f}); kernels {a['norm_ratio_to_init']['mean']:.1f}x their "
            f"initial norm, cosine {a['cosine_to_init']['mean']:.2f} to it; separated (p < 0.01) in {a['separated']}, "
            f"split as in the paper in {a['split_as_in_paper']} of {a['seeds']}"
        )
    return lines


def draw_filters(result: dict[str, Any], path: Path) -> None:
    """Each run's ``filters_conv1.png``, the arms side by side, one row per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    arms = list(result["runs"])
    seeds = result["seeds"]
    images = {
        (arm, r["seed"]): Image.open(Path(r["run"]) / f"filters_{LAYER}.png").convert("RGB")
        for arm in arms
        for r in result["runs"][arm]
    }
    w, h = next(iter(images.values())).size
    fig = Figure(figsize=(len(arms) * w / 100, len(seeds) * (h + 24) / 100), dpi=100)
    FigureCanvasAgg(fig)
    for row, seed in enumerate(seeds):
        for col, arm in enumerate(arms):
            ax = fig.add_subplot(len(seeds), len(arms), row * len(arms) + col + 1)
            ax.set_axis_off()
            if (arm, seed) in images:
                ax.imshow(images[(arm, seed)], interpolation="nearest")
                what = "towers" if arm == "two-towers" else "halves of one tower (control)"
                ax.set_title(f"{arm}, seed {seed}: {what}", fontsize=10)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.3 / (len(seeds) * (h + 24) / 100), hspace=0.12, wspace=0)
    fig.savefig(path, format="png")


def draw_specificity(result: dict[str, Any], path: Path) -> None:
    """Every kernel's colour specificity: per run, its two groups side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x, ticks = 0.0, []
    colours = {"two-towers": ("tab:blue", "tab:orange"), "one-tower": ("tab:gray", "silver")}
    gen = generator(0, 0x6A17)
    for arm, rs in result["runs"].items():
        for r in rs:
            half = len(r["kernels"]) // 2
            for g, part in enumerate((r["kernels"][:half], r["kernels"][half:])):
                jitter = (torch.rand(len(part), generator=gen) - 0.5) * 0.5
                ax.scatter([x + float(j) for j in jitter], part, s=6, color=colours[arm][g])
                ax.hlines(statistics.fmean(part), x - 0.3, x + 0.3, color="black", linewidth=1.5)
                x += 0.8
            ticks.append((x - 1.2, f"{'2T' if arm == 'two-towers' else '1T'} s{r['seed']}"))
            x += 0.6
    ax.axhline(2 / 3, color="red", linewidth=0.8, linestyle="--", label="random kernels (~2/3)")
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("colour specificity")
    ax.set_title(
        "conv1 kernels: 2T = two towers (tower 1 blue, tower 2 orange), 1T = one tower (halves grey)", fontsize=9
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def run_towers(
    out: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    reuse: bool = False,
    quiet: bool = True,
    registries=None,
    arms: Sequence[tuple[str, str]] = ARMS,
) -> dict[str, Any]:
    """Train (or with ``reuse`` read) every arm for every seed; write the report into ``out``."""
    regs = registries if registries is not None else load_plugins()
    out = Path(out)
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for label, recipe_name in arms:
            run_dir = out / label / f"seed{seed}"
            if not (reuse and (run_dir / "eval.json").exists() and (run_dir / f"filters_{LAYER}.json").exists()):
                recipe = load_recipe(recipe_name, [*overrides, f"seed={seed}"], regs)
                if not any(e.name == "filters" and e.options.layer == LAYER for e in recipe.evaluate):
                    raise ConvnetError(f"{recipe_name}: the recipe has no `filters` evaluator of {LAYER}")
                # The arms' folders are this runner's own: an arm trained again replaces its old run.
                train(recipe, out=run_dir, quiet=quiet, registries=regs, overwrite=True)
            r = read_run(run_dir) | {"seed": seed, "recipe": recipe_name}
            r["split"] = split_numbers(r["kernels"])
            initial = initial_kernels(recipe_name, seed, overrides, regs)
            r["split_at_init"] = split_numbers([float(x) for x in colour_specificity(initial)])
            final = model_tensors(load_checkpoint(run_dir / "checkpoints" / "last.safetensors")[0])
            r["learned"] = learned(initial, final[f"layers.{LAYER}.weight"])
            runs.setdefault(label, []).append(r)
    result: dict[str, Any] = {
        "experiment": "tower specialisation (the paper's Figure 3)",
        "layer": LAYER,
        "seeds": list(seeds),
        "overrides": list(overrides),
        "thresholds": {"agnostic_below": AGNOSTIC, "specific_above": SPECIFIC, "permutations": PERMUTATIONS},
        "runs": runs,
    }
    result["summary"] = summarise(runs)
    lines = report_lines(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "towers.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "towers.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    draw_filters(result, out / "towers_filters.png")
    draw_specificity(result, out / "towers_specificity.png")
    result["lines"] = lines
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/towers", help="folder of the runs and the report (default runs/towers)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to train (default 0 1 2)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in both arms' recipes (repeatable)",
    )
    p.add_argument("--reuse", action="store_true", help="read runs already finished in the folder, train the rest")
    p.add_argument("--progress", action="store_true", help="show each run's progress bars")


def command(args: argparse.Namespace) -> int:
    """``convnet towers``: errors are the CLI's (one line, exit 2 for a bad recipe)."""
    result = run_towers(args.out, args.seeds, args.overrides, reuse=args.reuse, quiet=not args.progress)
    print("\n".join(result["lines"]))
    print(f"written: {Path(args.out) / 'towers.txt'}, towers.json, towers_filters.png, towers_specificity.png")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m convnet.plugins.alexnet.towers",
        description="The paper's Figure 3: per-tower colour specificity over seeds, against one tower.",
    )
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return command(args)
    except ConvnetError as exc:
        print(f"towers: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
