"""The basic layers: conv, fc, relu, tanh, maxpool, avgpool, dropout, flatten."""

from __future__ import annotations

from convnet.core import Registries, hookimpl
from convnet.plugins.layers import shapeless as s
from convnet.plugins.layers.conv import ConvOptions, build_conv
from convnet.plugins.layers.linear import LinearOptions, build_linear


@hookimpl
def convnet_register(registries: Registries) -> None:
    add = registries.layer.add
    add("conv", build_conv, ConvOptions, '2-D convolution; grouped by tower unless towers = "cross"')
    add("fc", build_linear, LinearOptions, "fully connected; block-diagonal by tower unless cross")
    add("relu", s.build_relu, s.ReluOptions, "rectified linear unit max(0, x)")
    add("tanh", s.build_tanh, s.NoOptions, "hyperbolic tangent (the paper's saturating baseline)")
    add("maxpool", s.build_maxpool, s.MaxPoolOptions, "max pooling (3x3 stride 2 overlaps, as the paper)")
    add("avgpool", s.build_avgpool, s.PoolOptions, "average pooling")
    add("dropout", s.build_dropout, s.DropoutOptions, "dropout with probability p (0.5 in the paper)")
    add("flatten", s.build_flatten, s.NoOptions, "[C, H, W] -> [C*H*W], tower blocks kept contiguous")
