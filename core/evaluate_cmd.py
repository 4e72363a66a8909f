"""``convnet eval RECIPE --checkpoint CKPT...``: a recipe's evaluators on trained weights.

The first checkpoint is loaded into the recipe's model and every evaluator of the recipe
runs on it (as at the end of a run). With several checkpoints, the others join it in an
``ensemble`` evaluator (added if the recipe has none; its ``checkpoints`` option is replaced
by them), which reports each member and the averaged softmax.

Results go to ``OUT/eval.json`` and the evaluators' files to OUT. When OUT already holds a
run (or an earlier evaluation), everything goes to a fresh ``OUT/evals/<time>/`` instead: a
command never replaces a file that a run wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from convnet.core import checkpoint as ckpt
from convnet.core import data as cdata
from convnet.core import run_folder, schema
from convnet.core.components import build_evaluators, build_strategy, check_launch
from convnet.core.errors import ConvnetError, RecipeError
from convnet.core.evaluation import EvalContext, run_evaluators
from convnet.core.model import build_model
from convnet.core.registry import Registries

ENSEMBLE = "ensemble"


def with_members(recipe: schema.Recipe, others: Sequence[str], registries: Registries) -> schema.Recipe:
    """The recipe whose ``ensemble`` evaluator lists ``others`` (one added if needed)."""
    entries = [c for c in recipe.evaluate if c.name == ENSEMBLE]
    if not others:
        return recipe
    if not entries:
        entry = registries.evaluator.get(ENSEMBLE, "evaluate")
        comp = schema.Evaluator(ENSEMBLE, entry.options())
        recipe.evaluate.append(comp)
        entries = [comp]
    for comp in entries:
        if not hasattr(comp.options, "checkpoints"):
            raise RecipeError(f"evaluator {ENSEMBLE!r} (from another plugin) has no 'checkpoints' option")
        comp.options.checkpoints = [str(p) for p in others]
    return recipe


def output_folder(recipe: schema.Recipe, out: str | Path | None) -> Path:
    """Where this evaluation writes: OUT as given, unless it holds a run's files (then a fresh
    folder inside it); by default ``runs/<recipe>/eval-<time>``."""
    try:
        if out is None:
            folder = run_folder.default_folder(recipe.name, "eval-")
            return run_folder.fresh_folder(folder.parent, folder.name)
        folder = Path(out)
        if run_folder.run_files(folder) or (folder / "eval.json").exists():
            return run_folder.fresh_folder(folder / "evals")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError as exc:
        where = exc.filename or out
        raise ConvnetError(f"{where}: cannot make the evaluation's folder there ({exc.strerror or exc})") from None


def evaluate(
    recipe: schema.Recipe, checkpoints: Sequence[str | Path], out: str | Path | None, registries: Registries
) -> dict[str, Any]:
    """Run the recipe's evaluators on ``checkpoints[0]`` (the others as ensemble members).

    Returns the results and the output folder on the main process, ``{}`` on the others.
    """
    if not checkpoints:
        raise RecipeError("eval: give at least one --checkpoint")
    first = Path(checkpoints[0])
    recipe = with_members(recipe, [str(p) for p in checkpoints[1:]], registries)
    strategy = build_strategy(recipe, registries)
    check_launch(strategy, recipe)
    network = build_model(recipe, "cpu", registries)
    state = ckpt.model_tensors(ckpt.load(first)[0])
    ckpt.check_compatible(first, network.state_dict(), state)
    for other in checkpoints[1:]:  # every member checked before any work is done
        ckpt.check_compatible(other, network.state_dict(), ckpt.model_tensors(ckpt.load(other)[0]))
    module = strategy.prepare(network)
    strategy.load_state_dict(module, state)
    splits = cdata.build_dataset(recipe, registries)
    eval_aug = cdata.build_augmenters(recipe.data.eval_augment, registries, "data.eval_augment", recipe)
    evaluators = build_evaluators(recipe, registries)
    out_dir = output_folder(recipe, out) if strategy.is_main else None
    ctx = EvalContext(recipe, module, strategy, splits, eval_aug, out_dir, 0, True, registries, weights=str(first))
    with torch.random.fork_rng(devices=[]):
        results = run_evaluators(evaluators, ctx)
    skipped = sum(
        run_folder.report_skipped(strategy, out_dir, "evaluation", split, list(dict.fromkeys(ctx.skipped_names[split])))
        for split in sorted(ctx.skipped_names)
    )
    results = {
        "checkpoints": [str(p) for p in checkpoints],
        "metrics_from": str(first),
        **results,
        "skipped_eval_samples": skipped,
    }
    is_main = strategy.is_main
    if is_main:
        run_folder.write_json(out_dir / "eval.json", results)
    strategy.close()
    return {"out": str(out_dir), **results} if is_main else {}
