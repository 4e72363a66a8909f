"""Registries: names, duplicates, unknown names with the closest match, options must be attrs."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from convnet.core.errors import PluginError, RecipeError
from convnet.core.recipe import load_recipe
from convnet.core.registry import KINDS, Registries

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


@attrs.define
class Opts:
    size: int = 1


def _registries_as(plugin: str, dist: str) -> Registries:
    regs = Registries()
    regs.current_plugin = (plugin, dist)
    return regs


def test_every_kind_has_its_builtins(registries) -> None:
    assert set(KINDS) == {"layer", "augmenter", "strategy", "evaluator", "dataset", "optimizer", "schedule", "lrn"}
    expected = {
        "layer": {"conv", "fc", "relu", "tanh", "maxpool", "dropout", "flatten", "lrn"},
        "dataset": {"digits", "synthetic"},
        "optimizer": {"sgd", "paper-sgd"},
        "schedule": {"constant", "step", "plateau"},
        "strategy": {"single"},
        "evaluator": {"topk"},
        "lrn": {"reference"},
    }
    for kind, names in expected.items():
        assert names <= set(registries[kind].names()), kind
        for entry in registries[kind]:
            assert attrs.has(entry.options) and entry.description and entry.plugin and entry.distribution


def test_builtins_come_from_the_convnet_distribution(registries) -> None:
    for kind, registry in registries.items():
        for name in {"conv", "digits", "paper-sgd", "single", "topk"} & set(registry.names()):
            assert registry.get(name).distribution.startswith("convnet "), (kind, name)


def test_duplicate_name_names_both_plugins() -> None:
    regs = _registries_as("first", "dist-one 1.0")
    regs.layer.add("blur", lambda o, c: None, Opts, "first blur")
    regs.current_plugin = ("second", "dist-two 2.0")
    with pytest.raises(PluginError) as info:
        regs.layer.add("blur", lambda o, c: None, Opts, "second blur")
    message = str(info.value)
    assert "'blur'" in message and "'first'" in message and "dist-one 1.0" in message
    assert "'second'" in message and "dist-two 2.0" in message
    assert regs.layer.get("blur").description == "first blur"
    regs.dataset.add("blur", lambda o, c: None, Opts)  # the same name in another kind is fine


def test_options_must_be_an_attrs_class() -> None:
    regs = _registries_as("plain", "plain-dist 0.1")

    class Plain:
        size = 1

    with pytest.raises(PluginError, match=r"plugin 'plain' \(distribution plain-dist 0.1\).*'odd'.*not an attrs"):
        regs.layer.add("odd", lambda o, c: None, Plain)
    with pytest.raises(PluginError, match="non-string name"):
        regs.layer.add("", lambda o, c: None, Opts)
    assert "odd" not in regs.layer


def test_unknown_name_lists_known_names_and_the_closest(registries) -> None:
    with pytest.raises(RecipeError) as info:
        registries.layer.get("rellu", "model.layers[1]")
    message = str(info.value)
    assert message.startswith("model.layers[1]: unknown layer 'rellu'; did you mean 'relu'?")
    assert "conv" in message and "maxpool" in message
    with pytest.raises(RecipeError, match="unknown optimizer 'zzz' \\(known: "):
        registries.optimizer.get("zzz")


def test_unknown_names_in_a_recipe_name_the_path(registries) -> None:
    cases = {
        "model.layers[1].name=rellu": "model.layers[1]: unknown layer 'rellu'; did you mean 'relu'?",
        "data.dataset.name=digit": "unknown dataset 'digit'; did you mean 'digits'?",
        "train.optimizer.name=paper_sgd": "did you mean 'paper-sgd'?",
        "train.schedule.name=plateu": "did you mean 'plateau'?",
        "parallel.strategy=singel": "did you mean 'single'?",
    }
    for override, expected in cases.items():
        with pytest.raises(RecipeError) as info:
            load_recipe(TINY, [override], registries)
        assert expected in str(info.value), str(info.value)


def test_components_of_one_failed_plugin_are_named_in_one_sentence() -> None:
    """A recipe using several components of a plugin that failed to import: the failure is said
    once, after every component it takes away (it was repeated per component)."""
    from convnet.core import load_recipe, plugins
    from convnet.core.errors import RecipeError
    from convnet.core.registry import FailedPlugin

    _, regs = plugins.create_manager()
    error = "failed to import: ImportError: no module named 'torch_foo'"
    attempted = (("layer", "chan"), ("dataset", "squares"))  # what it registered before it failed
    regs.failed.append(FailedPlugin("p4", "p4", "p4-dist 1.0", error, f"plugin 'p4' {error}", attempted))
    sets = ['model.layers[1].name="chan"', 'data.dataset={name = "squares"}']
    with pytest.raises(RecipeError) as caught:
        load_recipe("alexnet-digits", sets, regs)
    assert str(caught.value) == (
        "alexnet-digits (with --set overrides): model.layers[1] (layer 'chan'), data.dataset (dataset 'squares') "
        f"come from plugin 'p4' (distribution p4-dist 1.0), which failed to load: {error}"
    )
    regs.failed[0] = FailedPlugin("p4", "p4", "p4-dist 1.0", error, f"plugin 'p4' {error}")  # failed at import
    with pytest.raises(RecipeError) as caught:
        load_recipe("alexnet-digits", sets, regs)
    message = str(caught.value)
    assert message.count(error) == 1 and message.endswith(
        f"; a plugin that failed to load may provide them: plugin 'p4' {error}"
    ), message
    assert "model.layers[1]: unknown layer 'chan' (known: " in message
    assert "data.dataset: unknown dataset 'squares' (known: " in message
