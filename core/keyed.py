"""Keyed randomness: random numbers that are a function of where they are used, not of a stream.

A random layer (dropout, or a plugin's own) draws, for the element (sample ``n``, feature
``f``) of its activation, a number that depends only on (run seed, training step, the layer's
key, the global sample index of ``n``, the global feature index of ``f``): a counter-based
splitmix64 hash, the same bits on CPU and CUDA. Nothing is consumed from a generator, so each
tower and each data shard computes exactly its slice of what ``single`` computes for the
whole batch, and every strategy (single, model-parallel fused or per tower, tower-parallel,
ddp over any number of ranks and nodes) follows ``single``'s trajectory; a resume needs no
generator state for them either.

The engine opens the context around the training forward::

    with keyed.keyed_draws(seed, step, sample_indices):   # dataset indices of this process's rows
        logits = module(x)

A random layer reads it (``current()`` is None outside a training forward: a user calling
the model directly; fall back to torch's own generator there, as the dropout layer does)::

    draws = keyed.current()
    features = keyed.features(x, self.group, self.towers)     # global feature index of each [1:] element
    u = draws.uniform(self.layer_id, features, device=x.device)   # [N, F] in [0, 1), 24 bits
    keep = draws.keep(self.p, self.layer_id, features, device=x.device)  # [N, F] bool, P(True) = 1 - p

A layer that needs several numbers per element keys each with its own extra part
(``draws.uniform((self.layer_id, 0), ...)``, ``(self.layer_id, 1)``).

Tower slices: under model-parallel and tower-parallel a parameter-free tower-local layer is
copied per tower group and computes only the blocks of dim 1 that belong to the towers of its
group. A module with a ``split_towers(group, towers)`` method is told so when it is copied;
``features(x, group, towers)`` then gives the global feature indices of its slice.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch

from convnet.core.data import _SPLITMIX, splitmix64

Part = int | str | tuple


def _signed(c: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = (_signed(c) for c in _SPLITMIX)
_UNIFORM_BITS = 24
_SHIFT = 64 - _UNIFORM_BITS


def _part(part: Part) -> int:
    if isinstance(part, str):
        return int.from_bytes(hashlib.blake2b(part.encode(), digest_size=8).digest(), "little")
    if isinstance(part, tuple):
        return key(*part)
    return int(part)


def key(*parts: Part) -> int:
    """A 64-bit key (a Python int) from integers and strings: chained splitmix64, as
    ``data.sample_key`` chains its parts; a string is hashed with blake2b, a tuple keyed first."""
    z = 0
    for part in parts:
        z = splitmix64(z ^ (_part(part) & ((1 << 64) - 1)))
    return z


def _xorshift_(z: torch.Tensor, shift: int, tmp: torch.Tensor) -> None:
    """``z ^= z >>> shift`` in place (logical shift of the int64's bits)."""
    torch.bitwise_right_shift(z, shift, out=tmp)
    tmp.bitwise_and_((1 << (64 - shift)) - 1)
    z.bitwise_xor_(tmp)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """``data.splitmix64`` on every element of an int64 tensor, in place (wrapping arithmetic)."""
    tmp = torch.empty_like(z)
    z.add_(_GOLDEN)
    _xorshift_(z, 30, tmp)
    z.mul_(_MUL1)
    _xorshift_(z, 27, tmp)
    z.mul_(_MUL2)
    _xorshift_(z, 31, tmp)
    return z


def splitmix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """``data.splitmix64`` of each element of an int64 tensor (its 64 bits as int64)."""
    return _mix_(z.to(torch.int64, copy=True))


# Eager under torch.compile: inductor cannot lower the wrapping 64-bit arithmetic (it overflows
# converting 2**64 - 1), and eager keeps the masks bit-identical to an uncompiled run's.
@torch.compiler.disable
def bits(k: int, samples: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """64 random bits (int64) for each (sample, feature): ``[N]`` x ``[F]`` -> ``[N, F]``.

    Element (n, f) is the ``features[f]``-th output of the splitmix64 sequence seeded with
    ``splitmix64(k ^ samples[n])``: ``splitmix64(row + features[f] * GOLDEN)``, so any slice of
    samples or features is the same slice of the whole.
    """
    rows = _mix_(samples.to(torch.int64, copy=True).bitwise_xor_(_signed(k)))
    cols = features.to(device=rows.device, dtype=torch.int64).mul(_GOLDEN)
    return _mix_(rows[:, None] + cols[None, :])


def uniform(k: int, samples: torch.Tensor, features: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) on a 2**-24 grid for each (sample, feature): ``[N, F]``."""
    top = bits(k, samples, features).bitwise_right_shift_(_SHIFT).add_(1 << (_UNIFORM_BITS - 1))
    return top.to(dtype).mul_(2.0**-_UNIFORM_BITS)


def keep_mask(p: float, k: int, samples: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``uniform(...) >= p`` without the floats: True with probability 1 - p (p on a 2**-24 grid)."""
    threshold = math.ceil(p * 2**_UNIFORM_BITS) - (1 << (_UNIFORM_BITS - 1))
    return bits(k, samples, features).bitwise_right_shift_(_SHIFT).ge(threshold)


def features(x: torch.Tensor, group: Sequence[int] | None = None, towers: int = 1) -> torch.Tensor:
    """The global flat feature index of each element of one sample of ``x`` ([N, C, ...]).

    With ``group``, dim 1 of ``x`` holds the blocks of those towers (in that order) out of
    ``towers`` equal blocks of the whole activation, as a tower piece computes them.
    """
    inner = math.prod(x.shape[2:])
    channels = x.shape[1] if x.dim() > 1 else 1
    idx = torch.arange(channels, device=x.device)
    if group is not None and list(group) != list(range(towers)):
        per = channels // len(group)
        idx = torch.cat([torch.arange(t * per, (t + 1) * per, device=x.device) for t in group])
    if inner == 1:
        return idx
    return (idx[:, None] * inner + torch.arange(inner, device=x.device)[None, :]).reshape(-1)


class Draws:
    """The keyed randomness of one training forward: run seed, step, and the global (dataset)
    indices of the rows this process holds, in order."""

    def __init__(self, seed: int, step: int, samples: torch.Tensor | Sequence[int]) -> None:
        self.seed, self.step = int(seed), int(step)
        self.samples = torch.as_tensor(samples, dtype=torch.int64).reshape(-1)
        self._on: dict[torch.device, torch.Tensor] = {}

    def key(self, *parts: Part) -> int:
        return key(self.seed, self.step, *parts)

    def samples_on(self, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = self.samples.to(device)
        return self._on[device]

    def _rows(self, n: int, device: torch.device | str) -> torch.Tensor:
        samples = self.samples_on(device)
        if n != len(samples):
            raise ValueError(f"a keyed random layer got {n} rows, but this training step holds {len(samples)} samples")
        return samples

    def uniform(
        self,
        layer: Part,
        features: torch.Tensor,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rows: int | None = None,
    ) -> torch.Tensor:
        device = features.device if device is None else device
        n = len(self.samples) if rows is None else rows
        return uniform(self.key(layer), self._rows(n, device), features, dtype)

    def keep(
        self,
        p: float,
        layer: Part,
        features: torch.Tensor,
        device: torch.device | str | None = None,
        rows: int | None = None,
    ) -> torch.Tensor:
        device = features.device if device is None else device
        n = len(self.samples) if rows is None else rows
        return keep_mask(p, self.key(layer), self._rows(n, device), features)


_CURRENT: contextvars.ContextVar[Draws | None] = contextvars.ContextVar("convnet_keyed_draws", default=None)


def current() -> Draws | None:
    """The draws of the training forward in progress, or None (eval, or a direct model call)."""
    return _CURRENT.get()


@contextlib.contextmanager
def keyed_draws(seed: int, step: int, samples: torch.Tensor | Sequence[int]) -> Iterator[Draws]:
    """Within it, random layers draw from (seed, step, layer, global sample, global feature)."""
    token = _CURRENT.set(Draws(seed, step, samples))
    try:
        yield _CURRENT.get()  # type: ignore[misc]
    finally:
        _CURRENT.reset(token)
