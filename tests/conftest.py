"""Hypothesis profiles (chosen by HYPOTHESIS_PROFILE; tox sets it) and shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "fast", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "full", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def registries():
    from convnet.core import plugins

    return plugins.registries()


@pytest.fixture(scope="session", autouse=True)
def cpu_kernel_built_once():
    """Build the C++ kernels (LRN, max-pool, the paper's SGD step) before any test, as `convnet
    build-kernels` would.

    Subprocess tests (`convnet run` children) then load them from the cache instead of each
    compiling them, which would cost time and, for the memory-bounded fault test, the
    compiler's own memory. A machine without a compiler builds nothing: `auto` falls back.
    """
    from convnet.plugins.layers import max_pool_kernel
    from convnet.plugins.lrn import kernels
    from convnet.plugins.optim import fused_step

    kernels.get("cpu")
    max_pool_kernel.available()
    fused_step.available()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: on 2 cores a second torch thread only waits on the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
