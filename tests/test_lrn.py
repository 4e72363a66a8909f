"""LRN implementations agree with the plainly written formula; the fused CPU kernel in detail.

The CPU kernel is JIT-built once per test session (cached in TORCH_EXTENSIONS_DIR). Where it
cannot be built these tests fail rather than skip: the project ships it, and a machine with
torch but without a C++ compiler is not one CI runs on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.core.errors import RecipeError
from convnet.core.model import LayerContext
from convnet.plugins import lrn
from convnet.plugins.lrn import kernels, local_response_norm
from convnet.plugins.lrn.reference import lrn_reference

TOLERANCE = {  # (rtol, atol) against the reference in the same dtype
    torch.float64: (1e-10, 0.0),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


@pytest.fixture(scope="module")
def cpu_kernel():
    fn = kernels.get("cpu")
    assert fn is not None, f"the cpu LRN kernel did not build: {kernels.failure('cpu')}"
    return fn


def _input(seed: int, shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


params = st.fixed_dictionaries(
    {
        "size": st.integers(1, 9),
        "alpha": st.sampled_from([1e-4, 1e-2]) | st.floats(1e-5, 2.0),
        "beta": st.sampled_from([0.0, 0.5, 0.75, 1.0]) | st.floats(0.0, 1.5),
        "k": st.sampled_from([2.0, 1.0]) | st.floats(0.5, 3.0),
    }
)
shapes = st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 7), st.integers(1, 7))


@settings(max_examples=40)
@given(
    shape=shapes,
    p=params,
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-2, 1.0, 10.0]),
    dtype=st.sampled_from(list(TOLERANCE)),
    memory_format=st.sampled_from([torch.contiguous_format, torch.channels_last]),
)
def test_cpu_kernel_agrees_with_reference(cpu_kernel, shape, p, seed, scale, dtype, memory_format):
    x = _input(seed, shape, scale, dtype).contiguous(memory_format=memory_format)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(cpu_kernel(x, **p), lrn_reference(x, **p), rtol=rtol, atol=atol)


@settings(max_examples=15)
@given(
    shape=shapes,
    p=params,
    seed=st.integers(0, 2**31),
    memory_format=st.sampled_from([torch.contiguous_format, torch.channels_last]),
)
def test_cpu_kernel_gradient_agrees_with_reference_autograd(cpu_kernel, shape, p, seed, memory_format):
    x = _input(seed, shape, 3.0, torch.float64).contiguous(memory_format=memory_format)
    grad = _input(seed + 1, shape, 1.0, torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    cpu_kernel(xa, **p).backward(grad)
    lrn_reference(xb, **p).backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)


def test_channels_last_is_computed_in_place_of_a_copy(cpu_kernel):
    """A channels_last input (train.channels_last) is read and written as NHWC: the op makes no
    layout copy in either direction, and its results keep the layout."""
    from torch.profiler import profile

    x = _input(5, (2, 16, 7, 9), 3.0, torch.float32).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with profile() as prof:
        y = cpu_kernel(x, 5, 1e-2, 0.75, 2.0)
        y.backward(torch.ones_like(y))
    names = [e.name for e in prof.events()]
    assert "convnet::lrn_forward" in names and "convnet::lrn_backward" in names
    assert "aten::copy_" not in names, "the channels_last path copied to NCHW and back"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@settings(max_examples=6)
@given(n=st.integers(1, 2), c=st.integers(1, 8), hw=st.integers(1, 3), p=params, seed=st.integers(0, 2**31))
def test_cpu_kernel_gradcheck_float64(cpu_kernel, n, c, hw, p, seed):
    x = _input(seed, (n, c, hw, hw + 1), 2.0, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: cpu_kernel(t, **p), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@settings(max_examples=20)
@given(shape=shapes, p=params, seed=st.integers(0, 2**31), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_torch_impl_maps_alpha_to_the_papers_convention(shape, p, seed, dtype):
    x = _input(seed, shape, 3.0, dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    torch.testing.assert_close(local_response_norm(x, **p, impl="torch"), lrn_reference(x, **p), rtol=rtol, atol=atol)


def test_alpha_multiplies_the_sum_not_the_mean():
    """One hand-computed value: channel 1 of [1, 2, 3] with size 3 sees 1 + 4 + 9 = 14."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    expected = 2.0 / (2.0 + 0.1 * 14.0) ** 0.75
    assert lrn_reference(x, 3, 0.1, 0.75, 2.0)[0, 1, 0, 0].item() == pytest.approx(expected, rel=1e-14)
    assert F.local_response_norm(x, 3, alpha=0.1, beta=0.75, k=2.0)[0, 1, 0, 0].item() != pytest.approx(expected)


@pytest.mark.parametrize("impl", ["cpu", "auto"])
def test_paper_shape_slice_with_awkward_pixel_count(cpu_kernel, impl):
    """Pixel counts that are not a multiple of the kernel's block, C < size, even size."""
    for shape, size in [((2, 96, 23, 13), 5), ((3, 2, 17, 19), 5), ((1, 7, 16, 16), 4), ((2, 5, 1, 300), 6)]:
        x = _input(sum(shape), shape, 5.0, torch.float64)
        torch.testing.assert_close(
            local_response_norm(x, size, 1e-2, 0.75, 2.0, impl=impl),
            lrn_reference(x, size, 1e-2, 0.75, 2.0),
            rtol=1e-10,
            atol=0.0,
        )


def test_outputs_written_everywhere(cpu_kernel):
    """With deterministic fill, every fresh buffer starts as NaN: any element left unwritten shows."""
    old = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, dtype=torch.float32)).all(), "poisoning is not in effect"
        for dtype in TOLERANCE:
            x = _input(3, (2, 9, 17, 16), 2.0, dtype).requires_grad_(True)
            y = cpu_kernel(x, 5, 1e-3, 0.75, 2.0)
            y.backward(torch.ones_like(y))
            assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), dtype
            rtol, atol = TOLERANCE[dtype]
            torch.testing.assert_close(y, lrn_reference(x.detach(), 5, 1e-3, 0.75, 2.0), rtol=rtol, atol=atol)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.mark.parametrize("layout", ["channels_last", "channel_slice", "pixel_stride", "transposed_hw"])
def test_non_contiguous_inputs(cpu_kernel, layout):
    base = _input(11, (2, 12, 9, 10), 3.0, torch.float64)
    x = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "channel_slice": base[:, 1::2],
        "pixel_stride": base[..., ::3],
        "transposed_hw": base.transpose(2, 3),
    }[layout]
    assert not x.is_contiguous()
    xa, xb = x.clone(memory_format=torch.preserve_format).requires_grad_(True), x.detach().clone().requires_grad_(True)
    ya = cpu_kernel(xa, 5, 1e-2, 0.75, 2.0)
    yb = lrn_reference(xb, 5, 1e-2, 0.75, 2.0)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=0.0)
    grad = _input(12, tuple(x.shape), 1.0, torch.float64)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-12)
    if layout == "channels_last":
        assert ya.is_contiguous(memory_format=torch.channels_last)
        assert xa.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["cpu", "reference", "torch", "auto"])
def test_zero_batch(cpu_kernel, impl):
    x = torch.zeros(0, 6, 5, 5, requires_grad=True)
    y = local_response_norm(x, impl=impl)
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_unknown_impl_names_the_choices():
    with pytest.raises(ValueError, match="reference"):
        local_response_norm(torch.zeros(1, 1, 1, 1), impl="fast")


def test_cpu_kernel_refuses_non_nchw_and_cuda_impl_refuses_cpu_tensor(cpu_kernel):
    with pytest.raises(ValueError, match="NCHW"):
        cpu_kernel(torch.zeros(3, 4, 5), 5, 1e-4, 0.75, 2.0)
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the cuda impl is exercised in test_lrn_cuda.py")
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        local_response_norm(torch.zeros(1, 3, 2, 2), impl="cuda")


def test_auto_falls_back_to_reference_with_one_warning(monkeypatch):
    """No compiler: `auto` warns once, with the reason, and returns the reference result."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(lrn, "_warned", set())
    kernels.get.cache_clear()
    try:
        x = _input(5, (2, 7, 3, 3), 2.0, torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = local_response_norm(x, impl="auto")
            second = local_response_norm(x, impl="auto")
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "no C++ compiler" in messages[0] and "reference" in messages[0]
        torch.testing.assert_close(first, lrn_reference(x), rtol=0, atol=0)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
            local_response_norm(x, impl="cpu")
    finally:
        kernels.get.cache_clear()


def _layer(registries, impl: str, towers: int, cross: bool, channels: int = 8):
    ctx = LayerContext(
        in_shape=(channels, 6, 5),
        towers=towers,
        cross=cross,
        path="model.layers[1]",
        id="lrn1",
        index=1,
        is_last=False,
        device=torch.device("cpu"),
        dtype=torch.float64,
        registries=registries,
    )
    options = lrn.LrnOptions(size=5, alpha=0.05, beta=0.75, k=2.0, impl=impl)
    return registries.layer.get("lrn").factory(options, ctx)


@pytest.mark.parametrize("impl", ["cpu", "reference", "torch", "auto"])
def test_tower_local_layer_normalises_each_tower_separately(registries, cpu_kernel, impl):
    built = _layer(registries, impl, towers=2, cross=False)
    assert built.out_shape == (8, 6, 5)
    x = _input(21, (3, 8, 6, 5), 4.0, torch.float64)
    per_tower = torch.cat([lrn_reference(block, 5, 0.05, 0.75, 2.0) for block in x.split(4, dim=1)], dim=1)
    y = built.module(x)
    torch.testing.assert_close(y, per_tower, rtol=1e-10, atol=0.0)
    across = lrn_reference(x, 5, 0.05, 0.75, 2.0)
    assert not torch.allclose(y[:, 2:6], across[:, 2:6]), "towers must not see each other's channels"
    cross = _layer(registries, impl, towers=2, cross=True)
    torch.testing.assert_close(cross.module(x), across, rtol=1e-10, atol=0.0)
    # channels_last: each tower's block is normalised through a view, and the layout is kept
    nhwc = x.contiguous(memory_format=torch.channels_last)
    y_nhwc = built.module(nhwc)
    torch.testing.assert_close(y_nhwc, per_tower, rtol=1e-10, atol=0.0)
    assert y_nhwc.is_contiguous(memory_format=torch.channels_last) or impl in ("reference", "torch")


def test_layer_rejects_towers_that_do_not_divide_the_channels(registries):
    with pytest.raises(RecipeError, match="model.layers\\[1\\].*divide"):
        _layer(registries, "auto", towers=3, cross=False, channels=8)
    with pytest.raises(RecipeError, match="impl"):
        _layer(registries, "triton", towers=1, cross=True)


def test_build_kernels_command_builds_the_cpu_kernel(cpu_kernel, capsys):
    from convnet.core.cli import main

    assert main(["build-kernels", "--only", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "lrn cpu: built and loaded" in out and "cuda" not in out
    assert main(["build-kernels", "--only", "cpu", "--only", "nosuch"]) == 2  # a typo builds nothing, says so
    assert capsys.readouterr().err == (
        "convnet: error: --only: no kernel named 'nosuch'; the kernels are: cpu, cuda, maxpool, paper-sgd\n"
    )


def test_a_kernel_that_cannot_run_here_fails_at_build_naming_the_layer(registries):
    """impl = "cuda" without a GPU: a recipe error at model build (exit 2), not a traceback mid-epoch."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the cuda impl can run here (test_lrn_cuda.py exercises it)")
    with pytest.raises(RecipeError, match=r"model\.layers\[1\] \(lrn1\): impl = \"cuda\" needs a CUDA device"):
        _layer(registries, "cuda", towers=2, cross=False)
