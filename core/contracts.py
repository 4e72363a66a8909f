"""One typed contract per registry kind: what a factory receives, what it returns, and when the
engine calls the returned object's methods. docs/plugins.md shows a complete plugin of each kind.

Every factory is called as ``factory(options, ctx)``: ``options`` is an instance of the attrs
class registered with it (the recipe's table, validated), ``ctx`` the kind's context below.

======== ================= ==================================================================
kind     ctx               factory returns
======== ================= ==================================================================
layer    LayerContext      ``BuiltLayer(module, out_shape, macs)``
lrn      LayerContext      ``fn(x, size, alpha, beta, k) -> Tensor`` (an LRN implementation)
augmenter DataContext      an ``Augment``: ``aug(image, generator) -> image`` (+ optional ``batch``)
dataset  DataContext       ``DatasetSplits(train, val, num_classes, classes)``
evaluator BuildContext     an ``Evaluator``: ``ev(EvalContext) -> dict`` of results
strategy BuildContext      a ``Strategy`` (subclass ``convnet.core.Strategy``)
optimizer OptimizerContext a ``torch.optim.Optimizer`` over ``ctx.parameters``
schedule ScheduleContext   a ``Schedule`` (subclass ``convnet.core.Schedule``)
======== ================= ==================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import torch
from torch import nn

from convnet.core.errors import RecipeError

if TYPE_CHECKING:
    from convnet.core.data import Augment, DataContext, DatasetSplits
    from convnet.core.evaluation import Evaluator
    from convnet.core.model import BuiltLayer, LayerContext
    from convnet.core.registry import Registries
    from convnet.core.schema import Recipe
    from convnet.core.strategy import Strategy


@attrs.frozen
class BuildContext:
    """What an evaluator or strategy factory knows: the resolved recipe, the registries (to
    build further components), and the recipe path of the component being built."""

    recipe: Recipe
    registries: Registries
    path: str

    def error(self, message: str) -> RecipeError:
        """A recipe error naming this component's path (raise it for a bad option)."""
        return RecipeError(f"{self.path}: {message}")


@attrs.frozen
class OptimizerContext:
    """What an optimizer factory knows: the parameters this process trains, by name
    (``layers.conv1.weight``; under tower-parallel only this rank's tower; under model-parallel
    with separate towers each group's piece, ``towers0/layers.conv1.weight``), and the recipe."""

    parameters: list[tuple[str, nn.Parameter]]
    recipe: Recipe
    registries: Registries
    path: str = "train.optimizer"


@attrs.frozen
class ScheduleContext:
    """What a schedule factory knows: the optimizer whose lr it sets, and the run's length.

    ``total_steps`` is ``epochs * steps_per_epoch`` (``train.max_steps`` stops a run early
    without changing a schedule's shape)."""

    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    recipe: Recipe
    registries: Registries
    path: str = "train.schedule"


class Schedule:
    """Sets the optimizer's learning rate. The engine calls, in this order:

    - ``after_step(step)`` after every optimizer step (``step`` = steps done, from 1): a
      per-step schedule (warm-up, cosine) sets the lr for the next step here;
    - ``after_epoch(metric)`` after each epoch's evaluation, with the recipe's
      ``train.monitor`` value (None when no evaluator reported it): the paper's plateau rule.

    ``state_dict()`` returns JSON values (saved in every checkpoint) and
    ``load_state_dict(state)`` restores them on ``--resume``: everything the schedule
    counts must be in it, or a resumed run differs from a straight one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def after_step(self, step: int) -> None:
        pass

    def after_epoch(self, metric: float | None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def set_lr(self, lr_of_group: Callable[[int, dict[str, Any]], float]) -> None:
        """Set each param group's lr to ``lr_of_group(index, group)``."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr_of_group(i, group)


# ---------------------------------------------------------------- factory protocols (typing only)


class LayerFactory(Protocol):
    def __call__(self, options: Any, ctx: LayerContext) -> BuiltLayer: ...


class LrnFactory(Protocol):
    def __call__(self, options: Any, ctx: LayerContext) -> Callable[..., torch.Tensor]: ...


class AugmenterFactory(Protocol):
    def __call__(self, options: Any, ctx: DataContext) -> Augment: ...


class DatasetFactory(Protocol):
    def __call__(self, options: Any, ctx: DataContext) -> DatasetSplits: ...


class EvaluatorFactory(Protocol):
    def __call__(self, options: Any, ctx: BuildContext) -> Evaluator: ...


class StrategyFactory(Protocol):
    def __call__(self, options: Any, ctx: BuildContext) -> Strategy: ...


class OptimizerFactory(Protocol):
    def __call__(self, options: Any, ctx: OptimizerContext) -> torch.optim.Optimizer: ...


class ScheduleFactory(Protocol):
    def __call__(self, options: Any, ctx: ScheduleContext) -> Schedule: ...
