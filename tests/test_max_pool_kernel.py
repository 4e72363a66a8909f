"""The NCHW CPU max-pool kernel (``convnet::max_pool2d_nchw``): torch's values and argmax indices
bit for bit, NaN and tie rules included, so the ``maxpool`` layer trains to the same bits with it
(``impl = "auto"``) as with torch's kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convnet.plugins.layers import max_pool_kernel
from convnet.plugins.layers.shapeless import MaxPool2d

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert max_pool_kernel.available(), f"the max-pool kernel did not build: {max_pool_kernel.failure()}"


def _torch(x: torch.Tensor, kernel: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.max_pool2d_with_indices(x, [kernel, kernel], [stride, stride])


def _assert_same(x: torch.Tensor, kernel: int, stride: int) -> None:
    (y, i), (y_ref, i_ref) = max_pool_kernel.max_pool2d(x, kernel, stride), _torch(x, kernel, stride)
    assert torch.equal(i, i_ref)
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert torch.equal(y.nan_to_num(), y_ref.nan_to_num())


@settings(max_examples=300, deadline=None)
@given(
    kernel=st.integers(1, 5),
    stride=st.integers(1, 4),
    extra=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    planes=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from(["none", "nan", "inf", "all -inf"]),
)
def test_values_and_indices_are_torchs(kernel, stride, extra, planes, dtype, seed, special):
    """Few distinct values, so windows hold ties; NaN and infinities where asked."""
    g = torch.Generator().manual_seed(seed)
    shape = (*planes, kernel + extra[0], kernel + extra[1])
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    where = torch.rand(shape, generator=g)
    if special == "nan":
        x[where < 0.15] = float("nan")
    elif special == "inf":
        x[where < 0.1] = float("inf")
        x[where > 0.9] = -float("inf")
    elif special == "all -inf":
        x.fill_(-float("inf"))
    _assert_same(x, kernel, stride)


@pytest.mark.parametrize("shape", [(2, 96, 55, 55), (2, 256, 27, 27), (2, 256, 13, 13)])
def test_alexnets_pools_after_relu(shape):
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    _assert_same(x, 3, 2)


def test_the_op_passes_opcheck():
    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.convnet.max_pool2d_nchw.default, (x, 3, 2))


def _x(**layout) -> torch.Tensor:
    x = torch.randn(2, 6, 13, 13, generator=torch.Generator().manual_seed(2))
    return x.to(**layout).requires_grad_() if layout else x.requires_grad_()


def _grad_fn(module: nn.Module, x: torch.Tensor) -> str:
    return type(module(x).grad_fn).__name__


def test_the_layer_trains_to_torchs_bits_through_the_kernel():
    pool, x, x_ref = MaxPool2d(3, 2, 0, impl="auto"), _x(), _x()
    y, y_ref = pool(x), nn.functional.max_pool2d(x_ref, 3, 2)
    assert "max_pool2d_nchw" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():
        assert torch.equal(pool(x), y_ref)


@pytest.mark.parametrize(
    "case", ['impl = "torch"', "channels_last", "padding", "bfloat16", "a window larger than the input"]
)
def test_elsewhere_the_layer_keeps_torchs_kernel(case):
    pool = MaxPool2d(3, 2, 1 if case == "padding" else 0, impl="torch" if case.startswith("impl") else "auto")
    x = {
        "channels_last": _x(memory_format=torch.channels_last),
        "bfloat16": _x(dtype=torch.bfloat16),
        "a window larger than the input": torch.randn(1, 2, 2, 5, requires_grad=True),
    }.get(case, _x())
    if case == "a window larger than the input":
        with pytest.raises(RuntimeError, match="Output size is too small"):
            pool(x)
        return
    assert _grad_fn(pool, x) == "MaxPool2DWithIndicesBackward0"


def test_forward_mode_ad_and_vmap_keep_torchs_kernel():
    pool, x = MaxPool2d(3, 2, 0, impl="auto"), _x().detach()
    t = torch.randn_like(x)
    y, jvp = torch.func.jvp(pool, (x,), (t,))
    y_ref, jvp_ref = torch.func.jvp(lambda a: nn.functional.max_pool2d(a, 3, 2), (x,), (t,))
    assert torch.equal(y, y_ref) and torch.equal(jvp, jvp_ref)
    assert torch.equal(torch.func.vmap(pool)(x[None])[0], y_ref)


def test_without_a_compiler_the_layer_keeps_torchs_kernel(tmp_path):
    script = textwrap.dedent(
        """
        import torch
        from convnet.plugins.layers import max_pool_kernel
        from convnet.plugins.layers.shapeless import MaxPool2d

        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        y = MaxPool2d(3, 2, 0, impl="auto")(x)
        assert not max_pool_kernel.available()
        assert type(y.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0", y.grad_fn
        print(max_pool_kernel.failure())
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "no C++ compiler" in done.stdout


def test_build_kernels_builds_it(capsys):
    from convnet.core.cli import main

    assert main(["build-kernels", "--only", "maxpool"]) == 0
    assert "layer maxpool: built and loaded" in capsys.readouterr().out


def test_a_huge_stride_costs_nothing_and_a_huge_plane_keeps_torchs_kernel(tmp_path):
    """The kernel's scratch is sized by the row, not the stride; a plane of 2^31 elements or more
    (rows are int32 in the kernel) is torch's to pool."""
    x = torch.randn(1, 2, 13, 13, generator=torch.Generator().manual_seed(3))
    _assert_same(x, 3, 10**9)
    _assert_same(x, 13, 2**31 - 1)
    y, i = max_pool_kernel.max_pool2d(x, 13, 2**40)  # past ATen's int: one window, the whole plane
    assert torch.equal(y.flatten(), x.flatten(2).amax(2).flatten())
    assert torch.equal(i.flatten(), x.flatten(2).argmax(2).flatten())
    big = tmp_path / "plane.bin"
    with big.open("wb") as f:  # a sparse file: no memory or disk is used
        f.truncate((2**31 + 2) * 4)
    plane = torch.from_file(str(big), shared=True, size=2**31 + 2).view(1, 1, 2, 2**30 + 1)
    assert not max_pool_kernel.fits(plane, 2, 2, 0)
    assert max_pool_kernel.fits(plane.view(2, 1, 1, 2**30 + 1), 2, 1, 0) is False  # too short for the window
    assert max_pool_kernel.fits(plane[..., :1000], 2, 2, 0) is False  # a slice: not contiguous


def test_a_relu_after_the_kernel_still_works_in_place():
    from convnet.plugins.layers.shapeless import ReLU

    pooled = MaxPool2d(3, 2, 0, impl="auto")(_x())
    assert "max_pool2d_nchw" in type(pooled.grad_fn).__name__
    assert ReLU(True, True)(pooled).data_ptr() == pooled.data_ptr()


def test_a_module_given_tuples_after_it_was_built_keeps_nns_path():
    pool, x = MaxPool2d(3, 2, 0, impl="auto"), _x()
    pool.kernel_size, pool.stride = (3, 3), (2, 2)
    assert _grad_fn(pool, x) == "MaxPool2DWithIndicesBackward0"
    assert torch.equal(pool(x), nn.functional.max_pool2d(x, 3, 2))
