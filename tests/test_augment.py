"""Property tests of the augmenters: crops, flips, PCA lighting, ten-crop, mean image, seeding."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from convnet.core import data as cdata
from convnet.core.data import DataContext
from convnet.plugins.augment import geometry as g
from convnet.plugins.augment import photometric as p

SEED_ST = st.integers(0, 2**63 - 1)


def ctx(path: str = "data.train_augment[0]") -> DataContext:
    return DataContext(None, None, path)  # type: ignore[arg-type]  # the augmenters read only the path


def gen(key: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(key)
    return generator


def keys_for(seed: int, epoch: int, indices: list[int], stage: int = 0) -> torch.Tensor:
    return torch.from_numpy(cdata.sample_keys(seed, cdata.STREAM_TRAIN_AUGMENT, epoch, indices, stage).astype(np.int64))


def distinct_image(c: int, h: int, w: int) -> torch.Tensor:
    """Every pixel value different, so a window identifies its position."""
    return torch.arange(c * h * w, dtype=torch.float32).view(c, h, w)


@st.composite
def image_and_crop(draw, max_side: int = 40):
    c = draw(st.sampled_from([1, 3]))
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    size = draw(st.integers(1, min(h, w)))
    return c, h, w, size


# ---------------------------------------------------------------------------- random-crop
@given(image_and_crop(), SEED_ST)
def test_random_crop_has_the_size_and_is_a_sub_window(shape, key):
    c, h, w, size = shape
    x = distinct_image(c, h, w)
    out = g.RandomCrop(g.RandomCropOptions(size=size), ctx())(x, gen(key))
    assert out.shape == (c, size, size)
    top, left = divmod(int(out[0, 0, 0]), w)
    assert torch.equal(out, x[:, top : top + size, left : left + size])


@given(image_and_crop(max_side=24), st.integers(1, 6), SEED_ST, st.integers(0, 5))
def test_random_crop_batched_matches_per_image(shape, n, seed, epoch):
    c, h, w, size = shape
    crop = g.RandomCrop(g.RandomCropOptions(size=size), ctx())
    images = torch.stack([distinct_image(c, h, w) + 1000 * i for i in range(n)])
    keys = keys_for(seed, epoch, list(range(n)))
    batched = crop.batch(images.clone(), keys)
    assert batched.shape == (n, c, size, size)
    for i in range(n):
        assert torch.equal(batched[i], crop(images[i], gen(int(keys[i]))))
    tops, lefts = (torch.from_numpy(a) for a in crop.offsets(keys, h, w))
    assert torch.equal(g.window_gather(images, tops, lefts, size, one_kernel=True), batched)


def test_random_crop_is_uniform_over_all_positions():
    crop = g.RandomCrop(g.RandomCropOptions(size=3), ctx())
    keys = keys_for(7, 0, list(range(9000)))
    tops, lefts = crop.offsets(keys, 5, 6)  # 3 x 4 = 12 positions
    counts = np.bincount(tops * 4 + lefts, minlength=12)
    expected = len(keys) / 12
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.min() > 0
    assert chi2 < 31.3  # chi-square, 11 degrees of freedom, p = 0.001


def test_random_crop_padding_keeps_the_image_inside():
    x = torch.ones(1, 4, 4)
    opts = g.RandomCropOptions(size=4, padding=2, padding_mode="constant", fill=-5.0)
    crop = g.RandomCrop(opts, ctx())
    seen = set()
    for key in range(200):
        out = crop(x, gen(key))
        assert out.shape == (1, 4, 4)
        ones = (out == 1).nonzero()
        assert set(out.unique().tolist()) <= {1.0, -5.0}
        seen.add((int(ones[:, 1].min()), int(ones[:, 2].min())))
    assert len(seen) > 1


# ---------------------------------------------------------------------------- hflip
@given(image_and_crop(), st.floats(0.0, 1.0), SEED_ST)
def test_hflip_twice_is_the_identity(shape, prob, key):
    c, h, w, _ = shape
    x = torch.randn(c, h, w, generator=gen(key))
    flip = g.HFlip(g.HFlipOptions(p=prob), ctx())
    once = flip(x, gen(key))
    assert torch.equal(once, x) or torch.equal(once, x.flip(-1))
    assert torch.equal(flip(once, gen(key)), x)


def test_hflip_probability_is_p():
    keys = keys_for(3, 1, list(range(20000)))
    assert np.all(g.HFlip(g.HFlipOptions(p=1.0), ctx()).flips(keys))
    assert not np.any(g.HFlip(g.HFlipOptions(p=0.0), ctx()).flips(keys))
    rate = g.HFlip(g.HFlipOptions(p=0.5), ctx()).flips(keys).mean()
    assert abs(rate - 0.5) < 0.015  # 4 standard errors


@given(st.integers(1, 6), st.integers(1, 12), SEED_ST)
def test_hflip_batched_matches_per_image(n, w, seed):
    flip = g.HFlip(g.HFlipOptions(), ctx())
    images = torch.randn(n, 3, 5, w, generator=gen(seed))
    keys = keys_for(seed, 0, list(range(n)))
    batched = flip.batch(images.clone(), keys)  # the batched forms may overwrite their input
    for i in range(n):
        assert torch.equal(batched[i], flip(images[i], gen(int(keys[i]))))
    mask = torch.from_numpy(flip.flips(keys))
    assert torch.equal(g.flip_where(images.clone(), mask, one_kernel=True), batched)


# ---------------------------------------------------------------------------- pca-lighting
def random_eigen(key: int, zero: int) -> tuple[list[float], list[list[float]]]:
    """Orthonormal eigenvectors (columns) and eigenvalues with ``zero`` of them 0."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(key), dtype=torch.float64))
    vals = (torch.rand(3, generator=gen(key + 1), dtype=torch.float64) * 5000 + 10).tolist()
    for i in range(zero):
        vals[2 - i] = 0.0
    return vals, q.tolist()


@given(image_and_crop(max_side=16), SEED_ST)
def test_pca_lighting_with_std_0_is_the_identity(shape, key):
    c, h, w, _ = shape
    vals, vecs = random_eigen(key % 10_000, 0)
    opts = p.PcaLightingOptions(std=0.0, eigvals=vals[:c], eigvecs=[row[:c] for row in vecs[:c]])
    x = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=gen(key))
    assert torch.equal(p.PcaLighting(opts, ctx())(x, gen(key)), x.float())


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2), st.floats(0.01, 2.0), SEED_ST)
def test_pca_lighting_offset_is_constant_and_in_the_eigen_span(h, w, zero, std, key):
    vals, vecs = random_eigen(key % 10_000, zero)
    light = p.PcaLighting(p.PcaLightingOptions(std=std, eigvals=vals, eigvecs=vecs), ctx())
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen(key)).double()
    delta = light(x, gen(key)) - x
    per_pixel = delta.reshape(3, -1)
    torch.testing.assert_close(per_pixel, per_pixel[:, :1].expand_as(per_pixel), rtol=0, atol=1e-9)
    offset = per_pixel[:, 0]
    coeff = torch.tensor(vecs, dtype=torch.float64).T @ offset  # coordinates along each eigenvector
    for i in range(3 - zero, 3):
        assert abs(float(coeff[i])) < 1e-9
    # The paper's formula: coordinate i = alpha_i * lambda_i on [0, 1] pixels, times 255.
    alpha = coeff[: 3 - zero] / (torch.tensor(vals[: 3 - zero], dtype=torch.float64) / 255.0)
    assert bool((alpha.abs() < 12 * std).all())


def test_pca_lighting_alphas_have_the_papers_std():
    vals, vecs = random_eigen(5, 0)
    light = p.PcaLighting(p.PcaLightingOptions(eigvals=vals, eigvecs=vecs), ctx())
    keys = keys_for(11, 2, list(range(20000)))
    offsets = light.offsets(keys)  # [N, 3] = P (alpha * lambda / 255)
    alpha = (offsets @ np.asarray(vecs)) / (np.asarray(vals) / 255.0)
    assert np.allclose(alpha.std(0), 0.1, rtol=0.03)
    assert np.allclose(alpha.mean(0), 0.0, atol=0.004)
    assert abs(np.corrcoef(alpha.T)[0, 1]) < 0.03


@given(st.integers(1, 5), SEED_ST)
def test_pca_lighting_batched_matches_per_image(n, seed):
    vals, vecs = random_eigen(seed % 1000, 0)
    light = p.PcaLighting(p.PcaLightingOptions(eigvals=vals, eigvecs=vecs), ctx())
    images = torch.randint(0, 256, (n, 3, 4, 5), dtype=torch.uint8, generator=gen(seed))
    keys = keys_for(seed, 1, list(range(n)))
    batched = light.batch(images.clone(), keys)
    assert batched.dtype == torch.float32
    for i in range(n):
        assert torch.equal(batched[i], light(images[i], gen(int(keys[i]))))


# ---------------------------------------------------------------------------- ten-crop
@given(image_and_crop(), st.integers(0, 3))
def test_ten_crop_is_exactly_the_ten_windows(shape, extra):
    c, h, w, size = shape
    x = distinct_image(c, h + extra, w)
    h += extra
    views = g.TenCrop(g.TenCropOptions(size=size), ctx("data.eval_augment[0]"))(x, gen(0))
    s = size
    top, left = (h - s) // 2, (w - s) // 2
    expected = [
        x[:, :s, :s],
        x[:, :s, w - s :],
        x[:, h - s :, :s],
        x[:, h - s :, w - s :],
        x[:, top : top + s, left : left + s],
    ]
    expected += [v.flip(-1) for v in expected]
    assert views.shape == (10, c, s, s)
    for view, want in zip(views, expected):
        assert torch.equal(view, want)
    batched = g.TenCrop(g.TenCropOptions(size=size), ctx()).batch(torch.stack([x, x + 1]), keys_for(0, 0, [0, 1]))
    assert batched.shape == (2, 10, c, s, s)
    assert torch.equal(batched[0], views) and torch.equal(batched[1], views + 1)


# ---------------------------------------------------------------------------- mean-image
@settings(max_examples=15)
@given(image_and_crop(max_side=20), st.integers(0, 4), SEED_ST)
def test_mean_image_then_adding_it_back_is_the_identity(tmp_path_factory, shape, margin, key):
    c, h, w, _ = shape
    mean = torch.rand(c, h + margin, w + margin, generator=gen(key)) * 255
    path = tmp_path_factory.mktemp("stats") / "stats.safetensors"
    save_file({"mean": mean}, str(path))
    sub = p.MeanImage(p.MeanImageOptions(stats=str(path)), ctx())
    x = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=gen(key))
    out = sub(x, gen(key))
    assert out.dtype == torch.float32
    window = sub.mean_for(x)
    torch.testing.assert_close(out + window, x.float(), rtol=0, atol=1e-4)
    top, left = margin // 2, margin // 2
    assert torch.equal(window, mean[:, top : top + h, left : left + w])


# ---------------------------------------------------------------------------- seeding
@given(
    SEED_ST,
    st.integers(0, 3),
    st.integers(0, 10**6),
    st.integers(0, 7),
    st.lists(st.integers(0, 2**62), min_size=1, max_size=20),
)
def test_sample_keys_vectorised_equals_one_by_one(seed, stream, epoch, stage, indices):
    many = cdata.sample_keys(seed, stream, epoch, indices, stage).tolist()
    assert many == [cdata.sample_key(seed, stream, epoch, i, stage) for i in indices]
    assert max(many) < 2**63


def test_sample_keys_differ_by_epoch_stage_and_index():
    keys = cdata.sample_keys(42, 1, 3, list(range(1000)), 2)
    assert len(set(keys.tolist())) == 1000
    assert cdata.sample_key(42, 1, 4, 0, 2) != keys[0]  # another epoch
    assert cdata.sample_key(42, 1, 3, 0, 3) != keys[0]  # another stage
    assert cdata.sample_key(42, 2, 3, 0, 2) != keys[0]  # another stream


@settings(max_examples=10)
@given(SEED_ST, st.integers(0, 100), st.lists(st.integers(0, 10**9), min_size=1, max_size=6, unique=True))
def test_the_chain_gives_the_same_output_in_either_placement(seed, epoch, indices):
    """What the engine's device placement computes equals what a worker computes, per sample."""
    from convnet.core.data import augment_batch as _device_augment

    vals, vecs = random_eigen(seed % 1000, 0)
    chain = [
        g.RandomCrop(g.RandomCropOptions(size=6, padding=1), ctx()),
        g.HFlip(g.HFlipOptions(), ctx()),
        p.PcaLighting(p.PcaLightingOptions(eigvals=vals, eigvecs=vecs), ctx()),
    ]
    images = torch.randint(0, 256, (len(indices), 3, 8, 9), dtype=torch.uint8, generator=gen(seed))

    class Base(torch.utils.data.Dataset):
        def __len__(self):
            return 10**9 + 1

        def __getitem__(self, i):
            return images[indices.index(i)], 0

    worker = cdata.Augmented(Base(), chain, seed, cdata.STREAM_TRAIN_AUGMENT)
    worker.epoch = epoch
    device = _device_augment(chain, images.clone(), seed, epoch, torch.tensor(indices))
    for j, i in enumerate(indices):
        assert torch.equal(worker[i][0], device[j])


# ---------------------------------------------------------------------------- random-shift
@given(image_and_crop(max_side=20), st.integers(0, 3), st.sampled_from(["constant", "edge"]), SEED_ST)
def test_random_shift_keeps_the_size_and_equals_random_crop_of_the_padded_image(shape, shift, mode, key):
    c, h, w, _ = shape
    x = distinct_image(c, h, w)
    opts = g.RandomShiftOptions(max_shift=shift, padding_mode=mode, fill=-1.0)
    out = g.RandomShift(opts, ctx())(x, gen(key))
    assert out.shape == x.shape
    if h == w:  # a square image: exactly random-crop at its own size after padding
        crop = g.RandomCrop(g.RandomCropOptions(size=h, padding=shift, padding_mode=mode, fill=-1.0), ctx())
        assert torch.equal(out, crop(x, gen(key)))
    t, l = g.RandomShift(opts, ctx()).shift(key)
    assert 0 <= t <= 2 * shift and 0 <= l <= 2 * shift
    rows, cols = torch.arange(h) + t - shift, torch.arange(w) + l - shift  # source of each output pixel
    keep_r, keep_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    assert torch.equal(out[:, keep_r][:, :, keep_c], x[:, rows[keep_r]][:, :, cols[keep_c]])


@given(st.integers(1, 5), st.integers(2, 12), st.integers(2, 12), SEED_ST)
def test_random_shift_batched_matches_per_image(n, h, w, seed):
    shift = g.RandomShift(g.RandomShiftOptions(max_shift=2), ctx())
    images = torch.randn(n, 3, h, w, generator=gen(seed))
    keys = keys_for(seed, 0, list(range(n)))
    batched = shift.batch(images.clone(), keys)
    for i in range(n):
        assert torch.equal(batched[i], shift(images[i], gen(int(keys[i]))))
