"""One process per tower over torch.distributed: the paper's split with ranks for GPUs.

Rank t holds only tower t's rows of every layer (and a replica of the few ``whole``
layers). Every rank reads the same full batch; at a cross layer the ranks all-gather
their blocks. The gradient of a gather depends on what reads the gathered tensor:

- a sharded layer (rank t computes only its rows from the full input): each rank's
  gradient for the full input is a partial sum, so the backward sums over ranks and
  keeps the own block (``_GatherToShards``; what torch.distributed.nn's all_gather does);
- a replicated computation (the loss, a ``whole`` layer): every rank computes the same
  full gradient, so the backward keeps the own block and sums nothing (``_GatherToReplicas``);
  summing would make it world-size times too large.

Launch: ``torchrun --standalone --nproc-per-node=TOWERS -m convnet.core run RECIPE
--set parallel.strategy=tower-parallel``.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch
import torch.distributed as dist
from torch import nn

from convnet.core import BuildContext, Network, RecipeError
from convnet.plugins.parallel.distributed import DistributedOptions, DistributedStrategy
from convnet.plugins.parallel.towers import (
    LayerSplit,
    canonical,
    describe_towers,
    iter_tensors,
    piece_tensor,
    run_towers,
    split_network,
)


@attrs.define
class TowerParallelOptions(DistributedOptions):
    pass


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, 1)


def _own_block(x: torch.Tensor) -> torch.Tensor:
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = x.shape[1] // world
    return x.narrow(1, rank * rows, rows).contiguous()


class _GatherToShards(torch.autograd.Function):
    """All-gather along dim 1; backward: sum the gradients over ranks, keep the own block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            blocks = list(grad.chunk(dist.get_world_size(), 1))
            out = torch.empty_like(blocks[0].contiguous())
            dist.reduce_scatter(out, [b.contiguous() for b in blocks])
            return out
        dist.all_reduce(grad)
        return _own_block(grad)


class _GatherToReplicas(torch.autograd.Function):
    """All-gather along dim 1; backward: every rank has the whole gradient, keep the own block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _own_block(grad)


class _ReplicaToShard(torch.autograd.Function):
    """A replicated tensor -> the own block; backward: all-gather the blocks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _own_block(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _gather_cat(grad)


class _ReplicaToCross(torch.autograd.Function):
    """A replicated tensor read whole by a sharded layer; backward: sum the partial gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _RankExchange:
    """The exchanges of one rank holding one tower."""

    def scatter(self, whole: torch.Tensor) -> list[torch.Tensor]:
        if not whole.requires_grad:
            return [_own_block(whole)]
        return [_ReplicaToShard.apply(whole)]

    def cross_inputs(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_GatherToShards.apply(blocks[0])]

    def replicate(self, whole: torch.Tensor) -> list[torch.Tensor]:
        return [_ReplicaToCross.apply(whole) if whole.requires_grad else whole]

    def to_whole(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        return _GatherToReplicas.apply(blocks[0])


class RankTower(nn.Module):
    """This rank's tower: its rows of every layer plus the replicated ``whole`` layers."""

    def __init__(self, splits: list[LayerSplit], strategy: TowerParallel, info: list) -> None:
        super().__init__()
        self.splits, self.info, self.strategy = splits, info, strategy
        self.pieces = nn.ModuleDict()
        self.whole = nn.ModuleDict()
        dev = strategy.device
        for s in splits:
            if s.mode == "whole":
                self.whole[s.id] = s.pieces[0].to(dev)
                continue
            self.pieces[s.id] = nn.ModuleList([s.pieces[0].to(dev)])
            if s.module is not None:
                self.whole[s.id] = s.module.to(dev)

    def _run(self, x: torch.Tensor, stop_at: str | None = None) -> torch.Tensor:
        with self.strategy.collective("exchanging activations between towers"):
            return run_towers(self.splits, self.pieces, self.whole, x, _RankExchange(), stop_at)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def features(self, x: torch.Tensor, layer_id: str) -> torch.Tensor:
        if layer_id not in {s.id for s in self.splits}:
            raise KeyError(layer_id)
        return self._run(x, layer_id)

    def tensor(self, s: LayerSplit, name: str) -> torch.Tensor:
        return piece_tensor(self.whole[s.id] if s.mode == "whole" else self.pieces[s.id][0], name)


class TowerParallel(DistributedStrategy):
    """Rank t = tower t. Every rank sees the whole batch, so ``shard_batch`` and the
    reductions over data shards (``all_reduce_sum``, ``all_gather_cat``) are the identity."""

    label = "tower-parallel"

    def __init__(self, options: TowerParallelOptions, towers: int, batch_size: int) -> None:
        super().__init__(options)
        self.towers = towers
        self.batch_size = batch_size
        self._splits: list[LayerSplit] = []

    def prepare(self, model: Network) -> nn.Module:
        if self.launched and self.world_size != model.towers:
            raise RecipeError(
                f'parallel.strategy = "tower-parallel" runs one process per tower: the model has '
                f"{model.towers} towers but {self.world_size} processes were launched "
                f"(torchrun --nproc-per-node={model.towers})"
            )
        self.start()
        self._splits = split_network(model, [[self.rank]])
        return RankTower(self._splits, self, model.info)

    def named_parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        assert isinstance(module, RankTower)
        for s, name, _ in iter_tensors(module.splits):
            t = module.tensor(s, name)
            if isinstance(t, nn.Parameter):
                yield canonical(s.id, name), t

    def _sharded(self) -> set[str]:
        return {canonical(s.id, n) for s, n, sharded in iter_tensors(self._splits) if sharded and s.mode != "whole"}

    def _gather_rows(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        sharded = self._sharded()
        with self.collective("gathering the model state"):
            for key in sorted(tensors):
                value = tensors[key].detach()
                name = key if key in sharded else key.rpartition("/")[0]
                if name in sharded and value.dim() > 0:  # a 0-d state (AdamW's step) is the same on every rank
                    value = value.contiguous()
                    parts = [torch.empty_like(value) for _ in range(self.world_size)]
                    dist.all_gather(parts, value)
                    out[key] = torch.cat(parts, 0)
                else:
                    out[key] = value
        return out

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(module, RankTower)
        return self._gather_rows({canonical(s.id, n): module.tensor(s, n) for s, n, _ in iter_tensors(module.splits)})

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        assert isinstance(module, RankTower)
        sharded = self._sharded()
        with torch.no_grad():
            for s, name, _ in iter_tensors(module.splits):
                key = canonical(s.id, name)
                value = state[key]
                if key in sharded:
                    value = value.chunk(self.world_size, 0)[self.rank]
                module.tensor(s, name).copy_(value)

    def gather_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._gather_rows(tensors)

    def scatter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sharded = self._sharded()
        return {
            k: v.chunk(self.world_size, 0)[self.rank].clone() if k.rpartition("/")[0] in sharded and v.dim() > 0 else v
            for k, v in tensors.items()
        }

    def describe(self, model: Network) -> list[dict]:
        dev = self.device.type
        names = [f"rank {t}: {dev}" + (f":{t}" if dev == "cuda" else "") for t in range(model.towers)]
        return describe_towers(model, names, self.batch_size, replicated=True)


def build_tower_parallel(options: TowerParallelOptions, ctx: BuildContext) -> TowerParallel:
    return TowerParallel(options, ctx.recipe.model.towers, ctx.recipe.data.batch_size)
