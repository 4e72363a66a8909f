"""Errors a user sees as one clear line (the CLI turns them into exit codes)."""
from __future__ import annotations


class ConvnetError(Exception):
    """Something the user can fix; printed without a traceback, exit code 1."""

    exit_code = 1


class RecipeError(ConvnetError):
    """A bad recipe or command line: names the path to the bad value. Exit code 2."""

    exit_code = 2


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
