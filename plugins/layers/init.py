"""Weight initialisation as layer options (the paper's N(0, 0.01) and constant biases)."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch import nn

WEIGHT_INITS = ("normal", "kaiming", "xavier", "torch")


@attrs.define
class InitOptions:
    """Mixin fields for layers with weights.

    ``weight_init = "normal"`` draws N(0, weight_std) as the paper does (std 0.01);
    ``"kaiming"``/``"xavier"`` scale by fan-in, useful for small networks trained briefly;
    ``"torch"`` keeps PyTorch's default. ``bias`` is the constant every bias starts at.
    """

    weight_init: str = attrs.field(default="normal", validator=v.in_(WEIGHT_INITS), kw_only=True)
    weight_std: float = attrs.field(default=0.01, validator=v.ge(0), kw_only=True)
    bias: float = attrs.field(default=0.0, kw_only=True)


def initialise(module: nn.Module, options: InitOptions) -> None:
    weight = module.weight
    if weight.device.type == "meta":
        return
    with torch.no_grad():
        if options.weight_init == "normal":
            weight.normal_(0.0, options.weight_std)
        elif options.weight_init == "kaiming":
            nn.init.kaiming_normal_(weight, nonlinearity="relu")
        elif options.weight_init == "xavier":
            nn.init.xavier_normal_(weight)
        if module.bias is not None and options.weight_init != "torch":
            module.bias.fill_(options.bias)
