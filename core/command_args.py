"""The arguments every recipe-reading command shares, for ``convnet``'s own commands and for
the commands plugins add (``convnet_add_commands``): a plugin's command then reads recipes
exactly as ``convnet run`` does (``args.recipe``, ``args.overrides`` for ``load_recipe``)."""

from __future__ import annotations

import argparse

RECIPE_HELP = "bundled recipe name or path to a .toml file"


def add_overrides_argument(
    parser: argparse.ArgumentParser, help: str = "override a recipe value, e.g. --set train.epochs=2 (repeatable)"
) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """``RECIPE`` (positional, into ``args.recipe``) and ``--set KEY=VALUE``."""
    parser.add_argument("recipe", metavar="RECIPE", help=RECIPE_HELP)
    add_overrides_argument(parser)
