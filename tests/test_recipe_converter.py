"""The recipe converter's steps, its error messages with their paths, and the last layer's width default."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path

import attrs
import cattrs
import pytest

from convnet.core import cli
from convnet.core.converter import configure_checked_classes, configure_strict_scalars, structure_error
from convnet.core.errors import RecipeError
from convnet.core.recipe import load_recipe, to_toml

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


def tiny_with(tmp_path: Path, old: str, new: str) -> Path:
    text = TINY.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "r.toml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


# ------------------------------------------------------------------ the steps, one at a time


def test_strict_scalars_take_each_type_only_as_itself() -> None:
    conv = cattrs.Converter()
    configure_strict_scalars(conv)
    assert conv.structure(2, float) == 2.0 and conv.structure([1, 2], list[int]) == [1, 2]
    for value, type_, message in [
        ("2", int, "expected an integer, found '2' (str)"),
        (True, int, "expected an integer, found True (bool)"),
        (2**63, int, f"expected an integer that fits 64 bits, found {2**63}"),
        (-(2**63) - 1, int, "expected an integer that fits 64 bits"),
        (1, bool, "expected true or false, found 1 (int)"),
        (1, str, "expected a string, found 1 (int)"),
        (float("inf"), float, "expected a finite number"),
        ("ab", list[str], "expected an array, found 'ab' (str)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            conv.structure(value, type_)


def test_checked_classes_name_the_field_a_validator_refuses() -> None:
    @attrs.define
    class Section:
        size: int = attrs.field(validator=attrs.validators.gt(0))

    conv = cattrs.Converter(detailed_validation=True)
    configure_strict_scalars(conv)
    configure_checked_classes(conv, (Section,))
    with pytest.raises(ValueError, match="expected a table, found 3"):
        conv.structure(3, Section)
    with pytest.raises(cattrs.ClassValidationError) as info:
        conv.structure({"size": 0}, Section)
    assert cattrs.transform_error(info.value, path="$")[0].endswith("@ $.size")


def test_a_literal_option_names_its_choices() -> None:
    """A third party's options may use typing.Literal: its error reads like attrs' in_ validator's."""

    @attrs.define
    class Options:
        mode: typing.Literal["a", "b"] = "a"

    conv = cattrs.Converter(detailed_validation=True)
    configure_strict_scalars(conv)
    with pytest.raises(cattrs.ClassValidationError) as info:
        conv.structure({"mode": "c"}, Options)
    error = structure_error(info.value, "r.toml")
    assert str(error) == "r.toml: mode: expected one of 'a', 'b', found 'c'"


# ------------------------------------------------------------------ messages, with their paths


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            'name = "relu"\n',
            'name = "relu"\nalpha = 1\n',
            "model.layers[1]: unknown key 'alpha' (allowed: inplace, opaque_under_compile)",
        ),
        (
            'name = "plateau"\npatience = 0\nthreshold = 1.0\n',
            'name = "constant"\nfactor = 0.5\n',
            "train.schedule: unknown key 'factor' (this component takes no options)",
        ),
        (
            'id = "lrn1"\n',
            'id = "lrn one"\n',
            "model.layers[2].id: expected a name made of letters, digits and _, found 'lrn one'",
        ),
        ('id = "lrn1"\n', "id = 3\n", "model.layers[2].id: expected a string, found 3 (int)"),
        (
            'id = "conv1"\ntowers = "cross"\n',
            'id = "conv1"\ntowers = "both"\n',
            "model.layers[0].towers: expected 'local' or 'cross', found 'both'",
        ),
        (
            'id = "conv1"\ntowers = "cross"\n',
            'id = "1conv"\ntowers = "both"\n',
            "model.layers[0].id: expected a name made of letters, digits and _, found '1conv'; "
            "model.layers[0].towers: expected 'local' or 'cross', found 'both'",
        ),
        (
            "lr = 0.05\n",
            "lrr = 0.05\n",
            "train.optimizer: unknown key 'lrr'; did you mean 'lr'? "
            "(allowed: decay_biases, lr, momentum, weight_decay)",
        ),
        (
            "kernel = 3\nstride = 2\n",
            'kernel = "3"\nstride = 2\n',
            "model.layers[3].kernel: expected an integer, found '3' (str)",
        ),
        ("p = 0.5\n", "p = 1.5\n", "model.layers[7].p: "),
    ],
)
def test_errors_name_the_file_and_the_path(tmp_path, registries, capsys, old: str, new: str, message: str) -> None:
    path = tiny_with(tmp_path, old, new)
    with pytest.raises(RecipeError, match="^" + re.escape(f"{path}: {message}")):
        load_recipe(path, registries=registries)
    assert cli.main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------ the last layer's width


def test_the_last_layers_out_follows_num_classes_and_is_written_out(tmp_path, registries) -> None:
    path = tiny_with(tmp_path, 'id = "fc"\ntowers = "cross"\nout = 4\n', 'id = "fc"\ntowers = "cross"\n')
    recipe = load_recipe(path, registries=registries)
    assert recipe.model.layers[-1].options.out == 4
    assert tomllib.loads(to_toml(recipe, registries))["model"]["layers"][-1]["out"] == 4
    assert to_toml(recipe, registries) == to_toml(load_recipe(TINY, registries=registries), registries).replace(
        'name = "tiny"', 'name = "r"'
    )
    three = load_recipe(path, ["model.num_classes=3"], registries)
    assert three.model.layers[-1].options.out == 3
    stated = load_recipe(path, ["model.num_classes=3", "model.layers.fc.out=2"], registries, validate_model=False)
    assert stated.model.layers[-1].options.out == 2  # a stated width is kept (and then fails the shape check)


def test_an_fc_that_is_not_last_must_state_its_width(tmp_path, registries) -> None:
    path = tiny_with(tmp_path, 'name = "flatten"\n', 'name = "flatten"\n\n[[model.layers]]\nname = "fc"\nid = "fc0"\n')
    with pytest.raises(
        RecipeError,
        match=re.escape(
            f"{path}: model.layers[7] (fc0): fc needs out = <features> "
            "(only the last layer's out defaults to model.num_classes)"
        ),
    ):
        load_recipe(path, registries=registries)
