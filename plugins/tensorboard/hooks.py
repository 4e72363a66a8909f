"""The hook implementations behind the tensorboard plugin (imported only when tensorboard is)."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

from convnet.core import RunView, hookimpl, read_metrics

# Per run (by id of its view): its writer, on the main process only.
_writers: dict[int, Any] = {}


def event_dir(out: Path) -> Path:
    return Path(out) / "tensorboard"


def scalars(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The real numbers of an evaluation's results, nested dicts flattened to ``a/b`` names."""
    out: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def first_conv_weight(state: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """(layer name, weight) of the model's first convolution: its first 4-D weight in state order."""
    for key, value in state.items():
        if key.endswith(".weight") and value.dim() == 4:
            return key.removeprefix("layers.").removesuffix(".weight"), value
    return None


def filter_grid(weight: torch.Tensor, columns: int = 16, pixels: int = 24) -> torch.Tensor:
    """``[K, C, kh, kw]`` kernels -> a ``[3, H, W]`` image in [0, 1], each kernel scaled on its own."""
    w = weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):  # not an image's channels: show the mean over them
        w = w.mean(1, keepdim=True)
    scale = max(1, math.ceil(pixels / max(w.shape[2:])))
    w = torch.nn.functional.interpolate(w, scale_factor=scale, mode="nearest")
    return torchvision.utils.make_grid(w, nrow=columns, normalize=True, scale_each=True, padding=2, pad_value=1.0)


def _write(run: RunView, what: Callable[[Any], None]) -> None:
    """Call ``what(writer)`` for this run; a failure (a full disk) stops TensorBoard logging for
    the run with one line, and never the run itself: the event files are a view, not the record."""
    writer = _writers.get(id(run))
    if writer is None:
        return
    try:
        what(writer)
    except Exception as exc:
        _writers.pop(id(run), None)
        print(
            f"convnet: warning: tensorboard: cannot write to {event_dir(run.out)} ({type(exc).__name__}: {exc}); "
            "no more TensorBoard events for this run (metrics.jsonl is unaffected)",
            file=sys.stderr,
        )
        try:
            writer.close()
        except Exception:  # the same failure again, already reported
            pass


def _logged(run: RunView, step: int) -> bool:
    """The steps metrics.jsonl holds a train record for."""
    return step % run.recipe.train.log_every == 0 or step == 1


# What the engine adds to an evaluation's record in metrics.jsonl (docs: the metrics file); the
# other keys are the evaluators' results, which ``convnet_evaluation_end`` logs.
ENGINE_KEYS = frozenset({"kind", "epoch", "step", "lr", "skipped_samples", "skipped_nonfinite", "skipped_eval_samples"})


@hookimpl
def convnet_train_start(run: RunView) -> None:
    # A resume: the checkpoint's weights, for its step's filter image (every rank: it may gather).
    conv = first_conv_weight(run.model_state()) if run.step else None
    if not run.is_main:
        return
    from torch.utils.tensorboard import SummaryWriter

    if run.step == 0:  # a fresh run: no other run's events (files of the user's own stay)
        for old in event_dir(run.out).rglob("events.out.tfevents.*"):
            old.unlink(missing_ok=True)
    try:
        # After a resume, hide everything logged from the checkpoint's step on, then log again
        # what metrics.jsonl kept of that step: a killed run's later steps are replayed, and an
        # evaluation the resume drops (the end of a run continued past, an epoch end pending)
        # is gone from both.
        _writers[id(run)] = SummaryWriter(log_dir=str(event_dir(run.out)), purge_step=run.step or None)
    except Exception as exc:
        print(
            f"convnet: warning: tensorboard: cannot write to {event_dir(run.out)} ({type(exc).__name__}: {exc}); "
            "no TensorBoard events for this run",
            file=sys.stderr,
        )
        return
    if run.step:
        _write(run, lambda w: _log_kept_records(w, run, conv))


def _log_kept_records(writer: Any, run: RunView, conv: tuple[str, torch.Tensor] | None) -> None:
    """The records of the checkpoint's step that metrics.jsonl kept, as the hooks logged them."""
    path = Path(run.out) / "metrics.jsonl"
    if not path.is_file():  # a checkpoint resumed into a fresh folder: no records kept
        return
    for record in read_metrics(path):
        if record.get("step") != run.step:
            continue
        if record.get("kind") == "train" and _logged(run, run.step):
            writer.add_scalar("train/loss", record["loss"], run.step)
            writer.add_scalar("train/lr", record["lr"], run.step)
        elif record.get("kind") == "eval":
            results = {k: v for k, v in record.items() if k not in ENGINE_KEYS}
            for name, value in scalars(results).items():
                writer.add_scalar(f"eval/{name}", value, run.step)
            if conv is not None:
                writer.add_image(f"filters/{conv[0]}", filter_grid(conv[1]), run.step)
    writer.flush()


@hookimpl
def convnet_step_end(run: RunView, step: int, metrics: dict[str, Any]) -> None:
    if _logged(run, step):
        _write(
            run,
            lambda w: (
                w.add_scalar("train/loss", metrics["loss"], step),
                w.add_scalar("train/lr", metrics["lr"], step),
            ),
        )


@hookimpl
def convnet_evaluation_end(run: RunView, epoch: int, results: dict[str, Any], final: bool) -> None:
    # Every rank: a sharded strategy gathers the weights collectively.
    conv = first_conv_weight(run.model_state())
    if id(run) not in _writers:
        return

    def add(writer: Any) -> None:
        for name, value in scalars(results).items():
            writer.add_scalar(f"{'final' if final else 'eval'}/{name}", value, run.step)
        if conv is not None:
            writer.add_image(f"filters/{conv[0]}", filter_grid(conv[1]), run.step)
        writer.flush()

    _write(run, add)


@hookimpl
def convnet_train_end(run: RunView, summary: dict[str, Any]) -> None:
    _write(run, lambda w: w.close())
    _writers.pop(id(run), None)
