"""Progress bars (tqdm) and per-epoch lines, observing a run through the lifecycle hooks."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tqdm import tqdm

from convnet.core import hookimpl

_bars: dict[int, tqdm] = {}


def _interactive(run: Any) -> bool:
    return run.strategy.is_main and not run.quiet and sys.stderr.isatty()


NOT_SHOWN = {"kind", "epoch", "step"}


def _fmt(metrics: dict[str, Any]) -> str:
    """Every scalar number of the record (plugins' evaluators' too); lr last."""
    keys = [
        k
        for k, v in metrics.items()
        if k not in NOT_SHOWN and k != "lr" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if "lr" in metrics:
        keys.append("lr")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys)


@hookimpl
def convnet_train_start(run: Any) -> None:
    if _interactive(run):
        # A pseudo-terminal may report a 0x0 size, where tqdm hides every bar: give it one.
        sized = shutil.get_terminal_size((0, 0)).columns > 0
        _bars[id(run)] = tqdm(
            total=run.total_steps,
            initial=run.step,
            desc=run.recipe.name,
            unit="step",
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 24,
            file=sys.stderr,
        )


@hookimpl
def convnet_step_end(run: Any, step: int, metrics: dict[str, Any]) -> None:
    bar = _bars.get(id(run))
    if bar is not None:
        bar.update(step - bar.n)
        bar.set_postfix_str(f"epoch {metrics['epoch'] + 1} loss {metrics['loss']:.4f}", refresh=False)


@hookimpl
def convnet_epoch_end(run: Any, epoch: int, metrics: dict[str, Any]) -> None:
    if not run.strategy.is_main or run.quiet:
        return
    line = f"epoch {epoch + 1}/{run.recipe.train.epochs}: {_fmt(metrics)}"
    bar = _bars.get(id(run))
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


@hookimpl
def convnet_train_end(run: Any, summary: dict[str, Any]) -> None:
    bar = _bars.pop(id(run), None)
    if bar is not None:
        bar.close()
