"""Errors a user sees as one clear line (the CLI turns them into exit codes)."""

from __future__ import annotations


class ConvnetError(Exception):
    """Something the user can fix; printed without a traceback, exit code 1.

    ``exit_now``: leave the process right after the message, skipping interpreter teardown
    (after a lost peer, the process group's C++ threads cannot be destroyed cleanly and
    would abort the process, hiding the exit code).
    """

    exit_code = 1
    exit_now = False


class RecipeError(ConvnetError):
    """A bad recipe or command line: names the path to the bad value. Exit code 2.

    ``unknown``: (kind, name) when the error is a component no loaded plugin provides;
    ``unknowns``: every such (kind, name) when the recipe names several.
    """

    exit_code = 2
    unknown: tuple[str, str] | None = None
    unknowns: list[tuple[str, str]] = []  # noqa: RUF012 (never mutated: instances assign a new list)


class PluginError(ConvnetError):
    """A plugin failed to load or registered something wrong; names plugin and distribution."""

    exit_code = 2


class CheckpointError(ConvnetError):
    """A checkpoint that cannot be used: names the file and what is wrong."""

    exit_code = 1


class DataError(ConvnetError):
    """A dataset that cannot be read: names the path and the expected layout."""

    exit_code = 1


class NonFiniteLossError(ConvnetError):
    """Training produced a NaN or infinite loss."""

    exit_code = 1
