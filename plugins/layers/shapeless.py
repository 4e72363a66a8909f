"""Layers that keep or simply reshape their input: activations, pooling, dropout, flatten."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, LayerContext, keyed


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


class KeyedDropout(nn.Module):
    """Dropout whose mask is keyed by (seed, step, layer id, global sample, global feature)
    (``convnet.core.keyed``): every strategy drops, for each element, what ``single`` drops.

    Outside a training step's forward (a direct call in train mode) it is torch's dropout;
    in eval mode the identity. A tower piece is told its towers with ``split_towers``.
    """

    def __init__(self, p: float, layer_id: str) -> None:
        super().__init__()
        self.p, self.layer_id = p, layer_id
        self.group: tuple[int, ...] | None = None
        self.towers = 1

    def split_towers(self, group: Sequence[int], towers: int) -> None:
        self.group, self.towers = tuple(group), towers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        draws = keyed.current()
        if draws is None:
            return nn.functional.dropout(x, self.p, True)
        keep = draws.keep(self.p, self.layer_id, keyed.features(x, self.group, self.towers), rows=x.shape[0])
        noise = keep.to(x.dtype).div_(1 - self.p) if self.p < 1 else keep.to(x.dtype)
        return x * noise.view_as(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer_id={self.layer_id!r}"


def build_dropout(options: DropoutOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(KeyedDropout(options.p, ctx.id), ctx.in_shape)


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
