"""Fully connected layer; tower-local ones are block-diagonal (one block per tower)."""

from __future__ import annotations

import math

import attrs
import torch
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, LayerContext
from convnet.plugins.layers.init import InitOptions, initialise


@attrs.define
class LinearOptions(InitOptions):
    """``out``: the number of output features. Unset in the last layer it is
    ``model.num_classes`` (the recipe loader writes it into the resolved recipe); every
    other fc layer must state it."""

    out: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))


class GroupedLinear(nn.Module):
    """``groups`` independent linear maps on consecutive feature blocks.

    The weight is ``[out, in // groups]`` like a grouped conv's, so rows stay in tower order.
    With one group it is exactly ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device))
        if self.weight.device.type != "meta":
            bound = 1 / math.sqrt(in_features // groups)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return nn.functional.linear(x, self.weight, self.bias)
        n = x.shape[0]
        g = self.groups
        xs = x.reshape(n, g, self.in_features // g).transpose(0, 1)
        ws = self.weight.reshape(g, self.out_features // g, self.in_features // g)
        y = torch.bmm(xs, ws.transpose(1, 2)).transpose(0, 1).reshape(n, self.out_features)
        return y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.groups}"


def build_linear(options: LinearOptions, ctx: LayerContext) -> BuiltLayer:
    if len(ctx.in_shape) != 1:
        raise ctx.error(f"fc needs a flat input, found {list(ctx.in_shape)}: add a flatten layer before it")
    if options.out is None:
        raise ctx.error("fc needs out = <features> (only the last layer's out defaults to model.num_classes)")
    (f,) = ctx.in_shape
    g = ctx.groups
    if f % g or options.out % g:
        raise ctx.error(
            f"a tower-local fc splits features over {g} towers: input {f} and out = "
            f'{options.out} must both divide by {g} (or set towers = "cross")'
        )
    module = GroupedLinear(f, options.out, g, device=ctx.device)
    initialise(module, options)
    return BuiltLayer(module, (options.out,), options.out * (f // g))
