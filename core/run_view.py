"""What a lifecycle hook sees of a run: a read-only view whose attributes are the contract."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from convnet.core.engine import Run
    from convnet.core.registry import Registries
    from convnet.core.schema import Recipe
    from convnet.core.strategy import Strategy


class RunView:
    """The run as plugins see it. Every attribute is read-only and documented here; nothing
    else of the engine is part of the contract.

    - ``recipe``: the resolved recipe (attrs classes); ``out``: the run folder;
    - ``step``, ``epoch``, ``batch_in_epoch``: steps done, the 0-based current epoch, steps
      done in it; ``steps_per_epoch``, ``total_steps`` (``max_steps`` applied); ``best``: the
      best monitored value so far (None before the first evaluation);
    - ``lr``: the first param group's learning rate; ``is_main``: True on the process that
      writes files (``rank == 0``); ``quiet``: the user asked for no progress output;
    - ``strategy``, ``module``: the parallelism strategy and the module it trains (read the
      canonical weights with ``model_state()``, on every process: it may gather);
    - ``registries``: the loaded components.
    """

    __slots__ = ("_run",)

    def __init__(self, run: Run) -> None:
        object.__setattr__(self, "_run", run)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RunView is read-only (tried to set {name!r})")

    recipe: Recipe = property(lambda self: self._run.recipe)  # type: ignore[assignment]
    out: Path = property(lambda self: self._run.out)  # type: ignore[assignment]
    step: int = property(lambda self: self._run.state.step)  # type: ignore[assignment]
    epoch: int = property(lambda self: self._run.state.epoch)  # type: ignore[assignment]
    batch_in_epoch: int = property(lambda self: self._run.state.batch_in_epoch)  # type: ignore[assignment]
    best: float | None = property(lambda self: self._run.state.best)  # type: ignore[assignment]
    steps_per_epoch: int = property(lambda self: self._run.parts.steps_per_epoch)  # type: ignore[assignment]
    total_steps: int = property(lambda self: self._run.total_steps)  # type: ignore[assignment]
    lr: float = property(lambda self: self._run.lr())  # type: ignore[assignment]
    is_main: bool = property(lambda self: self._run.strategy.is_main)  # type: ignore[assignment]
    quiet: bool = property(lambda self: self._run.quiet)  # type: ignore[assignment]
    strategy: Strategy = property(lambda self: self._run.strategy)  # type: ignore[assignment]
    module: nn.Module = property(lambda self: self._run.parts.module)  # type: ignore[assignment]
    registries: Registries = property(lambda self: self._run.registries)  # type: ignore[assignment]

    def model_state(self) -> dict[str, torch.Tensor]:
        """The canonical model state (``layers.conv1.weight`` ...), gathered to the main process."""
        return self._run.strategy.state_dict(self._run.parts.module)
