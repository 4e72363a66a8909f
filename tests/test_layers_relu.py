"""The relu layer rectifies in place only where nothing needs the unrectified tensor, and the
numbers (forward and gradients) are the same as an out-of-place ReLU's either way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convnet.core import build_model, load_recipe
from convnet.plugins.layers.shapeless import ReLU, rectify_in_place_is_safe


def _conv_output() -> tuple[nn.Conv2d, torch.Tensor]:
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    return conv, conv(x)


def test_a_conv_output_is_rectified_in_place_with_the_same_values_and_gradient():
    conv, y = _conv_output()
    expected = torch.relu(y.detach())
    out = ReLU(inplace=True)(y)
    assert out.data_ptr() == y.data_ptr(), "the conv output was copied, not rectified in place"
    assert torch.equal(out, expected)
    out.sum().backward()
    grad_in_place = conv.weight.grad.clone()
    conv.weight.grad = None
    torch.relu(conv(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)))).sum().backward()
    assert torch.equal(grad_in_place, conv.weight.grad)


@pytest.mark.parametrize("producer", ["tanh", "sigmoid", "view", "leaf", "no-grad", "option off"])
def test_out_of_place_where_the_input_is_needed_or_not_ours(producer):
    conv, y = _conv_output()
    inplace = producer != "option off"
    if producer == "tanh":
        x = torch.tanh(y)  # tanh's backward reads its output
    elif producer == "sigmoid":
        x = torch.sigmoid(y)
    elif producer == "view":
        x = y[:, :2]
    elif producer == "leaf":
        x = y.detach().requires_grad_(True)
    elif producer == "no-grad":
        with torch.no_grad():
            x = conv(torch.randn(2, 3, 6, 6))
    else:
        x = y
    before = x.detach().clone()
    out = ReLU(inplace=inplace)(x)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x.detach(), before), "the input was overwritten"
    assert not rectify_in_place_is_safe(x) or not inplace
    if x.requires_grad:  # the producer's backward still sees what it saved
        out.sum().backward()


def test_tanh_then_relu_gradient_is_right():
    w = torch.randn(5, requires_grad=True, generator=torch.Generator().manual_seed(1))
    ReLU(inplace=True)(torch.tanh(w * 3)).sum().backward()
    got = w.grad.clone()
    w.grad = None
    torch.relu(torch.tanh(w * 3)).sum().backward()
    assert torch.equal(got, w.grad)


def test_a_training_step_is_bit_identical_with_inplace_on_and_off(registries):
    """alexnet-digits: conv/fc outputs rectified in place give the same loss and gradients."""
    recipe = load_recipe("alexnet-digits", registries=registries)
    shape = (4, *recipe.model.input)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    y = torch.arange(4) % recipe.model.num_classes
    results = []
    safe_inputs: list[bool] = []

    def record(_module: nn.Module, args: tuple[torch.Tensor]) -> None:
        safe_inputs.append(rectify_in_place_is_safe(args[0]))

    for inplace in (True, False):
        model = build_model(recipe, "cpu", registries).train()
        relus = [m for m in model.modules() if isinstance(m, ReLU)]
        assert relus and all(m.inplace for m in relus), "relu's inplace option defaults to true"
        safe_inputs.clear()
        for m in relus:
            m.inplace = inplace
            m.register_forward_pre_hook(record)
        torch.manual_seed(3)  # the dropout layers draw from torch's generator outside a training step
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert sum(safe_inputs) == len(relus), "every relu of alexnet-digits follows a conv or an fc"
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
