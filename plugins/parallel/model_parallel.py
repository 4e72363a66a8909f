"""The paper's scheme in one process: tower t on ``devices[t]``, exchanges only at cross layers.

Devices may repeat (``["cpu", "cpu"]``, ``["cuda:0", "cuda:0"]``). The trained module holds
one piece per tower per layer; names and checkpoints stay those of the single-device
``Network`` (a sharded parameter is concatenated back by its rows), so a run saved under
one strategy resumes under any other.
"""
from __future__ import annotations

from typing import Any, Iterator

import attrs
import torch
from torch import nn

from convnet.core import schema
from convnet.core.model import Network
from convnet.core.strategy import Strategy, resolve_device
from convnet.plugins.parallel.towers import (LayerSplit, canonical, describe_towers, iter_tensors, piece_tensor,
                                             run_towers, split_network)


def _devices(instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    for name in value:
        resolve_device(name)


def _device(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    resolve_device(value)


@attrs.define
class ModelParallelOptions:
    """``devices[t]`` holds tower t (devices may repeat). Empty: every tower on ``device``,
    where ``auto`` means one GPU per tower if there are enough, else the one device there is."""

    devices: list[str] = attrs.field(factory=list, validator=_devices)
    device: str = attrs.field(default="auto", validator=_device)


class TowerModel(nn.Module):
    """Tower pieces on their devices; ``forward`` returns the logits on ``devices[0]``."""

    def __init__(self, splits: list[LayerSplit], devices: list[torch.device], info: list) -> None:
        super().__init__()
        self.splits = splits
        self.devices = devices
        self.info = info
        self.towers = len(devices)
        self.pieces = nn.ModuleDict()
        self.whole = nn.ModuleDict()
        for s in splits:
            if s.mode == "whole":
                self.whole[s.id] = s.pieces[0].to(devices[0])
                continue
            self.pieces[s.id] = nn.ModuleList([p.to(d) for p, d in zip(s.pieces, devices)])
            if s.module is not None:
                self.whole[s.id] = s.module.to(devices[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_towers(self.splits, self.pieces, self.whole, x, _LocalExchange(self.devices))

    def features(self, x: torch.Tensor, layer_id: str) -> torch.Tensor:
        if layer_id not in {s.id for s in self.splits}:
            raise KeyError(layer_id)
        return run_towers(self.splits, self.pieces, self.whole, x, _LocalExchange(self.devices), stop_at=layer_id)

    def tower_tensor(self, s: LayerSplit, name: str, tower: int) -> torch.Tensor:
        module = self.whole[s.id] if s.mode == "whole" else self.pieces[s.id][tower]
        return piece_tensor(module, name)


class _LocalExchange:
    """Blocks move with ``Tensor.to`` (non-blocking, so copies overlap compute on CUDA)."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.devices = devices

    def scatter(self, whole: torch.Tensor) -> list[torch.Tensor]:
        return [b.to(d, non_blocking=True) for b, d in zip(whole.chunk(len(self.devices), 1), self.devices)]

    def cross_inputs(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        full: dict[torch.device, torch.Tensor] = {}
        for d in self.devices:
            if d not in full:
                full[d] = torch.cat([b.to(d, non_blocking=True) for b in blocks], 1)
        return [full[d] for d in self.devices]

    def replicate(self, whole: torch.Tensor) -> list[torch.Tensor]:
        copies: dict[torch.device, torch.Tensor] = {}
        for d in self.devices:
            if d not in copies:
                copies[d] = whole.to(d, non_blocking=True)
        return [copies[d] for d in self.devices]

    def to_whole(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([b.to(self.devices[0], non_blocking=True) for b in blocks], 1)


def tower_name(tower: int, name: str) -> str:
    """The optimizer's name for tower ``tower``'s rows of canonical parameter ``name``."""
    return f"tower{tower}/{name}"


class ModelParallel(Strategy):
    def __init__(self, devices: list[torch.device], batch_size: int) -> None:
        super().__init__(devices[0])
        self.devices = devices
        self.batch_size = batch_size
        self._splits: list[LayerSplit] = []

    def prepare(self, model: Network) -> nn.Module:
        if model.towers != len(self.devices):
            raise ValueError(f"{len(self.devices)} devices for a model of {model.towers} towers")
        self._splits = split_network(model)
        return TowerModel(self._splits, self.devices, model.info)

    def named_parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        assert isinstance(module, TowerModel)
        for s, name, sharded in iter_tensors(module.splits):
            if s.mode == "whole":
                t = module.tower_tensor(s, name, 0)
                if isinstance(t, nn.Parameter):
                    yield canonical(s.id, name), t
                continue
            for tower in range(module.towers):
                t = module.tower_tensor(s, name, tower)
                if not isinstance(t, nn.Parameter):
                    break
                yield (tower_name(tower, canonical(s.id, name)) if module.towers > 1 else canonical(s.id, name)), t

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(module, TowerModel)
        out = {}
        for s, name, sharded in iter_tensors(module.splits):
            if sharded:
                parts = [module.tower_tensor(s, name, t).detach().to(self.devices[0]) for t in range(module.towers)]
                out[canonical(s.id, name)] = torch.cat(parts, 0)
            else:
                out[canonical(s.id, name)] = module.tower_tensor(s, name, 0).detach()
        return out

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert isinstance(module, TowerModel)
        expected = {canonical(s.id, n) for s, n, _ in iter_tensors(module.splits)}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyError(f"state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for s, name, sharded in iter_tensors(module.splits):
                value = state[canonical(s.id, name)]
                towers = 1 if s.mode == "whole" else module.towers
                for t in range(towers):
                    target = module.tower_tensor(s, name, t)
                    part = value.chunk(towers, 0)[t] if sharded else value
                    target.copy_(part)

    def gather_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tower{t}/NAME/buf`` pieces -> ``NAME/buf`` (rows concatenated in tower order)."""
        out: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            head, sep, rest = key.partition("/")
            if sep and head.startswith("tower") and head[5:].isdigit():
                parts.setdefault(rest, {})[int(head[5:])] = value
            else:
                out[key] = value
        for key, by_tower in parts.items():
            out[key] = torch.cat([by_tower[t].to(self.devices[0]) for t in sorted(by_tower)], 0)
        return out

    def scatter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        towers = len(self.devices)
        if towers == 1:
            return tensors
        sharded = {canonical(s.id, n) for s, n, sh in iter_tensors(self._splits) if sh and s.mode != "whole"}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            name, _, buf = key.rpartition("/")
            if name in sharded:
                for t, part in enumerate(value.chunk(towers, 0)):
                    out[f"{tower_name(t, name)}/{buf}"] = part.clone()
            else:
                out[key] = value
        return out

    def describe(self, model: Network) -> list[dict]:
        names = [f"tower {t}: {d}" for t, d in enumerate(self.devices)]
        return describe_towers(model, names, self.batch_size)


def _default_devices(device: str, towers: int) -> list[str]:
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() >= towers:
        return [f"cuda:{t}" for t in range(towers)]
    return [device] * towers


def build_model_parallel(options: ModelParallelOptions, recipe: schema.Recipe) -> Strategy:
    towers = recipe.model.towers
    names = options.devices or _default_devices(options.device, towers)
    if len(names) != towers:
        raise ValueError(f"devices has {len(names)} entries but model.towers = {towers}: "
                         "name one device per tower (devices may repeat)")
    strategy = ModelParallel([resolve_device(n) for n in names], recipe.data.batch_size)
    return strategy
