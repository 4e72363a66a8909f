"""The LRN kernels as PyTorch custom operators: schemas, fake (shape) rules and the backward.

``convnet::lrn_forward(x, size, alpha, beta, k, save_scale) -> (y, scale)`` and
``convnet::lrn_backward(grad, x, scale, size, alpha, beta, k) -> dx`` are defined here, once;
the compiled sources (csrc/lrn_cpu.cpp, csrc/lrn_cuda.cu) only register their CPU and CUDA
implementations with ``TORCH_LIBRARY_IMPL``. The fake rules let ``torch.compile`` and
``torch.export`` trace the ops as opaque nodes; the backward is ``lrn_backward`` registered with
``torch.library.register_autograd`` (no Python ``autograd.Function``), so AOTAutograd puts it in
the compiled backward graph. ``lrn_backward``'s own backward (double backward) goes through the
reference formula.

``scale`` = (k + alpha * window sum)^-beta in the accumulation dtype (float32 for half and
bfloat16), saved by the forward for the backward; with ``save_scale = False`` it is an empty
tensor and the forward writes one tensor instead of two. Inference never saves it; training on
the CPU does not either: the CPU backward recomputes the scale, in the forward's order (the same
gradient bit for bit), which costs less than writing and reading back a second tensor as big as
the input (benchmarks/lrn.py; docs/benchmarks.md). The CUDA backward needs the scale saved.

``y`` has the layout ``torch.empty_like(x)`` gives: a channels_last input
(``train.channels_last``) keeps its layout. The CPU kernel computes on NHWC directly, with no
copy to NCHW and back, and a saved scale has ``y``'s layout; the CUDA kernel copies an NHWC
input to NCHW and back, and keeps its scale NCHW (only its own backward reads it).
"""

from __future__ import annotations

from typing import Any

import torch

NAMESPACE = "convnet"
FORWARD = f"{NAMESPACE}::lrn_forward"
BACKWARD = f"{NAMESPACE}::lrn_backward"

torch.library.define(
    FORWARD, "(Tensor x, int size, float alpha, float beta, float k, bool save_scale=True) -> (Tensor, Tensor)"
)
torch.library.define(
    BACKWARD, "(Tensor grad, Tensor x, Tensor scale, int size, float alpha, float beta, float k) -> Tensor"
)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' ``at::opmath_type``: float32 for half and bfloat16, else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


def recomputes_scale(device: torch.device) -> bool:
    """Whether this device's backward recomputes an unsaved scale (the CPU kernel's does)."""
    return device.type == "cpu"


def _check_nchw(x: torch.Tensor, what: str) -> None:
    torch._check(x.dim() == 4, lambda: f"LRN: {what} must be NCHW, got {x.dim()} dimensions")


@torch.library.register_fake(FORWARD)
def _forward_fake(
    x: torch.Tensor, size: int, alpha: float, beta: float, k: float, save_scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_nchw(x, "input")
    torch._check(size > 0, lambda: f"LRN: size must be positive, got {size}")
    dtype = accumulation_dtype(x.dtype)
    if not save_scale:
        scale = x.new_empty((0,), dtype=dtype)
    elif x.device.type == "cuda":  # the CUDA kernel computes NCHW and its backward reads the scale so
        scale = x.new_empty(x.shape, dtype=dtype)
    else:
        scale = torch.empty_like(x, dtype=dtype)
    return torch.empty_like(x), scale


@torch.library.register_fake(BACKWARD)
def _backward_fake(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, size: int, alpha: float, beta: float, k: float
) -> torch.Tensor:
    _check_nchw(x, "input")
    unsaved = scale.numel() == 0
    torch._check(
        grad.shape == x.shape and (unsaved or scale.shape == x.shape),
        lambda: "LRN backward: grad, input and scale shapes differ",
    )
    return torch.empty_like(x)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, size, alpha, beta, k, save_scale = inputs
    if not save_scale and not recomputes_scale(x.device):
        raise RuntimeError(
            f"convnet::lrn_forward was called with save_scale=False on a {x.device.type} input that "
            "needs a gradient; that device's backward needs the saved scale"
        )
    scale = output[1]
    ctx.mark_non_differentiable(scale)
    ctx.set_materialize_grads(False)  # else autograd writes a zero gradient for the scale, as big as x
    ctx.save_for_backward(x, scale)
    ctx.args = (size, alpha, beta, k)


def _backward(ctx: Any, grad: torch.Tensor, _grad_scale: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    if grad is None:
        return None, None, None, None, None, None
    x, scale = ctx.saved_tensors
    dx = torch.ops.convnet.lrn_backward(grad, x, scale, *ctx.args)
    return dx, None, None, None, None, None


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


def _setup_backward_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    grad, x, _scale, size, alpha, beta, k = inputs
    ctx.save_for_backward(grad, x)
    ctx.args = (size, alpha, beta, k)


def _double_backward(ctx: Any, ggx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward's own gradient (``create_graph=True``: a gradient penalty, a Hessian-vector
    product): the vector-Jacobian product of the reference formula's backward, the same function
    in plain torch ops, so second and higher orders are exact, at the reference's speed."""
    from convnet.plugins.lrn.reference import lrn_reference

    grad, x = ctx.saved_tensors
    size, alpha, beta, k = ctx.args

    def backward_of(g: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(lambda t: lrn_reference(t, size, alpha, beta, k), at)[1](g)[0]

    d_grad, d_x = torch.func.vjp(backward_of, grad, x)[1](ggx)
    return d_grad, d_x, None, None, None, None, None


torch.library.register_autograd(BACKWARD, _double_backward, setup_context=_setup_backward_context)


def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """The fused LRN on whichever device's kernel is loaded; differentiable through the op's backward.

    The scale is saved only when a backward can follow (autograd on and ``x`` requiring grad) and
    that backward cannot recompute it; under ``torch.compile`` and ``torch.export`` that choice
    is made once, at trace time.
    """
    if x.dim() != 4:
        raise ValueError(f"LRN expects an NCHW tensor, got {x.dim()} dimensions")
    save_scale = torch.is_grad_enabled() and x.requires_grad and not recomputes_scale(x.device)
    return torch.ops.convnet.lrn_forward(x, int(size), float(alpha), float(beta), float(k), save_scale)[0]
