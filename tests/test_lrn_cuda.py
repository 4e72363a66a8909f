"""The hand-written CUDA LRN kernel: compiled with nvcc on every machine that has it (no GPU
needed, so a syntax or API error fails CI), run against the reference where a GPU is present."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.core import cpp_kernels
from convnet.plugins.lrn import kernels, local_response_norm
from convnet.plugins.lrn.reference import lrn_reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
# Every test that needs a device is also marked `cuda`: `pytest -m cuda` runs them (benchmarks/gpu_check.py does).


@pytest.mark.slow  # about 30 s of nvcc on 2 cores (torch's headers); CI still runs it
def test_cuda_source_compiles_with_nvcc(tmp_path):
    if cpp_kernels.find_nvcc() is None:
        pytest.skip("nvcc not found on PATH, CUDA_HOME or /usr/local/cuda*")
    obj = kernels.compile_cuda_object(tmp_path)
    assert obj.stat().st_size > 0
    # the forward and backward entry points are in the object (names are mangled)
    data = obj.read_bytes()
    assert b"lrn_forward" in data and b"lrn_backward" in data


def test_no_triton_in_the_kernel_path():
    sources = [*kernels.CSRC.iterdir(), kernels.CSRC.parent / "kernels.py", kernels.CSRC.parent / "__init__.py"]
    assert not [s.name for s in sources if "triton" in s.read_text().lower()]


@pytest.fixture(scope="module")
def cuda_kernel():
    fn = kernels.get("cuda")
    assert fn is not None, f"the cuda LRN kernel did not build: {kernels.failure('cuda')}"
    return fn


TOLERANCE = {
    torch.float64: (1e-10, 0.0),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


@pytest.mark.cuda
@needs_gpu
@settings(max_examples=40)
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 12), st.integers(1, 9), st.integers(1, 9)),
    size=st.integers(1, 9),
    alpha=st.floats(1e-5, 2.0),
    beta=st.sampled_from([0.75, 0.5, 1.0, 0.3]),
    k=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from(list(TOLERANCE)),
)
def test_cuda_kernel_agrees_with_reference(cuda_kernel, shape, size, alpha, beta, k, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    rtol, atol = TOLERANCE[dtype]
    expected = lrn_reference(x, size, alpha, beta, k)
    torch.testing.assert_close(cuda_kernel(x.cuda(), size, alpha, beta, k).cpu(), expected, rtol=rtol, atol=atol)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("size", [5, 4, 7, 1])
def test_cuda_gradcheck_float64(cuda_kernel, size):
    x = torch.randn(2, 7, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: cuda_kernel(t, size, 0.1, 0.75, 2.0), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.cuda
@needs_gpu
def test_cuda_outputs_written_everywhere_and_layouts(cuda_kernel):
    old = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.isnan(torch.empty(4, device="cuda")).all(), "poisoning is not in effect"
        base = torch.randn(3, 96, 23, 29, dtype=torch.float64) * 4
        for x in (base, base.contiguous(memory_format=torch.channels_last), base[:, ::2], base[..., ::3]):
            xa = x.cuda().requires_grad_(True)
            xb = x.clone().requires_grad_(True)
            ya, yb = cuda_kernel(xa, 5, 1e-3, 0.75, 2.0), lrn_reference(xb, 5, 1e-3, 0.75, 2.0)
            g = torch.randn_like(yb)
            ya.backward(g.cuda())
            yb.backward(g)
            torch.testing.assert_close(ya.cpu(), yb, rtol=1e-10, atol=0.0)
            torch.testing.assert_close(xa.grad.cpu(), xb.grad, rtol=1e-9, atol=1e-12)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.mark.cuda
@needs_gpu
def test_auto_picks_cuda_on_cuda_tensors(cuda_kernel):
    x = torch.randn(0, 6, 5, 5, device="cuda")
    assert local_response_norm(x, impl="auto").shape == x.shape
    x = torch.randn(2, 6, 5, 5, device="cuda")
    torch.testing.assert_close(local_response_norm(x, impl="auto"), cuda_kernel(x, 5, 1e-4, 0.75, 2.0), rtol=0, atol=0)


HOST_HARNESS = r"""
// Runs the CUDA kernel's per-column code on the CPU (float64), for the reference comparison.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "lrn_cuda_columns.h"
using namespace convnet_lrn;

int main(int argc, char** argv) {
  if (argc != 12) return 2;
  const int64_t N = atoll(argv[3]), C = atoll(argv[4]), HW = atoll(argv[5]), size = atoll(argv[6]);
  const double alpha = atof(argv[7]), beta = atof(argv[8]), k = atof(argv[9]);
  const bool force_generic = atoi(argv[10]) != 0;
  const int64_t length = (C + atoll(argv[11]) - 1) / atoll(argv[11]);
  const size_t n = size_t(N * C * HW);
  std::vector<double> x(n), g(n), y(n, -1.0 / 0.0), scale(n, 0.0 / 0.0), dx(n, 0.0 / 0.0), terms(n);
  FILE* in = fopen(argv[1], "rb");
  if (!in || fread(x.data(), 8, n, in) != n || fread(g.data(), 8, n, in) != n) return 3;
  fclose(in);
  const Window w = clipped_window(size, C);
  const Geometry geo{N * HW, HW, C, (C + length - 1) / length, length};
  const int64_t items = geo.pixels * geo.segments;
  const PowerKind kind = power_kind(beta);
  const bool registers = !force_generic && w.below == 2 && w.above == 2;
  const double coef = 2.0 * alpha * beta;
  for (int64_t idx = 0; idx < items; ++idx) {
    const Column col = column_of(idx, geo);
    if (registers) forward_column_registers<double, double, 2, 2>(x.data(), y.data(), scale.data(), col, geo, alpha, beta, k, kind);
    else forward_column_generic<double, double>(x.data(), y.data(), scale.data(), col, geo, int(w.below), int(w.above), alpha, beta, k, kind);
  }
  if (!registers) {
    for (int64_t idx = 0; idx < items; ++idx)
      backward_terms_column_generic<double, double>(g.data(), x.data(), scale.data(), terms.data(), column_of(idx, geo), geo, int(w.below), int(w.above), alpha, k);
  }
  for (int64_t idx = 0; idx < items; ++idx) {
    const Column col = column_of(idx, geo);
    if (registers) backward_column_registers<double, double, 2, 2>(g.data(), x.data(), scale.data(), dx.data(), col, geo, alpha, k, coef);
    else backward_column_generic<double, double>(g.data(), x.data(), scale.data(), terms.data(), dx.data(), col, geo, int(w.below), int(w.above), coef);
  }
  FILE* out = fopen(argv[2], "wb");
  fwrite(y.data(), 8, n, out);
  fwrite(dx.data(), 8, n, out);
  fclose(out);
  return 0;
}
"""


@pytest.fixture(scope="module")
def host_harness(tmp_path_factory):
    """The CUDA kernel's column code compiled as plain C++ (no GPU, no nvcc needed)."""
    import os
    import shutil
    import subprocess

    cxx = shutil.which(os.environ.get("CXX", "c++"))
    assert cxx is not None, "no C++ compiler to build the host harness"
    folder = tmp_path_factory.mktemp("lrn_cuda_host")
    (folder / "harness.cpp").write_text(HOST_HARNESS)
    exe = folder / "harness"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", f"-I{kernels.CSRC}", str(folder / "harness.cpp"), "-o", str(exe)],
        check=True,
        capture_output=True,
        text=True,
    )
    return exe


@pytest.mark.parametrize(
    "shape, size, alpha, beta, k, generic, segments",
    [
        ((2, 7, 3, 5), 5, 1e-2, 0.75, 2.0, False, 1),  # the paper's window, in registers
        ((2, 7, 3, 5), 5, 1e-2, 0.75, 2.0, True, 1),  # the same through the generic path
        ((2, 23, 3, 5), 5, 1e-2, 0.75, 2.0, False, 4),  # channels cut into runs (few pixels)
        ((2, 23, 3, 5), 5, 1e-2, 0.75, 2.0, False, 23),  # one channel per run
        ((2, 23, 3, 5), 6, 1e-2, 0.75, 2.0, False, 3),  # runs on the generic path
        ((1, 3, 4, 4), 5, 0.3, 0.6, 1.0, False, 1),  # C < size: clipped to the register window
        ((1, 3, 4, 4), 9, 0.3, 1.0, 1.0, False, 2),  # a wide window on 3 channels: also (2, 2)
        ((2, 2, 3, 3), 5, 0.3, 0.75, 1.5, False, 1),  # C = 2: generic
        ((2, 10, 3, 4), 4, 0.1, 0.5, 2.0, False, 1),  # even size
        ((1, 12, 2, 3), 7, 0.05, 0.3, 0.7, False, 1),
        ((3, 1, 2, 2), 1, 0.5, 0.75, 2.0, False, 1),
        ((2, 11, 1, 5), 5, 1e-4, 0.0, 2.0, False, 1),
    ],
)
def test_cuda_column_code_on_the_host_agrees_with_reference(
    host_harness, tmp_path, shape, size, alpha, beta, k, generic, segments
):
    import subprocess

    import numpy as np

    gen = torch.Generator().manual_seed(sum(shape) + size)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    (tmp_path / "in.bin").write_bytes(x.numpy().tobytes() + grad.numpy().tobytes())
    n, c, h, w = shape
    subprocess.run(
        [
            str(host_harness),
            str(tmp_path / "in.bin"),
            str(tmp_path / "out.bin"),
            str(n),
            str(c),
            str(h * w),
            str(size),
            repr(alpha),
            repr(beta),
            repr(k),
            str(int(generic)),
            str(segments),
        ],
        check=True,
    )
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64))
    y, dx = out[: x.numel()].reshape(shape), out[x.numel() :].reshape(shape)
    xr = x.clone().requires_grad_(True)
    expected = lrn_reference(xr, size, alpha, beta, k)
    expected.backward(grad)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-10, atol=0.0)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-9, atol=1e-12)


PAPER_SHAPES = [(128, 96, 55, 55), (128, 256, 27, 27)]  # conv1 and conv2 outputs, whole network


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other image: not contiguous in any format
        return x[::2]
    return x


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("shape", PAPER_SHAPES, ids=["conv1", "conv2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("size", [5, 4], ids=["odd5", "even4"])
def test_cuda_kernel_at_the_papers_shapes(cuda_kernel, shape, dtype, layout, size):
    """Forward and backward against the float64 reference on the same device."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 3
    x = _layout(base.to(dtype), layout).requires_grad_(True)
    xr = _layout(base.to(dtype), layout).double().requires_grad_(True)
    grad = torch.randn(x.shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)
    rtol, atol = TOLERANCE[dtype]
    y = cuda_kernel(x, size, 1e-4, 0.75, 2.0)
    yr = lrn_reference(xr, size, 1e-4, 0.75, 2.0)
    torch.testing.assert_close(y.double(), yr, rtol=rtol, atol=atol)
    y.backward(grad)
    yr.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=rtol, atol=atol)
