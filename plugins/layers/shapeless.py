"""Layers that keep or simply reshape their input: activations, pooling, dropout, flatten."""
from __future__ import annotations

import math

import attrs
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, LayerContext


@attrs.define
class NoOptions:
    pass


@attrs.define
class DropoutOptions:
    p: float = attrs.field(default=0.5, validator=[v.ge(0.0), v.le(1.0)])


@attrs.define
class PoolOptions:
    kernel: int = attrs.field(default=3, validator=v.gt(0))
    stride: int = attrs.field(default=2, validator=v.gt(0))
    padding: int = attrs.field(default=0, validator=v.ge(0))


def build_relu(options: NoOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(nn.ReLU(), ctx.in_shape)


def build_tanh(options: NoOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(nn.Tanh(), ctx.in_shape)


def build_dropout(options: DropoutOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(nn.Dropout(options.p), ctx.in_shape)


def build_flatten(options: NoOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(nn.Flatten(), (math.prod(ctx.in_shape),))


def _pool(kind: type[nn.Module]):
    def build(options: PoolOptions, ctx: LayerContext) -> BuiltLayer:
        if len(ctx.in_shape) != 3:
            raise ctx.error(f"pooling needs a [channels, height, width] input, found {list(ctx.in_shape)}")
        c, h, w = ctx.in_shape
        k, s, p = options.kernel, options.stride, options.padding
        if p * 2 > k:
            raise ctx.error(f"padding {p} must be at most half the kernel {k}")
        if k > h + 2 * p or k > w + 2 * p:
            raise ctx.error(f"pooling window {k}x{k} is larger than its input {list(ctx.in_shape)}")
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        return BuiltLayer(kind(k, s, p), (c, oh, ow))
    return build


build_maxpool = _pool(nn.MaxPool2d)
build_avgpool = _pool(nn.AvgPool2d)
