"""`convnet predict` (issue 17): image files a user hands over, classified through the recipe's test views."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from test_imagenet_data import CLASSES, tiny_recipe, write_tree

from convnet.core import checkpoint as ckpt
from convnet.core import plugins, predict
from convnet.core.cli import main
from convnet.core.data import build_dataset, ten_crop_views
from convnet.core.engine import train
from convnet.core.errors import CheckpointError, ConvnetError, RecipeError
from convnet.core.model import build_model
from convnet.core.predict import Prediction, image_files, load_predictor, plot_path
from convnet.core.recipe import load_recipe
from convnet.plugins.data.digits import as_digit

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
# alexnet-digits at 16x16 for 5 epochs with a larger rate: about 2 % top-1 error in seconds
DIGITS = ["model.input=[3, 16, 16]", "train.epochs=5", "train.optimizer.lr=0.03"]
RENDERED = 60


def sets(overrides: list[str]) -> list[str]:
    return [arg for s in overrides for arg in ("--set", s)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits-run")
    summary = train(load_recipe("alexnet-digits", DIGITS), out=out)
    assert summary["top1_error"] < 0.05
    return out / "checkpoints" / "last.safetensors"


def render(value: np.ndarray, style: int) -> np.ndarray:
    """A digit (ink = 1) as 8-bit RGB in one of three looks: white on black, black on white, red on blue."""
    v = value[..., None]
    if style == 0:
        rgb = np.repeat(v, 3, axis=-1)
    elif style == 1:
        rgb = np.repeat(1 - v, 3, axis=-1)
    else:
        rgb = v * np.array([0.9, 0.2, 0.1]) + (1 - v) * np.array([0.1, 0.2, 0.6])
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, list[int]]:
    """The first validation digits as 64x64 PNG files, as a user would hand them over."""
    folder = tmp_path_factory.mktemp("pictures")
    val = build_dataset(load_recipe("alexnet-digits", DIGITS), plugins.registries()).val
    labels = []
    for i in range(RENDERED):
        x, y = val[i]
        grey = (x[0] * 0.4 + 0.3).clamp(0, 1)  # undo the dataset's normalisation
        big = F.interpolate(grey[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        Image.fromarray(render(big.clamp(0, 1).numpy(), i % 3)).save(folder / f"digit{i:03d}.png")
        labels.append(y)
    return folder, labels


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_rendered_digits_are_classified_through_the_cli(trained, pictures, capsys):
    folder, labels = pictures
    assert main(["predict", "alexnet-digits", *sets(DIGITS), "--checkpoint", str(trained), "--json", str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == [str(folder / f"digit{i:03d}.png") for i in range(RENDERED)]
    for r in records:
        assert set(r) == {"file", "top5"} and len(r["top5"]) == 5
        names = [name for name, _ in r["top5"]]
        probs = [p for _, p in r["top5"]]
        assert set(names) <= {str(d) for d in range(10)} and len(set(names)) == 5
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    right = [r["top5"][0][0] == str(y) for r, y in zip(records, labels)]
    assert sum(right) >= 0.9 * RENDERED  # the network gets ~98 % of the validation digits
    for style in range(3):  # white on black, black on white, colour: each read as the bundled digits
        assert sum(right[style::3]) >= 0.85 * len(right[style::3]), style


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_bad_files_are_named_the_others_go_on(trained, pictures, tmp_path, capsys):
    folder, _ = pictures
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    empty = tmp_path / "empty"
    empty.mkdir()
    good = folder / "digit000.png"
    argv = [
        "predict",
        "alexnet-digits",
        *sets(DIGITS),
        "--checkpoint",
        str(trained),
        str(broken),
        str(good),
        str(tmp_path / "missing.png"),
        str(empty),
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 3
    assert err[0].startswith(f"convnet: error: {broken}: cannot read this image")
    assert err[1] == f"convnet: error: {tmp_path / 'missing.png'}: no such file or folder"
    assert err[2].startswith(f"convnet: error: {empty}: a folder with no image files")
    out = captured.out.strip().splitlines()
    assert out[0] == str(good) and len(out) == 6
    assert all(re.fullmatch(r" +\d+\.\d\d % +[0-9]", line) for line in out[1:])


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_plot_draws_the_images_with_their_bars(trained, pictures, tmp_path, capsys):
    folder, _ = pictures
    figure = tmp_path / "fig" / "top5.png"
    files = [str(folder / f"digit{i:03d}.png") for i in range(6)]
    assert (
        main(["predict", "alexnet-digits", *sets(DIGITS), "--checkpoint", str(trained), "--plot", str(figure), *files])
        == 0
    )
    assert f"plot: {figure}" in capsys.readouterr().out
    with Image.open(figure) as im:
        assert im.size == (4 * 320, 2 * 420 + 40)  # 4 columns, 2 rows of image + bars
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_the_python_api_and_the_evaluators_ten_crops(trained, pictures, registries):
    """With the ten-crop evaluator in the recipe, the softmax is averaged over its ten views."""
    folder, _labels = pictures
    files = [folder / f"digit{i:03d}.png" for i in range(4)]
    plain = predict(load_recipe("alexnet-digits", DIGITS), trained, files)
    assert all(isinstance(p, Prediction) and p.error is None for p in plain)
    recipe = load_recipe("alexnet-digits-eval", DIGITS)
    predictor = load_predictor(recipe, trained, registries)
    assert predictor.views is not None
    x = torch.stack([predictor.prepare(f, i) for i, f in enumerate(files)])
    net = build_model(recipe)
    net.load_state_dict(ckpt.model_tensors(ckpt.load(trained)[0]))
    net.eval()
    with torch.no_grad():
        views = ten_crop_views(F.pad(x, (2, 2, 2, 2), mode="replicate"), 16, 16)  # the recipe's pad = 2
        expected = torch.softmax(net(views.flatten(0, 1)).double(), 1).reshape(4, 10, -1).mean(1)
        centre = torch.softmax(net(x).double(), 1)
    torch.testing.assert_close(predictor.probabilities(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, centre, atol=1e-4)  # the views do change the answer
    ten = predict(recipe, trained, files)
    assert [p.top[0][1] for p in ten] == pytest.approx(expected.max(1).values.tolist(), abs=1e-6)
    torch.testing.assert_close(
        torch.tensor([p.top[0][1] for p in plain], dtype=torch.float64), centre.max(1).values, rtol=1e-5, atol=1e-6
    )


def test_a_dataset_without_a_file_reader_is_named(tmp_path, capsys):
    recipe = load_recipe(str(TINY))
    path = tmp_path / "tiny.safetensors"
    ckpt.save(path, {f"model/{k}": v for k, v in build_model(recipe).state_dict().items()}, {"convnet.state": "{}"})
    picture = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert main(["predict", str(TINY), "--checkpoint", str(path), str(picture)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset 'synthetic'" in err[0] and "read_file" in err[0]


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_a_checkpoint_of_another_recipe_is_named(trained, pictures):
    folder, _ = pictures
    with pytest.raises(CheckpointError, match=re.escape(str(trained))):
        predict(load_recipe("alexnet-digits"), trained, [folder / "digit000.png"])  # 32x32 model, 16x16 weights


def test_folders_give_their_images_sorted(tmp_path):
    for name in ("b.PNG", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    entries = image_files([tmp_path, tmp_path / "a.jpg", tmp_path / "sub", tmp_path / "nope.png"])
    assert entries[:3] == [tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "a.jpg"]
    assert entries[3].error.startswith(f"{tmp_path / 'sub'}: a folder with no image files (.jpg, .jpeg, .png")
    assert entries[4].error == f"{tmp_path / 'nope.png'}: no such file or folder" and len(entries) == 5


@settings(max_examples=25)
@given(st.integers(0, 1796), st.integers(1, 12), st.booleans())
def test_a_picture_of_a_bundled_digit_reads_back_as_that_digit(index, factor, dark_ink):
    """Any magnification, either ink: the 8x8 read back is the bundled digit on its 0..1 scale."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[index] / 16.0
    picture = np.kron(digit, np.ones((factor, factor))).astype(np.float32)
    if dark_ink:
        picture = 1.0 - picture
    lo, hi = digit.min(), digit.max()
    expected = (digit - lo) / (hi - lo)
    torch.testing.assert_close(as_digit(picture)[0].double(), torch.from_numpy(expected), rtol=0, atol=1e-5)


def test_imagenet_reads_a_file_as_its_validation_images_and_names_classes_by_synset_words(tmp_path, registries):
    root = tmp_path / "imagenet"
    write_tree(root)
    recipe = load_recipe(tiny_recipe(tmp_path, root), registries=registries)
    assert build_dataset(recipe, registries, purpose="predict").classes == list(CLASSES)  # no words: folders
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        f"{CLASSES[0]} tench, Tinca tinca\n"
        f"{CLASSES[1]} English springer, English springer spaniel\n"
        "n99999999 not a class here\n",
        encoding="utf-8",
    )
    splits = build_dataset(recipe, registries, purpose="predict")
    assert splits.classes == ["tench", "English springer"] and len(splits.val) == 0  # nothing scanned
    full = build_dataset(recipe, registries)
    assert full.classes == splits.classes
    path = full.val.path(0)
    torch.testing.assert_close(splits.read_file(Path(path)), full.val[0][0])


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_a_checkpoint_whose_outputs_are_nan_is_named_not_reported_as_a_prediction(trained, pictures, tmp_path):
    folder, _ = pictures
    tensors, metadata = ckpt.load(trained)
    tensors = dict(tensors)
    bias = next(k for k in tensors if k.startswith("model/") and k.endswith("fc8.bias"))
    tensors[bias] = torch.full_like(tensors[bias], float("nan"))
    broken = tmp_path / "nan.safetensors"
    ckpt.save(broken, tensors, {k: v for k, v in metadata.items() if k != "convnet.sha256"})
    with pytest.raises(ConvnetError, match=re.escape(f"{broken}: the network's outputs are NaN for ")):
        predict(load_recipe("alexnet-digits", DIGITS), broken, [folder / "digit000.png"])


def test_a_plot_is_checked_before_anything_is_classified(tmp_path, capsys):
    """A format matplotlib cannot draw, or the name of an input image, stops the command before
    it loads anything (the checkpoint here does not even exist), and the image stays."""
    image = tmp_path / "v.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(image)
    before = image.read_bytes()
    missing = str(tmp_path / "no-such.safetensors")
    for plot, files, message in [
        (image, [image], "--plot names one of the images to classify"),
        (image, [tmp_path], "--plot names one of the images to classify"),  # inside a folder given
        (tmp_path / "out.txt", [image], "--plot cannot draw a .txt file; use one of"),
        (tmp_path / "out.pgf", [image], "--plot cannot draw a .pgf file"),  # needs LaTeX to write
    ]:
        argv = ["predict", "alexnet-digits", "--checkpoint", missing, "--plot", str(plot), *map(str, files)]
        assert main(argv) == 1
        assert message in capsys.readouterr().err
    assert image.read_bytes() == before
    assert plot_path(tmp_path / "figure") == tmp_path / "figure.png"  # the name it is written under


@pytest.mark.slow  # trains a digits network first (module fixture)
def test_images_not_of_model_input_shape_are_a_recipe_error(trained, pictures):
    folder, _ = pictures
    recipe = load_recipe("alexnet-digits", [*DIGITS, "data.eval_augment=[{name='center-crop', size=12}]"])
    with pytest.raises(RecipeError, match=r"give \[3, 12, 12\] images but model.input is \[3, 16, 16\]"):
        predict(recipe, trained, [folder / "digit000.png"])
