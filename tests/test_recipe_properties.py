"""Property tests of recipes: round trips, ``--set``, and junk that must only ever be a RecipeError."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fixtures.strategies import leaves, raw_recipes, set_path, toml_literal
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convnet.core import schema
from convnet.core.errors import RecipeError
from convnet.core.recipe import apply_override, load_recipe, recipe_from_text, structure, to_toml, unstructure

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
FILTERED = settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


def structured(registries, raw: dict[str, Any]) -> schema.Recipe:
    try:
        return structure(copy.deepcopy(raw), registries, "<generated>")
    except RecipeError:
        assume(False)
        raise


@FILTERED
@given(data=st.data())
def test_accepted_recipes_round_trip_through_cattrs_and_toml(registries, data) -> None:
    recipe = structured(registries, data.draw(raw_recipes(registries), label="raw"))
    plain = unstructure(recipe, registries)
    # cattrs both ways
    assert structure(copy.deepcopy(plain), registries) == recipe
    # and through TOML text, as `convnet show` prints it and checkpoints store it
    text = to_toml(recipe, registries)
    again = recipe_from_text(text, registries)
    assert again == recipe
    assert to_toml(again, registries) == text
    assert tomllib.loads(text) == plain


def test_bundled_and_fixture_recipes_round_trip(registries) -> None:
    from convnet.core.recipe import bundled_names

    names = bundled_names()
    assert "alexnet-digits" in names
    for ref in [*names, str(TINY)]:
        recipe = load_recipe(ref, registries=registries, validate_model=False)
        assert recipe_from_text(to_toml(recipe, registries), registries) == recipe, ref


def _base_recipes(registries) -> st.SearchStrategy[dict[str, Any]]:
    fixed = [
        tomllib.loads(TINY.read_text()),
        unstructure(load_recipe("alexnet-digits", registries=registries, validate_model=False), registries),
    ]
    return st.one_of(st.sampled_from(fixed), raw_recipes(registries))


@FILTERED
@given(data=st.data())
def test_set_on_any_key_changes_exactly_that_key(registries, tmp_path_factory, data) -> None:
    raw = data.draw(_base_recipes(registries), label="recipe")
    recipe = structured(registries, raw)
    candidates = [leaf for leaf in leaves(recipe) if leaf.strategy() is not None]
    leaf = data.draw(st.sampled_from(candidates), label="key")
    new = data.draw(leaf.strategy().filter(lambda x: x != leaf.value and x is not None), label="value")
    before = unstructure(recipe, registries)
    expected = copy.deepcopy(before)
    set_path(expected, leaf.path, new)
    try:  # the value may break a rule the validators cannot show (e.g. a custom check)
        structure(copy.deepcopy(expected), registries)
    except RecipeError:
        assume(False)
    path = tmp_path_factory.mktemp("set") / "r.toml"
    path.write_text(tomli_w.dumps(before), encoding="utf-8")
    after = load_recipe(path, [f"{leaf.path}={toml_literal(new)}"], registries, validate_model=False)
    assert unstructure(after, registries) == expected
    assert after != recipe


@FILTERED
@given(data=st.data())
def test_set_by_layer_id_equals_set_by_index(registries, data) -> None:
    """``model.layers.ID.KEY`` and ``model.layers[N].KEY`` are one key, ids by the model's rule."""
    raw = data.draw(_base_recipes(registries), label="recipe")
    recipe = structured(registries, raw)
    layer_leaves = [
        leaf
        for leaf in leaves(recipe)
        if re.match(r"model\.layers\[\d+\]\.", leaf.path) and leaf.strategy() is not None and leaf.field.name != "id"
    ]
    assume(layer_leaves)
    leaf = data.draw(st.sampled_from(layer_leaves), label="key")
    new = data.draw(leaf.strategy().filter(lambda x: x is not None), label="value")
    index = int(re.match(r"model\.layers\[(\d+)\]", leaf.path).group(1))
    ids = schema.layer_ids((layer.name, layer.id) for layer in recipe.model.layers)
    assume(ids.count(ids[index]) == 1)  # a repeated id is the model's error, not an address
    by_id = leaf.path.replace(f"[{index}]", f".{ids[index]}", 1)
    plain = unstructure(recipe, registries)

    def load(assignment: str) -> Any:
        doc = copy.deepcopy(plain)
        apply_override(doc, assignment)
        try:
            return structure(doc, registries)
        except RecipeError as exc:
            return str(exc)

    assert load(f"{by_id}={toml_literal(new)}") == load(f"{leaf.path}={toml_literal(new)}")


def test_set_parses_types_and_rejects_bad_paths(registries) -> None:
    r = load_recipe(
        TINY,
        [
            "train.epochs=5",
            "train.optimizer.lr=0.25",
            "train.deterministic=false",
            "model.layers[0].out=6",
            "model.input=[3, 8, 8]",
            "name=plain words",
        ],
        registries,
        validate_model=False,
    )
    assert (r.train.epochs, r.train.optimizer.options.lr, r.train.deterministic) == (5, 0.25, False)
    assert r.model.layers[0].options.out == 6 and r.name == "plain words"
    for bad, where in [
        ("train.epochs=two", "train.epochs"),
        ("model.layers[99].out=3", "model.layers[99]"),
        ("train..lr=1", "empty key"),
        ("train.epochs", "KEY=VALUE"),
        ("model.layers[x].out=1", "list index"),
        ("train.optimizer.lrr=1", "'lrr'"),
        ("model.layers[0].out=-1", "model.layers[0].out"),
    ]:
        with pytest.raises(RecipeError, match=r"(?s).*" + re.escape(where)):
            load_recipe(TINY, [bad], registries)


# ------------------------------------------------------------------ junk only ever gives RecipeError

toml_scalars = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8), st.dates()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _load_text(tmp: Path, text: str) -> None:
    path = tmp / "junk.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_recipe(path)


@given(text=st.text(max_size=200))
def test_junk_text_only_raises_recipe_error(tmp_path_factory, text: str) -> None:
    with pytest.raises(RecipeError) as info:
        _load_text(tmp_path_factory.mktemp("junk"), text)
    assert "junk.toml" in str(info.value)


@given(doc=st.dictionaries(st.text(min_size=1, max_size=8), toml_values, max_size=5))
def test_junk_toml_documents_only_raise_recipe_error(tmp_path_factory, doc: dict) -> None:
    with pytest.raises(RecipeError, match="junk.toml"):
        _load_text(tmp_path_factory.mktemp("junk"), tomli_w.dumps(doc))


@FILTERED
@given(data=st.data())
def test_wrong_types_only_raise_recipe_error_naming_the_path(registries, tmp_path_factory, data) -> None:
    raw = data.draw(_base_recipes(registries), label="recipe")
    recipe = structured(registries, raw)
    leaf = data.draw(st.sampled_from(list(leaves(recipe))), label="key")
    wrong = data.draw(toml_values.filter(lambda x: type(x) is not type(leaf.value)), label="wrong")
    doc = unstructure(recipe, registries)
    set_path(doc, leaf.path, wrong)
    path = tmp_path_factory.mktemp("wrong") / "r.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    try:
        structure(copy.deepcopy(doc), registries)
        acceptable = True  # e.g. an integer where a float is expected
    except RecipeError:
        acceptable = False
    try:
        load_recipe(path, registries=registries)
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message
        if not acceptable:
            assert leaf.path in message, message
    else:
        assert acceptable
