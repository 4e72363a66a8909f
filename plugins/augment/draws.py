"""Counter-based random draws from per-sample keys, identical in either placement.

An augmenter's randomness for one sample is a pure function of that sample's key (see
``convnet.core.data.sample_keys``): the per-image form reads the key from its generator's
``initial_seed()``, the batched form gets a tensor of keys. Each draw is a splitmix64 hash
of (key, draw number), computed in Python integers and floats, one sample at a time in both
placements, so a crop offset, a flip or a lighting offset is bit-identical whichever way the
chain runs (and costs a few microseconds, less than a numpy call on a one-element array).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from convnet.core import GOLDEN_GAMMA, splitmix64

_MASK = (1 << 64) - 1


def key_of(generator: torch.Generator) -> int:
    """The key a per-image generator was seeded with."""
    return generator.initial_seed() & _MASK


def keys_list(keys: torch.Tensor | Sequence[int]) -> list[int]:
    """A batch's keys as Python integers."""
    return [int(k) & _MASK for k in (keys.tolist() if isinstance(keys, torch.Tensor) else keys)]


def uniform(key: int, count: int) -> list[float]:
    """``count`` floats in [0, 1); draw j depends only on (key, j)."""
    base = splitmix64(key & _MASK)
    return [(splitmix64(base ^ ((j * GOLDEN_GAMMA) & _MASK)) >> 11) * (1.0 / (1 << 53)) for j in range(count)]


def below(u: float, high: int) -> int:
    """An integer uniform over ``0 .. high - 1`` from a uniform float."""
    return min(int(u * high), high - 1)


def normal(key: int, count: int) -> list[float]:
    """``count`` standard normal floats (Box-Muller)."""
    u = uniform(key, 2 * count)
    return [math.sqrt(-2.0 * math.log1p(-u[i])) * math.cos(2.0 * math.pi * u[count + i]) for i in range(count)]
