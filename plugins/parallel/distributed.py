"""What the multi-process strategies share: the process group from torchrun's environment,
collectives that survive a lost peer with a clear error. (Dropout needs nothing from a
strategy: its masks are keyed by global sample and feature, ``convnet.core.keyed``.)

A strategy reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` (set by torchrun) when it is built, and starts the process group in
``prepare``, so ``convnet summary`` works without a launcher.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import attrs
import torch
import torch.distributed as dist
from attrs import validators as v

from convnet.core import ConvnetError, Strategy, resolve_device

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_PEER_MARKERS = (
    "gloo",
    "Gloo",
    "NCCL",
    "Connection closed",
    "Connection reset",
    "Broken pipe",
    "timed out",
    "Timed out",
    "ProcessGroup",
)


class LostPeerError(ConvnetError):
    """A collective failed: another process died, hung past the timeout, or is unreachable."""

    exit_code = 1
    exit_now = True


@attrs.define
class DistributedOptions:
    """``backend``: ``auto`` = nccl on CUDA, gloo on CPU. ``device``: ``auto`` = cuda:LOCAL_RANK
    when CUDA is there, else cpu. ``timeout`` (seconds): how long a collective waits for a
    peer before the run stops with an error."""

    backend: str = attrs.field(default="auto", validator=v.in_(("auto", "gloo", "nccl")))
    device: str = attrs.field(default="auto", validator=v.in_(("auto", "cpu", "cuda")))
    timeout: float = attrs.field(default=600.0, validator=v.gt(0))


def launch_env() -> dict[str, int] | None:
    """Rank, world size and local rank from torchrun's environment (None when absent)."""
    if not all(k in os.environ for k in ENV):
        return None
    try:
        return {
            "rank": int(os.environ["RANK"]),
            "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
        }
    except ValueError as exc:
        raise ConvnetError(f"torchrun environment is malformed: {exc}") from None


class DistributedStrategy(Strategy):
    """Base of ``tower-parallel`` and ``ddp``: one process per rank, torch.distributed."""

    label = "distributed"

    def __init__(self, options: DistributedOptions) -> None:
        self.options = options
        env = launch_env()
        self.launched = env is not None
        self.rank = env["rank"] if env else 0
        self.world_size = env["world_size"] if env else 1
        self.local_rank = env["local_rank"] if env else 0
        super().__init__(self._pick_device())
        self._started = False

    def _pick_device(self) -> torch.device:
        want = self.options.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            try:  # resolve_device: `convnet summary` plans for GPUs this machine may lack
                return resolve_device(f"cuda:{self.local_rank % max(torch.cuda.device_count(), 1)}")
            except ValueError:
                raise ValueError('device = "cuda" asked for, but CUDA is not available here') from None
        return torch.device("cpu")

    @property
    def backend(self) -> str:
        if self.options.backend != "auto":
            return self.options.backend
        return "nccl" if self.device.type == "cuda" else "gloo"

    def start(self) -> None:
        """Join the process group (once); every rank must call it."""
        if self._started:
            return
        if not self.launched:
            raise ConvnetError(
                f'parallel.strategy = "{self.label}" runs one process per rank: launch it with torchrun, e.g. '
                f"`torchrun --standalone --nproc-per-node=2 -m convnet.core run RECIPE "
                f"--set parallel.strategy={self.label}` (missing environment: "
                f"{', '.join(k for k in ENV if k not in os.environ)})"
            )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    self.backend,
                    rank=self.rank,
                    world_size=self.world_size,
                    timeout=datetime.timedelta(seconds=self.options.timeout),
                )
            except (RuntimeError, ValueError) as exc:
                raise LostPeerError(
                    f"{self.where}: could not join the process group at "
                    f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                    f"({_first_line(exc)})"
                ) from None
        self._started = True

    @property
    def where(self) -> str:
        return f"{self.label} rank {self.rank} of {self.world_size}"

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed collective into one clear error naming this rank. Only the process
        group's own failures: the block may also run local code (a tower's forward) whose
        errors (a layer's, out of memory) are not a lost peer and pass as they are."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            if isinstance(exc, dist.DistError) or any(m in str(exc) for m in _PEER_MARKERS):
                raise self.failure(exc, what) from exc
            raise

    def translate_error(self, exc: BaseException) -> Exception | None:
        if isinstance(exc, LostPeerError):
            return exc
        text = str(exc)
        if self._started and (isinstance(exc, dist.DistError) or any(m in text for m in _PEER_MARKERS)):
            return self.failure(exc)
        return None

    def failure(self, exc: BaseException, what: str = "a collective") -> LostPeerError:
        self.abandon()
        return LostPeerError(
            f"{self.where}: {what} failed, another process probably died or hung "
            f"(timeout {self.options.timeout:g} s); see its output: {_first_line(exc)}"
        )

    def any_rank(self, flag: bool) -> bool:
        if not self._started:
            return flag
        work = torch.tensor([1.0 if flag else 0.0], device=self.device)
        with self.collective("agreeing across ranks (a non-finite step, a stop)"):
            dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return bool(work.item() > 0)

    def barrier(self) -> None:
        if self._started:
            with self.collective("barrier"):
                dist.barrier()

    def close(self) -> None:
        if self._started and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                self.release_group()
                dist.destroy_process_group()
                self._started = False

    def abandon(self) -> None:
        """Drop the process group after a failure (a lost peer, an error in this process), so
        the process exits cleanly and the other ranks' next collective fails at once."""
        if self._started and dist.is_initialized():
            self._started = False
            try:
                self.release_group()
                dist.destroy_process_group()
            except Exception:  # already broken: nothing more to release
                pass

    def release_group(self) -> None:
        """Drop what this strategy built that holds the process group, before it is destroyed.

        ``destroy_process_group`` only forgets the group: its gloo threads end when the last
        holder lets go. A holder left (DDP's reducer) keeps them running until the interpreter
        tears the holder down at exit, and a gloo thread that releases a tensor then takes the
        GIL during finalization, which aborts the process ("terminate called without an active
        exception", pytorch/pytorch#190489)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
