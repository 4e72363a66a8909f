"""Optimizers (torch's SGD and the paper's form) and lr schedules."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import nn

from convnet.core import OptimizerContext, Registries, Schedule, hookimpl
from convnet.plugins.optim import fused_step
from convnet.plugins.optim import schedules as s
from convnet.plugins.optim.paper_sgd import PaperSGD


@attrs.define
class SGDOptions:
    """``decay_biases = false`` follows cuda-convnet, which decays weights only."""

    lr: float = attrs.field(default=0.01, validator=v.gt(0.0))
    momentum: float = attrs.field(default=0.9, validator=[v.ge(0.0), v.lt(1.0)])
    weight_decay: float = attrs.field(default=5e-4, validator=v.ge(0.0))
    decay_biases: bool = False


def _groups(named: list[tuple[str, nn.Parameter]], options: SGDOptions) -> list[dict]:
    if options.decay_biases:
        return [{"params": [p for _, p in named]}]
    decay = [p for n, p in named if not n.endswith("bias")]
    plain = [p for n, p in named if n.endswith("bias")]
    return [g for g in ({"params": decay}, {"params": plain, "weight_decay": 0.0}) if g["params"]]


def build_paper_sgd(options: SGDOptions, ctx: OptimizerContext) -> torch.optim.Optimizer:
    return PaperSGD(
        _groups(ctx.parameters, options), lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )


# `convnet build-kernels` builds the fused CPU step ahead of its first use.
build_paper_sgd.build = fused_step.build_ahead  # type: ignore[attr-defined]


def build_sgd(options: SGDOptions, ctx: OptimizerContext) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        _groups(ctx.parameters, options), lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay
    )


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.optimizer.add(
        "paper-sgd", build_paper_sgd, SGDOptions, "the paper's SGD: v <- m v - wd lr w - lr g; w <- w + v"
    )
    registries.optimizer.add("sgd", build_sgd, SGDOptions, "torch.optim.SGD (lr outside the momentum buffer)")
    schedule = registries.schedule.add
    schedule("constant", lambda options, ctx: Schedule(ctx.optimizer), s.ConstantOptions, "keep lr fixed")
    schedule("step", s.StepSchedule, s.StepOptions, "multiply lr by gamma every `every` epochs")
    schedule(
        "plateau",
        s.PlateauSchedule,
        s.PlateauOptions,
        "divide lr by 10 when the monitored validation error stops improving (the paper)",
    )
    schedule(
        "cosine",
        s.CosineSchedule,
        s.CosineOptions,
        "per step: linear warm-up, then a half cosine to min_lr at the run's last step",
    )
