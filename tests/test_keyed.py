"""Keyed randomness (convnet.core.keyed) and the keyed dropout layer: the torch hash is the
reference splitmix64 bit for bit, any slice of samples or features is the same slice of the
whole, and a tower piece draws its towers' slice of single's mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from convnet.core import keyed
from convnet.core.data import _SPLITMIX, splitmix64
from convnet.plugins.layers.shapeless import KeyedDropout

M64 = (1 << 64) - 1
u64 = st.integers(0, M64)


def _reference_bits(k: int, sample: int, feature: int) -> int:
    """Element (sample, feature): the feature-th splitmix64 output after the row's seed."""
    row = splitmix64(k ^ (sample & M64))
    return keyed._signed(splitmix64((row + feature * _SPLITMIX[0]) & M64))


@given(values=st.lists(u64, min_size=1, max_size=50))
def test_the_torch_hash_is_splitmix64_bit_for_bit(values) -> None:
    t = torch.tensor([keyed._signed(v) for v in values], dtype=torch.int64)
    assert keyed.splitmix64_tensor(t).tolist() == [keyed._signed(splitmix64(v)) for v in values]


@given(
    k=u64,
    samples=st.lists(st.integers(0, 2**40), min_size=1, max_size=6),
    features=st.lists(st.integers(0, 2**31), min_size=1, max_size=6),
)
def test_bits_are_the_reference_counter_hash(k, samples, features) -> None:
    got = keyed.bits(k, torch.tensor(samples), torch.tensor(features))
    assert got.tolist() == [[_reference_bits(k, s, f) for f in features] for s in samples]


@given(
    seed=st.integers(0, 2**63 - 1),
    step=st.integers(0, 10**6),
    layer=st.text(min_size=1, max_size=8),
    n=st.integers(1, 24),
    f=st.integers(1, 300),
    p=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_a_slice_of_samples_and_features_is_the_slice_of_the_whole_mask(seed, step, layer, n, f, p, data) -> None:
    samples = torch.tensor(data.draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n, unique=True)))
    whole = keyed.keyed_draws(seed, step, samples)
    with whole as draws:
        full = draws.keep(p, layer, torch.arange(f))
        u = draws.uniform(layer, torch.arange(f), dtype=torch.float64)  # p compared exactly
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1), label="rows"))
    cols = torch.tensor(sorted(data.draw(st.sets(st.integers(0, f - 1), min_size=1), label="cols")))
    with keyed.keyed_draws(seed, step, samples[rows]) as part:
        assert torch.equal(part.keep(p, layer, cols), full[rows][:, cols])
        assert torch.equal(part.uniform(layer, cols, dtype=torch.float64), u[rows][:, cols])
    assert torch.equal(full, u >= p)
    assert ((u >= 0) & (u < 1)).all()


def test_different_seed_step_layer_give_different_masks() -> None:
    s, f = torch.arange(64), torch.arange(256)
    masks = [
        keyed.keep_mask(0.5, keyed.key(*parts), s, f)
        for parts in [(0, 1, "fc6"), (1, 1, "fc6"), (0, 2, "fc6"), (0, 1, "fc7")]
    ]
    for i in range(len(masks)):
        assert 0.45 < masks[i].float().mean().item() < 0.55
        for j in range(i):
            assert 0.4 < (masks[i] == masks[j]).float().mean().item() < 0.6  # independent, not equal


@given(
    towers=st.sampled_from([1, 2, 3, 4]),
    per=st.integers(1, 3),
    inner=st.sampled_from([(), (2,), (2, 3)]),
    data=st.data(),
)
def test_tower_blocks_index_their_slice_of_the_whole(towers, per, inner, data) -> None:
    x = torch.zeros(2, towers * per, *inner)
    whole = keyed.features(x)
    assert torch.equal(whole, torch.arange(x[0].numel()))
    group = data.draw(st.lists(st.integers(0, towers - 1), min_size=1, max_size=towers, unique=True))
    blocks = torch.cat([x.reshape(2, towers, -1)[:, t] for t in group], 1).reshape(2, len(group) * per, *inner)
    expected = torch.cat([whole.reshape(towers, -1)[t] for t in group])
    assert torch.equal(keyed.features(blocks, group, towers), expected)


def test_dropout_in_a_training_forward_drops_the_keyed_mask() -> None:
    drop = KeyedDropout(0.5, "fc6")
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    with keyed.keyed_draws(11, 3, torch.arange(100, 108)) as draws:
        y = drop(x)
        keep = draws.keep(0.5, "fc6", torch.arange(36)).reshape(x.shape)
    assert torch.equal(y, torch.where(keep, x * 2, torch.zeros(())))
    y.sum().backward()
    assert torch.equal(x.grad, keep.float() * 2)
    # a tower piece holding tower 1 of 2 draws the second half of the channels' mask
    drop.split_towers([1], 2)
    with keyed.keyed_draws(11, 3, torch.arange(100, 108)):
        assert torch.equal(drop(x[:, 2:]), torch.where(keep[:, 2:], x[:, 2:] * 2, torch.zeros(())))


def test_dropout_outside_a_training_step_is_torchs_and_eval_is_the_identity() -> None:
    drop, x = KeyedDropout(0.5, "d"), torch.randn(4, 10)
    torch.manual_seed(5)
    expected = nn.functional.dropout(x, 0.5, True)
    torch.manual_seed(5)
    assert torch.equal(drop(x), expected)
    assert torch.equal(drop.eval()(x), x)
    with keyed.keyed_draws(0, 1, torch.arange(4)):
        assert torch.equal(drop(x), x)  # eval mode
        assert torch.equal(KeyedDropout(1.0, "d")(x), torch.zeros_like(x))
        assert torch.equal(KeyedDropout(0.0, "d")(x), x)
        with pytest.raises(ValueError, match="got 3 rows, but this training step holds 4 samples"):
            KeyedDropout(0.5, "d")(x[:3])
    assert keyed.current() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_draws_the_same_bits_as_the_cpu() -> None:
    s, f = torch.arange(1000, 1128), torch.arange(4096)
    k = keyed.key(3, 4, "fc6")
    assert torch.equal(keyed.bits(k, s.cuda(), f.cuda()).cpu(), keyed.bits(k, s, f))
    assert torch.equal(keyed.keep_mask(0.5, k, s.cuda(), f.cuda()).cpu(), keyed.keep_mask(0.5, k, s, f))
