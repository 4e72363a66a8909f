"""Learning-rate schedules: constant, step, the paper's divide-by-10-on-plateau, and cosine
with linear warm-up (a per-step schedule).

Each is a ``convnet.core.Schedule``: ``after_step(step)`` after every optimizer step,
``after_epoch(metric)`` after each evaluation, and a JSON ``state_dict`` for resumes.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
from attrs import validators as v

from convnet.core import Schedule, ScheduleContext


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


@attrs.define
class CosineOptions:
    """Linear warm-up from ``warmup_start`` x lr over ``warmup_steps``, then a half cosine down
    to ``min_lr`` at the run's last step (``epochs x steps per epoch``)."""

    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))
    warmup_start: float = attrs.field(default=0.0, validator=[v.ge(0.0), v.le(1.0)])
    min_lr: float = attrs.field(default=0.0, validator=v.ge(0.0))


class _Scaling(Schedule):
    def _scale(self, factor: float, floor: float = 0.0) -> None:
        self.set_lr(lambda i, group: max(group["lr"] * factor, floor))


class StepSchedule(_Scaling):
    def __init__(self, options: StepOptions, ctx: ScheduleContext) -> None:
        super().__init__(ctx.optimizer)
        self.options, self.epochs = options, 0

    def after_epoch(self, metric: float | None) -> None:
        self.epochs += 1
        if self.epochs % self.options.every == 0:
            self._scale(self.options.gamma)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state["epochs"])


class PlateauSchedule(_Scaling):
    def __init__(self, options: PlateauOptions, ctx: ScheduleContext) -> None:
        super().__init__(ctx.optimizer)
        self.options = options
        self.best = math.inf
        self.bad_epochs = 0
        self.reductions = 0

    def after_epoch(self, metric: float | None) -> None:
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
        return {
            "best": self.best if math.isfinite(self.best) else None,
            "bad_epochs": self.bad_epochs,
            "reductions": self.reductions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.bad_epochs, self.reductions = int(state["bad_epochs"]), int(state["reductions"])


class CosineSchedule(Schedule):
    """Per step: the lr of each param group is a function of the steps done (nothing else is
    state, so a resume needs only the step, which the engine restores)."""

    def __init__(self, options: CosineOptions, ctx: ScheduleContext) -> None:
        super().__init__(ctx.optimizer)
        self.options, self.total = options, ctx.total_steps
        if options.warmup_steps >= ctx.total_steps:
            raise ValueError(
                f"warmup_steps = {options.warmup_steps} leaves no step of the run's {ctx.total_steps} for the cosine"
            )
        self.base = [float(group["lr"]) for group in ctx.optimizer.param_groups]
        self.after_step(0)

    def lr_at(self, step: int, base: float) -> float:
        o = self.options
        if step < o.warmup_steps:
            return base * (o.warmup_start + (1.0 - o.warmup_start) * step / o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / (self.total - o.warmup_steps))
        return o.min_lr + (base - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def after_step(self, step: int) -> None:
        self.set_lr(lambda i, group: self.lr_at(step, self.base[i]))

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base = [float(b) for b in state["base"]]
