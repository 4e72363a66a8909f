"""The interface a parallelism strategy implements (plugins: single, model-parallel, ...).

The engine only talks to a model through its strategy: where batches go, which parameters
this process owns (by their canonical names, those of the single-device ``Network``), how
to read and write the canonical state, and how to reduce numbers over processes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from convnet.core.model import Network


class Strategy:
    """The base: one process, one device. ``single`` is this class."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, checkpoints and progress bars."""
        return self.rank == 0

    def prepare(self, model: Network) -> nn.Module:
        """Place the (CPU-built, initialised) model; return the module the engine trains."""
        return model.to(self.device)

    @property
    def input_device(self) -> torch.device:
        return self.device

    def named_parameters(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """This process's trainable parameters under their canonical names."""
        return module.named_parameters()

    def state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The full canonical model state (gathered to the main process if sharded)."""
        return {k: v.detach() for k, v in module.state_dict().items()}

    def load_state_dict(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(state)

    def gather_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-parameter tensors (optimizer state) from all processes, on the main one."""
        return tensors

    def scatter_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``gather_tensors``: this process's share of per-parameter tensors."""
        return tensors

    def shard_batch(self, indices: list[int]) -> list[int]:
        """This process's share of a global training batch."""
        return indices

    def shard_eval(self, indices: list[int]) -> list[int]:
        """This process's share of the evaluation samples (no sample twice, none dropped)."""
        return indices

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so all take the same branch)."""
        return flag

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of all processes (in rank order)."""
        return tensor

    def barrier(self) -> None:
        pass

    def translate_error(self, exc: BaseException) -> Exception | None:
        """A clear error for a failure of this strategy's machinery (a lost peer), else None."""
        return None

    def close(self) -> None:
        """End what ``prepare`` started (a process group). Let go first of everything built on it
        (DDP's reducer holds the group): threads a group leaves running to the interpreter's
        exit can abort the process."""

    def abandon(self) -> None:
        """After a failure: let go of what ``prepare`` started without meeting the other
        processes (``close`` waits for them at a barrier; a failed run must not)."""

    def describe(self, model: Network) -> list[dict]:
        """Per device: parameters, activation memory per sample, bytes exchanged per step."""
        params = sum(p.numel() for p in model.parameters())
        act = sum(4 * math.prod(i.out_shape) for i in model.info)
        return [
            {
                "device": str(self.device),
                "params": params,
                "activation_bytes_per_sample": act,
                "exchanged_bytes_per_sample": 0,
            }
        ]


def valid_device(instance: Any, attribute: Any, value: str) -> None:
    """An attrs validator for a device option (``"auto"``, ``"cpu"``, ``"cuda:1"``)."""
    resolve_device(value)


# False while a recipe is only read or described (`convnet show`, `convnet summary`): the devices it
# names need not be on this machine (a two-GPU recipe summarised on a laptop).
_DEVICES_NEEDED: contextvars.ContextVar[bool] = contextvars.ContextVar("convnet_devices_needed", default=True)


@contextlib.contextmanager
def devices_not_needed() -> Iterator[None]:
    """Within this block ``resolve_device`` accepts a CUDA device that this machine lacks."""
    token = _DEVICES_NEEDED.set(False)
    try:
        yield
    finally:
        _DEVICES_NEEDED.reset(token)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"not a device: {name!r} ({exc})") from None
    if dev.type == "cuda" and _DEVICES_NEEDED.get() and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return dev
