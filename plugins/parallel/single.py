"""The whole model on one device; towers are grouped convolutions."""

from __future__ import annotations

import os

import attrs

from convnet.core import BuildContext, Strategy, resolve_device, valid_device


@attrs.define
class SingleOptions:
    device: str = attrs.field(default="auto", validator=valid_device)


def require_one_process(label: str, ctx: BuildContext) -> None:
    """A one-process strategy started by torchrun as one of several processes would train that
    many independent copies (each into its own folder, or fighting over one)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or "1")
    if world > 1:
        raise ctx.error(
            f'"{label}" runs in one process, but torchrun started {world} (WORLD_SIZE={world}): each '
            'would train alone. Launch it without torchrun, or use "ddp" or "tower-parallel"'
        )


def build_single(options: SingleOptions, ctx: BuildContext) -> Strategy:
    require_one_process("single", ctx)
    return Strategy(resolve_device(options.device))
