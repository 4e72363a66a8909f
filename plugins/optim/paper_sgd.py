"""The paper's SGD update, where the velocity carries the learning rate.

    v <- momentum * v - weight_decay * lr * w - lr * g
    w <- w + v

torch.optim.SGD keeps lr outside the buffer (b <- momentum * b + g + wd * w; w <- w - lr * b).
The two agree while lr is constant; after an lr drop the paper's velocity still holds steps
taken at the old rate and decays them, where torch's rescales the whole buffer at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PaperSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
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
            # One multi-tensor kernel per operation instead of one per parameter and operation; the
            # same operations in the same order as the per-tensor form, so the same bits.
            torch._foreach_mul_(velocities, mu)
            if wd:
                torch._foreach_add_(velocities, params, alpha=-wd * lr)
            torch._foreach_add_(velocities, [p.grad for p in params], alpha=-lr)
            torch._foreach_add_(params, velocities)
        return loss
