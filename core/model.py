"""Build the network a recipe declares: a list of tower-aware layers.

Activations are laid out channel-major with tower ``t`` owning the ``t``-th block of
channels (or features). Under the ``single`` strategy a tower-local conv is a grouped
convolution; a ``cross`` layer reads every tower's block. Weights of every layer keep their
output rows in tower order, so a strategy can split a layer by slicing rows.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn

from convnet.core import schema
from convnet.core.errors import ConvnetError, RecipeError
from convnet.core.registry import Registries


@attrs.frozen
class LayerContext:
    """What a layer factory knows when it builds one layer."""

    in_shape: tuple[int, ...]
    towers: int
    cross: bool
    path: str
    id: str
    index: int
    is_last: bool
    device: torch.device
    dtype: torch.dtype
    registries: Registries

    @property
    def groups(self) -> int:
        """1 for a cross layer, ``towers`` for a tower-local one."""
        return 1 if self.cross else self.towers

    def error(self, message: str) -> RecipeError:
        return RecipeError(f"{self.path} ({self.id}): {message}")


@attrs.define
class BuiltLayer:
    """A layer factory's result: the module, its per-sample output shape and multiply-adds."""

    module: nn.Module
    out_shape: tuple[int, ...]
    macs: int = 0


@attrs.frozen
class LayerInfo:
    id: str
    name: str
    towers: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int


class Network(nn.Module):
    """The recipe's layers in order; ``forward`` returns logits.

    ``features(x, layer_id)`` returns the activation after a named layer (for evaluators
    such as nearest neighbours in fc7 space).
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], info: list[LayerInfo], towers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.info = info
        self.towers = towers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x

    def features(self, x: torch.Tensor, layer_id: str) -> torch.Tensor:
        if layer_id not in self.layers:
            raise KeyError(layer_id)
        for name, layer in self.layers.items():
            x = layer(x)
            if name == layer_id:
                return x
        raise AssertionError("unreachable")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(
    recipe: schema.Recipe,
    device: str | torch.device = "cpu",
    registries: Registries | None = None,
    seed: int | None = None,
) -> Network:
    """The recipe's network, weights initialised as its layer options say.

    With ``seed`` (default: the recipe's seed) initialisation is reproducible. On the
    ``meta`` device nothing is allocated: that is how recipes are shape-checked at load.
    """
    from convnet.core import plugins

    regs = registries if registries is not None else plugins.registries()
    dev = torch.device(device)
    dtype = DTYPES[recipe.model.dtype]
    towers = recipe.model.towers
    shape: tuple[int, ...] = tuple(recipe.model.input)
    modules: list[tuple[str, nn.Module]] = []
    info: list[LayerInfo] = []
    ids = schema.layer_ids((spec.name, spec.id) for spec in recipe.model.layers)
    seen: set[str] = set()
    generator_state = None
    if dev.type != "meta":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(recipe.seed if seed is None else seed)
    try:
        n = len(recipe.model.layers)
        for index, spec in enumerate(recipe.model.layers):
            layer_id = ids[index]
            path = f"model.layers[{index}]"
            if layer_id in seen:
                raise RecipeError(f"{path}: id {layer_id!r} is used twice")
            seen.add(layer_id)
            entry = regs.layer.get(spec.name, path)
            ctx = LayerContext(
                in_shape=shape,
                towers=towers,
                cross=spec.towers == "cross",
                path=path,
                id=layer_id,
                index=index,
                is_last=index == n - 1,
                device=dev,
                dtype=dtype,
                registries=regs,
            )
            try:
                built = entry.factory(spec.options, ctx)
                if not isinstance(built, BuiltLayer):
                    raise RecipeError(
                        f"{path}: layer {spec.name!r} from {entry.origin} returned "
                        f"{type(built).__name__}, not a BuiltLayer"
                    )
                built.module.to(device=dev, dtype=dtype)
            except ConvnetError:
                raise
            except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
                # sizes torch cannot hold (a 10**12-channel conv, a 10**18-feature fc): the recipe's fault
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise RecipeError(
                    f"{path} ({layer_id}): cannot build this layer for input {list(shape)}: {reason}"
                ) from None
            except Exception as exc:  # AttributeError, KeyError ...: a bug in the layer's plugin
                raise regs.layer.failed_in(entry, f"{path} ({layer_id})", exc) from exc
            params = sum(p.numel() for p in built.module.parameters())
            info.append(LayerInfo(layer_id, spec.name, spec.towers, shape, tuple(built.out_shape), params, built.macs))
            modules.append((layer_id, built.module))
            shape = tuple(built.out_shape)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    if shape != (recipe.model.num_classes,):
        raise RecipeError(
            f"model.layers: the last layer gives shape {list(shape)} per sample, "
            f"but model.num_classes = {recipe.model.num_classes} needs [{recipe.model.num_classes}]"
        )
    return Network(modules, info, towers)


def describe(model: Network) -> list[dict[str, Any]]:
    """Per layer: id, kind, towers, shapes, parameters and multiply-adds per sample."""
    rows = []
    for item in model.info:
        rows.append(
            {
                "id": item.id,
                "layer": item.name,
                "towers": item.towers,
                # The input image is on every tower already: a cross first layer exchanges nothing.
                "exchanges": item.towers == "cross" and model.towers > 1 and item is not model.info[0],
                "in_shape": list(item.in_shape),
                "out_shape": list(item.out_shape),
                "params": item.params,
                "macs": item.macs,
                "macs_per_tower": item.macs // model.towers,
            }
        )
    return rows
