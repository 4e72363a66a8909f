"""Parallelism strategies."""
from __future__ import annotations

from convnet.core.hookspecs import hookimpl
from convnet.core.registry import Registries
from convnet.plugins.parallel.single import SingleOptions, build_single


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.strategy.add("single", build_single, SingleOptions,
                            "one device; tower-local layers run as grouped convolutions")
