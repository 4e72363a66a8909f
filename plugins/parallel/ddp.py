"""Data parallel: DistributedDataParallel, one process per rank, any world size, any nodes.

``data.batch_size`` is the GLOBAL batch: rank r trains on its contiguous ``B / W`` slice of
every global batch, so W processes follow the same trajectory as one process with batch B
(the loss is a mean over the rank's slice and DDP averages the gradients over ranks).
Evaluation splits the samples over ranks (none twice, none dropped) and evaluators sum
their counts with ``all_reduce_sum``, so the numbers equal a single-process evaluation.
Only rank 0 writes.

Launch: ``torchrun --standalone --nproc-per-node=2 -m convnet.core run RECIPE --set
parallel.strategy=ddp`` (multi-node: see docs/parallel.md).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from convnet.core import BuildContext, Network, RecipeError
from convnet.plugins.parallel.distributed import DistributedOptions, DistributedStrategy


@attrs.define
class DDPOptions(DistributedOptions):
    pass


class _DDP(DistributedDataParallel):
    """DDP whose evaluation forward skips DDP's machinery (ranks may evaluate different
    numbers of batches)."""

    def forward(self, *args, **kwargs):  # type: ignore[override]
        if not (self.training and torch.is_grad_enabled()) or self.released:
            return self.module(*args, **kwargs)
        return super().forward(*args, **kwargs)

    @property
    def released(self) -> bool:
        return "reducer" not in self.__dict__

    def release(self) -> None:
        """Let go of the process group (the reducer, its logger, the group): the module then
        runs as the plain module it wraps."""
        for name in ("reducer", "logger"):
            self.__dict__.pop(name, None)
        self.process_group = None

    def features(self, x: torch.Tensor, layer_id: str) -> torch.Tensor:
        return self.module.features(x, layer_id)


_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
MAX_GATHER_DIMS = 8  # all_gather_cat exchanges shapes in a fixed-size tensor


class DDP(DistributedStrategy):
    label = "ddp"

    def __init__(self, options: DDPOptions, batch_size: int) -> None:
        super().__init__(options)
        self.batch_size = batch_size
        self._wrapped: _DDP | None = None

    def prepare(self, model: Network) -> nn.Module:
        if self.batch_size % self.world_size:
            raise RecipeError(
                f"data.batch_size = {self.batch_size} is the global batch and must divide by the "
                f"{self.world_size} ddp processes"
            )
        self.start()
        model = model.to(self.device)
        # No buffer broadcast in forward: the model's buffers are not trained state, and ranks
        # must not meet in a collective on every forward.
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
        with self.collective("broadcasting the initial weights"):
            wrapped = _DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None, **sync)
        self._wrapped = wrapped
        return wrapped

    def release_group(self) -> None:
        if self._wrapped is not None:
            self._wrapped.release()
            self._wrapped = None

    @staticmethod
    def _inner(module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def named_parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return self._inner(module).named_parameters()

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._inner(module).state_dict().items()}

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        self._inner(module).load_state_dict(state)

    def shard_batch(self, indices: list[int]) -> list[int]:
        per = len(indices) // self.world_size
        return indices[self.rank * per : (self.rank + 1) * per]

    def shard_eval(self, indices: list[int]) -> list[int]:
        n, w = len(indices), self.world_size
        start = self.rank * (n // w) + min(self.rank, n % w)
        return indices[start : start + n // w + (self.rank < n % w)]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._started:
            return tensor
        work = tensor.detach().to(self.device, copy=True)
        with self.collective("summing results over ranks"):
            dist.all_reduce(work)
        return work.to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._started:
            return tensor
        local = tensor.detach().to(self.device)
        with self.collective("gathering results from ranks"):
            # Every rank's whole shape: a rank with no rows may not know the others' trailing
            # shape (an evaluator's torch.empty(0, 0)), and all_gather needs equal shapes, or waits.
            ndim = MAX_GATHER_DIMS
            if local.dim() > ndim:
                raise ValueError(f"all_gather_cat: {local.dim()} dimensions, at most {ndim}")
            mine = torch.full((ndim + 1,), -1, dtype=torch.long, device=self.device)
            mine[0] = local.dim()
            mine[1 : local.dim() + 1] = torch.tensor(local.shape, dtype=torch.long)
            shapes = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(shapes, mine)
            dims = [[int(v) for v in s[1 : int(s[0]) + 1]] for s in shapes]
            filled = {tuple(d[1:]) for d in dims if d and d[0] > 0}
            if len(filled) > 1:
                raise ValueError(f"all_gather_cat: ranks hold rows of different shapes {sorted(filled)}")
            if not filled:
                return tensor
            trailing = filled.pop()
            if local.shape[0] == 0:
                local = local.reshape(0, *trailing)
            sizes = [d[0] if d else 0 for d in dims]
            longest = max(sizes)
            padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
            padded[: local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(tensor.device)

    def describe(self, model: Network) -> list[dict]:
        """Each rank holds the whole model; a step all-reduces every gradient (a ring moves
        2 (W-1)/W of the gradient bytes in and out of each rank)."""
        world = int(os.environ.get("WORLD_SIZE", 0)) or 2
        label = f"each of {world} ranks: {self.device}" + (
            "" if "WORLD_SIZE" in os.environ else " (2 assumed; torchrun sets WORLD_SIZE)"
        )
        params = sum(p.numel() for p in model.parameters())
        elem = next(iter(model.parameters())).element_size()
        act = sum(elem * math.prod(i.out_shape) for i in model.info)
        step = 2 * (world - 1) * params * elem // world
        per_rank_batch = max(self.batch_size // world, 1)
        return [
            {
                "device": label,
                "params": params,
                "activation_bytes_per_sample": act,
                "exchanged_bytes_per_sample": step // per_rank_batch,
                "exchanged_bytes_per_step": step,
            }
        ]


def build_ddp(options: DDPOptions, ctx: BuildContext) -> DDP:
    return DDP(options, ctx.recipe.data.batch_size)
