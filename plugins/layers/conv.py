"""Convolution: grouped by tower when tower-local, full when ``towers = "cross"``."""

from __future__ import annotations

import attrs
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, LayerContext
from convnet.plugins.layers.init import InitOptions, initialise


@attrs.define
class ConvOptions(InitOptions):
    out: int = attrs.field(validator=v.gt(0))
    kernel: int = attrs.field(validator=v.gt(0))
    stride: int = attrs.field(default=1, validator=v.gt(0))
    padding: int = attrs.field(default=0, validator=v.ge(0))


def build_conv(options: ConvOptions, ctx: LayerContext) -> BuiltLayer:
    if len(ctx.in_shape) != 3:
        raise ctx.error(f"conv needs a [channels, height, width] input, found {list(ctx.in_shape)}")
    c, h, w = ctx.in_shape
    g = ctx.groups
    if c % g or options.out % g:
        raise ctx.error(
            f"a tower-local conv splits channels over {g} towers: input {list(ctx.in_shape)} "
            f'and out = {options.out} must both divide by {g} (or set towers = "cross")'
        )
    k, s, p = options.kernel, options.stride, options.padding
    if k > h + 2 * p or k > w + 2 * p:
        raise ctx.error(f"kernel {k}x{k} (padding {p}) is larger than its input {list(ctx.in_shape)}")
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    module = nn.Conv2d(c, options.out, k, stride=s, padding=p, groups=g, device=ctx.device)
    initialise(module, options)
    macs = options.out * oh * ow * (c // g) * k * k
    return BuiltLayer(module, (options.out, oh, ow), macs)
