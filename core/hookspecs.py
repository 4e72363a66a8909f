"""The hooks a convnet plugin may implement.

Every plugin, built-in or third-party, is a module named by an entry point in the
``convnet`` group. ``convnet_register`` adds components to the registries; the lifecycle
hooks let logging, progress and early-stop plugins observe a run without the engine
knowing them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from convnet.core.registry import Registries
    from convnet.core.engine import Run

PROJECT = "convnet"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def convnet_register(registries: "Registries") -> None:
    """Add components: ``registries.layer.add("swish", build, SwishOptions, "...")``."""


@hookspec
def convnet_add_commands(subparsers: Any) -> None:
    """Add ``convnet`` subcommands (argparse sub-parsers, as pytest_addoption adds options).

    Set the command's function with ``parser.set_defaults(handler=fn)``; ``fn(args) -> int``.
    """


@hookspec
def convnet_train_start(run: "Run") -> None:
    """A run is about to take its first (or, after a resume, its next) step."""


@hookspec
def convnet_step_end(run: "Run", step: int, metrics: dict[str, Any]) -> None:
    """An optimizer step finished; ``metrics`` holds at least loss and lr."""


@hookspec
def convnet_epoch_end(run: "Run", epoch: int, metrics: dict[str, Any]) -> None:
    """An epoch and its evaluation finished."""


@hookspec
def convnet_evaluation_done(run: "Run", epoch: int, results: dict[str, Any]) -> None:
    """Evaluators produced ``results`` (after an epoch or at the end)."""


@hookspec
def convnet_train_end(run: "Run", summary: dict[str, Any]) -> None:
    """The run finished (or stopped); ``summary`` holds the final metrics and folder."""


@hookspec(firstresult=True)
def convnet_should_stop(run: "Run", epoch: int, metrics: dict[str, Any]) -> bool | None:
    """Return True to stop training after this epoch (early stopping)."""
