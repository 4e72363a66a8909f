"""Datasets: digits (real, bundled with scikit-learn), synthetic, and ImageNet from disk."""
from __future__ import annotations

from convnet.core import Registries, hookimpl
from convnet.plugins.data.digits import DigitsOptions, build_digits
from convnet.plugins.data.imagenet import ImageNetOptions, build_imagenet
from convnet.plugins.data.synthetic import SyntheticOptions, build_synthetic


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.dataset.add("digits", build_digits, DigitsOptions,
                           "scikit-learn's 1,797 8x8 handwritten digits, upsampled to model.input")
    registries.dataset.add("synthetic", build_synthetic, SyntheticOptions,
                           "random images and labels of model.input's shape (smoke tests, benchmarks)")
    registries.dataset.add("imagenet", build_imagenet, ImageNetOptions,
                           "ILSVRC-2012 from disk (ImageFolder or devkit layout), shorter side 256, centre crop")
