"""``convnet eval RECIPE --checkpoint CKPT...``: a recipe's evaluators on trained weights.

The first checkpoint is loaded into the recipe's model and every evaluator of the recipe
runs on it (as at the end of a run): the plain metrics are that checkpoint's, which the results
say (``"metrics_from"``). With several checkpoints, the others join it in an
``ensemble`` evaluator (added if the recipe has none; its ``checkpoints`` option is replaced
by them), which reports each member and the averaged softmax. Results go to
``OUT/eval.json``, and the evaluators' images and JSON files to OUT.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from convnet.core import checkpoint as ckpt
from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.errors import RecipeError
from convnet.core.evaluation import EvalContext, Evaluator, run_evaluators
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


def default_out(recipe: schema.Recipe) -> Path:
    return Path("runs") / (recipe.name or "recipe") / ("eval-" + time.strftime("%Y%m%d-%H%M%S"))


def evaluate(recipe: schema.Recipe, checkpoints: Sequence[str | Path], out: str | Path | None = None,
             registries: Registries | None = None) -> dict[str, Any]:
    """Run the recipe's evaluators on ``checkpoints[0]`` (the others as ensemble members).

    Returns the results and the output folder on the main process, ``{}`` on the others.
    """
    from convnet.core import plugins
    from convnet.core.engine import build_strategy

    if not checkpoints:
        raise RecipeError("eval: give at least one --checkpoint")
    regs = registries if registries is not None else plugins.registries()
    recipe = with_members(recipe, [str(p) for p in checkpoints[1:]], regs)
    strategy = build_strategy(recipe, regs)
    network = build_model(recipe, "cpu", regs)
    first = Path(checkpoints[0])
    tensors, _ = ckpt.load(first)
    state = ckpt.model_tensors(tensors)
    ckpt.check_compatible(first, network.state_dict(), state)
    for other in checkpoints[1:]:  # every member checked before any work is done
        ckpt.check_compatible(other, network.state_dict(), ckpt.model_tensors(ckpt.load(other)[0]))
    module = strategy.prepare(network)
    strategy.load_state_dict(module, state)
    splits = cdata.build_dataset(recipe, regs)
    eval_aug = cdata.build_augmenters(recipe.data.eval_augment, regs, "data.eval_augment", recipe)
    evaluators: list[tuple[str, Evaluator]] = []
    for i, comp in enumerate(recipe.evaluate):
        entry = regs.evaluator.get(comp.name, f"evaluate[{i}].name")
        evaluators.append((comp.name, entry.factory(comp.options, recipe)))
    for name, ev in evaluators:
        if name == ENSEMBLE and hasattr(ev, "member0"):
            ev.member0 = str(first)
    out_dir = Path(out) if out is not None else default_out(recipe)
    if strategy.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx = EvalContext(recipe, module, strategy, splits, eval_aug, out_dir if strategy.is_main else None, 0, True)
    with torch.random.fork_rng(devices=[]):
        results = run_evaluators(evaluators, ctx)
    # The evaluators' plain keys (top1_error, ...) are of the first checkpoint; ensemble_* of all.
    results = {"checkpoints": [str(p) for p in checkpoints], "metrics_from": str(first), **results}
    if strategy.is_main:
        (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    is_main = strategy.is_main
    strategy.close()
    return {"out": str(out_dir), **results} if is_main else {}
