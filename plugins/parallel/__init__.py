"""Parallelism strategies: single, model-parallel, tower-parallel, ddp."""

from __future__ import annotations

from convnet.core import Registries, hookimpl
from convnet.plugins.parallel.ddp import DDPOptions, build_ddp
from convnet.plugins.parallel.model_parallel import ModelParallelOptions, build_model_parallel
from convnet.plugins.parallel.single import SingleOptions, build_single
from convnet.plugins.parallel.tower_parallel import TowerParallelOptions, build_tower_parallel


@hookimpl
def convnet_register(registries: Registries) -> None:
    add = registries.strategy.add
    add("single", build_single, SingleOptions, "one device; tower-local layers run as grouped convolutions")
    add(
        "model-parallel",
        build_model_parallel,
        ModelParallelOptions,
        "the paper's scheme in one process: tower t on devices[t], exchanges at cross layers",
    )
    add(
        "tower-parallel",
        build_tower_parallel,
        TowerParallelOptions,
        "one process per tower over torch.distributed (torchrun), all-gather at cross layers",
    )
    add(
        "ddp",
        build_ddp,
        DDPOptions,
        "data parallel: DistributedDataParallel over torchrun processes, any world size, multi-node",
    )
