"""Augmenters in their surroundings: recipes, stats files, data-loader workers, the engine."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convnet.core import data as cdata
from convnet.core.data import DataContext
from convnet.core.errors import DataError, RecipeError
from convnet.core.recipe import load_recipe
from convnet.plugins.augment import geometry as g
from convnet.plugins.augment import photometric as p


def ctx(path: str = "data.train_augment[0]") -> DataContext:
    return DataContext(None, None, path)  # type: ignore[arg-type]


def gen(key: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(key)
    return generator


def write_stats(path: Path, channels: int = 3, size: int = 12, key: int = 0) -> dict[str, torch.Tensor]:
    """A file with the keys and shapes `convnet stats` writes."""
    mean = torch.rand(channels, size, size, generator=gen(key)) * 255
    cov = torch.tensor([[3000.0, 2500.0, 2000.0], [2500.0, 2800.0, 2300.0], [2000.0, 2300.0, 3100.0]])
    vals, vecs = torch.linalg.eigh(cov[:channels, :channels].double())
    order = torch.argsort(vals, descending=True)
    tensors = {
        "mean": mean,
        "eigvals": vals[order].float(),
        "eigvecs": vecs[:, order].float().contiguous(),
        "rgb_mean": mean.double().mean((1, 2)).float(),
    }
    save_file(tensors, str(path))
    return tensors


def recipe_text(augment: str, extra: str = "") -> str:
    return f"""
extends = "alexnet-digits"
name = "aug-test"
{extra}
[[data.train_augment]]
{augment}
"""


@pytest.mark.parametrize(
    "augment, option",
    [
        ('name = "pca-lighting"\nstd = -0.1\neigvals = [1.0]\neigvecs = [[1.0]]', "std"),
        ('name = "random-crop"\nsize = 0', "size"),
        ('name = "center-crop"\nsize = -3', "size"),
        ('name = "ten-crop"\nsize = 0', "size"),
        ('name = "hflip"\np = 1.5', "p"),
        ('name = "hflip"\np = -0.01', "p"),
        ('name = "random-crop"\nsize = 8\npadding_mode = "wrap"', "padding_mode"),
        ('name = "mean-rgb"\nmean = [1.0, 2.0, 3.0]\nstd = [1.0, 0.0, 1.0]', "std"),
        ('name = "hflip"\nprob = 0.5', "prob"),
    ],
)
def test_out_of_range_options_are_recipe_errors_with_their_path(tmp_path, augment, option):
    file = tmp_path / "r.toml"
    file.write_text(recipe_text(augment))
    with pytest.raises(RecipeError) as info:
        load_recipe(str(file))
    message = str(info.value)
    assert "data.train_augment[0]" in message and option in message, message


def test_bundled_recipes_name_only_registered_augmenters_with_valid_options(registries):
    from convnet.core.recipe import bundled_names

    for name in bundled_names():
        recipe = load_recipe(name)
        for comp in [*recipe.data.train_augment, *recipe.data.eval_augment]:
            assert comp.name in registries.augmenter


def test_missing_or_incomplete_stats_files_name_the_option_and_file(tmp_path, registries):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(RecipeError, match=r"data\.train_augment\[2\]: stats: .*nope\.safetensors: no such file"):
        p.MeanImage(p.MeanImageOptions(stats=str(missing)), ctx("data.train_augment[2]"))
    partial = tmp_path / "partial.safetensors"
    save_file({"mean": torch.zeros(3, 4, 4)}, str(partial))
    with pytest.raises(RecipeError, match="has no 'eigvals', 'eigvecs'"):
        p.PcaLighting(p.PcaLightingOptions(stats=str(partial)), ctx())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(RecipeError, match="not a readable safetensors file"):
        p.MeanImage(p.MeanImageOptions(stats=str(garbage)), ctx())
    with pytest.raises(RecipeError, match="needs the eigen data"):
        p.PcaLighting(p.PcaLightingOptions(), ctx())
    with pytest.raises(RecipeError, match="exactly one of"):
        p.MeanRgb(p.MeanRgbOptions(), ctx())


def test_stats_file_drives_mean_image_mean_rgb_and_pca_lighting(tmp_path):
    path = tmp_path / "stats.safetensors"
    t = write_stats(path, size=10)
    x = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8, generator=gen(1))
    assert torch.equal(p.MeanImage(p.MeanImageOptions(stats=str(path)), ctx())(x, gen(0)), x.float() - t["mean"])
    rgb = p.MeanRgb(p.MeanRgbOptions(stats=str(path)), ctx())(x, gen(0))
    assert torch.equal(rgb, x.float() - t["rgb_mean"].view(3, 1, 1))
    light = p.PcaLighting(p.PcaLightingOptions(stats=str(path)), ctx())
    inline = p.PcaLighting(p.PcaLightingOptions(eigvals=t["eigvals"].tolist(), eigvecs=t["eigvecs"].tolist()), ctx())
    assert torch.equal(light(x, gen(5)), inline(x, gen(5)))
    offset = (light(x, gen(5)) - x.float())[:, 0, 0]
    assert 0 < float(offset.abs().max()) < 30  # a few grey levels, as in the paper's reading


def test_stdev_weighting_and_scales_follow_the_documented_formula():
    vals, vecs = [400.0, 100.0, 25.0], torch.eye(3).tolist()
    keys = torch.tensor([123, 456])
    paper = p.PcaLighting(p.PcaLightingOptions(eigvals=vals, eigvecs=vecs), ctx()).offsets(keys)
    stdev = p.PcaLighting(p.PcaLightingOptions(eigvals=vals, eigvecs=vecs, weighting="stdev"), ctx()).offsets(keys)
    unit = p.PcaLighting(
        p.PcaLightingOptions(eigvals=[v / 255**2 for v in vals], eigvecs=vecs, eigvals_range=1.0), ctx()
    ).offsets(keys)
    alpha = paper / (np.asarray(vals) / 255.0)
    np.testing.assert_allclose(stdev, alpha * np.sqrt(vals), rtol=1e-12)
    np.testing.assert_allclose(unit, paper, rtol=1e-12)


def test_grey_images_work_and_channel_mismatches_are_named(tmp_path):
    grey = torch.randint(0, 256, (1, 9, 9), dtype=torch.uint8, generator=gen(2))
    for aug in (
        g.RandomCrop(g.RandomCropOptions(size=5), ctx()),
        g.HFlip(g.HFlipOptions(p=1.0), ctx()),
        g.CenterCrop(g.CenterCropOptions(size=5), ctx()),
        g.ResizeShorter(g.ResizeShorterOptions(size=4), ctx()),
    ):
        assert aug(grey, gen(0)).shape[0] == 1
    assert torch.equal(p.MeanRgb(p.MeanRgbOptions(mean=[100.0]), ctx())(grey, gen(0)), grey.float() - 100)
    one = p.PcaLighting(p.PcaLightingOptions(eigvals=[900.0], eigvecs=[[1.0]]), ctx())
    assert one(grey, gen(0)).shape == grey.shape
    path = tmp_path / "stats.safetensors"
    write_stats(path, size=9)
    with pytest.raises(DataError, match=r"data\.train_augment\[0\] \(mean-image.*1 channel"):
        p.MeanImage(p.MeanImageOptions(stats=str(path)), ctx())(grey, gen(0))
    with pytest.raises(DataError, match="pca-lighting"):
        p.PcaLighting(p.PcaLightingOptions(stats=str(path)), ctx())(grey, gen(0))


class _Images(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return torch.zeros(1, 9, 9, dtype=torch.uint8), 0


@pytest.mark.parametrize("workers", [0, 2])
def test_an_augmenters_error_in_a_worker_reaches_the_user_as_its_own_line(workers):
    """torch re-raises a worker's exception with the worker's traceback as its message; the user
    sees the augmenter's one line, as without workers."""
    pca = p.PcaLighting(p.PcaLightingOptions(eigvals=[1.0, 2.0], eigvecs=[[1.0, 0.0], [0.0, 1.0]]), ctx())
    images = cdata.Augmented(_Images(), [pca], seed=0, stream=cdata.STREAM_TRAIN_AUGMENT)
    with pytest.raises(DataError) as caught:
        for _ in cdata.loader(images, [[0, 1], [2, 3]], workers):
            pass
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.train_augment[0] (pca-lighting): "), message


@pytest.mark.parametrize("fill", [300.0, -1.0, 0.5])
def test_a_fill_uint8_images_cannot_hold_is_named(fill):
    image = torch.zeros(3, 6, 6, dtype=torch.uint8)
    crop = g.RandomCrop(g.RandomCropOptions(size=6, padding=2, fill=fill), ctx())
    with pytest.raises(DataError, match=rf"random-crop\): fill = {fill} does not fit torch.uint8 images"):
        crop(image, gen(0))
    assert crop(image.float(), gen(0)).shape == (3, 6, 6)  # float images take any fill
    assert g.RandomCrop(g.RandomCropOptions(size=6, padding=2, fill=255.0), ctx())(image, gen(0)).dtype == torch.uint8


def test_mean_image_refuses_images_larger_than_the_mean(tmp_path):
    path = tmp_path / "stats.safetensors"
    write_stats(path, size=8)
    with pytest.raises(DataError, match="larger than the 8x8 mean image"):
        p.MeanImage(p.MeanImageOptions(stats=str(path)), ctx())(torch.zeros(3, 9, 8, dtype=torch.uint8), gen(0))


def test_resize_shorter_keeps_aspect_and_dtype():
    resize = g.ResizeShorter(g.ResizeShorterOptions(size=16), ctx())
    wide = torch.randint(0, 256, (3, 20, 50), dtype=torch.uint8, generator=gen(3))
    out = resize(wide, gen(0))
    assert out.shape == (3, 16, 40) and out.dtype == torch.uint8
    tall = resize(torch.rand(1, 33, 11), gen(0))
    assert tall.shape == (1, 48, 16) and tall.dtype == torch.float32
    flat = torch.full((3, 10, 30), 77, dtype=torch.uint8)
    assert torch.equal(resize(flat, gen(0)), torch.full((3, 16, 48), 77, dtype=torch.uint8))
    batch = torch.stack([wide, wide.flip(-1)])
    assert torch.equal(resize.batch(batch, torch.tensor([0, 1]))[0], out)


def test_center_crop_is_the_middle_window():
    x = torch.arange(7 * 10, dtype=torch.float32).view(1, 7, 10)
    out = g.CenterCrop(g.CenterCropOptions(size=4), ctx())(x, gen(0))
    assert torch.equal(out, x[:, 1:5, 3:7])


def test_to_float_scales():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    assert torch.equal(p.ToFloat(p.ToFloatOptions(scale=1 / 255), ctx())(x, gen(0)), torch.tensor([[[0.0, 1.0]]]))


class Images(torch.utils.data.Dataset):
    """uint8 images, some of them smaller than the crop."""

    def __init__(self, n: int, small: set[int]) -> None:
        self.n, self.small = n, small

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        side = 10 if index in self.small else 24
        return torch.randint(0, 256, (3, side, side + 3), dtype=torch.uint8, generator=gen(index)), index % 3


def paper_chain(tmp_path: Path) -> list:
    stats = tmp_path / "stats.safetensors"
    write_stats(stats, size=24)
    return [
        g.RandomCrop(g.RandomCropOptions(size=16), ctx("data.train_augment[0]")),
        g.HFlip(g.HFlipOptions(), ctx("data.train_augment[1]")),
        p.PcaLighting(p.PcaLightingOptions(stats=str(stats)), ctx("data.train_augment[2]")),
        p.MeanImage(p.MeanImageOptions(stats=str(stats)), ctx("data.train_augment[3]")),
    ]


def run_pass(dataset, batches, workers):
    out = {}
    for images, _, indices, _ in cdata.loader(dataset, batches, workers):
        for image, i in zip(images, indices.tolist()):
            out[i] = image
    return out


def test_same_seed_epoch_index_give_the_same_output_in_any_worker(tmp_path):
    chain = paper_chain(tmp_path)
    dataset = cdata.Augmented(Images(24, set()), chain, seed=9, stream=cdata.STREAM_TRAIN_AUGMENT)
    dataset.epoch = 3
    one = run_pass(dataset, [list(range(24))[i : i + 5] for i in range(0, 24, 5)], workers=0)
    two = run_pass(dataset, [list(range(24))[::-1][i : i + 3] for i in range(0, 24, 3)], workers=2)
    assert sorted(one) == sorted(two) == list(range(24))
    for i in range(24):
        assert torch.equal(one[i], two[i])
    dataset.epoch = 4
    other = dataset[0][0]
    assert not torch.equal(other, one[0])


def test_small_images_are_resized_up_and_counted_per_pass_over_workers(tmp_path):
    chain = paper_chain(tmp_path)[:2]
    chain[0] = g.RandomCrop(g.RandomCropOptions(size=16), ctx("data.train_augment[0]"))
    small = {1, 4, 5, 11, 17}
    dataset = cdata.Augmented(Images(20, small), chain, seed=0, stream=cdata.STREAM_TRAIN_AUGMENT)
    dataset.epoch = 6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run_pass(dataset, [list(range(i, i + 4)) for i in range(0, 20, 4)], workers=2)
    assert all(v.shape == (3, 16, 16) for v in out.values())
    messages = [str(w.message) for w in caught if issubclass(w.category, g.SmallImageWarning)]
    assert messages == [
        "data.train_augment[0] (random-crop): 5 image(s) smaller than 16x16 were resized up to fit the crop in epoch 7"
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pass(dataset, [[0, 2, 3]], workers=0)
    assert not [w for w in caught if issubclass(w.category, g.SmallImageWarning)]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_worker_and_device_placements_train_identically(tmp_path):
    """Same seed -> the same crops and flips per sample in either placement -> the same losses."""
    from convnet.core.engine import train

    sets = [
        "train.max_steps=2",
        "train.log_every=1",
        "data.batch_size=8",
        "train.epochs=1",
        "evaluate=[]",
        "data.workers=0",
    ]
    augment = (
        '[[data.train_augment]]\nname = "random-crop"\nsize = 32\npadding = 3\npadding_mode = "edge"\n'
        '[[data.train_augment]]\nname = "hflip"\n'
    )
    losses = {}
    for where in ("worker", "device"):
        file = tmp_path / f"{where}.toml"
        file.write_text(f'extends = "alexnet-digits"\nname = "{where}"\n[data]\naugment_on = "{where}"\n{augment}')
        recipe = load_recipe(str(file), overrides=sets)
        train(recipe, out=tmp_path / where)
        losses[where] = _losses(tmp_path / where)
    assert len(losses["worker"]) == 2
    assert losses["worker"] == losses["device"]


def test_ten_crop_views_are_the_ones_the_ten_crop_evaluator_expects():
    """The contract with plugins/evaluate: [N, 10, C, s, s], corners, centre (view 4), mirrors."""
    tencrop = pytest.importorskip("convnet.plugins.evaluate.tencrop")
    images = torch.randint(0, 256, (2, 3, 13, 17), dtype=torch.uint8, generator=gen(4))
    aug = g.TenCrop(g.TenCropOptions(size=9), ctx("data.eval_augment[0]"))
    per_image = torch.stack([aug(image, gen(0)) for image in images])
    assert torch.equal(per_image, tencrop.ten_crops(images, 9, 9))
    assert torch.equal(
        per_image[:, tencrop.CENTRE], g.CenterCrop(g.CenterCropOptions(size=9), ctx()).batch(images, None)
    )


def test_reflect_padding_larger_than_the_image_is_a_data_error():
    crop = g.RandomCrop(g.RandomCropOptions(size=4, padding=5, padding_mode="reflect"), ctx("data.train_augment[1]"))
    with pytest.raises(DataError, match=r"data\.train_augment\[1\] \(random-crop\): reflect padding 5"):
        crop(torch.zeros(1, 4, 4), gen(0))
