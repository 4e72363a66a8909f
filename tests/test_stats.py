"""`convnet stats`: streaming mean image and RGB PCA, against direct computation."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_imagenet_data import _corrupt, tiny_recipe, write_tree

from convnet.core import cli, schema
from convnet.core import stats as cstats
from convnet.core.data import build_dataset
from convnet.core.errors import DataError
from convnet.core.recipe import load_recipe


def direct(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean image and the covariance of all pixel values, the plain way."""
    x = images.to(torch.float64)
    pixels = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    return x.mean(0), torch.cov(pixels)


@settings(max_examples=20)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_streaming_equals_direct_for_any_batching(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (sum(sizes), 3, 5, 4), generator=g, dtype=torch.uint8)
    # Correlated channels, like real photos.
    images[:, 1] = (images[:, 0].int() * 3 // 4 + images[:, 1].int() // 4).to(torch.uint8)
    acc = cstats.PixelStats()
    start = 0
    for n in sizes:
        acc.add(images[start : start + n])
        start += n
    out = acc.result()
    mean, cov = direct(images)
    torch.testing.assert_close(out["mean"], mean.float())
    torch.testing.assert_close(out["covariance"].double(), cov, rtol=1e-5, atol=1e-3)
    vals, vecs = out["eigvals"].double(), out["eigvecs"].double()
    assert torch.all(vals[:-1] >= vals[1:])  # largest first
    torch.testing.assert_close(cov @ vecs, vecs * vals, rtol=1e-4, atol=1e-2)  # columns are eigenvectors
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)


def test_mixed_shapes_are_a_data_error():
    acc = cstats.PixelStats()
    acc.add(torch.zeros(1, 3, 4, 4))
    with pytest.raises(DataError, match="different shapes"):
        acc.add(torch.zeros(1, 3, 5, 4))


@pytest.fixture
def tree_recipe(tmp_path):
    root = tmp_path / "imagenet"
    write_tree(root)
    return root, tiny_recipe(tmp_path, root)


def test_stats_command_matches_the_training_images(tree_recipe, tmp_path, registries, capsys):
    _root, recipe_path = tree_recipe
    out = tmp_path / "stats.safetensors"
    assert cli.main(["stats", str(recipe_path), "--out", str(out), "--batch-size", "3", "--quiet"]) == 0
    assert str(out) in capsys.readouterr().out
    saved = load_file(str(out))
    assert saved["mean"].shape == (3, 32, 32) and saved["mean"].dtype == torch.float32
    assert saved["eigvals"].shape == (3,) and saved["eigvecs"].shape == (3, 3)
    splits = build_dataset(load_recipe(recipe_path, registries=registries), registries)
    images = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    mean, cov = direct(images)
    torch.testing.assert_close(saved["mean"], mean.float())
    assert float(saved["mean"].max()) > 1.0  # 0-255 scale, as the images
    vals, vecs = torch.linalg.eigh(cov)
    torch.testing.assert_close(saved["eigvals"].double(), vals.flip(0), rtol=1e-4, atol=1e-3)
    # Eigenvectors up to sign.
    dots = (saved["eigvecs"].double() * vecs.flip(1)).sum(0).abs()
    torch.testing.assert_close(dots, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-4)


def test_limit_reads_images_spread_over_the_split_so_every_class(tree_recipe, registries):
    """Folder datasets list the training split class by class: --limit N takes N images spread
    evenly over it (one per class here), not the first class's first N."""
    _, recipe_path = tree_recipe
    recipe = load_recipe(recipe_path, registries=registries)
    train = build_dataset(recipe, registries).train
    classes = sorted({int(train[i][1]) for i in range(len(train))})
    tensors, summary = cstats.compute(recipe, registries, batch_size=2, limit=len(classes), progress=False)
    chosen = [i * len(train) // len(classes) for i in range(len(classes))]
    assert sorted(int(train[i][1]) for i in chosen) == classes and summary["images"] == len(classes)
    mean, _ = direct(torch.stack([train[i][0] for i in chosen]))
    torch.testing.assert_close(tensors["mean"].double(), mean, rtol=0, atol=1e-4)


def test_default_output_is_next_to_the_data_root(tree_recipe, registries):
    root, recipe_path = tree_recipe
    assert cli.main(["stats", str(recipe_path), "--quiet", "--limit", "3"]) == 0
    saved = load_file(str(root / "stats.safetensors"))
    assert set(cstats.STATS_KEYS) <= set(saved)


def test_default_output_is_the_dataset_root_even_when_an_augmenter_names_another(tree_recipe, registries, capsys):
    """Issue 17: stats go next to the dataset, not to a path relative to the current folder; the
    command then says which --set points the recipe's augmenters at them."""
    root, recipe_path = tree_recipe
    recipe = load_recipe(recipe_path, registries=registries)
    recipe.data.train_augment.append(schema.Augmenter("mean-image", types.SimpleNamespace(stats="elsewhere/s.st")))
    assert cstats.default_out(recipe) == root / "stats.safetensors"
    assert cstats.readers(recipe) == {
        f"data.train_augment[{len(recipe.data.train_augment) - 1}].stats": "elsewhere/s.st"
    }
    rootless = load_recipe("alexnet-digits", registries=registries)
    assert cstats.default_out(rootless) == cstats.Path("runs/alexnet-digits/stats.safetensors")
    rootless.data.eval_augment.append(schema.Augmenter("mean-image", types.SimpleNamespace(stats="elsewhere/s.st")))
    assert str(cstats.default_out(rootless)) == "elsewhere/s.st"


def test_an_existing_different_file_is_replaced_only_with_force(tree_recipe, tmp_path, capsys):
    _root, recipe_path = tree_recipe
    out = tmp_path / "st" / "stats.safetensors"
    base = ["stats", str(recipe_path), "--out", str(out), "--quiet"]
    assert cli.main([*base, "--limit", "4"]) == 0
    assert "(written)" in capsys.readouterr().out
    first = out.read_bytes()
    assert cli.main([*base, "--limit", "4"]) == 0  # the same statistics again: fine, and said so
    captured = capsys.readouterr()
    assert "unchanged" in captured.out and "exists" in captured.err and out.read_bytes() == first
    assert cli.main([*base, "--limit", "6"]) == 1  # different: refused, the new ones kept aside
    err = capsys.readouterr().err.strip().splitlines()
    aside = out.with_name("stats.new.safetensors")
    assert err[-1] == (
        f"convnet: error: {out}: exists and holds different statistics; not replaced without "
        f"--force (the new ones are in {aside})"
    )
    assert out.read_bytes() == first and set(cstats.STATS_KEYS) <= set(load_file(str(aside)))
    assert cli.main([*base, "--limit", "6", "--force"]) == 0
    assert "replaced" in capsys.readouterr().out and out.read_bytes() != first
    assert cli.main(["stats", str(recipe_path), "--out", str(tmp_path), "--quiet"]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_unreadable_images_are_skipped_and_counted(tree_recipe, tmp_path, registries, capsys):
    root, recipe_path = tree_recipe
    bad = len(_corrupt(root))
    out = tmp_path / "s.safetensors"
    assert cli.main(["stats", str(recipe_path), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"({bad} unreadable skipped)" in captured.out
    assert f"stats: skipped {bad} unreadable training sample(s): {root / 'train'}" in captured.err  # named
    fatal = tiny_recipe(tmp_path, root, extra='bad_samples = "fatal"')
    assert cli.main(["stats", str(fatal), "--out", str(out), "--quiet"]) == 1
    assert "unreadable" in capsys.readouterr().err


def test_load_names_the_missing_file_or_key(tmp_path):
    with pytest.raises(DataError, match="convnet stats"):
        cstats.load(tmp_path / "none.safetensors")
    partial = tmp_path / "partial.safetensors"
    save_file({"mean": torch.zeros(3, 2, 2)}, str(partial))
    with pytest.raises(DataError, match="missing eigvals, eigvecs"):
        cstats.load(partial)


def test_a_recipe_trains_with_the_paper_augmenters_on_the_stats_it_points_to(tmp_path, registries):
    """`convnet stats` output consumed by the augmenters that name it: mean image, crops, flips, PCA lighting."""
    needed = ("mean-image", "random-crop", "hflip", "pca-lighting", "center-crop")
    assert all(n in registries.augmenter for n in needed), "the built-in augmenters must be registered"
    from convnet.core.engine import train

    root = tmp_path / "imagenet"
    write_tree(root)
    stats_file = root / "stats.safetensors"  # where `convnet stats` writes by default: next to the data
    augment = f"""
train_augment = [
    {{ name = "mean-image", stats = "{stats_file}" }},
    {{ name = "random-crop", size = 32 }},
    {{ name = "hflip", p = 0.5 }},
    {{ name = "pca-lighting", std = 0.1, stats = "{stats_file}" }},
]
eval_augment = [
    {{ name = "mean-image", stats = "{stats_file}" }},
    {{ name = "center-crop", size = 32 }},
]
"""
    recipe_path = tiny_recipe(tmp_path, root, extra=augment)
    text = recipe_path.read_text().replace("size = 32\n[train]", "size = 40\n[train]")
    recipe_path.write_text(text)
    assert cli.main(["stats", str(recipe_path), "--quiet"]) == 0
    assert load_file(str(stats_file))["mean"].shape == (3, 40, 40)
    summary = train(load_recipe(recipe_path, registries=registries), out=tmp_path / "run", registries=registries)
    assert summary["step"] == 4 and 0.0 <= summary["top1_error"] <= 1.0
