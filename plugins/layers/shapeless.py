"""Layers that keep or simply reshape their input: activations, pooling, dropout, flatten."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import torch
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, LayerContext, keyed
from convnet.plugins.layers import eager_kernels, max_pool_kernel


@attrs.define
class NoOptions:
    pass


@attrs.define
class ReluOptions:
    """``inplace = true`` rectifies the previous layer's output in place, as torchvision's AlexNet
    does (one activation less to allocate and write: about 3 % of a CPU training step of
    alexnet-imagenet), whenever that is known to be safe; otherwise it writes a new tensor, and
    the numbers are the same either way. Only the producer is checked, not who else holds its
    output: set it false when a forward hook or a layer of your own keeps the previous layer's
    output and must see it unrectified.

    ``opaque_under_compile = true`` runs torch's eager ReLU as an opaque op when training on the
    CPU under ``torch.compile`` (``eager_kernels``: inductor's CPU code for ReLU's backward mask
    is slower than eager's); the numbers are the same either way."""

    inplace: bool = True
    opaque_under_compile: bool = True


@attrs.define
class DropoutOptions:
    p: float = attrs.field(default=0.5, validator=[v.ge(0.0), v.le(1.0)])


@attrs.define
class PoolOptions:
    kernel: int = attrs.field(default=3, validator=v.gt(0))
    stride: int = attrs.field(default=2, validator=v.gt(0))
    padding: int = attrs.field(default=0, validator=v.ge(0))


@attrs.define
class MaxPoolOptions(PoolOptions):
    """``impl = "auto"`` pools contiguous NCHW float CPU tensors without padding with convnet's
    own kernel (``max_pool_kernel``: torch's values and indices, about three times faster), and
    everything else with torch's; ``"torch"`` always uses torch's. The numbers are the same either
    way.

    ``opaque_under_compile = true`` runs the eager kernel as an opaque op when training on the CPU
    under ``torch.compile`` (``eager_kernels``); the numbers are the same either way."""

    impl: str = attrs.field(default="auto", validator=v.in_(("auto", "torch")))
    opaque_under_compile: bool = True


# Autograd nodes whose backward does not read their output: rectifying that output in place
# changes nothing the backward needs. A producer not listed (tanh and sigmoid read their output,
# a third party's node is unknown) gets an out-of-place ReLU; so do views, leaves (a batch the
# caller still holds) and tensors outside autograd (evaluation), and anything under torch.compile,
# which plans its own buffers.
_SAFE_PRODUCERS = frozenset(
    {
        "ConvolutionBackward0",
        "AddmmBackward0",
        "MmBackward0",
        "AddBackward0",
        "MulBackward0",
        "NativeDropoutBackward0",
        "MaxPool2DWithIndicesBackward0",
        "GeneratedBackwardFor_convnet_max_pool2d_nchw_defaultBackward",  # max_pool_kernel's op
        "AvgPool2DBackward0",
    }
)


def rectify_in_place_is_safe(x: torch.Tensor) -> bool:
    """Whether ``x`` may be overwritten by its ReLU: the output of a producer whose backward does
    not read it, not a view of another tensor (other holders of ``x`` are not checked)."""
    if torch.compiler.is_compiling() or not x.requires_grad or x._is_view():
        return False
    return type(x.grad_fn).__name__ in _SAFE_PRODUCERS


class ReLU(nn.ReLU):
    """``nn.ReLU`` that works in place when ``rectify_in_place_is_safe`` says so (``inplace``),
    and through ``eager_kernels.relu`` when compiled for CPU training (``opaque_under_compile``)."""

    def __init__(self, inplace: bool = False, opaque_under_compile: bool = False) -> None:
        super().__init__(inplace)
        self.opaque_under_compile = opaque_under_compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.opaque_under_compile and eager_kernels.wanted(x):
            return eager_kernels.relu(x)
        if self.inplace and rectify_in_place_is_safe(x):
            return torch.relu_(x)
        return torch.relu(x)


def build_relu(options: ReluOptions, ctx: LayerContext) -> BuiltLayer:
    return BuiltLayer(ReLU(options.inplace, options.opaque_under_compile), ctx.in_shape)


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


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools NCHW CPU tensors with ``max_pool_kernel`` (``impl = "auto"``)
    and runs through an opaque op when compiled for CPU training (``opaque_under_compile``)."""

    def __init__(
        self, kernel: int, stride: int, padding: int, opaque_under_compile: bool = False, impl: str = "torch"
    ) -> None:
        super().__init__(kernel, stride, padding)
        self.opaque_under_compile, self.impl = opaque_under_compile, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The ops are square, dilation 1, floor mode: a module changed after it was built keeps nn's path.
        k, s, p = self.kernel_size, self.stride, self.padding
        square = all(type(n) is int for n in (k, s, p))
        if not square or self.dilation != 1 or self.ceil_mode or self.return_indices:
            return super().forward(x)
        compiling = torch.compiler.is_compiling()
        opaque = self.opaque_under_compile and eager_kernels.wanted(x)
        if (
            self.impl == "auto"
            and (opaque or not compiling)
            and max_pool_kernel.fits(x, k, s, p)
            and max_pool_kernel.available()
        ):
            return max_pool_kernel.max_pool2d(x, k, s)[0]
        if opaque:
            return eager_kernels.max_pool2d(x, k, s, p)[0]
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"


def _pool(kind: Callable[[int, int, int, PoolOptions], nn.Module]):
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
        return BuiltLayer(kind(k, s, p, options), (c, oh, ow))

    return build


build_maxpool = _pool(lambda k, s, p, options: MaxPool2d(k, s, p, options.opaque_under_compile, options.impl))
# `convnet build-kernels` builds the NCHW CPU kernel ahead of its first use.
build_maxpool.build = max_pool_kernel.build_ahead  # type: ignore[attr-defined]
build_avgpool = _pool(lambda k, s, p, options: nn.AvgPool2d(k, s, p))
