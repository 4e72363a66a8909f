"""The hooks a convnet plugin may implement.

Every plugin, built-in or third-party, is a module named by an entry point in the
``convnet`` group (``[project.entry-points.convnet] name = "module"``), decorated with
``convnet.core.hookimpl``. docs/plugins.md documents every hook with examples the tests run.

The order of the calls in one run (every process of a multi-process run calls them; write
files only where ``run.is_main``)::

    convnet_register                      once per process, when plugins load
    convnet_load_state                    on --resume, before the first step
    convnet_train_start
      convnet_step_end                    after every optimizer step
      convnet_evaluation_end              after each epoch's evaluation
      convnet_save_state                  whenever a checkpoint is written
      convnet_epoch_end
      convnet_should_stop                 stops at the first True
    convnet_evaluation_end                the final evaluation (``final`` results)
    convnet_train_end                     always, also when the run failed

``run`` is a read-only ``RunView`` (see ``convnet.core.RunView``): its attributes are the
ones a plugin may rely on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from convnet.core.registry import Registries
    from convnet.core.run_view import RunView

PROJECT = "convnet"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------- loading


@hookspec
def convnet_register(registries: Registries) -> None:
    """Add components to the registries.

    :param registries: one registry per kind (``registries.layer``, ``.augmenter``,
        ``.strategy``, ``.evaluator``, ``.dataset``, ``.optimizer``, ``.schedule``, ``.lrn``);
        ``registries.layer.add(name, factory, OptionsClass, "one-line description")``.

    A name registered twice is an error naming both plugins; a plugin whose registration
    raises is dropped whole (none of its components stay) and reported.
    """


@hookspec
def convnet_add_commands(subparsers: Any) -> None:
    """Add ``convnet`` subcommands (argparse sub-parsers, as pytest_addoption adds options).

    :param subparsers: the ``argparse`` sub-parsers action of the ``convnet`` command.

    Set the command's function with ``parser.set_defaults(handler=fn)``; ``fn(args) -> int``
    is the exit code. ``args.strict`` is the global ``--strict`` flag.
    """


# ---------------------------------------------------------------- a run


@hookspec
def convnet_train_start(run: RunView) -> None:
    """A run is about to take its first (or, after a resume, its next) step.

    :param run: the run; ``run.step`` is 0, or the resumed step.
    """


@hookspec
def convnet_step_end(run: RunView, step: int, metrics: dict[str, Any]) -> None:
    """An optimizer step finished.

    :param step: steps done so far (1 after the first).
    :param metrics: ``epoch`` (0-based), ``loss`` (the global batch's mean, NaN for a batch
        with no readable sample) and ``lr`` (after the schedule moved it for the next step).
    """


@hookspec
def convnet_evaluation_end(run: RunView, epoch: int, results: dict[str, Any], final: bool) -> None:
    """The evaluators produced ``results`` (after an epoch, or the final evaluation).

    :param epoch: the 0-based epoch just evaluated (for the final evaluation, the number of
        epochs done).
    :param results: every evaluator's numbers merged (``top1_error``, ``top5_error``, ...).
    :param final: True for the evaluation at the end of the run (``when = "end"`` evaluators
        ran too).
    """


# FutureWarning, not DeprecationWarning: Python hides the latter outside __main__, and plugins
# are always loaded from library code, so their authors would never see it.
@hookspec(
    warn_on_impl=FutureWarning(
        "convnet_evaluation_done is deprecated: implement convnet_evaluation_end(run, epoch, results, final)"
    )
)
def convnet_evaluation_done(run: RunView, epoch: int, results: dict[str, Any]) -> None:
    """Deprecated name of ``convnet_evaluation_end`` (still called, with the same results)."""


@hookspec
def convnet_epoch_end(run: RunView, epoch: int, metrics: dict[str, Any]) -> None:
    """An epoch, its evaluation and its checkpoint are done.

    :param epoch: the 0-based epoch that ended.
    :param metrics: the epoch's ``metrics.jsonl`` record: ``kind = "eval"``, ``epoch``, ``step``,
        ``lr``, ``skipped_samples`` and every evaluator number.
    """


@hookspec(firstresult=True)
def convnet_should_stop(run: RunView, epoch: int, metrics: dict[str, Any]) -> bool | None:
    """Return True to stop training after this epoch (early stopping).

    :param metrics: as for ``convnet_epoch_end``.

    Stops at the first non-None result. The run then ends as usual: final evaluation,
    ``convnet_train_end`` with ``summary["stopped_early"] = True``.
    """


@hookspec
def convnet_train_end(run: RunView, summary: dict[str, Any]) -> None:
    """The run finished, stopped, or failed.

    :param summary: on success, ``out``, ``step``, ``epoch``, ``stopped_early``,
        ``skipped_samples``, ``skipped_nonfinite`` and the final evaluation's numbers; on
        failure, ``out``, ``step`` and ``error`` (``"Type: message"``).
    """


# ---------------------------------------------------------------- checkpoints


@hookspec
def convnet_save_state(run: RunView) -> dict[str, Any] | None:
    """Return this plugin's state to store in the checkpoint being written, or None.

    The dict may hold tensors (stored as tensors, bit-exact, copied) and JSON values (numbers,
    strings, lists, dicts of them; tensors inside them too). It is keyed by the plugin's name in the checkpoint and
    handed back by ``convnet_load_state`` on ``--resume``. Called on every process; the main
    process's state is the one saved.
    """


@hookspec
def convnet_load_state(run: RunView, state: dict[str, Any]) -> None:
    """Restore what ``convnet_save_state`` returned, on ``--resume``, before the first step.

    :param state: this plugin's saved dict (tensors back as tensors). Not called when the
        checkpoint holds nothing from this plugin.
    """
