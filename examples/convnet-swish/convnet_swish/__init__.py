"""A third-party convnet plugin: registers the ``swish`` layer through the entry point."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from convnet.core import BuiltLayer, LayerContext, hookimpl


@attrs.define
class SwishOptions:
    beta: float = 1.0


class Swish(nn.Module):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


def build_swish(options: SwishOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(Swish(options.beta), ctx.in_shape)


@hookimpl
def convnet_register(registries) -> None:
    registries.layer.add("swish", build_swish, SwishOptions, "swish activation x * sigmoid(beta x)")
