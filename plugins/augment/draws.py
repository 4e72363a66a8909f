"""Counter-based random draws from per-sample keys, identical in either placement.

An augmenter's randomness for one sample is a pure function of that sample's key (see
``convnet.core.data.sample_keys``): the per-image form reads the key from its generator's
``initial_seed()``, the batched form gets a tensor of keys. Draws are computed here in
float64 numpy on the CPU (a few numbers per image), then moved to the images' device, so a
crop offset, a flip or a lighting offset is the same whichever way the chain runs.
"""
from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_of(generator: torch.Generator) -> torch.Tensor:
    """The ``[1]`` key tensor of a per-image generator."""
    return torch.tensor([generator.initial_seed() & ((1 << 63) - 1)], dtype=torch.int64)


def uniform(keys: torch.Tensor, count: int) -> np.ndarray:
    """``[N, count]`` float64 in [0, 1): draw j of sample n depends only on (keys[n], j)."""
    k = keys.cpu().numpy().astype(np.uint64)[:, None]
    j = np.arange(count, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = _splitmix(_splitmix(k) ^ (j * _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(keys: torch.Tensor, count: int) -> np.ndarray:
    """``[N, count]`` float64 standard normal (Box-Muller)."""
    u = uniform(keys, 2 * count)
    radius = np.sqrt(-2.0 * np.log1p(-u[:, :count]))
    return radius * np.cos(2.0 * np.pi * u[:, count:])
