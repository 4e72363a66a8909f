"""The paper's SGD update, where the velocity carries the learning rate.

    v <- momentum * v - weight_decay * lr * w - lr * g
    w <- w + v

torch.optim.SGD keeps lr outside the buffer (b <- momentum * b + g + wd * w; w <- w - lr * b).
The two agree while lr is constant; after an lr drop the paper's velocity still holds steps
taken at the old rate and decays them, where torch's rescales the whole buffer at once.

On the CPU the step is one operator (``convnet::paper_sgd_``, fused_step.py), one pass over each
parameter instead of four multi-tensor passes, with the same bits; ``fused=False`` keeps the
multi-tensor form, ``fused=True`` requires the operator (an error where it cannot be built or
does not take a parameter), ``None`` (the default) uses it wherever it can.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from convnet.plugins.optim import fused_step


class PaperSGD(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        fused: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        # Not a param-group default: it changes no number, so checkpoints do not record it.
        self.fused = fused
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            velocities = [self.state[p]["velocity"] for p in params]
            grads = [p.grad for p in params]
            if self._use_operator(params):
                fit = [fused_step.fits(p, g, v) for p, g, v in zip(params, grads, velocities)]
                if self.fused and not all(fit):
                    p = params[fit.index(False)]
                    raise ValueError(
                        f"PaperSGD(fused=True): the fused step takes dense float32/float64 CPU "
                        f"parameters whose gradient shares their layout, not this {tuple(p.shape)} "
                        f"{p.dtype} one on {p.device}"
                    )
                on = [i for i, f in enumerate(fit) if f]
                if on:
                    torch.ops.convnet.paper_sgd_(
                        [params[i] for i in on],
                        [grads[i] for i in on],
                        [velocities[i] for i in on],
                        mu,
                        -wd * lr if wd else None,
                        -lr,
                    )
                off = [i for i, f in enumerate(fit) if not f]
                params, grads, velocities = ([xs[i] for i in off] for xs in (params, grads, velocities))
            if params:
                _multi_tensor_step(params, grads, velocities, lr, mu, wd)
        return loss

    def _use_operator(self, params: list[torch.Tensor]) -> bool:
        if self.fused is False:
            return False
        if self.fused:
            if not fused_step.available():
                raise RuntimeError(
                    f"PaperSGD(fused=True): the fused step cannot be built here ({fused_step.failure()})"
                )
            return True
        return any(p.device.type == "cpu" for p in params) and fused_step.available()


def _multi_tensor_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    velocities: list[torch.Tensor],
    lr: float,
    mu: float,
    wd: float,
) -> None:
    """One multi-tensor kernel per operation instead of one per parameter and operation; the
    same operations in the same order as the per-tensor form, so the same bits."""
    torch._foreach_mul_(velocities, mu)
    if wd:
        torch._foreach_add_(velocities, params, alpha=-wd * lr)
    torch._foreach_add_(velocities, grads, alpha=-lr)
    torch._foreach_add_(params, velocities)
