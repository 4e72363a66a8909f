"""The paper's network as recipes: shapes, parameters, multiply-adds, towers, init, LRN, bad shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convnet.core import cli
from convnet.core.errors import RecipeError
from convnet.core.model import build_model, describe
from convnet.core.recipe import bundled_names, load_recipe, to_toml
from convnet.core.summary import summarize

PAPER_AUGMENTERS = ("mean-image", "random-crop", "hflip", "pca-lighting", "ten-crop")


def augment_overrides(registries) -> list[str]:
    """Clear the augmenter lists only while the augmenter plugin is not installed: the
    network does not depend on them."""
    if all(n in registries.augmenter for n in PAPER_AUGMENTERS):
        return []
    return ["data.train_augment=[]", "data.eval_augment=[]"]


def load(name: str, registries, extra: tuple[str, ...] = ()):
    return load_recipe(name, [*augment_overrides(registries), *extra], registries)


def rows_by_id(recipe, registries) -> dict[str, dict]:
    return {r["id"]: r for r in describe(build_model(recipe, device="meta", registries=registries))}


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def test_alexnet_imagenet_spatial_sizes_are_55_27_13_6(registries):
    rows = rows_by_id(load("alexnet-imagenet", registries), registries)
    assert rows["conv1"]["in_shape"] == [3, 227, 227]
    assert rows["conv1"]["out_shape"] == [96, 55, 55]
    assert rows["pool1"]["out_shape"] == [96, 27, 27]
    assert rows["conv2"]["out_shape"] == [256, 27, 27]
    assert rows["pool2"]["out_shape"] == [256, 13, 13]
    assert [rows[c]["out_shape"] for c in ("conv3", "conv4", "conv5")] == [[384, 13, 13], [384, 13, 13], [256, 13, 13]]
    assert rows["pool5"]["out_shape"] == [256, 6, 6]
    assert rows["flatten"]["out_shape"] == [9216]
    assert [rows[f]["out_shape"] for f in ("fc6", "fc7", "fc8")] == [[4096], [4096], [1000]]


def test_alexnet_imagenet_parameters_and_multiply_adds_match_the_paper(registries):
    info = summarize(load("alexnet-imagenet", registries), registries)
    rows = {r["id"]: r for r in info["layers"]}
    assert info["params"] == 60_965_224
    # Each product written out from the paper's table (kernels x fan-in per tower x positions).
    expected_macs = {
        "conv1": 96 * 55 * 55 * 3 * 11 * 11,
        "conv2": 256 * 27 * 27 * 48 * 5 * 5,
        "conv3": 384 * 13 * 13 * 256 * 3 * 3,
        "conv4": 384 * 13 * 13 * 192 * 3 * 3,
        "conv5": 256 * 13 * 13 * 192 * 3 * 3,
        "fc6": 4096 * 9216,
        "fc7": 4096 * 4096,
        "fc8": 1000 * 4096,
    }
    for layer, macs in expected_macs.items():
        assert rows[layer]["macs"] == macs, layer
        assert rows[layer]["macs_per_tower"] * 2 == macs, layer
    assert info["macs"] == sum(expected_macs.values()) == 724_406_816
    assert all(rows[r]["macs"] == 0 for r in ("pool1", "pool2", "pool5", "lrn1", "lrn2", "relu1"))
    assert rows["conv2"]["params"] == 256 * 48 * 25 + 256  # 5x5x48: inside one tower
    assert rows["conv3"]["params"] == 384 * 256 * 9 + 384  # 3x3x256: reads both towers


def test_alexnet_imagenet_towers_and_exchanges(registries):
    info = summarize(load("alexnet-imagenet", registries), registries)
    rows = {r["id"]: r for r in info["layers"]}
    assert info["towers"] == 2
    assert rows["conv1"]["towers"] == "cross" and not rows["conv1"]["exchanges"]
    assert [rows[c]["towers"] for c in ("conv2", "conv4", "conv5", "lrn1", "lrn2")] == ["local"] * 5
    assert info["exchange_layers"] == ["conv3", "fc6", "fc7", "fc8"]


def test_summary_command_prints_the_paper_numbers(registries, capsys):
    argv = ["summary", "alexnet-imagenet"]
    for o in augment_overrides(registries):
        argv += ["--set", o]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "60,965,224" in text and "724,406,816" in text
    assert "96x55x55" in text and "96x27x27" in text and "256x13x13" in text and "256x6x6" in text
    assert cli.main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == 60_965_224


def test_paper_initialisation_from_layer_options(registries):
    model = build_model(load("alexnet-imagenet", registries), registries=registries)
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        module = model.layers[layer]
        w = module.weight.detach()
        assert abs(float(w.std()) - 0.01) < 0.01 * 0.05, layer  # thousands+ of draws per layer
        assert abs(float(w.mean())) < 0.001, layer
        assert torch.all(module.bias == (1.0 if layer in ones else 0.0)), layer


def test_lrn_is_tower_local_by_default_and_cross_is_an_option(registries):
    recipe = load("alexnet-imagenet", registries)
    local = build_model(recipe, registries=registries).layers["lrn1"]
    cross = build_model(
        load("alexnet-imagenet", registries, ('model.layers.lrn1.towers="cross"',)), registries=registries
    ).layers["lrn1"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, 5, 5, generator=g) * 30
    bumped = x.clone()
    bumped[:, 48:50] *= 3  # tower 1's first channels; the window of channel 47 reaches 48 and 49
    # Tower 0 (channels 0-47) never sees tower 1's channels in the paper's network...
    assert torch.equal(local(x)[:, :48], local(bumped)[:, :48])
    # ... while Caffe's single-device variant normalises channel 47 with 48 and 49.
    assert not torch.allclose(cross(x)[:, 47], cross(bumped)[:, 47])
    assert torch.equal(cross(x)[:, :46], cross(bumped)[:, :46])


def test_paper_optimizer_and_schedule_in_the_recipe(registries):
    recipe = load("alexnet-imagenet", registries)
    opt, sch = recipe.train.optimizer, recipe.train.schedule
    assert (opt.name, opt.options.lr, opt.options.momentum, opt.options.weight_decay) == ("paper-sgd", 0.01, 0.9, 5e-4)
    assert (sch.name, sch.options.factor, sch.options.max_reductions) == ("plateau", 0.1, 3)
    assert recipe.data.batch_size == 128
    assert [layer.options.p for layer in recipe.model.layers if layer.name == "dropout"] == [0.5, 0.5]


def test_paper_recipe_lists_the_paper_augmenters(registries):
    """Checked on the raw file, so it holds whether or not the augmenter plugin is installed."""
    from convnet.core.recipe import load_raw

    raw, _ = load_raw("alexnet-imagenet")
    assert [a["name"] for a in raw["data"]["train_augment"]] == ["mean-image", "random-crop", "hflip", "pca-lighting"]
    assert [a["name"] for a in raw["data"]["eval_augment"]] == ["mean-image", "ten-crop"]
    assert raw["data"]["train_augment"][1]["size"] == 227


def test_one_tower_variant_halves_the_conv_kernels(registries):
    recipe = load("alexnet-1tower", registries)
    rows = rows_by_id(recipe, registries)
    assert recipe.model.towers == 1
    assert [rows[c]["out_shape"][0] for c in ("conv1", "conv2", "conv3", "conv4", "conv5")] == [48, 128, 192, 192, 256]
    assert rows["pool5"]["out_shape"] == [256, 6, 6]
    expected = (
        (48 * 3 * 121 + 48)
        + (128 * 48 * 25 + 128)
        + (192 * 128 * 9 + 192)
        + (192 * 192 * 9 + 192)
        + (256 * 192 * 9 + 256)
        + (4096 * 9216 + 4096)
        + (4096 * 4096 + 4096)
        + (1000 * 4096 + 1000)
    )
    assert sum(r["params"] for r in rows.values()) == expected


def test_torchvision_variant_has_torchvisions_parameter_count(registries):
    import torchvision

    rows = rows_by_id(load("alexnet-torchvision", registries), registries)
    theirs = sum(p.numel() for p in torchvision.models.alexnet(weights=None).parameters())
    assert sum(r["params"] for r in rows.values()) == theirs == 61_100_840
    assert rows["conv1"]["out_shape"] == [64, 55, 55] and rows["pool5"]["out_shape"] == [256, 6, 6]
    assert not any(r["layer"] == "lrn" for r in rows.values())


# ---------------------------------------------------------------- shapes that do not fit


def test_kernel_larger_than_input_fails_at_load_with_path_and_shapes(registries):
    with pytest.raises(RecipeError) as err:
        load("alexnet-imagenet", registries, ("model.input=[3, 9, 9]",))
    msg = str(err.value)
    assert "model.layers[0] (conv1)" in msg and "11x11" in msg and "[3, 9, 9]" in msg


def test_tower_split_that_does_not_divide_fails_at_load(registries):
    with pytest.raises(RecipeError) as err:
        load("alexnet-imagenet", registries, ("model.towers=3",))
    msg = str(err.value)
    assert "model.layers[4] (conv2)" in msg and "[96, 27, 27]" in msg and "256" in msg and "3 towers" in msg


def test_local_conv_whose_channels_do_not_divide_names_layer_and_shape(registries):
    # conv2 is tower-local; 90 output channels from conv1 cannot split over 4 towers.
    with pytest.raises(RecipeError) as err:
        load(
            "alexnet-imagenet",
            registries,
            ("model.towers=4", "model.layers.conv1.out=90", 'model.layers.lrn1.towers="cross"'),
        )
    msg = str(err.value)
    assert "model.layers[4] (conv2)" in msg and "[90, 27, 27]" in msg and "4" in msg


def test_fc_on_a_spatial_input_fails_at_load(registries):
    with pytest.raises(RecipeError) as err:
        load("alexnet-imagenet", registries, ('model.layers.flatten.name="relu"',))
    assert "model.layers[16] (fc6)" in str(err.value) and "[256, 6, 6]" in str(err.value)


def test_bad_shape_fails_before_any_data_is_read(registries, tmp_path):
    missing = tmp_path / "no-such-imagenet"
    with pytest.raises(RecipeError):
        load("alexnet-imagenet", registries, (f'data.dataset.root="{missing}"', "model.input=[3, 9, 9]"))


def test_the_paper_recipe_runs_end_to_end_on_a_small_jpeg_tree(tmp_path, registries):
    """stats -> the paper's augmenters -> two SGD steps -> ten-crop evaluation. fc6/fc7 are narrowed
    to 256 so that the checkpoints the run writes stay small; everything else is the paper's."""
    from test_imagenet_data import write_tree

    from convnet.core.engine import train

    root = tmp_path / "imagenet"
    write_tree(root)
    stats = tmp_path / "stats.safetensors"
    raw = load_recipe("alexnet-imagenet", registries=registries)
    sets = [
        f'data.dataset.root="{root}"',
        "model.num_classes=2",  # fc8's width follows
        "model.layers.fc6.out=256",
        "model.layers.fc7.out=256",
        "data.batch_size=4",
        "data.workers=0",
        "train.max_steps=2",
    ]
    sets += [
        f'data.{split}[{i}].stats="{stats}"'
        for split in ("train_augment", "eval_augment")
        for i, a in enumerate(getattr(raw.data, split))
        if a.name in ("mean-image", "pca-lighting")
    ]
    # --out: the augmenters were pointed at this file (by default stats go next to the dataset)
    argv = ["stats", "alexnet-imagenet", "--quiet", "--out", str(stats), *[x for s in sets for x in ("--set", s)]]
    assert cli.main(argv) == 0
    summary = train(load_recipe("alexnet-imagenet", sets, registries), out=tmp_path / "run", registries=registries)
    assert summary["step"] == 2 and summary["samples"] == 4 and 0.0 <= summary["top1_error"] <= 1.0


# ---------------------------------------------------------------- the recipes as written

RESOLVED = Path(__file__).parent / "fixtures" / "resolved"


@pytest.mark.parametrize("name", bundled_names())
def test_bundled_recipes_resolve_byte_for_byte_as_before(name, registries):
    """A run resumes only under the recipe it was saved with (resolved, compared key by key).

    tests/fixtures/resolved/ holds each bundled recipe as `convnet show` printed it before the
    recipes were rewritten with inline layer tables, layer edits by id and fc8's width from
    model.num_classes: the rewrite changed no resolved value. Regenerate a file for a change that
    is meant to change the recipe (old runs of it then no longer resume) or for a new option
    whose default keeps the old behaviour (relu's ``inplace``: old runs resume, tested below).
    """
    recipe = load_recipe(name, registries=registries)  # the augmenters are ours: missing is a failure
    assert to_toml(recipe, registries) == (RESOLVED / f"{name}.toml").read_text(encoding="utf-8")


def test_a_checkpoint_saved_before_an_option_existed_still_resumes(registries):
    """alexnet-imagenet as checkpoints saved it before relu had ``inplace``, before relu and maxpool
    had ``opaque_under_compile``, before maxpool had ``impl`` and before the recipe set ``train.channels_last`` and
    ``train.reuse_cpu_memory``: the option holds its default on both sides, and the layout and the
    allocation may change on a resume, so the run continues; a real difference is still found."""
    from convnet.core.recipe import resume_difference

    text = (RESOLVED / "alexnet-imagenet.toml").read_text(encoding="utf-8")
    before = text.replace("inplace = true\n", "").replace("channels_last = true\n", "")
    before = before.replace("reuse_cpu_memory = true\n", "").replace("opaque_under_compile = true\n", "")
    before = before.replace('padding = 0\nimpl = "auto"\n', "padding = 0\n")
    assert before.count("\n") == text.count("\n") - 22
    recipe = load_recipe("alexnet-imagenet", registries=registries)
    assert resume_difference(before, recipe, registries) is None
    # a part a resume may change and this machine cannot read does not hide the new defaults
    gone = before.replace('strategy = "single"\ndevice = "auto"', 'strategy = "no-longer-installed"')
    assert gone != before
    assert resume_difference(gone, recipe, registries) is None
    changed = load_recipe("alexnet-imagenet", ["model.layers.relu1.inplace=false"], registries)
    assert resume_difference(before, changed, registries) == ("model.layers[1].inplace", True, False)
    changed = load_recipe("alexnet-imagenet", ["model.layers.pool1.opaque_under_compile=false"], registries)
    assert resume_difference(before, changed, registries) == ("model.layers[3].opaque_under_compile", True, False)
    changed = load_recipe("alexnet-imagenet", ['model.layers.pool1.impl="torch"'], registries)
    assert resume_difference(before, changed, registries) == ("model.layers[3].impl", "auto", "torch")


def test_the_paper_network_is_a_table_and_fc8_follows_num_classes(registries):
    from convnet.core.recipe import load_raw

    raw, _ = load_raw("alexnet-imagenet")
    assert [layer["id"] for layer in raw["model"]["layers"]][:4] == ["conv1", "relu1", "lrn1", "pool1"]
    assert "out" not in raw["model"]["layers"][-1]
    assert load("alexnet-imagenet", registries).model.layers[-1].options.out == 1000
    ten = load("alexnet-imagenet", registries, ("model.num_classes=10",))
    assert rows_by_id(ten, registries)["fc8"]["out_shape"] == [10]
