"""``extends``: tables merge key by key, arrays are replaced, paths resolve from the child's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from convnet.core.errors import RecipeError
from convnet.core.recipe import load_recipe

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


def test_extends_a_bundled_recipe(tmp_path: Path, registries) -> None:
    child = tmp_path / "short-digits.toml"
    child.write_text(
        'extends = "alexnet-digits"\n[train]\nepochs = 2\n[train.optimizer]\nlr = 0.02\n', encoding="utf-8"
    )
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
    child.write_text(
        'extends = "base.toml"\n[model]\ninput = [3, 8, 8]\nnum_classes = 4\n'
        '[[model.layers]]\nname = "flatten"\n[[model.layers]]\nname = "fc"\nout = 4\n',
        encoding="utf-8",
    )
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


def test_a_broken_parent_names_the_recipe_that_extends_it(tmp_path: Path, registries) -> None:
    """Found by hypothesis: ``extends = "/etc/passwd"`` named only /etc/passwd."""
    parent = tmp_path / "parent.toml"
    parent.write_text("this is not TOML\n", encoding="utf-8")
    middle = tmp_path / "middle.toml"
    middle.write_text(f'extends = "{parent.name}"\n', encoding="utf-8")
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{middle.name}"\n', encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(child, registries=registries)
    assert str(caught.value).startswith(f"{child}: extends: {parent}: not valid TOML: "), caught.value
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n', encoding="utf-8")
    with pytest.raises(RecipeError) as caught:
        load_recipe(loop, registries=registries)
    assert str(caught.value).count(": extends: ") == 2 and "levels (a cycle?)" in str(caught.value), caught.value


# ------------------------------------------------------------------ a child swaps a component


def child_of(tmp_path: Path, parent: str, body: str) -> Path:
    path = tmp_path / "child.toml"
    path.write_text(f'extends = "{parent}"\n{body}', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "parent, table, body, check",
    [
        # the example: the parent's plateau options (factor, patience) do not follow
        (
            "alexnet-digits",
            "train.schedule",
            '[train.schedule]\nname = "step"\nevery = 5\n',
            lambda r: (
                (r.train.schedule.name, r.train.schedule.options.every, r.train.schedule.options.gamma)
                == ("step", 5, 0.1)
            ),
        ),
        (
            "alexnet-digits",
            "train.schedule",
            '[train.schedule]\nname = "constant"\n',
            lambda r: r.train.schedule.name == "constant",
        ),
        (
            "alexnet-digits",
            "train.schedule",
            '[train.schedule]\nname = "cosine"\nwarmup_steps = 20\n',
            lambda r: (r.train.schedule.name, r.train.schedule.options.warmup_steps) == ("cosine", 20),
        ),
        # same options class, other component: replaced all the same (the parent's lr is not kept)
        (
            "alexnet-digits",
            "train.optimizer",
            '[train.optimizer]\nname = "sgd"\nmomentum = 0.5\n',
            lambda r: (
                (r.train.optimizer.name, r.train.optimizer.options.lr, r.train.optimizer.options.momentum)
                == ("sgd", 0.01, 0.5)
            ),
        ),
        (
            "alexnet-imagenet",
            "data.dataset",
            '[data.dataset]\nname = "synthetic"\ntrain_size = 8\n',
            lambda r: (r.data.dataset.name, r.data.dataset.options.train_size) == ("synthetic", 8),
        ),
        # [parallel] is named by `strategy`; the parent's device = "cpu" does not follow
        (
            "ablation-digits",
            "parallel",
            '[parallel]\nstrategy = "model-parallel"\ndevices = ["cpu", "cpu"]\n',
            lambda r: (
                (r.parallel.name, r.parallel.options.devices, r.parallel.options.device)
                == ("model-parallel", ["cpu", "cpu"], "auto")
            ),
        ),
    ],
)
def test_a_child_table_naming_another_component_replaces_the_parents(
    tmp_path, registries, parent, table, body, check
) -> None:
    recipe = load_recipe(child_of(tmp_path, parent, body), registries=registries, validate_model=False)
    assert check(recipe), table


def test_the_same_component_still_merges_and_the_swap_rule_covers_every_component_table(tmp_path, registries) -> None:
    from convnet.core.recipe import component_tables

    assert component_tables() == {
        ("data", "dataset"): "name",
        ("train", "optimizer"): "name",
        ("train", "schedule"): "name",
        ("parallel",): "strategy",
    }
    same = child_of(tmp_path, "alexnet-digits", '[train.schedule]\nname = "plateau"\npatience = 5\n')
    schedule = load_recipe(same, registries=registries, validate_model=False).train.schedule.options
    assert (schedule.patience, schedule.factor) == (5, 0.1)
    # options of another component given without its name still merge, and fail as before
    no_name = child_of(tmp_path, "alexnet-digits", "[train.schedule]\nevery = 5\n")
    with pytest.raises(RecipeError, match=r"train\.schedule: unknown key 'every'"):
        load_recipe(no_name, registries=registries)


def test_a_swapped_component_is_checked_against_its_own_options(tmp_path, registries) -> None:
    child = child_of(tmp_path, "alexnet-digits", '[train.schedule]\nname = "step"\nfactor = 0.5\n')
    message = rf"^{child}: train\.schedule: unknown key 'factor' \(allowed: every, gamma\)$"
    with pytest.raises(RecipeError, match=message):
        load_recipe(child, registries=registries)


def test_a_set_component_name_that_keeps_the_old_keys_says_how_to_swap_it(registries) -> None:
    """--set assigns one key (docs/recipes.md): the old dataset's keys stay and the new one
    rejects them; the error says to assign the whole table, and that works."""
    name, root = "data.dataset.name=packed", "data.dataset.root=/nowhere"
    hint = r"; --set data\.dataset\.name=\.\.\. keeps data\.dataset's other keys: to swap the component, assign"
    with pytest.raises(RecipeError, match=r"data\.dataset: unknown key 'val_fraction'.*" + hint):
        load_recipe("alexnet-digits", [name, root], registries, validate_model=False)
    whole = load_recipe("alexnet-digits", ['data.dataset={name = "packed", root = "/nowhere"}'], registries, False)
    assert whole.data.dataset.name == "packed"
    with pytest.raises(RecipeError, match=r"unknown key 'lrr'") as info:  # no --set of a name: no hint
        load_recipe("alexnet-digits", ["train.optimizer.lrr=1"], registries, validate_model=False)
    assert "keeps" not in str(info.value)


def test_a_layer_table_without_a_parent_is_refused_with_its_path(tmp_path, registries) -> None:
    lone = tmp_path / "lone.toml"
    lone.write_text(
        TINY.read_text().split("[[model.layers]]")[0]
        + "[model.layers.fc]\nout = 3\n"
        + '[data.dataset]\nname = "synthetic"\n',
        encoding="utf-8",
    )
    with pytest.raises(RecipeError, match=rf"^{lone}: model\.layers: a table edits the layers of a parent recipe"):
        load_recipe(lone, registries=registries)
