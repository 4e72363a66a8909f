"""convnet's core: interfaces, registries, hooks, recipes, engine, checkpoints, CLI.

The small stable Python API::

    import convnet.core as cn
    recipe = cn.load_recipe("alexnet-digits", overrides=["train.epochs=1"])
    model = cn.build_model(recipe)
    result = cn.train(recipe, out="runs/x")
"""
from __future__ import annotations

from convnet.core.errors import CheckpointError, ConvnetError, DataError, PluginError, RecipeError
from convnet.core.hookspecs import hookimpl
from convnet.core.model import BuiltLayer, LayerContext, Network, build_model
from convnet.core.recipe import load_recipe
from convnet.core.engine import Run, train

__all__ = ["load_recipe", "build_model", "train", "Run", "Network", "BuiltLayer", "LayerContext", "hookimpl",
           "ConvnetError", "RecipeError", "PluginError", "CheckpointError", "DataError"]
