"""The whole model on one device; towers are grouped convolutions."""

from __future__ import annotations

import attrs

from convnet.core import BuildContext, Strategy, resolve_device, valid_device


@attrs.define
class SingleOptions:
    device: str = attrs.field(default="auto", validator=valid_device)


def build_single(options: SingleOptions, ctx: BuildContext) -> Strategy:
    return Strategy(resolve_device(options.device))
