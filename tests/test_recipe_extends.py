"""``extends``: tables merge key by key, arrays are replaced, paths resolve from the child's folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from convnet.core.errors import RecipeError
from convnet.core.recipe import load_recipe

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


def test_extends_a_bundled_recipe(tmp_path: Path, registries) -> None:
    child = tmp_path / "short-digits.toml"
    child.write_text('extends = "alexnet-digits"\n[train]\nepochs = 2\n[train.optimizer]\nlr = 0.02\n',
                     encoding="utf-8")
    base = load_recipe("alexnet-digits", registries=registries)
    r = load_recipe(child, registries=registries)
    assert r.name == "short-digits" and r.description == ""
    assert (r.train.epochs, r.train.optimizer.options.lr) == (2, 0.02)
    assert r.train.optimizer.name == base.train.optimizer.name == "paper-sgd"  # merged, not replaced
    assert r.train.optimizer.options.momentum == base.train.optimizer.options.momentum
    assert r.model == base.model and r.data == base.data and r.train.schedule == base.train.schedule


def test_extends_a_relative_path_and_arrays_replace(tmp_path: Path, registries) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.toml").write_text(TINY.read_text(), encoding="utf-8")
    child = tmp_path / "sub" / "child.toml"
    child.write_text('extends = "base.toml"\n[model]\ninput = [3, 8, 8]\nnum_classes = 4\n'
                     '[[model.layers]]\nname = "flatten"\n[[model.layers]]\nname = "fc"\nout = 4\n', encoding="utf-8")
    r = load_recipe(child, registries=registries)
    assert [layer.name for layer in r.model.layers] == ["flatten", "fc"]
    assert r.model.towers == 2  # a table key the child did not set is inherited
    over = load_recipe(child, ["model.towers=1"], registries)
    assert over.model.towers == 1


def test_extends_errors_name_the_file(tmp_path: Path, registries) -> None:
    child = tmp_path / "child.toml"
    child.write_text('extends = "alexnet-digitz"\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=f"^{child}: extends: unknown recipe 'alexnet-digitz'; did you mean"):
        load_recipe(child, registries=registries)
    child.write_text("extends = 3\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=f"^{child}: extends: expected a recipe name or path, found 3"):
        load_recipe(child, registries=registries)
