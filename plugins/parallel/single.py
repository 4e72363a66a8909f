"""The whole model on one device; towers are grouped convolutions."""
from __future__ import annotations

import attrs

from convnet.core.strategy import Strategy, resolve_device


def _device(instance, attribute, value: str) -> None:
    resolve_device(value)


@attrs.define
class SingleOptions:
    device: str = attrs.field(default="auto", validator=_device)


def build_single(options: SingleOptions, ctx) -> Strategy:
    return Strategy(resolve_device(options.device))
