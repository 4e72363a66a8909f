"""The relu and maxpool layers under ``torch.compile``: for CPU training they call torch's eager
kernels through opaque custom ops (``convnet.plugins.layers.eager_kernels``), elsewhere the
standard ATen ops, and the numbers are those of eager either way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convnet.plugins.layers import eager_kernels
from convnet.plugins.layers.shapeless import MaxPool2d, ReLU

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _input(channels_last: bool = False, requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(2, 6, 11, 11, generator=torch.Generator().manual_seed(0))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_ops_pass_opcheck(channels_last):
    x = _input(channels_last)
    torch.library.opcheck(eager_kernels.relu, (x,))
    torch.library.opcheck(eager_kernels.max_pool2d, (x, 3, 2, 1))
    y = torch.relu(x.detach())
    torch.library.opcheck(eager_kernels.relu_backward, (torch.randn_like(y), y))
    out, indices = torch.ops.aten.max_pool2d_with_indices(x.detach(), [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(eager_kernels.max_pool2d_backward, (torch.randn_like(out), x.detach(), indices, 3, 2, 1))


def test_the_backward_ops_lay_out_their_result_as_aten_does():
    """The fake rules must give the real strides: a ReLU's gradient takes its output's layout
    whatever the incoming gradient's (a flatten after a channels_last ReLU hands back NCHW), and
    max-pool's takes the input's suggested format (a transposed input gives a contiguous one)."""
    y = torch.relu(_input(True).detach())
    torch.library.opcheck(eager_kernels.relu_backward, (torch.randn(y.shape), y))
    x = _input().detach().transpose(2, 3)
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
    torch.library.opcheck(eager_kernels.max_pool2d_backward, (torch.randn_like(out), x, indices, 3, 2, 1))


def test_the_ops_give_eager_values_and_gradients_bit_for_bit():
    x, x_ref = _input(True), _input(True)
    y, _ = eager_kernels.max_pool2d(eager_kernels.relu(x), 3, 2, 0)
    y_ref = nn.functional.max_pool2d(torch.relu(x_ref), 3, 2, 0)
    assert torch.equal(y, y_ref) and y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


class _Recorder:
    """A torch.compile backend that keeps the ops Dynamo traced and runs the graph as it is."""

    def __init__(self) -> None:
        self.targets: list[object] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        self.targets += [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


def _traced(module: nn.Module, x: torch.Tensor) -> list[object]:
    recorder = _Recorder()
    torch._dynamo.reset()
    torch.compile(module, backend=recorder, fullgraph=True)(x)
    return recorder.targets


OPAQUE = {torch.ops.convnet.relu.default, torch.ops.convnet.max_pool2d.default}


def _layers(opaque: bool = True) -> nn.Sequential:
    return nn.Sequential(ReLU(True, opaque), MaxPool2d(3, 2, 0, opaque))


def test_compiled_training_on_the_cpu_calls_the_opaque_ops():
    assert set(_traced(_layers(), _input())) >= OPAQUE


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_training_pools_nchw_with_convnets_kernel(channels_last):
    """``impl = "auto"``: an NCHW input goes to the NCHW kernel's op (``max_pool_kernel``), a
    channels_last one to torch's kernel through ``convnet::max_pool2d``; eager's numbers both ways."""
    from convnet.plugins.layers import max_pool_kernel

    assert max_pool_kernel.available(), max_pool_kernel.failure()
    pool = MaxPool2d(3, 2, 0, True, impl="auto")
    nchw = torch.ops.convnet.max_pool2d_nchw.default
    targets = set(_traced(pool, _input(channels_last)))
    assert (nchw in targets) != channels_last
    assert (torch.ops.convnet.max_pool2d.default in targets) == channels_last
    x, x_ref = _input(channels_last), _input(channels_last)
    torch._dynamo.reset()
    y, y_ref = torch.compile(pool, fullgraph=True)(x), nn.functional.max_pool2d(x_ref, 3, 2)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("case", ["option off", "no grad", "input without grad", "not the cpu"])
def test_elsewhere_the_layers_trace_to_standard_ops(case):
    module, x = _layers(opaque=case != "option off"), _input(requires_grad=case in ("option off", "not the cpu"))
    if case == "not the cpu":  # a GPU is not here; the meta device stands for any other device
        x = torch.empty_like(x, device="meta").requires_grad_()
    if case == "no grad":
        x.requires_grad_(True)
        with torch.no_grad():
            targets = _traced(module, x)
    else:
        targets = _traced(module, x)
    assert not OPAQUE & set(targets)
    assert targets, "nothing was traced"


def test_export_keeps_aten_ops_for_other_runtimes():
    module = _layers().train()
    program = torch.export.export(module, (_input(requires_grad=True),))
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(name.startswith("convnet.") for name in names), names
    assert any("max_pool2d" in name for name in names), names


def test_inductor_training_step_matches_eager():
    """Compiled with inductor (the default backend), a conv -> relu -> maxpool -> fc step gives
    eager's loss and gradients within float32 rounding (the conv and fc are inductor's to fuse)."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(6, 8, 3), ReLU(True, True), MaxPool2d(3, 2, 0, True), nn.Flatten(), nn.Linear(128, 3)
        )

    eager, compiled = net(), net()
    torch._dynamo.reset()
    compiled.compile(fullgraph=True)
    x = _input(True, requires_grad=False)
    losses = []
    for module in (eager, compiled):
        loss = module(x).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_channels_last_relu_before_a_flatten_matches_eager():
    """The flatten's backward hands the ReLU an NCHW gradient while its output is channels_last:
    the compiled step must still run, with eager's gradients."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Conv2d(6, 4, 3), ReLU(True, True), nn.Flatten(), nn.Linear(4 * 9 * 9, 5))
        return module.to(memory_format=torch.channels_last)

    eager, compiled = net(), net()
    torch._dynamo.reset()
    compiled.compile(fullgraph=True)
    x = _input(True, requires_grad=False)
    for module in (eager, compiled):
        module(x).square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_double_backward_through_the_opaque_ops_matches_eager():
    """A gradient penalty (create_graph=True) under a backend that runs the traced graph as it is."""

    def penalty_grads(module: nn.Module) -> list[torch.Tensor]:
        x = _input()
        (gx,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()
        return [p.grad for p in module.parameters()]

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(6, 4, 3), ReLU(True, True), nn.Conv2d(4, 4, 3), MaxPool2d(3, 2, 1, True))

    eager, compiled = net(), net()
    recorder = _Recorder()
    torch._dynamo.reset()
    traced = torch.compile(compiled, backend=recorder, fullgraph=True)
    for a, b in zip(penalty_grads(eager), penalty_grads(traced)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert set(recorder.targets) >= OPAQUE


@pytest.mark.parametrize("change", ["ceil_mode", "dilation"])
def test_a_max_pool_changed_after_it_was_built_keeps_torchs_path(change):
    """The op is square, dilation 1, floor mode; a module set otherwise must not call it."""
    pool = MaxPool2d(3, 2, 0, True)
    setattr(pool, change, True if change == "ceil_mode" else 2)
    module, x = nn.Sequential(ReLU(True, True), pool), _input()
    assert torch.ops.convnet.max_pool2d.default not in _traced(module, x)
    assert torch.compile(module, backend=_Recorder())(x).shape == module(x).shape
