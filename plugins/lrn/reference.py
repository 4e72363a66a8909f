"""The paper's local response normalisation, written plainly: the ground truth for tests.

b[c] = a[c] / (k + alpha * sum_{j = c - n//2}^{c + (n-1)//2} a[j]^2) ^ beta, the window
clipped at the edges. alpha multiplies the SUM (PyTorch and Caffe divide it by n). For an
even n the window reaches n//2 channels below c and n//2 - 1 above, as
``torch.nn.functional.local_response_norm`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_sum_of_squares(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of a^2 over the channel window, accumulated in at least float32."""
    acc = x.to(torch.promote_types(x.dtype, torch.float32))
    sq = (acc * acc).unsqueeze(1)  # N,1,C,H,W
    below, above = size // 2, (size - 1) // 2
    sq = F.pad(sq, (0, 0, 0, 0, below, above))
    return _box(sq, size)


def _box(sq: torch.Tensor, size: int) -> torch.Tensor:
    c = sq.shape[2] - size + 1
    out = sq[:, :, 0:c]
    for j in range(1, size):
        out = out + sq[:, :, j : j + c]
    return out.squeeze(1)


def lrn_reference(
    x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"LRN expects an NCHW tensor, got {x.dim()} dimensions")
    s = window_sum_of_squares(x, size)
    acc = x.to(s.dtype)
    return (acc / (k + alpha * s).pow(beta)).to(x.dtype)


def lrn_torch(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> torch.Tensor:
    """PyTorch's own LRN; its alpha is divided by ``size``, so pass ``size * alpha``."""
    return F.local_response_norm(x, size, alpha=alpha * size, beta=beta, k=k)
