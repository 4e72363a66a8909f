"""Building a recipe's components: the one place that turns recipe tables into objects.

Each builder takes the registries explicitly; only the public functions of ``convnet.core``
(``load_recipe``, ``build_model``, ``train``, ``predict``) and the command line fall back to
the globally loaded plugins.
"""

from __future__ import annotations

import difflib
import os

import attrs
import torch
from torch import nn

from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.compiling import compile_in_place
from convnet.core.contracts import BuildContext, OptimizerContext, Schedule, ScheduleContext
from convnet.core.errors import PluginError, RecipeError
from convnet.core.evaluation import Evaluator
from convnet.core.model import Network, build_model
from convnet.core.registry import Registries
from convnet.core.strategy import Strategy


def build_strategy(recipe: schema.Recipe, registries: Registries) -> Strategy:
    ctx = BuildContext(recipe, registries, "parallel")
    return registries.strategy.build(recipe.parallel, "parallel", ctx, returns=Strategy)


def check_launch(strategy: Strategy, recipe: schema.Recipe) -> None:
    """Before a run or an evaluation starts: a one-process strategy that torchrun started as one
    of several processes would train (or evaluate) one independent copy per process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world > 1 and strategy.world_size == 1:
        raise RecipeError(
            f'parallel.strategy = "{recipe.parallel.name}" runs in one process, but torchrun started '
            f"{world} (WORLD_SIZE={world}): each would work alone. Launch it without torchrun, or use "
            '"ddp" or "tower-parallel"'
        )


def build_evaluators(recipe: schema.Recipe, registries: Registries) -> list[tuple[str, Evaluator]]:
    """``(path, evaluator)`` per ``[[evaluate]]`` table, in recipe order."""
    built = []
    for i, comp in enumerate(recipe.evaluate):
        path = f"evaluate[{i}]"
        ev = registries.evaluator.build(comp, path, BuildContext(recipe, registries, path))
        if not callable(ev) or getattr(ev, "when", "epoch") not in ("epoch", "end"):
            raise PluginError(
                f"{path}: evaluator {comp.name!r} from {registries.evaluator.get(comp.name).origin} returned "
                f'{type(ev).__name__}, which is not an Evaluator (callable, with when = "epoch" or "end")'
            )
        built.append((f"{path} ({comp.name})", ev))
    return built


def check_monitor(recipe: schema.Recipe, evaluators: list[tuple[str, Evaluator]]) -> None:
    """``train.monitor`` (the plateau schedule's metric, and ``best.safetensors``'s) must be a
    result of an evaluator that runs after every epoch; checked when every such evaluator says
    what it reports (``Evaluator.metrics``). With none, nothing is monitored, as documented."""
    reported: list[str] = []
    at_end: list[str] = []
    for _, ev in evaluators:
        metrics = getattr(ev, "metrics", None)
        if getattr(ev, "when", "epoch") == "end":
            at_end += metrics or ()
        elif metrics is None:
            return
        else:
            reported += metrics
    monitor = recipe.train.monitor
    if not reported or monitor in reported:
        return
    why = (
        f"{monitor!r} is reported only at the end of the run"
        if monitor in at_end
        else f"{monitor!r} is not a result of the recipe's evaluators"
    )
    close = difflib.get_close_matches(monitor, reported, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(f"train.monitor: {why}; the ones run after every epoch report {', '.join(reported)}{hint}")


def build_optimizer(
    recipe: schema.Recipe, registries: Registries, parameters: list[tuple[str, nn.Parameter]]
) -> torch.optim.Optimizer:
    ctx = OptimizerContext(parameters, recipe, registries)
    return registries.optimizer.build(recipe.train.optimizer, "train.optimizer", ctx, returns=torch.optim.Optimizer)


def build_schedule(
    recipe: schema.Recipe, registries: Registries, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> Schedule:
    ctx = ScheduleContext(optimizer, steps_per_epoch, steps_per_epoch * recipe.train.epochs, recipe, registries)
    return registries.schedule.build(recipe.train.schedule, "train.schedule", ctx, returns=Schedule)


def checkpoint_room(recipe: schema.Recipe, registries: Registries) -> int:
    """Bytes the run folder needs: an atomic save holds the old and the new checkpoint at once,
    each with the weights and up to two optimizer buffers per weight (sized on the meta device)."""
    model = build_model(recipe, "meta", registries)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * 3 * weights + (1 << 20)


@attrs.define
class Components:
    """Everything a run trains with, built from the recipe."""

    network: Network
    module: nn.Module
    parameters: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    splits: cdata.DatasetSplits
    train_augmenters: list[cdata.Augment]
    eval_augmenters: list[cdata.Augment]
    evaluators: list[tuple[str, Evaluator]]
    train_set: cdata.Augmented
    steps_per_epoch: int


def build_components(recipe: schema.Recipe, registries: Registries, strategy: Strategy) -> Components:
    """The model (initialised under the recipe's seed, placed by the strategy), the data, the
    augmenters, the optimizer over this process's parameters, the schedule and the evaluators."""
    network = build_model(recipe, "cpu", registries)
    splits = cdata.build_dataset(recipe, registries)
    module = strategy.prepare(network)
    if recipe.train.compile:  # in place: parameter names and checkpoints stay those of the eager module
        compile_in_place(module, recipe.train.compile_mode)
    if recipe.train.channels_last:
        module.to(memory_format=torch.channels_last)
    named = list(strategy.named_parameters(module))
    steps = cdata.steps_per_epoch(len(splits.train), recipe.data.batch_size)
    if steps == 0:
        raise RecipeError(
            f"data.batch_size = {recipe.data.batch_size} is larger than the training set ({len(splits.train)} samples)"
        )
    optimizer = build_optimizer(recipe, registries, named)
    train_aug = cdata.build_augmenters(recipe.data.train_augment, registries, "data.train_augment", recipe)
    eval_aug = cdata.build_augmenters(recipe.data.eval_augment, registries, "data.eval_augment", recipe)
    in_workers = [] if recipe.data.augment_on == "device" else train_aug
    evaluators = build_evaluators(recipe, registries)
    check_monitor(recipe, evaluators)
    return Components(
        network=network,
        module=module,
        parameters=dict(named),
        optimizer=optimizer,
        schedule=build_schedule(recipe, registries, optimizer, steps),
        splits=splits,
        train_augmenters=train_aug,
        eval_augmenters=eval_aug,
        evaluators=evaluators,
        train_set=cdata.Augmented(splits.train, in_workers, recipe.seed, cdata.STREAM_TRAIN_AUGMENT),
        steps_per_epoch=steps,
    )
