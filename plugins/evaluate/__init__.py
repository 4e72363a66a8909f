"""Evaluators."""
from __future__ import annotations

from convnet.core.hookspecs import hookimpl
from convnet.core.registry import Registries
from convnet.plugins.evaluate.topk import Topk, TopkOptions


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.evaluator.add("topk", lambda options, ctx: Topk(options), TopkOptions,
                             "top-1 and top-5 (any k) error on the validation split")
