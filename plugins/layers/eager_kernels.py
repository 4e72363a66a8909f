"""torch's own ReLU and max-pool kernels as opaque custom operators, for CPU training under
``torch.compile``.

Inductor's CPU code for these two layers' training graphs is slow where eager's is not: it saves
ReLU's backward as a bool mask (``y <= 0``) and max-pool's argmax as int8 offsets, and its
generated C++ stores those masks 8-22x slower than eager computes them (torch 2.14.1, AVX-512
and AVX2 code alike: a [32,96,55,55] mask takes 45 ms compiled against 2 ms eager; see
docs/benchmarks.md). Called through these ops, the layers run the eager kernels, and the backward
reads the saved output (ReLU) or the input and its int64 indices (max-pool), as eager autograd
does: the same numbers bit for bit, and the same saved tensors as an eager step.

The ops are used only where that helps: under ``torch.compile`` (not ``torch.export``, whose
programs keep the standard ATen ops for ONNX and other runtimes), on the CPU (Triton's generated
GPU code has no such cost, and fusing there saves memory traffic), and when a backward will follow
(inference keeps inductor's fusions). The relu and maxpool layers' ``opaque_under_compile``
option turns it off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def wanted(x: Tensor) -> bool:
    """Whether a layer should call these ops for ``x`` (decided once, at trace time, under compile)."""
    return (
        torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and x.requires_grad
    )


@torch.library.custom_op("convnet::relu", mutates_args=())
def relu(x: Tensor) -> Tensor:
    return torch.relu(x)


@relu.register_fake
def _relu_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("convnet::relu_backward", mutates_args=())
def relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(grad, y, 0)


@relu_backward.register_fake
def _relu_backward_fake(grad: Tensor, y: Tensor) -> Tensor:
    torch._check(grad.shape == y.shape, lambda: "ReLU backward: grad and output shapes differ")
    # ATen's own meta rule: the result takes y's layout, not grad's (a flatten after a
    # channels_last ReLU hands back an NCHW grad).
    return torch.ops.aten.threshold_backward(grad, y, 0)


def _relu_setup(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
    ctx.save_for_backward(output)


def _relu_grad(ctx: Any, grad: Tensor) -> Tensor:
    (y,) = ctx.saved_tensors
    return relu_backward(grad, y)


relu.register_autograd(_relu_grad, setup_context=_relu_setup)


def _relu_backward_setup(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(inputs[1])


def _relu_backward_grad(ctx: Any, grad_grad: Tensor) -> tuple[Tensor, None]:
    """Double backward (a gradient penalty under a backend that supports it): linear in grad,
    piecewise constant in y, as ATen's threshold_backward formula says."""
    (y,) = ctx.saved_tensors
    return relu_backward(grad_grad, y), None


relu_backward.register_autograd(_relu_backward_grad, setup_context=_relu_backward_setup)


def _window(kernel: int, stride: int, padding: int) -> tuple[list[int], list[int], list[int]]:
    return [kernel, kernel], [stride, stride], [padding, padding]


@torch.library.custom_op("convnet::max_pool2d", mutates_args=())
def max_pool2d(x: Tensor, kernel: int, stride: int, padding: int) -> tuple[Tensor, Tensor]:
    """Square max-pooling, dilation 1, floor mode: ``(output, int64 argmax indices)``."""
    return torch.ops.aten.max_pool2d_with_indices(x, *_window(kernel, stride, padding))


@max_pool2d.register_fake
def _max_pool2d_fake(x: Tensor, kernel: int, stride: int, padding: int) -> tuple[Tensor, Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, *_window(kernel, stride, padding))


@torch.library.custom_op("convnet::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad: Tensor, x: Tensor, indices: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    k, s, p = _window(kernel, stride, padding)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, k, s, p, [1, 1], False, indices)


@max_pool2d_backward.register_fake
def _max_pool2d_backward_fake(
    grad: Tensor, x: Tensor, indices: Tensor, kernel: int, stride: int, padding: int
) -> Tensor:
    torch._check(grad.shape == indices.shape, lambda: "max-pool backward: grad and indices shapes differ")
    k, s, p = _window(kernel, stride, padding)
    # ATen's own meta rule: the result is laid out in x's suggested memory format.
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, k, s, p, [1, 1], False, indices)


def _max_pool2d_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, kernel, stride, padding = inputs
    indices = output[1]
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, indices)
    ctx.window = (kernel, stride, padding)


def _max_pool2d_grad(ctx: Any, grad: Tensor | None, _grad_indices: Tensor | None) -> tuple[Tensor | None, ...]:
    if grad is None:
        return None, None, None, None
    x, indices = ctx.saved_tensors
    return max_pool2d_backward(grad, x, indices, *ctx.window), None, None, None


max_pool2d.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)


def _max_pool2d_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[2])


def _max_pool2d_backward_grad(ctx: Any, grad_grad: Tensor) -> tuple[Tensor | None, ...]:
    """Double backward: each output gradient is the input gradient at its argmax (ATen's
    max_pool_double_backward); nothing flows to x or the indices."""
    (indices,) = ctx.saved_tensors
    picked = grad_grad.flatten(-2).gather(-1, indices.flatten(-2)).view(indices.shape)
    return picked, None, None, None, None, None


max_pool2d_backward.register_autograd(_max_pool2d_backward_grad, setup_context=_max_pool2d_backward_setup)
