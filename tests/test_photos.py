"""The bundled colour photographs: an honest split, the recipes' own statistics, a short run that
learns, and a clear message when scikit-image (the `photos` extra) is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convnet.core as cn
from convnet.core import data as cdata
from convnet.core.errors import RecipeError
from convnet.core.stats import PixelStats
from convnet.plugins.data.photos import PHOTOS, PhotosOptions, patch_corners, resize_shorter, window_counts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The two photographs scikit-learn ships: tests with them need no extra.
SKLEARN_ONLY = ['data.dataset.photos=["china", "flower"]', "model.num_classes=2"]


def test_validation_patches_come_from_areas_no_training_patch_touches() -> None:
    options = PhotosOptions(train_per_photo=500, val_per_photo=200)
    for index, (h, w) in enumerate([(256, 385), (256, 256), (256, 294)]):  # chelsea, retina, hubble once resized
        train, val, mask = patch_corners(h, w, options, index)
        p = options.patch
        assert all(not mask[y : y + p, x : x + p].any() for y, x in train.tolist())
        assert all(mask[y : y + p, x : x + p].all() for y, x in val.tolist())
        # one validation cell in every row and every column of the 4x4 grid: validation areas are all over
        cells = {(r, c) for r in range(4) for c in range(4) if mask[(2 * r + 1) * h // 8, (2 * c + 1) * w // 8]}
        assert len(cells) == 4 and {r for r, _ in cells} == {c for _, c in cells} == set(range(4))
        assert 0.2 < mask.double().mean() < 0.3
        # training patches reach every part of the picture outside the validation cells
        assert train[:, 0].min() < p and train[:, 0].max() > h - 2 * p and train[:, 1].max() > w - 2 * p


def test_window_counts_counts_the_mask_under_each_patch() -> None:
    mask = torch.zeros(6, 7, dtype=torch.bool)
    mask[2:4, 3:6] = True
    counts = window_counts(mask, 3)
    expected = torch.tensor([[float(mask[y : y + 3, x : x + 3].sum()) for x in range(5)] for y in range(4)])
    assert torch.equal(counts, expected.double())


def test_photos_split_is_fixed_balanced_and_uint8(registries) -> None:
    pytest.importorskip("skimage")
    overrides = ["data.dataset.train_per_photo=12", "data.dataset.val_per_photo=4"]
    recipe = cn.load_recipe("alexnet-photos", overrides, registries)
    a = cdata.build_dataset(recipe, registries)
    b = cdata.build_dataset(recipe, registries)
    assert (len(a.train), len(a.val), a.num_classes, a.classes) == (120, 40, 10, list(PHOTOS))
    image, label = a.train[0]
    assert image.shape == (3, 36, 36) and image.dtype == torch.uint8 and label == 0
    assert all(torch.equal(a.train[i][0], b.train[i][0]) for i in range(0, 120, 7))
    assert torch.bincount(torch.tensor([a.val[i][1] for i in range(40)])).tolist() == [4] * 10
    colour = torch.stack([a.train[i][0] for i in range(120)]).double()
    assert (colour[:, 0] - colour[:, 2]).abs().mean() > 10  # real colour, not grey


def _own_stats(recipe_name: str, registries) -> dict[str, torch.Tensor]:
    recipe = cn.load_recipe(recipe_name, registries=registries)
    splits = cdata.build_dataset(recipe, registries)
    stats = PixelStats()
    stats.add(torch.stack([splits.train[i][0] for i in range(len(splits.train))]))
    return stats.result()


@pytest.mark.parametrize("recipe_name", ["alexnet-photos", "ablation-photos"])
def test_the_recipes_mean_and_pca_lighting_are_the_datasets_own(recipe_name, registries) -> None:
    pytest.importorskip("skimage")
    stats = _own_stats(recipe_name, registries)
    recipe = cn.load_recipe(recipe_name, registries=registries)
    by_name = {c.name: c.options for c in recipe.data.train_augment}
    lighting, mean = by_name["pca-lighting"], by_name["mean-rgb"]
    own = lambda key: stats[key].double()  # noqa: E731
    assert torch.allclose(torch.tensor(lighting.eigvals, dtype=torch.float64), own("eigvals"), rtol=1e-4)
    assert torch.allclose(torch.tensor(lighting.eigvecs, dtype=torch.float64), own("eigvecs"), atol=2e-4)
    assert torch.allclose(torch.tensor(mean.mean, dtype=torch.float64), own("rgb_mean"), atol=0.01)
    eval_mean = next(c.options for c in recipe.data.eval_augment if c.name == "mean-rgb")
    assert eval_mean == mean


def test_without_scikit_image_the_dataset_names_the_extra(tmp_path: Path) -> None:
    """A Python in which `import skimage` fails (as when the extra is not installed)."""
    script = """
import sys
sys.modules["skimage"] = None  # what Python does for a package that is not there: ImportError
import convnet.core as cn
from convnet.core import data as cdata
from convnet.core.errors import RecipeError
regs = cn.load_plugins()
try:
    cdata.build_dataset(cn.load_recipe("alexnet-photos", registries=regs), regs)
except RecipeError as exc:
    print("ERROR", exc)
ok = cdata.build_dataset(cn.load_recipe("alexnet-photos", OVERRIDES, registries=regs), regs)
print("SKLEARN-ONLY", len(ok.train), ok.classes)
""".replace("OVERRIDES", repr(SKLEARN_ONLY))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "ERROR data.dataset: the photograph 'astronaut' is shipped by scikit-image, which is not installed: "
        "pip install 'convnet[photos]'" in proc.stdout
    )
    assert "SKLEARN-ONLY 600 ['china', 'flower']" in proc.stdout


def test_photos_need_rgb_input_and_one_class_per_photograph(registries) -> None:
    recipe = cn.load_recipe("alexnet-photos", ["model.num_classes=9"], registries)
    with pytest.raises(RecipeError, match="data.dataset: 10 photographs are 10 classes, but model.num_classes = 9"):
        cdata.build_dataset(recipe, registries)
    with pytest.raises(RecipeError, match="expected distinct names among astronaut"):
        cn.load_recipe("alexnet-photos", ['data.dataset.photos=["china", "lena"]'], registries)


def test_read_file_gives_a_patch_as_the_validation_split_does(tmp_path: Path, registries) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_image

    Image.fromarray(load_sample_image("china.jpg")).save(tmp_path / "china.png")
    recipe = cn.load_recipe("alexnet-photos", SKLEARN_ONLY, registries)
    splits = cdata.build_dataset(recipe, registries, purpose="predict")
    image = splits.read_file(tmp_path / "china.png")
    assert image.shape == (3, 36, 36) and image.dtype == torch.uint8
    side = load_sample_image("china.jpg")[:, 106:533]  # 427 x 640 -> the central 427 x 427
    assert torch.equal(image, resize_shorter(side, 36))


def test_a_short_photos_run_learns_and_scores_each_towers_colour(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    overrides = ["train.epochs=3", "data.dataset.train_per_photo=100", "data.dataset.val_per_photo=10"]
    summary = cn.train(cn.load_recipe("alexnet-photos", overrides), out=tmp_path, quiet=True)
    assert summary["top1_error"] < 0.75, summary  # chance is 90 %
    towers = summary["filters_conv1_colour_specificity"]
    assert len(towers) == 2 and all(0 < s < 1 for s in towers)
    filters = json.loads((tmp_path / "filters_conv1.json").read_text())
    assert filters["shape"] == [64, 3, 5, 5] and len(filters["kernel_colour_specificity"]) == 64
    assert (tmp_path / "filters_conv1.png").stat().st_size > 0
