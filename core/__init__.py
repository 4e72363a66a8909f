"""convnet's core: interfaces, registries, hooks, recipes, engine, checkpoints, CLI.

This module is the one public face, for users and for plugin authors alike (as ``pytest``
is over ``_pytest``): everything below is importable as ``convnet.core.NAME``, and nothing
else in ``convnet.core.*`` is part of the contract. The built-in plugins import only these
names. docs/plugins.md documents each kind's contract with runnable examples.

The small stable Python API::

    import convnet.core as cn
    recipe = cn.load_recipe("alexnet-digits", overrides=["train.epochs=1"])
    model = cn.build_model(recipe)
    result = cn.train(recipe, out="runs/x")
"""

from __future__ import annotations

from convnet.core import cpp_kernels, keyed, schema
from convnet.core.checkpoint import check_compatible, model_tensors
from convnet.core.checkpoint import load as load_checkpoint
from convnet.core.checkpoint import save as save_checkpoint
from convnet.core.command_args import add_overrides_argument, add_recipe_arguments
from convnet.core.components import build_strategy
from convnet.core.contracts import (
    AugmenterFactory,
    BuildContext,
    DatasetFactory,
    EvaluatorFactory,
    LayerFactory,
    LrnFactory,
    OptimizerContext,
    OptimizerFactory,
    Schedule,
    ScheduleContext,
    ScheduleFactory,
    StrategyFactory,
)
from convnet.core.data import (
    GOLDEN_GAMMA,
    Augment,
    DataContext,
    DatasetSplits,
    build_dataset,
    derive_seed,
    generator,
    sample_key,
    sample_keys,
    splitmix64,
    ten_crop_views,
)
from convnet.core.engine import Run, train
from convnet.core.errors import (
    CheckpointError,
    ConvnetError,
    DataError,
    NonFiniteLossError,
    PluginError,
    RecipeError,
)
from convnet.core.evaluation import EvalContext, Evaluator, Predictions, multiview_logits
from convnet.core.hookspecs import hookimpl, hookspec
from convnet.core.image_modes import eight_bit
from convnet.core.model import BuiltLayer, LayerContext, LayerInfo, Network, build_model
from convnet.core.plugins import PluginWarning, load_plugins
from convnet.core.predict import predict
from convnet.core.recipe import load_recipe, to_toml
from convnet.core.registry import KINDS, Entry, Registries, Registry
from convnet.core.report import read_metrics
from convnet.core.run_folder import FolderLock
from convnet.core.run_view import RunView
from convnet.core.schema import Recipe, layer_ids
from convnet.core.strategy import Strategy, resolve_device, valid_device

__all__ = [
    # using convnet
    "load_recipe",
    "build_model",
    "train",
    "predict",
    "Run",
    "read_metrics",
    "to_toml",
    "Recipe",
    "schema",
    "layer_ids",
    # random layers: masks keyed by (seed, step, layer, global sample, global feature)
    "keyed",
    # building a plugin's C++/CUDA sources on first use (the LRN kernels, the paper's SGD step)
    "cpp_kernels",
    # writing a plugin: hooks and registries
    "hookimpl",
    "hookspec",
    "add_recipe_arguments",
    "add_overrides_argument",
    "load_plugins",
    "KINDS",
    "Registries",
    "Registry",
    "Entry",
    "PluginWarning",
    "RunView",
    # the contract of each kind: factory protocols and the contexts factories receive
    "LayerFactory",
    "LrnFactory",
    "LayerContext",
    "BuiltLayer",
    "LayerInfo",
    "Network",
    "AugmenterFactory",
    "Augment",
    "DatasetFactory",
    "DataContext",
    "DatasetSplits",
    "build_dataset",
    "EvaluatorFactory",
    "Evaluator",
    "EvalContext",
    "Predictions",
    "multiview_logits",
    "StrategyFactory",
    "Strategy",
    "resolve_device",
    "valid_device",
    "build_strategy",
    "BuildContext",
    "OptimizerFactory",
    "OptimizerContext",
    "ScheduleFactory",
    "Schedule",
    "ScheduleContext",
    # keyed randomness and data helpers
    "sample_key",
    "sample_keys",
    "generator",
    "derive_seed",
    "splitmix64",
    "GOLDEN_GAMMA",
    "ten_crop_views",
    "eight_bit",
    # checkpoints: safetensors only (convnet never unpickles)
    "load_checkpoint",
    "save_checkpoint",
    "model_tensors",
    "check_compatible",
    # one writer at a time: an fcntl lock on a folder (run folders, packs)
    "FolderLock",
    # errors
    "ConvnetError",
    "RecipeError",
    "PluginError",
    "CheckpointError",
    "DataError",
    "NonFiniteLossError",
]
