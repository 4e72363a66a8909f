"""Cutting the single-device ``Network`` into towers, and running the tower pieces.

The ``Network`` keeps every weight's output rows in tower order, so tower ``t`` of a layer
with ``O`` outputs owns rows ``t*O/T : (t+1)*O/T`` of each of its parameters. How each
layer runs under a tower split (its *mode*):

- ``local``: tower ``t`` reads its own block of the previous activation. A layer with
  parameters gets those rows, its ``groups`` (grouped conv, grouped fc, LRN) becoming the
  number of towers the piece computes.
  A layer without parameters is applied to each tower's block on its own: exact for
  layers that treat channels independently (activations, pooling, dropout, flatten,
  third-party elementwise layers such as swish) or in tower groups (LRN). A piece (or a
  module in it) with a ``split_towers(group, towers)`` method is told which towers' blocks
  it computes: a keyed random layer (``convnet.core.keyed``) needs its global feature indices.
- ``cross``: tower ``t`` reads every tower's block (one exchange) and computes its own
  rows; a parameter-free cross layer is computed whole on every tower, which keeps its
  own block of the output.
- ``whole``: a ``cross`` layer whose outputs do not divide by the towers (the last
  layer's ``num_classes``, say) runs unsplit on tower 0; so do the parameter-free layers
  after it.

Pieces are built per *tower group*: the towers one device computes together (their blocks
concatenated in tower order). A strategy supplies an :class:`Exchange` (how blocks move
between groups) and runs :func:`run_towers`. ``model-parallel`` holds every group in one
process (one group per device); ``tower-parallel`` holds one single-tower group per process.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import attrs
import torch
from torch import nn

from convnet.core import LayerInfo, Network, RecipeError

ROW_ATTRS_OUT = ("out_channels", "out_features", "num_features")
ROW_ATTRS_IN = ("in_channels", "in_features")


def layer_modes(model: Network) -> list[str]:
    """Each layer's mode (``local``, ``cross`` or ``whole``), from the recipe's shapes alone."""
    towers = model.towers
    modes = []
    for info in model.info:
        rows = info.out_shape[0]
        if info.towers == "cross" and rows % towers:
            modes.append("whole")
        elif info.towers == "cross":
            modes.append("cross")
        elif info.params and rows % towers:
            raise RecipeError(
                f"model.layers ({info.id}): a tower-local layer with parameters needs its "
                f"{rows} outputs to divide by {towers} towers"
            )
        else:
            modes.append("local")
    return modes


@attrs.define
class LayerSplit:
    """One layer cut into tower groups: ``pieces[g]`` computes the towers ``groups[g]``.

    A group's piece computes its towers' blocks concatenated in tower order (a group of
    towers on one device runs as one grouped layer, as ``single`` does for all of them).
    """

    id: str
    mode: str
    info: LayerInfo
    module: nn.Module | None  # the canonical module (parameter-free layers only)
    pieces: list[nn.Module]
    sharded: tuple[str, ...] = ()  # tensor names (inside the layer) split by rows
    replicated: tuple[str, ...] = ()  # tensor names every tower holds whole

    @property
    def has_params(self) -> bool:
        return self.info.params > 0


class TakeBlock(nn.Module):
    """A parameter-free cross layer computed whole; a group keeps its towers' output blocks."""

    def __init__(self, module: nn.Module, group: Sequence[int], towers: int) -> None:
        super().__init__()
        self.inner, self.group, self.towers = module, list(group), towers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return take_blocks(self.inner(x), self.group, self.towers)


def take_blocks(x: torch.Tensor, group: Sequence[int], towers: int, dim: int = 1) -> torch.Tensor:
    """The blocks of ``group``'s towers along ``dim``, in order (a view when contiguous)."""
    rows = x.shape[dim] // towers
    if list(group) == list(range(group[0], group[0] + len(group))):
        return x.narrow(dim, group[0] * rows, len(group) * rows)
    return torch.cat([x.narrow(dim, t * rows, rows) for t in group], dim)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters()) | dict(module.named_buffers())


def _shell(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are left empty (None)."""
    memo: dict[int, object] = {id(t): None for t in _tensors(module).values()}
    return copy.deepcopy(module, memo)


def _set_tensor(piece: nn.Module, name: str, value: torch.Tensor, is_param: bool, requires_grad: bool) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = piece.get_submodule(prefix) if prefix else piece
    if is_param:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        owner._buffers[leaf] = value


def _ungroup(piece: nn.Module, towers: int, mode: str, rows: int, in_rows: int, group: Sequence[int]) -> None:
    """A group's piece computes ``len(group)`` towers: ``groups`` = towers becomes that;
    the sizes it records follow."""
    share = len(group)
    for m in piece.modules():
        if towers > 1 and getattr(m, "groups", None) == towers:
            m.groups = share if mode == "local" else 1
    for attr in ROW_ATTRS_OUT:
        if isinstance(getattr(piece, attr, None), int) and getattr(piece, attr) == rows:
            setattr(piece, attr, rows // towers * share)
    if mode == "local":
        for attr in ROW_ATTRS_IN:
            if isinstance(getattr(piece, attr, None), int) and getattr(piece, attr) == in_rows:
                setattr(piece, attr, in_rows // towers * share)


def _row_piece(
    module: nn.Module, info: LayerInfo, mode: str, group: Sequence[int], towers: int
) -> tuple[nn.Module, tuple[str, ...], tuple[str, ...]]:
    rows = info.out_shape[0]
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    piece = _shell(module)
    sharded, replicated = [], []
    for name, tensor in (params | buffers).items():
        is_param = name in params
        if tensor.dim() >= 1 and tensor.shape[0] == rows:
            value = take_blocks(tensor.detach(), group, towers, dim=0).clone()
            sharded.append(name)
        elif is_param:
            raise RecipeError(
                f"model.layers ({info.id}): parameter {name!r} of shape {list(tensor.shape)} "
                f"is not laid out by the layer's {rows} output rows, so it cannot be split "
                "into towers"
            )
        else:
            value = tensor.detach().clone()
            replicated.append(name)
        _set_tensor(piece, name, value, is_param, tensor.requires_grad)
    _ungroup(piece, towers, mode, rows, info.in_shape[0], group)
    return piece, tuple(sharded), tuple(replicated)


def _tell_towers(piece: nn.Module, group: Sequence[int], towers: int) -> None:
    """A piece that computes only its group's blocks and needs to know which (a keyed random
    layer: its global feature indices) says so with ``split_towers(group, towers)``."""
    for m in piece.modules():
        split = getattr(m, "split_towers", None)
        if callable(split):
            split(list(group), towers)


def split_network(model: Network, groups: Sequence[Sequence[int]] | None = None) -> list[LayerSplit]:
    """Cut ``model`` into pieces, one per tower group (copies; the model is left as it was).

    ``groups``: the tower groups to build (default: one group per tower, all of them).
    """
    towers = model.towers
    groups = [list(g) for g in (groups if groups is not None else [[t] for t in range(towers)])]
    splits = []
    for info, mode in zip(model.info, layer_modes(model)):
        module = model.layers[info.id]
        if mode == "whole":
            whole = _shell(module)
            params = dict(module.named_parameters())
            for name, tensor in _tensors(module).items():
                _set_tensor(whole, name, tensor.detach().clone(), name in params, tensor.requires_grad)
            splits.append(LayerSplit(info.id, mode, info, None, [whole], replicated=tuple(_tensors(module))))
            continue
        if info.params:
            pieces: list[nn.Module] = []
            sharded: tuple[str, ...] = ()
            replicated: tuple[str, ...] = ()
            for group in groups:
                piece, sharded, replicated = _row_piece(module, info, mode, group, towers)
                pieces.append(piece)
            splits.append(LayerSplit(info.id, mode, info, None, pieces, sharded, replicated))
            continue
        pieces = []
        for group in groups:
            if mode == "cross":
                pieces.append(TakeBlock(copy.deepcopy(module), group, towers))
            else:
                piece = copy.deepcopy(module)
                _ungroup(piece, towers, mode, info.out_shape[0], info.in_shape[0], group)
                _tell_towers(piece, group, towers)
                pieces.append(piece)
        splits.append(
            LayerSplit(info.id, mode, info, copy.deepcopy(module), pieces, replicated=tuple(_tensors(module)))
        )
    return splits


class Exchange(Protocol):
    """How activation blocks move between the towers a process holds."""

    def scatter(self, whole: torch.Tensor) -> list[torch.Tensor]:
        """A whole activation (on tower 0, or replicated) -> each held group's blocks."""

    def cross_inputs(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The held groups' blocks -> for each held group, every tower's blocks concatenated."""

    def replicate(self, whole: torch.Tensor) -> list[torch.Tensor]:
        """A whole activation -> one copy per held group, for a cross layer."""

    def to_whole(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The held groups' blocks -> the whole activation (on tower 0, or replicated)."""


def run_towers(
    splits: list[LayerSplit],
    pieces: nn.ModuleDict,
    whole: nn.ModuleDict,
    x: torch.Tensor,
    exchange: Exchange,
    stop_at: str | None = None,
) -> torch.Tensor:
    """The forward pass over tower pieces: returns the whole output (or ``stop_at``'s).

    ``pieces[id]`` holds the held towers' modules, ``whole[id]`` the unsplit modules.
    """
    blocks: list[torch.Tensor] | None = None
    state = x
    for s in splits:
        replicated = s.mode == "whole" or (s.mode == "local" and blocks is None and not s.has_params)
        if s.mode == "whole":
            state = whole[s.id](exchange.to_whole(blocks) if blocks is not None else state)
            blocks = None
        elif replicated:
            state = whole[s.id](state)
        else:
            if s.mode == "local":
                inputs = blocks if blocks is not None else exchange.scatter(state)
            else:
                inputs = exchange.cross_inputs(blocks) if blocks is not None else exchange.replicate(state)
            blocks = [m(b) for m, b in zip(pieces[s.id], inputs)]
        if s.id == stop_at:
            break
    return exchange.to_whole(blocks) if blocks is not None else state


def canonical(layer_id: str, name: str) -> str:
    return f"layers.{layer_id}.{name}"


def iter_tensors(splits: list[LayerSplit]) -> Iterator[tuple[LayerSplit, str, bool]]:
    """(split, tensor name inside the layer, sharded?) for every tensor of the model."""
    for s in splits:
        for name in s.sharded:
            yield s, name, True
        for name in s.replicated:
            yield s, name, False


def piece_tensor(module: nn.Module, name: str) -> torch.Tensor:
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    t = owner._parameters.get(leaf)
    return t if t is not None else owner._buffers[leaf]


# ---------------------------------------------------------------------------- accounting


def tower_costs(
    model: Network, elem_bytes: int, groups: Sequence[Sequence[int]] | None = None, replicated: bool = False
) -> list[dict[str, int]]:
    """Per tower group (default: one per tower): parameters, activation bytes and bytes
    received from other groups per sample, forward.

    Activations count every layer's output blocks a group keeps plus the blocks it
    receives at cross layers. The input image is on every group already. Whole layers run
    on the group holding tower 0 (model-parallel), or, ``replicated`` (tower-parallel: one
    process per tower), on every group, each gathering the others' blocks before them.
    """
    towers = model.towers
    groups = [list(g) for g in (groups if groups is not None else [[t] for t in range(towers)])]
    n = len(groups)
    home = next(i for i, g in enumerate(groups) if 0 in g)
    runs_whole = range(n) if replicated else [home]
    params, act, recv = [0] * n, [0] * n, [0] * n
    split = False
    for index, (info, mode) in enumerate(zip(model.info, layer_modes(model))):
        n_in, n_out = math.prod(info.in_shape), math.prod(info.out_shape)
        if mode == "whole" or (mode == "local" and not split and not info.params):
            for g in runs_whole:
                if split:
                    other = n_in * (towers - len(groups[g])) // towers
                    recv[g] += other
                    act[g] += other
                params[g] += info.params
                act[g] += n_out
            split = False
            continue
        for g, group in enumerate(groups):
            share = len(group)
            if mode == "cross" and split:
                other = n_in * (towers - share) // towers
                recv[g] += other
                act[g] += other
            elif not split and index > 0 and g not in runs_whole:  # a whole activation on the home group goes out
                part = n_in if mode == "cross" else n_in * share // towers
                recv[g] += part
                act[g] += part
            params[g] += info.params * share // towers
            act[g] += n_out * share // towers
        split = True
    if split:
        last = math.prod(model.info[-1].out_shape)
        for g in runs_whole:
            recv[g] += last * (towers - len(groups[g])) // towers
    return [
        {
            "params": params[g],
            "activation_bytes_per_sample": act[g] * elem_bytes,
            "received_bytes_per_sample": recv[g] * elem_bytes,
        }
        for g in range(n)
    ]


def describe_towers(
    model: Network,
    devices: Sequence[str],
    batch_size: int,
    groups: Sequence[Sequence[int]] | None = None,
    replicated: bool = False,
) -> list[dict]:
    """``Strategy.describe`` rows, one per tower group: backward moves as many bytes as forward."""
    params = list(model.parameters())
    elem = params[0].element_size() if params else 4
    rows = []
    for label, cost in zip(devices, tower_costs(model, elem, groups, replicated)):
        per_sample = 2 * cost["received_bytes_per_sample"]
        rows.append(
            {
                "device": label,
                "params": cost["params"],
                "activation_bytes_per_sample": cost["activation_bytes_per_sample"],
                "exchanged_bytes_per_sample": per_sample,
                "exchanged_bytes_per_step": per_sample * batch_size,
            }
        )
    return rows
