"""torchvision's alexnet weights in the alexnet-torchvision recipe: same logits, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_alexnet_recipes import augment_overrides

from convnet.core import checkpoint as ckpt
from convnet.core import cli
from convnet.core.model import build_model
from convnet.core.recipe import load_recipe
from convnet.plugins.alexnet.torchvision_weights import (
    ConversionError,
    convert_file,
    load_torchvision_alexnet,
    read_state_dict,
)


@pytest.fixture(scope="module")
def theirs():
    torch.manual_seed(1234)
    return torchvision.models.alexnet(weights=None).eval()


@pytest.fixture(scope="module")
def recipe(registries):
    return load_recipe("alexnet-torchvision", augment_overrides(registries), registries)


def test_converted_weights_give_identical_logits(theirs, recipe, registries):
    ours = build_model(recipe, registries=registries, seed=99).eval()
    load_torchvision_alexnet(ours, theirs.state_dict())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        assert torch.equal(
            ours.features(x, "relu7"), theirs.classifier[:6](torch.flatten(theirs.avgpool(theirs.features(x)), 1))
        )


def test_convert_file_roundtrip(theirs, recipe, registries, tmp_path):
    src = tmp_path / "alexnet.pth"
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, src)  # a DataParallel-style prefix
    out = convert_file(
        src,
        tmp_path / "converted.safetensors",
        "alexnet-torchvision",
        registries,
        overrides=augment_overrides(registries),
    )
    tensors, metadata = ckpt.load(out)
    assert "alexnet-torchvision" in metadata["convnet.recipe"] or "61,100,840" in metadata["convnet.recipe"]
    ours = build_model(recipe, registries=registries).eval()
    ours.load_state_dict(ckpt.model_tensors(tensors))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_convert_command(theirs, registries, tmp_path, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(src))
    out = tmp_path / "w.safetensors"
    argv = ["convert", str(src), "--out", str(out)]
    for o in augment_overrides(registries):
        argv += ["--set", o]
    assert cli.main(argv) == 0
    assert out.exists() and str(out) in capsys.readouterr().out


def test_the_weights_recipe_feeds_what_torchvisions_preprocessing_gives(registries):
    """torchvision's weights were trained on ``Normalize(ImageNet mean, std)`` of [0, 1] pixels:
    the recipe `convnet convert` uses gives that from the 0-255 images the datasets yield."""
    from torchvision.transforms.v2 import functional as F

    from convnet.core import data as cdata

    recipe = load_recipe("alexnet-torchvision-weights", [], registries)
    for path in ("data.train_augment", "data.eval_augment"):
        first = cdata.build_augmenters(getattr(recipe.data, path.split(".")[1])[:1], registries, path, recipe)[0]
        image = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        theirs = F.normalize(F.to_dtype(image, torch.float32, scale=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        torch.testing.assert_close(first(image, torch.Generator()), theirs, rtol=1e-5, atol=1e-5)
    assert recipe.model.layers == load_recipe("alexnet-torchvision", [], registries).model.layers


class NotWeights:
    """An arbitrary class: pickled into a .pth, it must not be loaded back."""


def test_pickled_code_is_refused(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "obj": NotWeights()}, src)
    with pytest.raises(ConversionError, match="weights-only"):
        read_state_dict(src)


def test_wrong_shape_and_unknown_key_are_named(theirs, recipe, registries):
    model = build_model(recipe, device="meta", registries=registries)
    state = dict(theirs.state_dict())
    state["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    with pytest.raises(ConversionError, match=r"'features\.3\.weight' has shape \[192, 64, 3, 3\].*\[192, 64, 5, 5\]"):
        load_torchvision_alexnet(model, state, "w.pth")
    state = dict(theirs.state_dict())
    state["features.1.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"unexpected tensor 'features\.1\.weight'"):
        load_torchvision_alexnet(model, state, "w.pth")
    state = dict(theirs.state_dict())
    del state["classifier.6.bias"]
    with pytest.raises(ConversionError, match=r"missing 'classifier\.6\.bias'"):
        load_torchvision_alexnet(model, state, "w.pth")


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConversionError, match="no such weight file"):
        read_state_dict(tmp_path / "nope.pth")
