"""Datasets: digits (real, bundled with scikit-learn) and synthetic."""
from __future__ import annotations

from convnet.core.hookspecs import hookimpl
from convnet.core.registry import Registries
from convnet.plugins.data.digits import DigitsOptions, build_digits
from convnet.plugins.data.synthetic import SyntheticOptions, build_synthetic


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.dataset.add("digits", build_digits, DigitsOptions,
                           "scikit-learn's 1,797 8x8 handwritten digits, upsampled to model.input")
    registries.dataset.add("synthetic", build_synthetic, SyntheticOptions,
                           "random images and labels of model.input's shape (smoke tests, benchmarks)")
