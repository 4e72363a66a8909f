"""Learning-rate schedules: constant, step, and the paper's divide-by-10-on-plateau."""
from __future__ import annotations

import math
from typing import Any

import attrs
import torch
from attrs import validators as v


@attrs.define
class ConstantOptions:
    pass


@attrs.define
class StepOptions:
    every: int = attrs.field(default=30, validator=v.gt(0))
    gamma: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.le(1.0)])


@attrs.define
class PlateauOptions:
    """Divide lr by 1/factor when the monitored metric has not improved for ``patience`` epochs.

    The paper divides by 10 "when the validation error rate stopped improving", three times
    in all; ``max_reductions`` caps the drops (0 = no cap).
    """

    factor: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.lt(1.0)])
    patience: int = attrs.field(default=2, validator=v.ge(0))
    threshold: float = attrs.field(default=1e-4, validator=v.ge(0.0))
    max_reductions: int = attrs.field(default=3, validator=v.ge(0))
    min_lr: float = attrs.field(default=0.0, validator=v.ge(0.0))


class Schedule:
    """Adjusts the optimizer's lr after each epoch (given the monitored metric)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step_epoch(self, metric: float | None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _scale(self, factor: float, floor: float = 0.0) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = max(group["lr"] * factor, floor)


class StepSchedule(Schedule):
    def __init__(self, optimizer: torch.optim.Optimizer, options: StepOptions) -> None:
        super().__init__(optimizer)
        self.options, self.epochs = options, 0

    def step_epoch(self, metric: float | None) -> None:
        self.epochs += 1
        if self.epochs % self.options.every == 0:
            self._scale(self.options.gamma)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])


class PlateauSchedule(Schedule):
    def __init__(self, optimizer: torch.optim.Optimizer, options: PlateauOptions) -> None:
        super().__init__(optimizer)
        self.options = options
        self.best = math.inf
        self.bad_epochs = 0
        self.reductions = 0

    def step_epoch(self, metric: float | None) -> None:
        if metric is None or not math.isfinite(metric):
            return
        if metric < self.best - self.options.threshold:
            self.best, self.bad_epochs = metric, 0
            return
        self.bad_epochs += 1
        capped = self.options.max_reductions and self.reductions >= self.options.max_reductions
        if self.bad_epochs > self.options.patience and not capped:
            self._scale(self.options.factor, self.options.min_lr)
            self.reductions += 1
            self.bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None,
                "bad_epochs": self.bad_epochs, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.bad_epochs, self.reductions = int(state["bad_epochs"]), int(state["reductions"])
