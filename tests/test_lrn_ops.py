"""The LRN kernels as custom operators: opcheck, torch.compile(fullgraph=True), torch.export.

``torch.library.opcheck`` runs the op through its schema, fake rule, autograd registration and
AOT dispatch and compares each with the real kernel, so a fake rule that lies about a stride
or a dtype, or a backward that is not registered properly, fails here.
"""

from __future__ import annotations

import pytest
import torch

from convnet.core.model import build_model
from convnet.core.recipe import load_recipe
from convnet.plugins.lrn import kernels, local_response_norm, ops
from convnet.plugins.lrn.reference import lrn_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAPER = (5, 1e-4, 0.75, 2.0)


@pytest.fixture(scope="module")
def cpu_kernel():
    fn = kernels.get("cpu")
    assert fn is not None, f"the cpu LRN kernel did not build: {kernels.failure('cpu')}"
    return fn


def _input(shape, dtype=torch.float32, seed=0, channels_last=False, requires_grad=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).mul(3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def _opcheck_cases(device: str):
    recomputes = ops.recomputes_scale(torch.device(device))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for channels_last in (False, True):
            for save_scale in (True, False):
                needs_grad = save_scale or recomputes  # an unsaved scale is recomputed by the CPU backward
                x = _input((2, 7, 5, 6), dtype, 1, channels_last, requires_grad=needs_grad).to(device)
                yield (x, 5, 1e-2, 0.75, 2.0, save_scale)
    yield (_input((0, 6, 3, 3), requires_grad=True).to(device), 5, 1e-4, 0.75, 2.0, True)
    yield (_input((1, 3, 4, 4), torch.float64, 2, requires_grad=True).to(device), 4, 0.3, 0.6, 1.0, True)


def test_opcheck_cpu(cpu_kernel):
    for args in _opcheck_cases("cpu"):
        torch.library.opcheck(torch.ops.convnet.lrn_forward.default, args)
    x = _input((2, 7, 5, 6), torch.float64)
    for save_scale in (True, False):
        _, scale = torch.ops.convnet.lrn_forward(x, 5, 1e-2, 0.75, 2.0, save_scale)
        args = (torch.ones_like(x), x, scale, 5, 1e-2, 0.75, 2.0)
        torch.library.opcheck(torch.ops.convnet.lrn_backward.default, args)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [3, 4])
def test_double_backward_through_the_kernel_is_exact(cpu_kernel, channels_last, size):
    """A gradient penalty differentiates the LRN's backward: gradgradcheck in float64, and the
    penalty's gradient equals the reference formula's."""
    x = _input((2, 6, 4, 5), torch.float64, 3, channels_last, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: ops.lrn(t, size, 0.3, 0.75, 1.0), (x,))

    def penalty_grad(fn):
        y = fn(x * 0.5)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), x)[0]

    want = penalty_grad(lambda t: lrn_reference(t, size, 0.5, 0.75, 1.0))
    torch.testing.assert_close(penalty_grad(lambda t: ops.lrn(t, size, 0.5, 0.75, 1.0)), want)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_opcheck_cuda():
    assert kernels.get("cuda") is not None, kernels.failure("cuda")
    for args in _opcheck_cases("cuda"):
        torch.library.opcheck(torch.ops.convnet.lrn_forward.default, args)


def test_fake_rule_keeps_the_layout_and_the_accumulation_dtype(cpu_kernel):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype, acc in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        real = _input((2, 8, 4, 3), dtype, channels_last=True)
        with FakeTensorMode() as mode:
            fake_y, fake_scale = torch.ops.convnet.lrn_forward(mode.from_tensor(real), *PAPER, True)
        y, scale = torch.ops.convnet.lrn_forward(real, *PAPER, True)
        assert (fake_y.stride(), fake_y.dtype, fake_scale.dtype) == (y.stride(), y.dtype, acc)
        assert fake_scale.stride() == scale.stride()
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert scale.is_contiguous(memory_format=torch.channels_last)
        assert scale.shape == real.shape and scale.dtype == acc


def test_save_scale_false_writes_no_scale(cpu_kernel):
    x = _input((1, 4, 2, 2))
    _, scale = torch.ops.convnet.lrn_forward(x, *PAPER, False)
    assert scale.numel() == 0
    with torch.no_grad():  # the public path saves nothing when no backward can follow
        torch.testing.assert_close(cpu_kernel(x, *PAPER), lrn_reference(x, *PAPER))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("shape", "size", "beta"),
    [
        ((2, 7, 5, 6), 5, 0.75),
        ((2, 96, 9, 9), 5, 0.75),
        ((2, 4, 3, 3), 4, 0.6),  # even size, general power
        ((2, 1, 3, 3), 3, 0.5),  # a window wider than the channels
        ((1, 6, 300, 2), 7, 1.0),  # more pixels than one block of the NCHW kernel
    ],
)
def test_the_cpu_backward_recomputes_an_unsaved_scale_bit_for_bit(cpu_kernel, channels_last, dtype, shape, size, beta):
    """Training on the CPU does not save the scale (ops.lrn): its gradient must be the saved one's."""
    x = _input(shape, dtype, 3, channels_last)
    grad = _input(shape, dtype, 4, channels_last)
    args = (size, 1e-2, beta, 2.0)
    _, saved = torch.ops.convnet.lrn_forward(x, *args, True)
    _, unsaved = torch.ops.convnet.lrn_forward(x, *args, False)
    assert unsaved.numel() == 0
    expected = torch.ops.convnet.lrn_backward(grad, x, saved, *args)
    assert torch.equal(torch.ops.convnet.lrn_backward(grad, x, unsaved, *args), expected)
    x.requires_grad_(True)
    local_response_norm(x, *args, impl="cpu").backward(grad)
    assert torch.equal(x.grad, expected), "the public path recomputes the scale and gets the same gradient"


def test_a_backward_with_the_scale_of_another_call_is_refused(cpu_kernel):
    x = _input((1, 4, 2, 2))
    _, scale = torch.ops.convnet.lrn_forward(_input((1, 4, 3, 3)), *PAPER, True)
    with pytest.raises(RuntimeError, match="shapes differ"):
        torch.ops.convnet.lrn_backward(torch.ones_like(x), x, scale, *PAPER)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_cuda_op_refuses_a_backward_without_its_scale():
    assert kernels.get("cuda") is not None, kernels.failure("cuda")
    x = _input((1, 4, 2, 2), requires_grad=True).cuda()
    with pytest.raises(RuntimeError, match="save_scale=False"):
        torch.ops.convnet.lrn_forward(x, *PAPER, False)
    with torch.no_grad():
        _, unsaved = torch.ops.convnet.lrn_forward(x, *PAPER, False)
        with pytest.raises(RuntimeError, match="needs the scale saved"):
            torch.ops.convnet.lrn_backward(torch.ones_like(x), x, unsaved, *PAPER)


@pytest.mark.slow  # inductor compiles C++ on 2 cores
@pytest.mark.parametrize("impl", ["cpu", "auto"])
def test_compile_fullgraph_forward_and_backward_match_eager(cpu_kernel, impl):
    """One graph (fullgraph=True fails on any break), and the compiled backward is the kernel's."""

    def f(t):
        return local_response_norm(t, 5, 1e-2, 0.75, 2.0, impl=impl).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    xa, xb = _input((2, 8, 5, 5), requires_grad=True), _input((2, 8, 5, 5), requires_grad=True)
    compiled(xa).backward()
    f(xb).backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_aot_graphs_hold_the_ops_not_their_decomposition(cpu_kernel):
    from torch._functorch.aot_autograd import aot_function, make_boxed_func

    seen: list[str] = []

    def collect(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    f = aot_function(lambda t: local_response_norm(t, *PAPER, impl="cpu"), fw_compiler=collect, bw_compiler=collect)
    f(_input((2, 6, 3, 3), requires_grad=True)).sum().backward()
    assert "convnet.lrn_forward.default" in seen and "convnet.lrn_backward.default" in seen


def test_export_traces_the_papers_network_with_the_op(cpu_kernel, registries):
    recipe = load_recipe("alexnet-imagenet", [], registries)
    torch.manual_seed(0)
    model = build_model(recipe, "cpu", registries).eval()
    x = torch.randn(2, 3, 227, 227)
    program = torch.export.export(model, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("convnet.lrn_forward.default") == 2, "conv1's and conv2's LRN, tower-local"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_accumulation_dtype_is_the_kernels_opmath():
    assert ops.accumulation_dtype(torch.bfloat16) == torch.float32
    assert ops.accumulation_dtype(torch.float16) == torch.float32
    assert ops.accumulation_dtype(torch.float64) == torch.float64
