"""The paper's scheme in one process: tower t on ``devices[t]``, exchanges only at cross layers.

Devices may repeat (``["cpu", "cpu"]``, ``["cuda:0", "cuda:0"]``). The trained module holds
one piece per tower per layer; names and checkpoints stay those of the single-device
``Network`` (a sharded parameter is concatenated back by its rows), so a run saved under
one strategy resumes under any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import torch
from torch import nn

from convnet.core import BuildContext, Network, Strategy, resolve_device, valid_device
from convnet.plugins.parallel.towers import (
    LayerSplit,
    canonical,
    describe_towers,
    iter_tensors,
    piece_tensor,
    run_towers,
    split_network,
    take_blocks,
)


def _devices(instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    for name in value:
        resolve_device(name)


@attrs.define
class ModelParallelOptions:
    """``devices[t]`` holds tower t (devices may repeat). Empty: every tower on ``device``,
    where ``auto`` means one GPU per tower if there are enough, else the one device there is.

    ``fuse_shared_devices``: towers that share a device run as one grouped layer there (what
    ``single`` does with all of them); false runs every tower as its own modules even on a
    shared device, exactly as on distinct devices (how the split is tested on one CPU).
    """

    devices: list[str] = attrs.field(factory=list, validator=_devices)
    device: str = attrs.field(default="auto", validator=valid_device)
    fuse_shared_devices: bool = True


def tower_groups(devices: list[torch.device], fuse: bool) -> list[list[int]]:
    """Towers by device, in order of first appearance (one group per tower unless fused)."""
    if not fuse:
        return [[t] for t in range(len(devices))]
    groups: dict[torch.device, list[int]] = {}
    for t, d in enumerate(devices):
        groups.setdefault(d, []).append(t)
    return list(groups.values())


class TowerModel(nn.Module):
    """Tower-group pieces on their devices; ``forward`` returns the logits on ``devices[0]``."""

    def __init__(
        self, splits: list[LayerSplit], groups: list[list[int]], devices: list[torch.device], info: list
    ) -> None:
        super().__init__()
        self.splits, self.groups, self.info = splits, groups, info
        self.towers = len(devices)
        self.group_devices = [devices[g[0]] for g in groups]
        self.home = devices[0]
        self.pieces = nn.ModuleDict()
        self.whole = nn.ModuleDict()
        for s in splits:
            if s.mode == "whole":
                self.whole[s.id] = s.pieces[0].to(self.home)
                continue
            self.pieces[s.id] = nn.ModuleList([p.to(d) for p, d in zip(s.pieces, self.group_devices)])
            if s.module is not None:
                self.whole[s.id] = s.module.to(self.home)

    def _exchange(self) -> _LocalExchange:
        return _LocalExchange(self.groups, self.group_devices, self.home, self.towers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_towers(self.splits, self.pieces, self.whole, x, self._exchange())

    def features(self, x: torch.Tensor, layer_id: str) -> torch.Tensor:
        if layer_id not in {s.id for s in self.splits}:
            raise KeyError(layer_id)
        return run_towers(self.splits, self.pieces, self.whole, x, self._exchange(), stop_at=layer_id)

    def group_tensor(self, s: LayerSplit, name: str, group: int) -> torch.Tensor:
        module = self.whole[s.id] if s.mode == "whole" else self.pieces[s.id][group]
        return piece_tensor(module, name)


class _LocalExchange:
    """Blocks move with ``Tensor.to`` (non-blocking, so copies overlap compute on CUDA)."""

    def __init__(self, groups: list[list[int]], devices: list[torch.device], home: torch.device, towers: int) -> None:
        self.groups, self.devices, self.home, self.towers = groups, devices, home, towers

    def scatter(self, whole: torch.Tensor) -> list[torch.Tensor]:
        return [take_blocks(whole, g, self.towers).to(d, non_blocking=True) for g, d in zip(self.groups, self.devices)]

    def _gather(self, blocks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        if len(blocks) == 1:  # one group holds every tower, in order
            return blocks[0].to(device, non_blocking=True)
        by_tower: dict[int, torch.Tensor] = {}
        for g, b in zip(self.groups, blocks):
            for t, part in zip(g, b.chunk(len(g), 1)):
                by_tower[t] = part
        return torch.cat([by_tower[t].to(device, non_blocking=True) for t in range(self.towers)], 1)

    def cross_inputs(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        full: dict[torch.device, torch.Tensor] = {}
        for d in self.devices:
            if d not in full:
                full[d] = self._gather(blocks, d)
        return [full[d] for d in self.devices]

    def replicate(self, whole: torch.Tensor) -> list[torch.Tensor]:
        copies: dict[torch.device, torch.Tensor] = {}
        for d in self.devices:
            if d not in copies:
                copies[d] = whole.to(d, non_blocking=True)
        return [copies[d] for d in self.devices]

    def to_whole(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return self._gather(blocks, self.home)


def group_name(group: list[int], name: str) -> str:
    """The optimizer's name for a tower group's rows of canonical parameter ``name``."""
    return f"towers{'+'.join(map(str, group))}/{name}"


def _parse_group(head: str) -> list[int] | None:
    if not head.startswith("towers"):
        return None
    parts = head[len("towers") :].split("+")
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None


class ModelParallel(Strategy):
    def __init__(self, devices: list[torch.device], batch_size: int, fuse: bool = True) -> None:
        super().__init__(devices[0])
        self.devices = devices
        self.batch_size = batch_size
        self.groups = tower_groups(devices, fuse)
        self._splits: list[LayerSplit] = []

    @property
    def _whole_group(self) -> bool:
        """One group holding every tower in order: pieces carry the canonical names."""
        return self.groups == [list(range(len(self.devices)))]

    def prepare(self, model: Network) -> nn.Module:
        if model.towers != len(self.devices):
            raise ValueError(f"{len(self.devices)} devices for a model of {model.towers} towers")
        self._splits = split_network(model, self.groups)
        return TowerModel(self._splits, self.groups, self.devices, model.info)

    def named_parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        assert isinstance(module, TowerModel)
        for s, name, _sharded in iter_tensors(module.splits):
            for g, group in enumerate(self.groups if s.mode != "whole" else [[0]]):
                t = module.group_tensor(s, name, g)
                if not isinstance(t, nn.Parameter):
                    break
                plain = s.mode == "whole" or self._whole_group
                yield (canonical(s.id, name) if plain else group_name(group, canonical(s.id, name))), t

    def _assemble(self, parts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Group pieces (by group index) -> the canonical tensor, rows in tower order. A 0-d
        optimizer state (AdamW's step) is not split: every piece holds the same, the first is kept."""
        if any(value.dim() == 0 for value in parts.values()):
            return parts[min(parts)].to(self.devices[0])
        by_tower: dict[int, torch.Tensor] = {}
        for g, value in parts.items():
            group = self.groups[g]
            for t, rows in zip(group, value.chunk(len(group), 0)):
                by_tower[t] = rows.to(self.devices[0])
        return torch.cat([by_tower[t] for t in sorted(by_tower)], 0)

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(module, TowerModel)
        out = {}
        for s, name, sharded in iter_tensors(module.splits):
            if sharded and s.mode != "whole":
                parts = {g: module.group_tensor(s, name, g).detach() for g in range(len(self.groups))}
                out[canonical(s.id, name)] = self._assemble(parts)
            else:
                out[canonical(s.id, name)] = module.group_tensor(s, name, 0).detach()
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
                groups = [[0]] if s.mode == "whole" else self.groups
                for g, group in enumerate(groups):
                    part = (
                        take_blocks(value, group, len(self.devices), dim=0) if sharded and s.mode != "whole" else value
                    )
                    module.group_tensor(s, name, g).copy_(part)

    def gather_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``towers0+1/NAME/buf`` group pieces -> ``NAME/buf`` (rows in tower order)."""
        out: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[int, torch.Tensor]] = {}
        index = {tuple(g): i for i, g in enumerate(self.groups)}
        for key, value in tensors.items():
            head, sep, rest = key.partition("/")
            group = _parse_group(head) if sep else None
            if group is not None and tuple(group) in index:
                parts.setdefault(rest, {})[index[tuple(group)]] = value
            else:
                out[key] = value
        for key, by_group in parts.items():
            out[key] = self._assemble(by_group)
        return out

    def scatter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._whole_group:
            return tensors
        sharded = {canonical(s.id, n) for s, n, sh in iter_tensors(self._splits) if sh and s.mode != "whole"}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            name, _, buf = key.rpartition("/")
            if name in sharded:
                for group in self.groups:
                    piece = take_blocks(value, group, len(self.devices), 0) if value.dim() > 0 else value
                    out[f"{group_name(group, name)}/{buf}"] = piece.clone()
            else:
                out[key] = value
        return out

    def describe(self, model: Network) -> list[dict]:
        names = [f"tower{'s' if len(g) > 1 else ''} {'+'.join(map(str, g))}: {self.devices[g[0]]}" for g in self.groups]
        return describe_towers(model, names, self.batch_size, self.groups)


def _default_devices(device: str, towers: int) -> list[str]:
    if device == "auto" and torch.cuda.is_available() and torch.cuda.device_count() >= towers:
        return [f"cuda:{t}" for t in range(towers)]
    return [device] * towers


def build_model_parallel(options: ModelParallelOptions, ctx: BuildContext) -> Strategy:
    recipe = ctx.recipe
    towers = recipe.model.towers
    names = options.devices or _default_devices(options.device, towers)
    if len(names) != towers:
        raise ValueError(
            f"devices has {len(names)} entries but model.towers = {towers}: "
            "name one device per tower (devices may repeat)"
        )
    return ModelParallel([resolve_device(n) for n in names], recipe.data.batch_size, options.fuse_shared_devices)
