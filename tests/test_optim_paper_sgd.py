"""The paper's SGD form against its equations, and where it parts from torch.optim.SGD.

v_{i+1} = 0.9 v_i - 0.0005 eps w_i - eps <dL/dw>_i
w_{i+1} = w_i + v_{i+1}
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convnet.core import OptimizerContext, ScheduleContext, cpp_kernels, load_plugins, load_recipe
from convnet.plugins.optim import SGDOptions, build_paper_sgd, fused_step
from convnet.plugins.optim.paper_sgd import PaperSGD
from convnet.plugins.optim.schedules import CosineOptions, CosineSchedule, PlateauOptions, PlateauSchedule

MU, WD = 0.9, 5e-4


def optimizer_context(named: list) -> OptimizerContext:
    return OptimizerContext(named, load_recipe("alexnet-digits"), load_plugins())


def schedule_context(opt: torch.optim.Optimizer, steps_per_epoch: int = 10, epochs: int = 3) -> ScheduleContext:
    return ScheduleContext(
        opt, steps_per_epoch, steps_per_epoch * epochs, load_recipe("alexnet-digits"), load_plugins()
    )


def grad_of(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient of 0.5 * sum((w - target)^2) * (1 + w^2): a nonlinear loss, written by hand."""
    return (w - target) * (1 + w * w) + (w - target) ** 2 * w


def loss_of(w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (0.5 * (w - target) ** 2 * (1 + w * w)).sum()


def run_optimizer(opt_cls, lrs: list[float], w0: torch.Tensor, target: torch.Tensor, **kw) -> list[torch.Tensor]:
    w = nn.Parameter(w0.clone())
    opt = opt_cls([w], lr=lrs[0], momentum=MU, weight_decay=WD, **kw)
    history = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss_of(w, target).backward()
        opt.step()
        history.append(w.detach().clone())
    return history


def paper_equations(lrs: list[float], w0: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    w, v, history = w0.clone(), torch.zeros_like(w0), []
    for eps in lrs:
        v = MU * v - WD * eps * w - eps * grad_of(w, target)
        w = w + v
        history.append(w.clone())
    return history


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(7)
    return torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)


# 6 steps at 0.01, then the paper's division by 10, then again.
SCHEDULE = [0.01] * 6 + [0.001] * 6 + [0.0001] * 4


def test_hand_gradient_is_the_autograd_gradient(problem):
    w0, target = problem
    w = w0.clone().requires_grad_(True)
    loss_of(w, target).backward()
    torch.testing.assert_close(w.grad, grad_of(w0, target), rtol=1e-12, atol=1e-12)


def test_paper_sgd_follows_the_papers_equations_step_by_step(problem):
    w0, target = problem
    ours = run_optimizer(PaperSGD, SCHEDULE, w0, target)
    paper = paper_equations(SCHEDULE, w0, target)
    for step, (a, b) in enumerate(zip(ours, paper)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"step {step + 1}")


def test_same_as_torch_sgd_while_lr_is_constant(problem):
    w0, target = problem
    ours = run_optimizer(PaperSGD, SCHEDULE[:6], w0, target)
    torchs = run_optimizer(torch.optim.SGD, SCHEDULE[:6], w0, target)
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_differs_from_torch_sgd_after_an_lr_drop_exactly_as_predicted(problem):
    """torch keeps b (no lr inside) and steps w -= lr * b, so a drop rescales all past momentum
    at once; the paper's velocity holds the old, larger steps and lets them decay by 0.9.
    On the first step after the drop the difference is mu * (lr_old - lr_new) * b_old."""
    w0, target = problem
    lrs = SCHEDULE[:7]
    ours = run_optimizer(PaperSGD, lrs, w0, target)
    torchs = run_optimizer(torch.optim.SGD, lrs, w0, target)
    torch.testing.assert_close(ours[5], torchs[5], rtol=1e-12, atol=1e-14)
    # Rebuild torch's buffer b after step 6: v = -lr_old * b in the paper's terms.
    paper = paper_equations(lrs[:6], w0, target)
    v_old = paper[5] - paper[4]
    b_old = -v_old / lrs[5]
    w6 = paper[5]
    g = grad_of(w6, target) + WD * w6
    torch_step = -(lrs[6]) * (MU * b_old + g)
    paper_step = MU * v_old - lrs[6] * g
    torch.testing.assert_close(torchs[6] - w6, torch_step, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(ours[6] - w6, paper_step, rtol=1e-9, atol=1e-14)
    gap = ours[6] - torchs[6]
    torch.testing.assert_close(gap, MU * (lrs[6] - lrs[5]) * b_old, rtol=1e-9, atol=1e-14)
    assert gap.abs().max() > 1e-4  # not a rounding difference: the velocities really differ


def test_weight_decay_skips_biases_unless_asked():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(1.0)
    named = list(layer.named_parameters())
    opt = build_paper_sgd(SGDOptions(lr=0.1, momentum=0.9, weight_decay=0.5), optimizer_context(named))
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(layer.weight, torch.full_like(layer.weight, 1 - 0.5 * 0.1))
    assert torch.equal(layer.bias, torch.ones_like(layer.bias))
    opt = build_paper_sgd(
        SGDOptions(lr=0.1, momentum=0.9, weight_decay=0.5, decay_biases=True), optimizer_context(named)
    )
    opt.step()
    assert torch.allclose(layer.bias, torch.full_like(layer.bias, 1 - 0.5 * 0.1))


def test_plateau_divides_by_ten_when_validation_error_stops_improving_three_times_at_most():
    w = nn.Parameter(torch.zeros(1))
    opt = PaperSGD([w], lr=0.01)
    sched = PlateauSchedule(PlateauOptions(factor=0.1, patience=1, max_reductions=3), schedule_context(opt))
    errors = [0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    lrs = []
    for e in errors:
        sched.after_epoch(e)
        lrs.append(opt.param_groups[0]["lr"])
    drops = [i for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * 0.5]
    assert len(drops) == 3
    assert lrs[-1] == pytest.approx(0.01 / 1000)
    assert lrs[:2] == [0.01, 0.01]  # improving: no drop


def test_cosine_warms_up_linearly_then_follows_half_a_cosine_to_min_lr():
    w = nn.Parameter(torch.zeros(1))
    opt = PaperSGD([w], lr=0.1)
    sched = CosineSchedule(CosineOptions(warmup_steps=5, warmup_start=0.2, min_lr=0.001), schedule_context(opt, 10, 3))
    lrs = [opt.param_groups[0]["lr"]]
    for step in range(1, 31):
        sched.after_step(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.02)  # warmup_start x lr before the first step
    assert lrs[:6] == pytest.approx([0.1 * (0.2 + 0.8 * t / 5) for t in range(6)])
    assert lrs[5] == pytest.approx(0.1)  # the peak, then only down
    assert all(a > b for a, b in itertools.pairwise(lrs[5:]))
    assert lrs[5 + 25 // 2] < 0.1 * 0.6 and lrs[-1] == pytest.approx(0.001)  # total = 3 epochs x 10 steps
    mid = 5 + 12.5
    assert sched.lr_at(17, 0.1) > sched.lr_at(18, 0.1) and pytest.approx(sched.lr_at(mid, 0.1)) == 0.001 + 0.099 * 0.5


def test_cosine_state_restores_the_same_lr_sequence():
    w = nn.Parameter(torch.zeros(1))
    a, b = PaperSGD([w], lr=0.05), PaperSGD([w], lr=0.05)
    first = CosineSchedule(CosineOptions(warmup_steps=2), schedule_context(a, 4, 2))
    for step in range(1, 4):
        first.after_step(step)
    second = CosineSchedule(CosineOptions(warmup_steps=2), schedule_context(b, 4, 2))
    second.load_state_dict(first.state_dict())
    second.after_step(3)
    assert b.param_groups[0]["lr"] == a.param_groups[0]["lr"]


def test_cosine_with_no_room_after_warm_up_is_a_recipe_error():
    opt = PaperSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps = 30 leaves no step"):
        CosineSchedule(CosineOptions(warmup_steps=30), schedule_context(opt, 10, 3))


@pytest.mark.parametrize("fused", [False, True], ids=["multi-tensor", "fused"])
def test_step_is_bit_identical_to_the_per_tensor_equations(fused):
    """Both forms of the step (torch._foreach_* over all parameters, or the fused operator) give
    the per-tensor equations' bits; a parameter without a gradient is left alone (and gets no
    velocity)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(50, 30), (7,), (3, 4, 5, 5), (2, 2)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = PaperSGD(params, lr=0.01, momentum=MU, weight_decay=WD, fused=fused)
    expected = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in expected]
    for step, lr in enumerate([0.01, 0.01, 0.001, 0.001]):
        opt.param_groups[0]["lr"] = lr
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params[:-1], grads):
            p.grad = g
        opt.step()
        for i in range(len(shapes) - 1):
            velocity[i].mul_(MU).add_(expected[i], alpha=-WD * lr).add_(grads[i], alpha=-lr)
            expected[i].add_(velocity[i])
        for p, e in zip(params, expected):
            assert torch.equal(p.detach(), e), f"step {step}"
    assert "velocity" not in opt.state[params[-1]]


# The fused step (convnet::paper_sgd_) gives the multi-tensor form's bits where both fuse the
# multiply-adds: ATen's AVX2/AVX-512 kernels and a kernel built with FMA. Elsewhere they may
# differ by a rounding.
SAME_ROUNDING = cpp_kernels.has_avx2() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture(scope="module")
def fused_kernel():
    assert fused_step.available(), f"the fused paper-SGD step did not build: {fused_step.failure()}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    if SAME_ROUNDING:
        assert torch.equal(_bits(a), _bits(b))  # bit for bit, the sign of zeros included
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _trajectory(fused, shapes, dtype, channels_last, lrs, momentum, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    if channels_last:
        params = [nn.Parameter(p.detach().to(memory_format=torch.channels_last)) if p.dim() == 4 else p for p in params]
    groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
    opt = PaperSGD(
        [g for g in groups if g["params"]], lr=lrs[0], momentum=momentum, weight_decay=weight_decay, fused=fused
    )
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype).to(memory_format=_layout(p))
        opt.step()
    return params, [opt.state[p]["velocity"] for p in params]


def _layout(p: torch.Tensor) -> torch.memory_format:
    if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 37), min_size=1, max_size=4).map(tuple), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    channels_last=st.booleans(),
    lrs=st.lists(st.sampled_from([0.0, 1e-4, 0.001, 0.01, 0.1]), min_size=1, max_size=4),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_fused_step_gives_the_multi_tensor_forms_bits(
    fused_kernel, shapes, dtype, channels_last, lrs, momentum, weight_decay, seed
):
    args = (shapes, dtype, channels_last, lrs, momentum, weight_decay, seed)
    w_multi, v_multi = _trajectory(False, *args)
    w_fused, v_fused = _trajectory(True, *args)
    for a, b in zip([*w_multi, *v_multi], [*w_fused, *v_fused]):
        assert a.stride() == b.stride()
        _same(a, b)


def test_fused_step_on_alexnet_sized_parameters(fused_kernel):
    """fc6's 9216 x 4096 weights split across threads, conv1's channels_last weights, odd biases."""
    shapes = [(4096, 9216), (96, 3, 11, 11), (1000,), (4096,)]
    args = (shapes, torch.float32, True, [0.01, 0.01, 0.001], MU, WD, 5)
    w_multi, v_multi = _trajectory(False, *args)
    w_fused, v_fused = _trajectory(True, *args)
    for a, b in zip([*w_multi, *v_multi], [*w_fused, *v_fused]):
        _same(a, b)


def test_fused_step_passes_opcheck(fused_kernel):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4, 4)]
    params, grads, velocities = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(3))
    torch.library.opcheck(torch.ops.convnet.paper_sgd_.default, (params, grads, velocities, 0.9, -5e-6, -0.01))
    torch.library.opcheck(torch.ops.convnet.paper_sgd_.default, (params, grads, velocities, 0.9, None, -0.01))


def test_parameters_the_fused_step_does_not_take_get_the_multi_tensor_step(fused_kernel):
    """bfloat16 and a gradient whose layout differs from its parameter's: the default uses the
    multi-tensor form for those and the operator for the rest, with the same numbers as all
    multi-tensor; fused=True names the parameter it cannot take."""

    def run(fused):
        gen = torch.Generator().manual_seed(1)
        params = [
            nn.Parameter(torch.randn(6, 5, generator=gen)),
            nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.bfloat16)),
            nn.Parameter(torch.randn(8, 6, generator=gen)),
        ]
        opt = PaperSGD(params, lr=0.1, fused=fused)
        for _ in range(3):
            params[0].grad = torch.randn(6, 5, generator=gen)
            params[1].grad = torch.randn(4, 3, generator=gen, dtype=torch.bfloat16)
            params[2].grad = torch.randn(6, 8, generator=gen).t()  # strides (1, 8), not (6, 1)
            opt.step()
        return params

    for a, b in zip(run(None), run(False)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"fused=True.*\(4, 3\) torch.bfloat16"):
        run(True)


def test_without_a_compiler_the_default_keeps_the_multi_tensor_step_and_fused_true_says_why(tmp_path):
    """A machine with no C++ compiler (CXX names none) and an empty build cache: the default step
    still runs, with the multi-tensor form's numbers; fused=True fails naming the reason."""
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from convnet.plugins.optim import fused_step
        from convnet.plugins.optim.paper_sgd import PaperSGD

        def run(fused):
            w = nn.Parameter(torch.arange(6.0))
            opt = PaperSGD([w], lr=0.1, fused=fused)
            w.grad = torch.ones(6)
            opt.step()
            return w

        assert not fused_step.available()
        assert torch.equal(run(None), run(False))
        try:
            run(True)
        except RuntimeError as exc:
            print(exc)
        """
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "PaperSGD(fused=True): the fused step cannot be built here" in done.stdout
    assert "no C++ compiler" in done.stdout and "no-such-compiler" in done.stdout


def test_build_kernels_builds_the_fused_step(fused_kernel, capsys):
    from convnet.core.cli import main

    assert main(["build-kernels", "--only", "paper-sgd"]) == 0
    assert "optimizer paper-sgd: built and loaded" in capsys.readouterr().out
