"""Max-pooling of NCHW tensors on the CPU as one operator, ``convnet::max_pool2d_nchw``.

torch's CPU max-pool is vectorised over the channels for channels_last tensors but scans each
window element by element for NCHW ones: at alexnet-imagenet's three pools (batch 32) its NCHW
forward takes about three times what this kernel (csrc/max_pool_cpu.cpp, built on first use like
the LRN kernels) takes. The operator returns torch's values and int64 argmax indices bit for bit
(NaN and tie rules included; tests/test_max_pool_kernel.py), so its backward is ATen's
``max_pool2d_with_indices_backward`` (``eager_kernels.max_pool2d_backward``) and a network trains
to the same bits with it or without it. ``available()`` is False where it cannot be built and the
``maxpool`` layer then keeps torch's kernel.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from convnet.core import cpp_kernels
from convnet.plugins.layers import eager_kernels

OP = "convnet::max_pool2d_nchw"
CSRC = Path(__file__).resolve().parent / "csrc"

torch.library.define(OP, "(Tensor x, int kernel, int stride) -> (Tensor, Tensor)")


@torch.library.register_fake(OP)
def _fake(x: Tensor, kernel: int, stride: int) -> tuple[Tensor, Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, [kernel, kernel], [stride, stride])


def _setup(ctx, inputs: tuple[Tensor, int, int], output: tuple[Tensor, Tensor]) -> None:
    x, kernel, stride = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1])
    ctx.window = (kernel, stride)


def _grad(ctx, grad: Tensor | None, _grad_indices: Tensor | None) -> tuple[Tensor | None, None, None]:
    if grad is None:
        return None, None, None
    x, indices = ctx.saved_tensors
    kernel, stride = ctx.window
    return eager_kernels.max_pool2d_backward(grad, x, indices, kernel, stride, 0), None, None


torch.library.register_autograd(OP, _grad, setup_context=_setup)

_failure: list[str] = []


def build(verbose: bool = False) -> None:
    """Build (or find in the cache) and load the CPU kernel; raises when it cannot."""
    cpp_kernels.load_cpu("convnet_max_pool_cpu", [CSRC / "max_pool_cpu.cpp"], [], verbose=verbose)


def build_ahead(verbose: bool = False) -> str:
    """For ``convnet build-kernels``."""
    build(verbose=verbose)
    return f"built and loaded (cached under {cpp_kernels.cache_root()})"


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the CPU kernel is built and loaded (building it on the first call). torch.compile
    takes the answer as a constant instead of tracing into the build."""
    return _built()


@functools.cache
def _built() -> bool:
    try:
        build()
    except Exception as exc:
        _failure[:] = [cpp_kernels.one_line(exc)]
        return False
    _failure.clear()
    return True


def failure() -> str | None:
    """Why ``available()`` is False, if it is."""
    return _failure[0] if _failure else None


def fits(x: Tensor, kernel: int, stride: int, padding: int) -> bool:
    """Whether the kernel takes this pooling: a non-empty contiguous NCHW float32/float64 CPU
    tensor, no padding, a window that fits. Forward-mode AD and functorch transforms (vmap,
    jvp), which the operator has no rules for, keep torch's kernel."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() == 4
        and x.is_contiguous()
        and x.numel() > 0
        and padding == 0
        and x.shape[2] >= kernel
        and x.shape[3] >= kernel
        and x.shape[2] * x.shape[3] < 2**31  # the kernel keeps rows as int32
        and not torch.jit.is_tracing()
        and not torch.compiler.is_exporting()
        and (torch.compiler.is_compiling() or not _transformed(x))
    )


def _transformed(x: Tensor) -> bool:
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def max_pool2d(x: Tensor, kernel: int, stride: int) -> tuple[Tensor, Tensor]:
    """``(output, indices)``, as ``aten.max_pool2d_with_indices(x, kernel, stride)`` gives them."""
    return torch.ops.convnet.max_pool2d_nchw.default(x, kernel, stride)
