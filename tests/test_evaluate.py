"""Evaluators: top-k, ten-crop, ensemble, filters, neighbours, confusion (issue 7)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convnet.core import BuildContext, load_plugins
from convnet.core import checkpoint as ckpt
from convnet.core.data import DatasetSplits
from convnet.core.errors import CheckpointError, RecipeError
from convnet.core.evaluate_cmd import evaluate
from convnet.core.evaluation import EvalContext
from convnet.core.model import build_model
from convnet.core.recipe import load_recipe
from convnet.core.strategy import Strategy
from convnet.plugins.evaluate.confusion import Confusion, ConfusionOptions, confused_pairs, confusion_matrix
from convnet.plugins.evaluate.filters import Filters, FiltersOptions, colour_specificity, draw, labelled
from convnet.plugins.evaluate.neighbours import Neighbours, NeighboursOptions, nearest, query_indices
from convnet.plugins.evaluate.tencrop import TenCrop, TenCropOptions, ten_crops
from convnet.plugins.evaluate.topk import Topk, TopkOptions, topk_errors


class Pairs(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def context(recipe, module: nn.Module, val: Pairs, train: Pairs | None = None, out=None, augment=()) -> EvalContext:
    k = recipe.model.num_classes
    splits = DatasetSplits(train if train is not None else val, val, k, [f"c{i}" for i in range(k)])
    return EvalContext(
        recipe, module, Strategy(torch.device("cpu")), splits, list(augment), out, 0, True, load_plugins()
    )


def built(recipe, path: str = "evaluate[0]") -> BuildContext:
    """What an evaluator factory receives for the recipe entry at ``path``."""
    return BuildContext(recipe, load_plugins(), path)


@pytest.fixture(scope="module")
def digits():
    return load_recipe("alexnet-digits")


# ------------------------------------------------------------------ top-k


def reference_topk_error(logits: list[list[float]], labels: list[int], k: int) -> float:
    """Plain Python: sort classes by (higher logit first, then lower index), is the label in the first k?"""
    wrong = 0
    for row, label in zip(logits, labels):
        order = sorted(range(len(row)), key=lambda c: (-row[c], c))
        wrong += label not in order[:k]
    return wrong / len(labels)


@st.composite
def logits_and_labels(draw_):
    classes = draw_(st.integers(1, 12))
    n = draw_(st.integers(1, 30))
    # few distinct integer values: many ties
    values = draw_(st.lists(st.lists(st.integers(-3, 3), min_size=classes, max_size=classes), min_size=n, max_size=n))
    labels = draw_(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    return values, labels


@given(logits_and_labels())
def test_topk_equals_plain_reference_for_every_k_with_ties(case):
    values, labels = case
    logits = torch.tensor(values, dtype=torch.float32)
    y = torch.tensor(labels)
    classes = logits.shape[1]
    counts = topk_errors(logits, y, list(range(1, classes + 1)))
    for k in range(1, classes + 1):
        wrong, total = counts[k]
        assert wrong / total == reference_topk_error(values, labels, k)
    # deterministic: a permutation of the samples changes nothing
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    assert topk_errors(logits[perm], y[perm], [1]) == {1: counts[1]}
    assert counts[classes][0] == 0


def test_a_nan_in_the_logits_is_wrong_for_every_k_and_predicts_no_class():
    """Comparisons with NaN are all false: without care a NaN network ranks every label first."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0], [float("nan")] * 3])
    labels = torch.tensor([2, 1, 0])
    assert topk_errors(logits, labels, [1, 3]) == {1: (2, 3), 3: (2, 3)}
    matrix = confusion_matrix(logits, labels, 3)
    assert int(matrix.sum()) == 1 and int(matrix[2, 2]) == 1


def test_topk_tie_goes_to_lower_class():
    logits = torch.zeros(2, 4)  # all tied: class 0 ranks first
    assert topk_errors(logits, torch.tensor([0, 3]), [1, 3, 4]) == {1: (1, 2), 3: (1, 2), 4: (0, 2)}


# ------------------------------------------------------------------ ten-crop


class LookupByMean(nn.Module):
    """Ignores the image's layout: each image is constant, its value picks a row of a logit table."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.mean((1, 2, 3)).round().long()]


@settings(max_examples=15)
@given(st.integers(2, 10), st.integers(1, 12), st.integers(0, 3), st.booleans(), st.data())
def test_ten_crop_on_a_model_that_ignores_the_input_equals_centre_crop(classes, n, pad, flip, data):
    recipe = load_recipe(
        "alexnet-digits", [f"model.num_classes={classes}", "model.input=[3, 8, 8]"], validate_model=False
    )
    # logits on a 1/8 grid: distinct logits stay distinct after softmax (the comparison with
    # plain top-k on logits is about crops, not about float resolution)
    table = (
        torch.tensor(
            data.draw(
                st.lists(st.lists(st.integers(-40, 40), min_size=classes, max_size=classes), min_size=n, max_size=n)
            ),
            dtype=torch.float32,
        )
        / 8
    )
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 8, 8).clone()
    ctx = context(recipe, LookupByMean(table), Pairs(images, labels))
    result = TenCrop(TenCropOptions(pad=pad, flip=flip), built(recipe))(ctx)
    plain = Topk(TopkOptions(k=[1, 5]))(ctx)
    for k in (1, 5):
        if k <= classes:
            assert result[f"tencrop_top{k}_error"] == result[f"centre_top{k}_error"] == plain[f"top{k}_error"]
    assert result["tencrop_samples"] == n


def test_ten_crops_geometry():
    image = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    views = ten_crops(image, 4, 4)
    assert views.shape == (1, 10, 1, 4, 4)
    assert torch.equal(views[0, 0, 0], image[0, 0, :4, :4])  # top-left
    assert torch.equal(views[0, 1, 0], image[0, 0, :4, 2:])  # top-right
    assert torch.equal(views[0, 2, 0], image[0, 0, 2:, :4])  # bottom-left
    assert torch.equal(views[0, 3, 0], image[0, 0, 2:, 2:])  # bottom-right
    assert torch.equal(views[0, 4, 0], image[0, 0, 1:5, 1:5])  # centre
    assert torch.equal(views[0, 9, 0], image[0, 0, 1:5, 1:5].flip(-1))
    assert ten_crops(image, 4, 4, flip=False).shape[1] == 5
    with pytest.raises(ValueError, match="larger than the image"):
        ten_crops(image, 7, 4)


def test_ten_crop_uses_views_from_the_eval_augmentation(digits):
    """A ten-view augmenter ([10, C, h, w] per image): view 4 is the centre; predict() averages softmax."""
    recipe = load_recipe("alexnet-digits", ["model.input=[3, 8, 8]"], validate_model=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    images = torch.randn(20, 3, 12, 12)
    labels = [i % 10 for i in range(20)]

    def ten_views(image, generator):
        return ten_crops(image[None], 8, 8)[0]

    ctx = context(recipe, model, Pairs(images, labels), augment=[ten_views])
    result = TenCrop(TenCropOptions(), built(recipe))(ctx)
    with torch.no_grad():
        views = ten_crops(images, 8, 8)
        probs = torch.softmax(model(views.flatten(0, 1)), 1).reshape(20, 10, 10).double()
    y = torch.tensor(labels)
    assert result["centre_top1_error"] == topk_errors(probs[:, 4], y, [1])[1][0] / 20
    assert result["tencrop_top1_error"] == topk_errors(probs.mean(1), y, [1])[1][0] / 20
    assert Topk(TopkOptions(k=[1]))(ctx)["top1_error"] == result["tencrop_top1_error"]
    for options in (TenCropOptions(pad=2), TenCropOptions(flip=False)):  # they would be ignored: said so
        with pytest.raises(RecipeError, match="already gives the 10 views"):
            TenCrop(options, built(recipe))(context(recipe, model, Pairs(images, labels), augment=[ten_views]))


def test_ten_crop_options_the_ten_crop_augmenter_would_ignore_fail_when_built(registries):
    """Found when the recipe loads, not after the training it evaluates."""
    recipe = load_recipe("alexnet-digits", ['data.eval_augment=[{name = "ten-crop", size = 32}]'], registries)
    with pytest.raises(RecipeError, match="already gives the 10 views"):
        TenCrop(TenCropOptions(pad=2), built(recipe))
    assert TenCrop(TenCropOptions(), built(recipe)).metrics is not None


def test_ten_crop_agrees_with_the_ten_crop_augmenter(registries):
    """Crops cut by the evaluator = the views of the `ten-crop` augmenter (same order, centre = view 4)."""
    from convnet.core.data import DataContext

    recipe = load_recipe("alexnet-digits", ["model.input=[3, 8, 8]"], validate_model=False)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    data = Pairs(torch.randn(30, 3, 11, 11), [i % 10 for i in range(30)])
    entry = registries.augmenter.get("ten-crop")
    augmenter = entry.factory(entry.options(size=8), DataContext(recipe, registries, "data.eval_augment[0]"))
    own = TenCrop(TenCropOptions(), built(recipe))(context(recipe, model, data))
    via_augmenter = TenCrop(TenCropOptions(), built(recipe))(context(recipe, model, data, augment=[augmenter]))
    assert own == via_augmenter and own["tencrop_samples"] == 30


def test_ten_crop_too_small_images_is_a_recipe_error():
    recipe = load_recipe("alexnet-digits", ["model.input=[3, 8, 8]"], validate_model=False)
    ctx = context(recipe, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10)), Pairs(torch.zeros(2, 3, 4, 4), [0, 1]))
    with pytest.raises(RecipeError, match="ten-crop: crop 8x8 is larger than the image 4x4"):
        TenCrop(TenCropOptions(), built(recipe))(ctx)
    with pytest.raises(RecipeError, match=r"evaluate\[0\]\.size"):
        TenCrop(TenCropOptions(size=6), built(recipe))


# ------------------------------------------------------------------ ensemble and convnet eval


def save_model(path, model: nn.Module) -> str:
    ckpt.save(path, {f"model/{k}": v for k, v in model.state_dict().items()}, {"convnet.state": "{}"})
    return str(path)


SMALL = ['evaluate=[{name = "topk"}, {name = "ensemble"}]', "data.dataset.val_fraction=0.05"]


def test_ensemble_of_one_checkpoint_equals_that_checkpoint(tmp_path, digits):
    recipe = load_recipe("alexnet-digits", SMALL)
    a = save_model(tmp_path / "a.safetensors", build_model(recipe, seed=1))
    result = evaluate(recipe, [a], tmp_path / "out", load_plugins())
    assert result["ensemble_size"] == 1
    assert result["ensemble_top1_error"] == result["top1_error"]
    assert result["ensemble_top5_error"] == result["top5_error"]
    assert result["ensemble_members"][0]["member"] == a
    assert (tmp_path / "out" / "eval.json").is_file()


def test_ensemble_of_two_averages_softmax(tmp_path):
    recipe = load_recipe("alexnet-digits", SMALL)
    models = [build_model(recipe, seed=s) for s in (1, 2)]
    paths = [save_model(tmp_path / f"m{s}.safetensors", m) for s, m in zip((1, 2), models)]
    result = evaluate(load_recipe("alexnet-digits", SMALL), paths, tmp_path / "out", load_plugins())
    from convnet.core import plugins
    from convnet.core.data import build_dataset

    val = build_dataset(recipe, plugins.registries()).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        probs = [torch.softmax(m.eval()(x).double(), 1) for m in models]
    expected = topk_errors((probs[0] + probs[1]) / 2, y, [1])[1][0] / len(y)
    assert result["ensemble_size"] == 2
    assert result["ensemble_top1_error"] == pytest.approx(expected, abs=1.5 / len(y))
    members = [m["top1_error"] for m in result["ensemble_members"]]
    assert members[0] == result["top1_error"]
    assert members == [pytest.approx(topk_errors(p, y, [1])[1][0] / len(y), abs=1.5 / len(y)) for p in probs]


def test_cli_eval_says_which_checkpoint_the_plain_metrics_come_from(tmp_path, capsys):
    import json

    from convnet.core.cli import main

    recipe = load_recipe("alexnet-digits", SMALL)
    a, b = (save_model(tmp_path / f"{n}.safetensors", build_model(recipe, seed=s)) for n, s in (("a", 1), ("b", 2)))
    argv = ["eval", "alexnet-digits", "--checkpoint", b, a, "--out", str(tmp_path / "out")]
    for s in SMALL:
        argv += ["--set", s]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert printed["metrics_from"] == saved["metrics_from"] == b
    assert printed["top1_error"] == printed["ensemble_members"][0]["top1_error"]  # b's, indeed
    assert f"the plain metrics are of the first checkpoint, {b}" in captured.err


def test_checkpoint_of_another_recipe_names_the_first_mismatched_tensor(tmp_path):
    other = load_recipe("alexnet-digits", ["model.layers[0].out=16"])
    path = save_model(tmp_path / "other.safetensors", build_model(other))
    recipe = load_recipe("alexnet-digits", SMALL)
    with pytest.raises(CheckpointError) as info:
        evaluate(recipe, [path], tmp_path / "out", load_plugins())
    message = str(info.value)
    assert "layers.conv1.weight" in message and "[16, 3, 5, 5]" in message and "[32, 3, 5, 5]" in message
    good = save_model(tmp_path / "good.safetensors", build_model(recipe))
    with pytest.raises(CheckpointError, match="layers.conv1.weight"):  # as an ensemble member too
        evaluate(load_recipe("alexnet-digits", SMALL), [good, path], tmp_path / "out2", load_plugins())


def test_cli_eval_bad_inputs(tmp_path, capsys):
    from convnet.core.cli import main

    other = load_recipe("alexnet-digits", ["model.layers[0].out=16"])
    path = save_model(tmp_path / "other.safetensors", build_model(other))
    assert main(["eval", "alexnet-digits", "--checkpoint", path, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers.conv1.weight" in err[0] and "[16, 3, 5, 5]" in err[0]
    assert main(["eval", "alexnet-digits", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 1
    assert "no such checkpoint file" in capsys.readouterr().err
    good = save_model(tmp_path / "good.safetensors", build_model(load_recipe("alexnet-digits")))
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        assert main(["eval", "alexnet-digits", "--checkpoint", good, "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot make the evaluation's folder there" in err[0] and "a-file" in err[0], err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "alexnet-digits"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------ filters


def test_filters_image_has_the_expected_pixel_size_for_the_recipe(tmp_path, digits):
    from PIL import Image

    ctx = context(digits, build_model(digits), Pairs(torch.zeros(1, 3, 32, 32), [0]), out=tmp_path)
    result = Filters(FiltersOptions(), built(digits))(ctx)
    # conv1: 32 kernels 5x5x3, 2 towers of 16 -> one row of 16 per tower; drawn 10x (48/5), gap 2
    width = 16 * 5 * 10 + 17 * 2
    height = 2 * (5 * 10 + 2 * 2) + 2
    grid = draw(build_model(digits).layers["conv1"].weight, 2, 16, 10, 2)
    assert grid.shape == (height, width, 3)
    assert (grid[height // 2 - 1] == 0).all()  # the black band between the towers
    with Image.open(tmp_path / "filters_conv1.png") as im:
        assert im.size == (width + 182, height + 62)  # the grid, a title above and tower names left
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels[50 : 50 + height, 170 : 170 + width] == grid).mean() > 0.9  # pixel for pixel (but its frame)
    scores = result["filters_conv1_colour_specificity"]
    assert len(scores) == 2 and all(0.5 < s < 0.8 for s in scores)  # random init: about 2/3
    fig = labelled(grid, "conv1", (32, 3, 5, 5), 2, scores)
    ax = fig.axes[0]
    assert "conv1: 32 kernels of 5x5x3" in ax.get_title()
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == ["tower 1", "tower 2"]


@settings(max_examples=10)
@given(
    st.integers(1, 4), st.integers(1, 20), st.integers(1, 7), st.integers(1, 8), st.integers(1, 3), st.integers(0, 3)
)
def test_filters_grid_size(towers, per_tower, k, columns, scale, gap):
    kernels = torch.randn(towers * per_tower, 3, k, k)
    image = draw(kernels, towers, columns, scale, gap)
    cols = min(per_tower, columns)
    rows = -(-per_tower // cols)
    assert image.shape == (
        towers * (rows * k * scale + (rows + 1) * gap) + (towers - 1) * gap,
        cols * k * scale + (cols + 1) * gap,
        3,
    )
    first = image[gap : gap + k * scale, gap : gap + k * scale]  # kernel 0, scaled to its own min..max
    assert (first.min() == 0 and first.max() == 255) or k == 1


def test_colour_specificity_definition():
    grey = torch.randn(4, 1, 5, 5).expand(4, 3, 5, 5)
    assert torch.allclose(colour_specificity(grey), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    pure_colour = torch.tensor([1.0, -1.0, 0.0])[None, :, None, None].expand(2, 3, 5, 5)
    assert torch.allclose(colour_specificity(pure_colour), torch.ones(2, dtype=torch.float64))
    random = colour_specificity(torch.randn(2000, 3, 5, 5, generator=torch.Generator().manual_seed(0)))
    assert abs(float(random.mean()) - 2 * 25 / 74) < 0.01  # E = 2 k^2 / (3 k^2 - 1)


def test_filters_on_a_layer_that_is_not_a_first_conv(digits):
    with pytest.raises(RecipeError, match=r"evaluate\[0\]\.layer: .*'conv9'"):
        Filters(FiltersOptions(layer="conv9"), built(digits))
    ctx = context(digits, build_model(digits), Pairs(torch.zeros(1, 3, 32, 32), [0]))
    with pytest.raises(RecipeError, match="reads 16 channels per kernel"):
        Filters(FiltersOptions(layer="conv2"), built(digits))(ctx)


# ------------------------------------------------------------------ neighbours


def test_neighbours_of_a_training_image_include_itself_at_distance_0(tmp_path, digits):
    from convnet.core import plugins
    from convnet.core.data import build_dataset

    splits = build_dataset(digits, plugins.registries())
    train = splits.train
    ctx = EvalContext(
        digits, build_model(digits), Strategy(torch.device("cpu")), splits, [], tmp_path, 0, True, load_plugins()
    )
    result = Neighbours(NeighboursOptions(query_split="train", queries=5, k=3, train_limit=300), built(digits))(ctx)
    import json

    payload = json.loads((tmp_path / "neighbours.json").read_text())
    assert payload["train_images"] == 300 and len(payload["queries"]) == 5
    for q in payload["queries"]:
        assert q["neighbours"][0] == q["query"] and q["distances"][0] == 0.0
        assert q["distances"] == sorted(q["distances"])
        assert q["labels"][0] == q["label"] == train[q["query"]][1]
    assert 0 <= result["neighbours_label_agreement"] <= 1
    from PIL import Image

    with Image.open(tmp_path / "neighbours.png") as im:
        assert im.size == (4 * (64 + 40) + 60, 5 * (64 + 48) + 60)
    from convnet.plugins.evaluate.neighbours import labelled as labelled_sheet

    rows = [[train[q["query"]][0]] + [train[j][0] for j in q["neighbours"]] for q in payload["queries"]]
    fig = labelled_sheet(rows, payload["queries"], splits.classes, "fc7", 64)
    assert len(fig.axes) == 5 * 4 and "fc7" in fig._suptitle.get_text()
    first = payload["queries"][0]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["query", "1", "2", "3"]
    assert fig.axes[0].get_xlabel() == splits.classes[first["label"]]
    assert fig.axes[0].get_ylabel() == f"train #{first['query']}"
    assert fig.axes[1].get_xlabel().startswith(splits.classes[first["labels"][0]] + " (0")


def test_neighbours_without_the_layer_is_a_recipe_error_naming_the_option():
    recipe = load_recipe("alexnet-digits", ['evaluate=[{name = "neighbours", layer = "fc9"}]'], validate_model=False)
    with pytest.raises(RecipeError, match=r"evaluate\[0\]\.layer: .*'fc9'.*does not have"):
        Neighbours(recipe.evaluate[0].options, built(recipe))


def test_nearest_ties_go_to_the_lower_index_and_query_spread():
    db = torch.tensor([[1.0], [0.0], [1.0], [3.0]])
    dist, pos = nearest(torch.tensor([[0.0], [2.0]]), db, 3)
    assert pos.tolist() == [[1, 0, 2], [0, 2, 3]]
    assert dist.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert query_indices(10, 4) == [0, 3, 6, 9] and query_indices(3, 8) == [0, 1, 2]


# ------------------------------------------------------------------ confusion


@given(st.integers(1, 8), st.data())
def test_confusion_matrix_matches_a_loop(classes, data):
    n = data.draw(st.integers(1, 40))
    values = data.draw(
        st.lists(st.lists(st.integers(-2, 2), min_size=classes, max_size=classes), min_size=n, max_size=n)
    )
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n))
    matrix = confusion_matrix(torch.tensor(values, dtype=torch.float32), torch.tensor(labels), classes)
    expected = [[0] * classes for _ in range(classes)]
    for row, label in zip(values, labels):
        expected[label][min(range(classes), key=lambda c: (-row[c], c))] += 1
    assert matrix.tolist() == expected
    pairs = confused_pairs(matrix, 100)
    assert all(t != p and c > 0 for t, p, c in pairs)
    assert [(-c, t, p) for t, p, c in pairs] == sorted((-c, t, p) for t, p, c in pairs)
    assert sum(c for _, _, c in pairs) == n - int(matrix.diag().sum())


def test_confusion_evaluator_writes_json(tmp_path):
    recipe = load_recipe("alexnet-digits", ["model.num_classes=3", "model.input=[3, 8, 8]"], validate_model=False)
    table = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    images = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 8, 8).clone()
    ctx = context(recipe, LookupByMean(table), Pairs(images, [0, 0, 2, 1]), out=tmp_path)
    result = Confusion(ConfusionOptions(pairs=5), built(recipe))(ctx)
    import json

    payload = json.loads((tmp_path / "confusion.json").read_text())
    assert payload["matrix"] == [[0, 2, 0], [1, 0, 0], [0, 0, 1]]
    assert [(p["true"], p["predicted"], p["count"]) for p in payload["pairs"]] == [("c0", "c1", 2), ("c1", "c0", 1)]
    assert result["most_confused"] == ["c0->c1: 2", "c1->c0: 1"]
    assert math.isclose(payload["pairs"][0]["rate"], 1.0)


def test_every_evaluator_gives_the_same_under_model_parallel(tmp_path):
    """Same checkpoint, `single` vs `model-parallel` (two towers on the CPU): same numbers and files."""
    import json

    sets = [
        "model.input=[3, 16, 16]",
        "data.dataset.val_fraction=0.03",
        "evaluate[3].train_limit=100",
        "evaluate[3].queries=4",
    ]
    recipe = load_recipe("alexnet-digits-eval", sets)
    a = save_model(tmp_path / "a.safetensors", build_model(recipe, seed=3))
    b = save_model(tmp_path / "b.safetensors", build_model(recipe, seed=4))
    single = evaluate(recipe, [a, b], tmp_path / "single", load_plugins())
    split = load_recipe(
        "alexnet-digits-eval", [*sets, 'parallel.strategy="model-parallel"', 'parallel.devices=["cpu", "cpu"]']
    )
    towers = evaluate(split, [a, b], tmp_path / "towers", load_plugins())
    for key in (
        "top1_error",
        "tencrop_top1_error",
        "centre_top1_error",
        "ensemble_top1_error",
        "most_confused",
        "neighbours_label_agreement",
    ):
        assert towers[key] == single[key], key
    assert towers["filters_conv1_colour_specificity"] == pytest.approx(single["filters_conv1_colour_specificity"])
    near = [json.loads((tmp_path / d / "neighbours.json").read_text())["queries"] for d in ("single", "towers")]
    assert [q["neighbours"] for q in near[0]] == [q["neighbours"] for q in near[1]]
