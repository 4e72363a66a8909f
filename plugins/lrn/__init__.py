"""Local response normalisation: the ``lrn`` layer and its swappable implementations.

``local_response_norm(x, size, alpha, beta, k, impl)`` is the public function; the layer
calls it per tower. Implementations live in the ``lrn`` registry; ``auto`` picks the
fastest one available for the tensor's device.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import attrs
import torch
from attrs import validators as v
from torch import nn

from convnet.core import BuiltLayer, ConvnetError, LayerContext, Registries, hookimpl
from convnet.plugins.lrn import kernels, ops
from convnet.plugins.lrn import onnx as lrn_onnx
from convnet.plugins.lrn.reference import lrn_reference, lrn_torch

LrnFn = Callable[[torch.Tensor, int, float, float, float], torch.Tensor]

IMPLS = ("auto", "reference", "torch", "cpu", "cuda")


@attrs.define
class ImplOptions:
    pass


def _kernel(name: str) -> LrnFn | None:
    """A compiled kernel, or None when it cannot be built here (``kernels.failure`` says why)."""
    return kernels.get(name)


@torch.compiler.assume_constant_result
def _available(name: str) -> bool:
    """Whether kernel ``name`` is loaded (building it on the first call). torch.compile takes the
    answer as a constant instead of tracing into the build, so the op stays in one graph."""
    return kernels.get(name) is not None


_warned: set[str] = set()
_DEVICE_KERNELS = {"cuda": "cuda", "cpu": "cpu"}


def _auto(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    name = _DEVICE_KERNELS.get(x.device.type)
    if name is not None and _available(name):
        return ops.lrn(x, size, alpha, beta, k)
    key = name or x.device.type
    if key not in _warned:
        _warned.add(key)
        why = kernels.failure(name) if name else "no kernel for this device type"
        warnings.warn(
            f"LRN: the {key} kernel is not available ({why}); using the reference implementation (slower, same result)",
            RuntimeWarning,
            stacklevel=3,
        )
    return lrn_reference(x, size, alpha, beta, k)


def _require(name: str) -> LrnFn:
    def run(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        if not _available(name):
            raise KernelUnavailable(
                f'LRN impl {name!r} is not available here ({kernels.failure(name)}); use impl = "auto" or "reference"'
            )
        if x.device.type != name:
            raise RuntimeError(f"LRN impl {name!r} needs a {name} tensor, got one on {x.device}")
        return ops.lrn(x, size, alpha, beta, k)

    return run


class KernelUnavailable(ConvnetError, RuntimeError):
    """An explicitly chosen kernel (``impl = "cpu"`` or ``"cuda"``) cannot run here."""


_FNS: dict[str, LrnFn] = {
    "auto": _auto,
    "reference": lrn_reference,
    "torch": lrn_torch,
    "cpu": _require("cpu"),
    "cuda": _require("cuda"),
}


def local_response_norm(
    x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, impl: str = "auto"
) -> torch.Tensor:
    """The paper's LRN on an NCHW tensor (alpha multiplies the window SUM)."""
    if impl not in _FNS:
        raise ValueError(f"unknown LRN impl {impl!r}; expected one of {', '.join(IMPLS)}")
    return _FNS[impl](x, size, alpha, beta, k)


@attrs.define
class LrnOptions:
    size: int = attrs.field(default=5, validator=v.gt(0))
    alpha: float = attrs.field(default=1e-4, validator=v.ge(0))
    beta: float = attrs.field(default=0.75, validator=v.ge(0))
    k: float = attrs.field(default=2.0, validator=v.gt(0))
    impl: str = attrs.field(default="auto")


class LocalResponseNorm(nn.Module):
    """Normalises within each tower's block of channels (``groups`` = towers), or across all."""

    def __init__(self, fn: LrnFn, size: int, alpha: float, beta: float, k: float, groups: int, impl: str) -> None:
        super().__init__()
        self.fn, self.size, self.alpha, self.beta, self.k, self.groups, self.impl = (
            fn,
            size,
            alpha,
            beta,
            k,
            groups,
            impl,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return self.fn(x, self.size, self.alpha, self.beta, self.k)
        n, c, h, w = x.shape
        g = self.groups
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # NHWC memory: each tower's block of a pixel's channels is a pixel of a channels_last
            # [n, c / g, h, w * g] tensor, a view, where NCHW's reshape would copy.
            towers = x.permute(0, 2, 3, 1).reshape(n, h, w * g, c // g).permute(0, 3, 1, 2)
            y = self.fn(towers, self.size, self.alpha, self.beta, self.k)
            return y.permute(0, 2, 3, 1).reshape(n, h, w, c).permute(0, 3, 1, 2)
        y = self.fn(x.reshape(n * g, c // g, h, w), self.size, self.alpha, self.beta, self.k)
        return y.reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
            f"groups={self.groups}, impl={self.impl}"
        )


def build_lrn(options: LrnOptions, ctx: LayerContext) -> BuiltLayer:
    if len(ctx.in_shape) != 3:
        raise ctx.error(f"lrn needs a [channels, height, width] input, found {list(ctx.in_shape)}")
    if ctx.in_shape[0] % ctx.groups:
        raise ctx.error(f"tower-local lrn: {ctx.in_shape[0]} channels do not divide by {ctx.groups} towers")
    entry = ctx.registries.lrn.get(options.impl, f"{ctx.path}.impl")
    if ctx.device.type != "meta":  # a real build: fail here, with the recipe path, not mid-epoch
        if options.impl == "cuda" and not torch.cuda.is_available():
            raise ctx.error('impl = "cuda" needs a CUDA device and none is available here; use "auto"')
        if options.impl in _DEVICE_KERNELS and _kernel(options.impl) is None:
            raise ctx.error(
                f'impl = "{options.impl}": the kernel cannot be built here ({kernels.failure(options.impl)}); '
                'use "auto" or "reference"'
            )
    fn = entry.factory(options, ctx)
    return BuiltLayer(
        LocalResponseNorm(fn, options.size, options.alpha, options.beta, options.k, ctx.groups, options.impl),
        ctx.in_shape,
    )


def _impl_factory(name: str) -> Callable[[LrnOptions, LayerContext], LrnFn]:
    def factory(options: LrnOptions, ctx: LayerContext) -> LrnFn:
        return lambda x, size, alpha, beta, k: local_response_norm(x, size, alpha, beta, k, impl=name)

    if name in kernels.KERNELS:
        # `convnet build-kernels` calls this ahead of time: it knows nothing of LRN, only the attribute.
        factory.build = functools.partial(kernels.build_ahead, name)  # type: ignore[attr-defined]
    return factory


# `convnet export --format onnx` looks for this attribute on registered factories (core/export.py).
build_lrn.onnx_translations = {  # type: ignore[attr-defined]
    torch.ops.convnet.lrn_forward.default: lrn_onnx.lrn_forward
}


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.layer.add(
        "lrn", build_lrn, LrnOptions, "local response normalisation across channels (the paper's, alpha on the sum)"
    )
    lrn = registries.lrn.add
    lrn("auto", _impl_factory("auto"), ImplOptions, "the fastest kernel for the tensor's device, else reference")
    lrn("reference", _impl_factory("reference"), ImplOptions, "the formula in plain torch (ground truth)")
    lrn("torch", _impl_factory("torch"), ImplOptions, "torch.nn.functional.local_response_norm, alpha mapped")
    lrn("cpu", _impl_factory("cpu"), ImplOptions, "fused C++ kernel (forward and backward)")
    lrn("cuda", _impl_factory("cuda"), ImplOptions, "hand-written CUDA kernel (forward and backward)")
