"""The paper's SGD step as one operator, ``convnet::paper_sgd_``, one pass over each parameter.

``paper_sgd_(params, grads, velocities, momentum, weight_step, grad_step)`` updates in place::

    v <- momentum * v + weight_step * w + grad_step * g     (no weight term when weight_step is None)
    w <- w + v

with ``weight_step = -weight_decay * lr`` and ``grad_step = -lr``. Its CPU implementation
(csrc/paper_sgd_cpu.cpp) is built on first use like the LRN kernels and gives the bits that
``PaperSGD``'s multi-tensor form gives (tests/test_optim_paper_sgd.py), in under half the time
(benchmarks/paper_sgd.py). ``available()`` is False where it cannot be built; ``failure()`` then
says why and the optimizer keeps the multi-tensor form.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from convnet.core import cpp_kernels

OP = "convnet::paper_sgd_"
CSRC = Path(__file__).resolve().parent / "csrc"

torch.library.define(
    OP,
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] velocities, float momentum, float? weight_step, "
    "float grad_step) -> ()",
)


@torch.library.register_fake(OP)
def _fake(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    velocities: list[torch.Tensor],
    momentum: float,
    weight_step: float | None,
    grad_step: float,
) -> None:
    return None


_failure: list[str] = []


def build(verbose: bool = False) -> None:
    """Build (or find in the cache) and load the CPU kernel; raises when it cannot."""
    # -ffp-contract=off: the source says which multiply-adds are fused (those ATen fuses).
    cpp_kernels.load_cpu(
        "convnet_paper_sgd_cpu", [CSRC / "paper_sgd_cpu.cpp"], [], ["-ffp-contract=off"], verbose=verbose
    )


def build_ahead(verbose: bool = False) -> str:
    """For ``convnet build-kernels``."""
    build(verbose=verbose)
    return f"built and loaded (cached under {cpp_kernels.cache_root()})"


@functools.cache
def available() -> bool:
    """Whether the CPU kernel is built and loaded (building it on the first call)."""
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


def fits(param: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor) -> bool:
    """Whether the kernel takes this triple: CPU, float32 or float64, each contiguous or
    channels_last (the layouts ``train.channels_last`` gives), all three in one memory order."""
    return (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.float64)
        and grad.layout == torch.strided
        and grad.dtype == velocity.dtype == param.dtype
        and grad.device == velocity.device == param.device
        and param.shape == grad.shape == velocity.shape
        and all(map(_dense, (param, grad, velocity)))
        and _order(param) == _order(grad) == _order(velocity)
    )


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _order(t: torch.Tensor) -> list[int]:
    """The strides that fix a dense tensor's memory order (a size-1 dimension's stride fixes nothing)."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]
