"""The imagenet dataset on real JPEG trees written on the fly (pieces of scikit-learn's sample photos)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_networks import conv_pool_fc
from PIL import Image

from convnet.core import cli
from convnet.core.data import build_dataset
from convnet.core.engine import train
from convnet.core.errors import DataError, RecipeError
from convnet.core.recipe import load_recipe
from convnet.plugins.data.imagenet import ImageFiles, preprocess

CLASSES = ("n01440764", "n02102040")  # two wnids, as folder names


class NotData:
    """An arbitrary class: pickled into a file, it must not be loaded back."""


def photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg, flower.jpg: 427x640x3 uint8


def pieces(photo: np.ndarray, count: int, seed: int) -> list[Image.Image]:
    """Crops of varied size and aspect ratio, portrait and landscape."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        h, w = int(rng.integers(60, 300)), int(rng.integers(60, 300))
        y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
        out.append(Image.fromarray(photo[y : y + h, x : x + w]))
    return out


def write_tree(root: Path, train_per_class: int = 4, val_per_class: int = 2, flat_val: bool = False) -> dict:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/...``; one grey, one CMYK JPEG and one RGBA PNG."""
    files: dict[str, list[Path]] = {"train": [], "val": []}
    val_wnids = []
    for c, (wnid, photo) in enumerate(zip(CLASSES, photos())):
        imgs = pieces(photo, train_per_class + val_per_class, seed=c)
        for i, img in enumerate(imgs):
            split = "train" if i < train_per_class else "val"
            folder = root / split / wnid
            if split == "val" and flat_val:
                folder = root / "val"
                val_wnids.append(wnid)
                name = f"ILSVRC2012_val_{len(val_wnids):08d}.JPEG"
            else:
                name = f"{wnid}_{i}.JPEG"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            if i == 1:
                img.convert("L").save(path, "JPEG", quality=90)
            elif i == 2:
                img.convert("CMYK").save(path, "JPEG", quality=90)
            elif i == 3:
                path = path.with_suffix(".png")
                rgba = img.convert("RGBA")
                rgba.putalpha(128)
                rgba.save(path, "PNG")
            else:
                img.save(path, "JPEG", quality=90)
            files[split].append(path)
    return {"files": files, "val_wnids": val_wnids}


def tiny_recipe(tmp_path: Path, root: Path, extra: str = "", workers: int = 0) -> Path:
    """A small network on the imagenet dataset at 32x32, to train in seconds."""
    text = f"""
description = "test"
seed = 0
parallel = {{ strategy = "single", device = "cpu" }}
evaluate = [{{ name = "topk", k = [1] }}]
[model]
input = [3, 32, 32]
num_classes = 2
towers = 2
{conv_pool_fc(classes=2)}
[data]
batch_size = 2
workers = {workers}
{extra}
[data.dataset]
name = "imagenet"
root = "{root}"
size = 32
[train]
epochs = 1
optimizer = {{ name = "paper-sgd", lr = 0.001 }}
"""
    path = tmp_path / "tiny.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imagenet"
    info = write_tree(root)
    return root, info


def test_every_file_becomes_uint8_3x256x256(tree):
    _root, info = tree
    for path in info["files"]["train"] + info["files"]["val"]:
        image = preprocess(path)
        assert image.dtype == torch.uint8 and image.shape == (3, 256, 256), path
    grey = preprocess(info["files"]["train"][1])
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    cmyk = preprocess(info["files"]["train"][2])
    assert not torch.equal(cmyk[0], cmyk[2])  # converted to colour, not read as one plane


def test_preprocessing_equals_torchvision_resize_and_center_crop(tree):
    import torchvision.transforms as tv

    _root, info = tree
    pipeline = tv.Compose([tv.Resize(256), tv.CenterCrop(256), tv.PILToTensor()])
    for path in info["files"]["train"]:
        with Image.open(path) as img:
            expected = pipeline(img.convert("RGB"))
        assert torch.equal(preprocess(path), expected), path


@pytest.mark.parametrize("size", [(600, 300), (300, 600), (301, 777)])
def test_centre_crop_keeps_the_middle_of_the_longer_side(tmp_path, size):
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = (255, 0, 0)
    long = max(w, h)
    band = slice(long // 4, long - long // 4)  # the middle half of the long side is blue
    if w > h:
        a[:, band] = (0, 0, 255)
    else:
        a[band, :] = (0, 0, 255)
    path = tmp_path / "bands.png"
    Image.fromarray(a).save(path)
    out = preprocess(path)
    inner = out[:, 3:-3, 3:-3]  # bilinear blends one or two pixels at the band edges
    assert torch.all(inner[2] >= 250) and torch.all(inner[0] <= 5)


def test_truncated_or_garbage_files_are_none(tree, tmp_path):
    _root, info = tree
    good = info["files"]["train"][0]
    data = good.read_bytes()
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"not a jpeg at all" * 10)
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    ds = ImageFiles([str(good), str(truncated), str(garbage), str(empty)], [0, 0, 1, 1], 256)
    assert ds.path(1) == str(truncated) and ds.path(0) == str(good)
    assert ds[0] is not None and ds[0][1] == 0
    assert ds[1] is None and ds[2] is None and ds[3] is None


def test_folders_layout_builds_both_splits(tree, tmp_path, registries):
    root, _info = tree
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    splits = build_dataset(recipe, registries)
    assert splits.classes == list(CLASSES) and splits.num_classes == 2
    assert len(splits.train) == 8 and len(splits.val) == 4
    labels = [splits.train[i][1] for i in range(len(splits.train))]
    assert labels == [0] * 4 + [1] * 4
    assert splits.train[0][0].shape == (3, 32, 32)


def test_devkit_layout_with_flat_val_uses_the_ground_truth(tmp_path, registries):
    root = tmp_path / "ilsvrc"
    info = write_tree(root, flat_val=True)
    torch.save(
        ({CLASSES[0]: ("tench", "Tinca tinca"), CLASSES[1]: ("English springer",)}, info["val_wnids"]),
        root / "meta.bin",
    )
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    splits = build_dataset(recipe, registries)
    assert splits.classes == [f"{CLASSES[0]} tench", f"{CLASSES[1]} English springer"]
    assert len(splits.val) == len(info["val_wnids"]) == 4
    expected = [CLASSES.index(w) for w in info["val_wnids"]]
    assert [splits.val[i][1] for i in range(4)] == expected
    assert sorted(Path(splits.val.path(i)).name for i in range(4)) == [p.name for p in info["files"]["val"]]


def test_devkit_meta_must_be_weights_only(tmp_path, registries):
    root = tmp_path / "ilsvrc"
    write_tree(root, flat_val=True)
    torch.save(({CLASSES[0]: ("x",)}, [NotData()]), root / "meta.bin")
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    with pytest.raises(DataError, match="meta.bin: not a torchvision ImageNet meta file"):
        build_dataset(recipe, registries)


def test_a_flat_val_folder_without_the_devkit_says_what_labels_it_needs(tmp_path, registries):
    root = tmp_path / "ilsvrc"
    write_tree(root, flat_val=True)  # no meta.bin: the folders layout, and val/ holds files only
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    with pytest.raises(DataError) as err:
        build_dataset(recipe, registries)
    assert str(err.value).startswith(f"{root / 'val'}: holds images but no class folders (the devkit's flat layout)")
    assert f"{root / 'meta.bin'} or {root / 'ILSVRC2012_devkit_t12.tar.gz'}, and neither is there" in str(err.value)
    torch.save(({}, []), root / "meta.bin")  # the devkit is there, but the recipe forces the folders layout
    forced = load_recipe(tiny_recipe(tmp_path, root), ['data.dataset.layout="folders"'], registries=registries)
    with pytest.raises(DataError, match='but layout = "folders" was chosen: use "auto" or "devkit"'):
        build_dataset(forced, registries)


def test_a_training_class_folder_without_images_is_refused_by_name(tree, tmp_path, registries):
    root, _ = tree
    (root / "train" / "n99999999").mkdir()
    (root / "train" / "n99999999" / "readme.txt").write_text("no images here")
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    with pytest.raises(DataError) as err:
        build_dataset(recipe, registries)
    assert str(err.value).startswith(f"{root / 'train'}: class folder(s) without images (")
    assert "): n99999999; each would be a class no training image shows" in str(err.value)


@pytest.mark.parametrize("case", ["missing", "no-train", "no-images"])
def test_bad_root_is_one_line_naming_path_and_layout(tmp_path, registries, case):
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "no-images":
        (root / "train" / CLASSES[0]).mkdir(parents=True)
        (root / "train" / CLASSES[0] / "notes.txt").write_text("x")
        (root / "val").mkdir()
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    with pytest.raises(DataError) as err:
        build_dataset(recipe, registries)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg and "expected <root>/train/<class>/*.JPEG" in msg
    if case == "no-images":
        assert "no images" in msg


def test_missing_root_from_the_command_line(tmp_path, capsys):
    path = tiny_recipe(tmp_path, tmp_path / "nowhere")
    code = cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and str(tmp_path / "nowhere") in err[0] and "ImageFolder" in err[0]


def test_num_classes_mismatch_is_a_recipe_error(tree, tmp_path, registries):
    root, _ = tree
    recipe = load_recipe(
        tiny_recipe(tmp_path, root), ["model.num_classes=3", "model.layers[4].out=3"], registries=registries
    )
    with pytest.raises(RecipeError) as caught:
        build_dataset(recipe, registries)
    classes = len([d for d in (root / "train").iterdir() if d.is_dir()])
    assert classes != 3 and str(caught.value) == (
        f"{recipe.name}: model.num_classes = 3, but dataset 'imagenet' has {classes} classes; "
        f"set it to match (--set model.num_classes={classes})"
    )


def _corrupt(root: Path, split: str = "train") -> list[Path]:
    """Truncate one JPEG of the split and replace another by garbage: two unreadable samples."""
    jpegs = sorted((root / split).rglob("*.JPEG"))
    data = jpegs[0].read_bytes()
    jpegs[0].write_bytes(data[: len(data) // 3])
    jpegs[-1].write_bytes(b"\x00" * 100)
    return [jpegs[0], jpegs[-1]]


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_training_images_are_skipped_counted_and_reported(tree, tmp_path, registries, workers, capsys):
    root, _ = tree
    files = _corrupt(root)
    bad = len(files)
    recipe = load_recipe(tiny_recipe(tmp_path, root, workers=workers), registries=registries)
    out = tmp_path / "run"
    summary = train(recipe, out=out, registries=registries)
    assert summary["skipped_samples"] == bad
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in evals if r["kind"] == "eval"] == [bad]
    err = capsys.readouterr().err
    assert f"epoch 1: skipped {bad} unreadable training sample(s): " in err
    assert all(str(f) in err for f in files), err  # named, on the console and in the run folder
    listed = sorted(line.split("\t") for line in (out / "skipped.txt").read_text().splitlines())
    assert listed == sorted(["epoch 1", "training", str(f)] for f in files)


def test_unreadable_validation_images_are_counted_and_named(tree, tmp_path, registries, capsys):
    root, _ = tree
    files = _corrupt(root, "val")
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    out = tmp_path / "run"
    train(recipe, out=out, registries=registries)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_eval_samples"] for r in records if r["kind"] in ("eval", "final")] == [2, 2]
    err = capsys.readouterr().err
    assert "epoch 1 evaluation: skipped 2 unreadable val sample(s): " in err and all(str(f) in err for f in files)
    assert "final evaluation: skipped 2 unreadable val sample(s)" in err
    evals = tmp_path / "eval"  # convnet eval says the same, as the end of a run does
    path = tiny_recipe(tmp_path, root)
    checkpoint = out / "checkpoints" / "last.safetensors"
    assert cli.main(["eval", str(path), "--checkpoint", str(checkpoint), "--out", str(evals)]) == 0
    err = capsys.readouterr().err
    assert "evaluation: skipped 2 unreadable val sample(s): " in err and all(str(f) in err for f in files)
    assert json.loads((evals / "eval.json").read_text())["skipped_eval_samples"] == 2
    listed = sorted(line.split("\t") for line in (evals / "skipped.txt").read_text().splitlines())
    assert listed == sorted(["evaluation", "val", str(f)] for f in files)
    # an evaluator that reads a few samples after one that read them all hides nothing
    later = [
        "--set",
        "evaluate=[{name='topk'}, {name='neighbours', queries=1, layer='flatten1'}]",
        "--out",
        str(tmp_path / "eval2"),
    ]
    assert cli.main(["eval", str(path), "--checkpoint", str(checkpoint), *later]) == 0
    assert "evaluation: skipped 2 unreadable val sample(s): " in capsys.readouterr().err
    assert json.loads((tmp_path / "eval2" / "eval.json").read_text())["skipped_eval_samples"] == 2


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_unreadable_image_is_fatal_when_the_recipe_says_so_naming_it_and_why(tree, tmp_path, registries, split):
    root, _ = tree
    files = _corrupt(root, split)
    recipe = load_recipe(tiny_recipe(tmp_path, root, extra='bad_samples = "fatal"'), registries=registries)
    with pytest.raises(DataError) as caught:
        train(recipe, out=tmp_path / "run", registries=registries)
    message = str(caught.value)
    assert message.startswith("training set, epoch 1: " if split == "train" else "val set: "), message
    named = [f for f in files if f"{f} is unreadable (" in message]
    assert len(named) == 1 and message.endswith(', and data.bad_samples = "fatal"'), message
    why = message.split(f"{named[0]} is unreadable (", 1)[1]
    assert why.startswith(("OSError: image file is truncated", "UnidentifiedImageError: cannot identify")), message


def test_an_unreadable_file_whose_name_is_not_utf8_is_skipped_and_listed_by_its_bytes(tree, tmp_path, registries):
    root, _ = tree
    folder = next(p for p in sorted((root / "train").iterdir()) if p.is_dir())
    name = os.fsencode(folder) + b"/caf\xe9.JPEG"
    with open(name, "wb") as f:
        f.write(b"not an image")
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    summary = train(recipe, out=tmp_path / "run", registries=registries)
    assert summary["skipped_samples"] == 1
    assert (tmp_path / "run" / "skipped.txt").read_bytes() == b"epoch 1\ttraining\t" + name + b"\n"


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """Pillow clips 16-bit values above 255 when converting: a 16-bit photograph would read as
    white. It reads as the same picture saved with 8 bits."""
    from convnet.core import eight_bit
    from convnet.plugins.data.digits import read_grey

    deep = np.random.default_rng(0).integers(0, 65536, (50, 60)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(deep / 257).astype(np.uint8)).save(tmp_path / "shallow.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # Pillow opens it as 16-bit
    assert torch.equal(preprocess(tmp_path / "deep.png", 36), preprocess(tmp_path / "shallow.png", 36))
    assert np.array_equal(read_grey(tmp_path / "deep.png"), read_grey(tmp_path / "shallow.png"))
    # a 32-bit TIFF (mode I too) holds whatever range its writer chose: left to Pillow, as before
    Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with Image.open(tmp_path / "wide.tif") as img:
        assert img.mode == "I" and np.asarray(eight_bit(img).convert("L")).tolist() == [[0, 128, 255]]
    # a float TIFF (0..1 here) would truncate to black: refused as unreadable instead
    Image.fromarray(np.random.default_rng(1).random((40, 50)).astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="mode F"):
        preprocess(tmp_path / "float.tif", 36)


@pytest.mark.parametrize("shape", [(2, 3000), (40, 3000), (2000, 30)])
def test_a_long_thin_image_is_resampled_in_the_crop_only_and_looks_the_same(shape, monkeypatch):
    """2 x 3000 pixels would become 256 x 384,000 before the centre crop (about 300 MB): only the
    crop's source region is resampled, at the same scale, within one grey level of the full path."""
    from convnet.plugins.data import imagenet

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8))
    asked, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, size, *a, **k: asked.append(size) or resize(self, size, *a, **k)
    )
    region = np.asarray(imagenet.resize_center_crop(img, 256)).astype(int)
    assert asked == [(256, 256)]  # no image larger than the crop was made
    monkeypatch.setattr(imagenet, "ELONGATED", 10**9)
    whole = np.asarray(imagenet.resize_center_crop(img, 256)).astype(int)
    assert region.shape == whole.shape == (256, 256, 3) and np.abs(region - whole).max() <= 1
