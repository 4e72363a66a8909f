"""Layers addressed by id: ``--set model.layers.fc8.out=3`` and a child recipe's table of layer edits."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w
from fixtures.strategies import component, options_dict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convnet.core import cli, schema
from convnet.core.errors import RecipeError
from convnet.core.layer_edits import raw_layer_ids
from convnet.core.model import build_model, describe
from convnet.core.recipe import bundled_names, load_raw, load_recipe, structure


def ids_of(recipe: schema.Recipe) -> list[str]:
    return schema.layer_ids((layer.name, layer.id) for layer in recipe.model.layers)


def child(tmp_path: Path, body: str, parent: str = "alexnet-digits") -> Path:
    path = tmp_path / "child.toml"
    path.write_text(f'extends = "{parent}"\n{body}', encoding="utf-8")
    return path


# ------------------------------------------------------------------ one rule for ids


@pytest.mark.parametrize("name", bundled_names())
def test_ids_of_the_plain_data_are_the_models_ids(name: str, registries) -> None:
    raw, _ = load_raw(name)
    recipe = load_recipe(name, registries=registries)
    built = [row["id"] for row in describe(build_model(recipe, device="meta", registries=registries))]
    assert raw_layer_ids(raw["model"]["layers"]) == ids_of(recipe) == built


def test_default_ids_count_layers_by_registry_name() -> None:
    assert schema.layer_ids([("conv", "c"), ("relu", None), ("max-pool", None), ("relu", None), ("conv", None)]) == [
        "c",
        "relu1",
        "max_pool1",
        "relu2",
        "conv2",
    ]


# ------------------------------------------------------------------ --set by id


def test_set_by_id_is_set_by_index(registries) -> None:
    by_index = load_recipe("alexnet-imagenet", ["model.num_classes=3", "model.layers[22].out=3"], registries)
    by_id = load_recipe("alexnet-imagenet", ["model.num_classes=3", "model.layers.fc8.out=3"], registries)
    assert by_id == by_index and by_id.model.layers[22].options.out == 3
    relu = load_recipe("alexnet-digits", ["model.layers.relu3.name=tanh"], registries)  # a default id
    assert [layer.name for layer in relu.model.layers][9] == "tanh"
    whole = load_recipe("alexnet-digits", ['model.layers.dropout2={name = "dropout", p = 0.25}'], registries)
    assert whole.model.layers[21].options.p == 0.25


def test_ids_stay_with_their_layers_through_set(registries) -> None:
    """Renaming relu3 to tanh keeps it relu3 (and relu4 the layer after conv4), so a second --set
    by id reaches the layer the user sees in `convnet show`; a layer replaced as a table keeps its
    id unless the table names one; a --set of an id renames that layer only."""
    plain = ids_of(load_recipe("alexnet-digits", registries=registries))
    renamed = load_recipe(
        "alexnet-digits", ["model.layers.relu3.name=tanh", "model.layers.relu4.inplace=false"], registries
    )
    assert ids_of(renamed) == plain
    at = plain.index("relu4")
    assert renamed.model.layers[at].options.inplace is False
    assert [layer.options.inplace for layer in renamed.model.layers if layer.name == "relu"].count(False) == 1
    table = load_recipe("alexnet-digits", ['model.layers.fc7={name = "fc", out = 64, towers = "cross"}'], registries)
    assert ids_of(table) == plain and table.model.layers[plain.index("fc7")].options.out == 64
    named = load_recipe("alexnet-digits", ["model.layers.fc7.id=hidden", "model.layers.hidden.out=33"], registries)
    assert ids_of(named) == [("hidden" if i == "fc7" else i) for i in plain]
    assert named.model.layers[plain.index("fc7")].options.out == 33


def test_set_by_unknown_id_names_the_path_the_ids_and_the_closest(registries, capsys) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe("alexnet-imagenet", ["model.layers.fc9.out=3"], registries)
    message = str(info.value)
    assert message.startswith(
        "--set model.layers.fc9.out: model.layers.fc9: no layer with id 'fc9'; "
        "did you mean 'fc8'? (ids: conv1, relu1, lrn1, pool1, conv2,"
    )
    assert message.endswith(", fc7, relu7, drop7, fc8)") and "\n" not in message
    assert cli.main(["show", "alexnet-digits", "--set", "model.layers.lrn3.k=1"]) == 2
    assert "model.layers.lrn3: no layer with id 'lrn3'" in capsys.readouterr().err


# ------------------------------------------------------------------ a child's layer edits


def test_child_merges_replaces_removes_and_inserts_layers_by_id(tmp_path, registries) -> None:
    path = child(
        tmp_path,
        """
[model.layers]
fc8 = { weight_std = 0.02 }                      # merged into fc8
relu1 = { name = "tanh" }                        # another layer: replaced whole
lrn1 = { remove = true }
lrn2 = { remove = true }
drop0 = { name = "dropout", p = 0.1, after = "pool1" }
drop00 = { name = "dropout", p = 0.2, after = "pool1" }  # after the same anchor: table order kept
act = { name = "relu", before = "conv1", towers = "cross" }
""",
    )
    recipe = load_recipe(path, registries=registries)
    base = load_recipe("alexnet-digits", registries=registries)
    assert ids_of(recipe)[:7] == ["act", "conv1", "relu1", "pool1", "drop0", "drop00", "conv2"]
    assert "lrn1" not in ids_of(recipe) and "lrn2" not in ids_of(recipe)
    layers = dict(zip(ids_of(recipe), recipe.model.layers, strict=True))
    assert layers["relu1"].name == "tanh" and layers["relu1"].id == "relu1"  # the id stays with the key
    assert (layers["drop0"].options.p, layers["drop00"].options.p, layers["act"].towers) == (0.1, 0.2, "cross")
    fc8 = layers["fc8"].options
    assert (fc8.weight_std, fc8.out, fc8.weight_init) == (0.02, 10, base.model.layers[-1].options.weight_init)


def test_ids_stay_with_their_layers_when_others_come_and_go(tmp_path, registries) -> None:
    """alexnet-digits names its relus by default; removing relu1 must not rename relu2 to relu1."""
    recipe = load_recipe(child(tmp_path, "[model.layers.relu1]\nremove = true\n"), registries=registries)
    base = load_recipe("alexnet-digits", registries=registries)
    assert ids_of(recipe) == [i for i in ids_of(base) if i != "relu1"]
    assert recipe.model.layers[1].id == "lrn1" and recipe.model.layers[4].id == "relu2"  # written out
    assert [row["id"] for row in describe(build_model(recipe, device="meta", registries=registries))] == ids_of(recipe)


def test_after_or_before_on_an_existing_id_moves_it(tmp_path, registries) -> None:
    path = child(
        tmp_path, '[model.layers]\ndropout1 = { before = "fc6", p = 0.3 }\ndropout2 = { after = "dropout1" }\n'
    )
    ids = ids_of(load_recipe(path, registries=registries))
    assert ids[-8:] == ["flatten1", "dropout1", "dropout2", "fc6", "relu6", "fc7", "relu7", "fc8"]


def test_an_array_in_the_child_still_replaces_the_whole_list(tmp_path, registries) -> None:
    path = child(tmp_path, '[model]\nlayers = [{ name = "flatten" }, { name = "fc", towers = "cross" }]\n')
    assert [layer.name for layer in load_recipe(path, registries=registries).model.layers] == ["flatten", "fc"]


def test_edits_chain_through_grandchildren(tmp_path, registries) -> None:
    middle = tmp_path / "middle.toml"
    middle.write_text('extends = "ablation-digits"\n[model.layers.lrn1]\nremove = true\n', encoding="utf-8")
    last = tmp_path / "last.toml"
    last.write_text('extends = "middle.toml"\n[model.layers.lrn2]\nremove = true\n', encoding="utf-8")
    no_lrn = load_recipe("ablation-no-lrn", registries=registries)
    assert load_recipe(last, registries=registries) == attrs.evolve(no_lrn, name="last", description="")


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "[model.layers.lrn_1]\nremove = true\n",
            "model.layers.lrn_1: no layer with id 'lrn_1'; did you mean 'lrn1'? (ids: conv1, relu1, lrn1,",
        ),
        (
            "[model.layers.fc9]\nout = 3\n",
            "model.layers.fc9: no layer with id 'fc9'; did you mean 'fc8'? (a new layer needs after = \"ID\" or "
            'before = "ID"; ids: conv1,',
        ),
        (
            '[model.layers.extra]\nname = "relu"\nafter = "pool_1"\n',
            "model.layers.extra.after: no layer with id 'pool_1'; did you mean 'pool1'? (ids: conv1,",
        ),
        ('[model.layers.extra]\nafter = "pool1"\n', "model.layers.extra: a new layer needs a name"),
        (
            "[model.layers.lrn1]\nremove = true\nsize = 3\n",
            "model.layers.lrn1: remove = true takes no other keys, found size",
        ),
        (
            '[model.layers.lrn1]\nafter = "conv1"\nbefore = "pool1"\n',
            "model.layers.lrn1: give after or before, not both",
        ),
        (
            '[model.layers]\nlrn1 = "gone"\n',
            "model.layers.lrn1: expected a table (the layer's keys, or remove = true), found 'gone' (str)",
        ),
        (
            '[model.layers.lrn1]\nid = "lrn7"\n',
            "model.layers.lrn1.id: the table's key is the layer's id; found id = 'lrn7'",
        ),
        ('[model.layers.lrn1]\nremove = "yes"\n', "model.layers.lrn1.remove: expected true or false, found 'yes'"),
        ("[model.layers.lrn1]\nafter = 3\n", "model.layers.lrn1.after: expected a layer id, found 3 (int)"),
        ('[model.layers.lrn1]\nbefore = "lrn1"\n', "model.layers.lrn1.before: a layer cannot be placed before itself"),
    ],
)
def test_bad_layer_edits_name_the_file_and_the_path(tmp_path, registries, body: str, message: str) -> None:
    path = child(tmp_path, body)
    with pytest.raises(RecipeError, match="^" + re.escape(f"{path}: {message}")):
        load_recipe(path, registries=registries)


def test_an_edited_layers_options_are_checked_with_the_layers_index(tmp_path, registries) -> None:
    path = child(tmp_path, "[model.layers.lrn2]\nsize = 0\n")
    with pytest.raises(RecipeError, match=rf"^{path}: model\.layers\[6\]\.size: "):
        load_recipe(path, registries=registries)


# ------------------------------------------------------------------ edits by id == edits by index


@st.composite
def layer_edits(draw: st.DrawFn, registries, parent: list[dict[str, Any]]) -> tuple[dict, list[int], dict]:
    """Edits by id of a parent's layer list: (edits, removed indexes, index -> new keys)."""
    ids = raw_layer_ids(parent)
    touched = draw(st.lists(st.integers(0, len(ids) - 1), unique=True, max_size=6))
    edits: dict[str, Any] = {}
    removed: list[int] = []
    changed: dict[int, dict[str, Any]] = {}
    for index in touched:
        what = draw(st.sampled_from(["remove", "merge", "replace"]))
        if what == "remove" and len(removed) < len(ids) - 1:
            edits[ids[index]] = {"remove": True}
            removed.append(index)
            continue
        if what == "replace":
            new = draw(component(registries, "layer", layer=False))
        else:
            name = parent[index]["name"]
            new = draw(options_dict(registries.layer.get(name).options))
            if draw(st.booleans()):
                new["towers"] = draw(st.sampled_from(["local", "cross"]))
        edits[ids[index]] = new
        changed[index] = new
    return edits, removed, changed


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_layer_edits_by_id_equal_editing_the_list_by_index(registries, tmp_path_factory, data) -> None:
    parent_name = data.draw(st.sampled_from(["alexnet-digits", "ablation-digits"]), label="parent")
    raw, _ = load_raw(parent_name)
    parent = raw["model"]["layers"]
    edits, removed, changed = data.draw(layer_edits(registries, parent), label="edits")
    expected = copy.deepcopy(raw)
    layers = expected["model"]["layers"]
    for index, new in changed.items():
        if new.get("name", layers[index]["name"]) != layers[index]["name"]:
            layers[index] = {**new, **({"id": layers[index]["id"]} if "id" in layers[index] else {})}
        else:
            layers[index].update(new)
    expected["model"]["layers"] = [layer for i, layer in enumerate(layers) if i not in removed]
    try:
        want = structure(expected, registries)
    except RecipeError:
        assume(False)
    path = tmp_path_factory.mktemp("edits") / "child.toml"
    path.write_text(tomli_w.dumps({"extends": parent_name, "model": {"layers": edits}}), encoding="utf-8")
    got = load_recipe(path, registries=registries, validate_model=False)
    assert [(x.name, x.towers, x.options) for x in got.model.layers] == [
        (x.name, x.towers, x.options) for x in want.model.layers
    ]
    # and every layer keeps the id it had in the parent, whatever was removed or renamed around it
    parent_ids = raw_layer_ids(parent)
    assert ids_of(got) == [i for n, i in enumerate(parent_ids) if n not in removed]
