"""Evaluators: top-k, ten-crop, ensembles, first-layer filters, feature neighbours, confusion."""

from __future__ import annotations

from convnet.core import Registries, hookimpl
from convnet.plugins.evaluate.confusion import Confusion, ConfusionOptions
from convnet.plugins.evaluate.ensemble import Ensemble, EnsembleOptions
from convnet.plugins.evaluate.filters import Filters, FiltersOptions
from convnet.plugins.evaluate.neighbours import Neighbours, NeighboursOptions
from convnet.plugins.evaluate.tencrop import TenCrop, TenCropOptions
from convnet.plugins.evaluate.topk import Topk, TopkOptions


@hookimpl
def convnet_register(registries: Registries) -> None:
    add = registries.evaluator.add
    add(
        "topk",
        lambda options, ctx: Topk(options, ctx.recipe.model.num_classes),
        TopkOptions,
        "top-1 and top-5 (any k) error on the validation split",
    )
    add(
        "ten-crop",
        TenCrop,
        TenCropOptions,
        "softmax averaged over 10 crops (corners, centre, flips) beside the centre crop's error",
    )
    add(
        "ensemble",
        Ensemble,
        EnsembleOptions,
        "softmax averaged over several checkpoints; each member's error and the ensemble's",
    )
    add(
        "filters",
        Filters,
        FiltersOptions,
        "first-layer kernels as a PNG grid per tower, and each tower's colour specificity",
    )
    add(
        "neighbours",
        Neighbours,
        NeighboursOptions,
        "training images nearest to some validation images in fc7 space (PNG sheet + JSON)",
    )
    add("confusion", Confusion, ConfusionOptions, "the most confused class pairs (JSON)")
