"""Resume is bit-exact on CPU: N steps straight = k steps, stop, resume, N - k steps.

The tiny recipe has dropout (keyed by step and sample: nothing to restore), a plateau schedule that drops
the lr at every epoch end (the schedule state must be restored) and 4 steps per epoch, so the
cut can fall inside an epoch, on its last step (before the epoch's evaluation) or between
epochs. The cut is made either by ``train.max_steps`` or by a real SIGINT sent to this
process, which the engine turns into a checkpoint at the next step boundary.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core import checkpoint as ckpt
from convnet.core import plugins
from convnet.core.engine import Interrupted, Run
from convnet.core.hookspecs import hookimpl

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
STEPS_PER_EPOCH, EPOCHS = 4, 3


def model_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items() if k.startswith("model/")}


def all_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items()}


def train(out: Path, *overrides: str, resume: Path | None = None) -> dict:
    recipe = cn.load_recipe(TINY, list(overrides))
    return cn.train(recipe, out=out, resume=resume)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


_straight: dict[int, tuple[dict[str, bytes], tuple]] = {}


def outcome(out: Path) -> tuple:
    """What a run leaves that a resume must reproduce besides the weights: its saved position and
    best value, and best.safetensors' weights."""
    last, best = out / "checkpoints" / "last.safetensors", out / "checkpoints" / "best.safetensors"
    state = ckpt.state_of(ckpt.load(last)[1], last)
    return state["step"], state["epoch"], state["best"], model_bytes(best) if best.exists() else None


def straight(n: int, tmp: Path, with_outcome: bool = False):
    if n not in _straight:
        out = tmp / f"straight-{n}"
        train(out, f"train.max_steps={n}")
        _straight[n] = (model_bytes(out / "checkpoints" / "last.safetensors"), outcome(out))
    return _straight[n] if with_outcome else _straight[n][0]


class _SigintAtStep:
    """A real SIGINT delivered to this process right after step ``k`` (a hook plugin)."""

    def __init__(self, k: int) -> None:
        self.k = k

    @hookimpl
    def convnet_step_end(self, run, step, metrics) -> None:
        if step == self.k:
            signal.raise_signal(signal.SIGINT)


def interrupt_at(out: Path, k: int, n: int) -> None:
    pm, regs = plugins.create_manager()
    pm.register(_SigintAtStep(k))
    recipe = cn.load_recipe(TINY, [f"train.max_steps={n}"], regs)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match=f"(?s)interrupted at step {k};.*--resume"):
        Run(recipe, out=out, registries=regs, pm=pm).train()
    assert signal.getsignal(signal.SIGINT) is before


def test_six_straight_equals_three_resume_three(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, "train.max_steps=6")
    first = train(b, "train.max_steps=3")
    assert first["step"] == 3
    last = b / "checkpoints" / "last.safetensors"
    assert ckpt.state_of(ckpt.load(last)[1], last)["step"] == 3
    second = train(b, "train.max_steps=6", resume=last)
    assert second["step"] == 6
    wa, wb = model_bytes(a / "checkpoints" / "last.safetensors"), model_bytes(last)
    assert wa.keys() == wb.keys() and len(wa) == 6
    assert wa == wb
    # every tensor of the checkpoint: optimizer state and the torch, numpy and python generators too
    everything = [all_bytes(a / "checkpoints" / "last.safetensors"), all_bytes(last)]
    assert {"rng/torch", "rng/numpy", "rng/python"} <= everything[0].keys()
    assert everything[0].keys() == everything[1].keys()
    assert [k for k in everything[0] if everything[0][k] != everything[1][k]] == []
    # and the weights did move: 3 steps are not 6
    assert model_bytes(last) != straight(3, tmp_path)


@settings(max_examples=8)
@given(n=st.integers(2, STEPS_PER_EPOCH * EPOCHS), data=st.data(), how=st.sampled_from(["max_steps", "sigint"]))
def test_resume_anywhere_is_bit_exact(tmp_path_factory, n: int, data, how: str) -> None:
    k = data.draw(st.integers(1, n - 1), label="k")
    tmp = tmp_path_factory.mktemp("resume")
    out = tmp / "cut"
    if how == "sigint":
        interrupt_at(out, k, n)
    else:
        train(out, f"train.max_steps={k}")
    last = out / "checkpoints" / "last.safetensors"
    assert ckpt.state_of(ckpt.load(last)[1], last)["step"] == k
    summary = train(out, f"train.max_steps={n}", resume=last)
    assert summary["step"] == n
    assert (model_bytes(last), outcome(out)) == straight(n, tmp_path_factory.getbasetemp(), with_outcome=True)


def test_a_stop_mid_epoch_does_not_change_what_best_means_after_a_resume(tmp_path: Path) -> None:
    """max_steps = 3 ends mid-epoch with a final evaluation; resumed to 12 steps, the best value
    and best.safetensors are those of the run that never stopped."""
    out = tmp_path / "cut"
    train(out, "train.max_steps=3")
    train(out, "train.max_steps=12", resume=out / "checkpoints" / "last.safetensors")
    assert (model_bytes(out / "checkpoints" / "last.safetensors"), outcome(out)) == straight(
        12, tmp_path, with_outcome=True
    )


def test_resume_replays_the_pending_epoch_end(tmp_path: Path) -> None:
    """Cut on an epoch's last step (before its evaluation): the resumed run evaluates that
    epoch and drops the lr exactly as the straight run did, and logs it once."""
    out = tmp_path / "cut"
    interrupt_at(out, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)
    assert not [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    train(out, f"train.max_steps={2 * STEPS_PER_EPOCH}", resume=out / "checkpoints" / "last.safetensors")
    ref = tmp_path / "ref"
    train(ref, f"train.max_steps={2 * STEPS_PER_EPOCH}")

    def evals(folder: Path) -> list[str]:
        return [line for line in (folder / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]

    assert evals(out) == evals(ref) and len(evals(ref)) == 2
    assert model_bytes(out / "checkpoints" / "last.safetensors") == model_bytes(
        ref / "checkpoints" / "last.safetensors"
    )


def test_resume_restores_rng_and_optimizer_state(tmp_path: Path) -> None:
    out = tmp_path / "r"
    train(out, "train.max_steps=2")
    tensors, meta = ckpt.load(out / "checkpoints" / "last.safetensors")
    state = ckpt.state_of(meta, out / "checkpoints" / "last.safetensors")
    assert {"rng/torch", "rng/numpy", "rng/python"} <= tensors.keys()
    velocities = [k for k in tensors if k.startswith("optimizer/") and k.endswith("/velocity")]
    assert len(velocities) == 6 and all(tensors[k].abs().sum() > 0 for k in velocities)
    assert state["step"] == 2 and state["epoch"] == 0 and state["batch_in_epoch"] == 2
    assert "schedule" in state and "optimizer_groups" in state


class _SigintDuringEvaluation:
    @hookimpl
    def convnet_evaluation_end(self, run, epoch, results) -> None:
        if epoch == 0:
            signal.raise_signal(signal.SIGINT)


def test_sigint_during_an_evaluation_stops_at_the_epoch_boundary(tmp_path: Path) -> None:
    pm, regs = plugins.create_manager()
    pm.register(_SigintDuringEvaluation())
    n = 2 * STEPS_PER_EPOCH
    recipe = cn.load_recipe(TINY, [f"train.max_steps={n}"], regs)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted, match=f"interrupted at step {STEPS_PER_EPOCH};"):
        Run(recipe, out=out, registries=regs, pm=pm).train()
    last = out / "checkpoints" / "last.safetensors"
    state = ckpt.state_of(ckpt.load(last)[1], last)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (STEPS_PER_EPOCH, 1, 0)
    train(out, f"train.max_steps={n}", resume=last)
    assert model_bytes(last) == straight(n, tmp_path)


def test_resume_refuses_a_checkpoint_of_a_run_that_trains_differently(tmp_path):
    out = tmp_path / "run"
    train(out, "train.max_steps=2")
    last = out / "checkpoints" / "last.safetensors"
    with pytest.raises(cn.CheckpointError, match=r"train\.optimizer\.lr \(checkpoint: 0\.05, now: 0\.5\)") as info:
        train(tmp_path / "other", "train.optimizer.lr=0.5", resume=last)
    assert str(last) in str(info.value)
    # What does not change the run's result may change: more epochs, no step cap, another strategy.
    result = train(tmp_path / "longer", f"train.epochs={EPOCHS + 1}", "parallel.strategy=model-parallel", resume=last)
    assert result["step"] == STEPS_PER_EPOCH * (EPOCHS + 1)


def test_channels_last_resumes_bit_exactly_and_stays_near_the_contiguous_run(tmp_path: Path) -> None:
    """train.channels_last (NHWC convolutions, the CPU LRN kernel on NHWC, in-place ReLUs): 6 steps
    straight = 3, resume, 3 in every tensor; the checkpoint has the contiguous run's names and
    shapes, and its weights are the contiguous run's to float32 rounding (another summation order)."""
    kernel = 'model.layers.lrn1.impl="cpu"'
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(a, "train.max_steps=6", "train.channels_last=true", kernel)
    train(b, "train.max_steps=3", "train.channels_last=true", kernel)
    last = b / "checkpoints" / "last.safetensors"
    resumed = Run(cn.load_recipe(TINY, ["train.max_steps=6", "train.channels_last=true", kernel]), out=b, resume=last)
    resumed.train()
    # the velocities come back in their parameters' layout, so the fused paper-SGD step still takes them
    conv = [p for p in resumed.parts.parameters.values() if p.dim() == 4]
    assert conv and all(resumed.parts.optimizer.state[p]["velocity"].stride() == p.stride() for p in conv)
    straight_cl = all_bytes(a / "checkpoints" / "last.safetensors")
    assert [k for k, v in all_bytes(last).items() if straight_cl[k] != v] == []
    train(c, "train.max_steps=6", kernel)
    nhwc, nchw = (
        load_file(str(a / "checkpoints" / "last.safetensors")),
        load_file(str(c / "checkpoints" / "last.safetensors")),
    )
    assert nhwc.keys() == nchw.keys()
    for key in (k for k in nchw if k.startswith("model/")):
        assert nhwc[key].shape == nchw[key].shape and nhwc[key].is_contiguous()
        torch.testing.assert_close(nhwc[key], nchw[key], rtol=1e-4, atol=1e-5, msg=key)


class _CountingSGD(torch.optim.SGD):
    """Keeps a Python int per parameter (as third-party optimizers do): its step count."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["count"] = self.state[p].get("count", 0) + 1
        return super().step(closure)


def test_numbers_in_an_optimizers_state_survive_a_resume(tmp_path: Path) -> None:
    """A step counter kept as a Python int: 3 steps, resume, 5 more counts 8, as straight."""
    from convnet.plugins.optim import SGDOptions

    pm, regs = plugins.create_manager()
    regs.optimizer.add(
        "counting-sgd", lambda options, ctx: _CountingSGD([p for _, p in ctx.parameters], lr=options.lr), SGDOptions
    )

    def run(out: Path, steps: int, resume: Path | None = None) -> Run:
        recipe = cn.load_recipe(TINY, [f"train.max_steps={steps}", "train.optimizer.name=counting-sgd"], regs)
        done = Run(recipe, out=out, registries=regs, pm=pm, resume=resume)
        done.train()
        return done

    first = run(tmp_path / "cut", 3)
    assert {first.parts.optimizer.state[p]["count"] for p in first.parts.module.parameters()} == {3}
    resumed = run(tmp_path / "cut", 8, resume=tmp_path / "cut" / "checkpoints" / "last.safetensors")
    assert {resumed.parts.optimizer.state[p]["count"] for p in resumed.parts.module.parameters()} == {8}
    assert model_bytes(tmp_path / "cut" / "checkpoints" / "last.safetensors") == model_bytes(
        run(tmp_path / "straight", 8).checkpoints.path()
    )


class _LabellingSGD(torch.optim.SGD):
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["label"] = "seen"
        return super().step(closure)


def test_optimizer_state_a_checkpoint_cannot_hold_is_named_in_a_warning(tmp_path: Path) -> None:
    from convnet.plugins.optim import SGDOptions

    pm, regs = plugins.create_manager()
    regs.optimizer.add(
        "labelling-sgd", lambda options, ctx: _LabellingSGD([p for _, p in ctx.parameters], lr=options.lr), SGDOptions
    )
    recipe = cn.load_recipe(TINY, ["train.max_steps=1", "train.optimizer.name=labelling-sgd"], regs)
    with pytest.warns(UserWarning, match=r"_LabellingSGD keeps per-parameter state .*conv1\.weight/label \(str\)"):
        Run(recipe, out=tmp_path / "run", registries=regs, pm=pm).train()


def test_resume_without_out_continues_in_the_checkpoints_own_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """--resume DIR/checkpoints/last.safetensors continues DIR (its metrics, its report); a copy of
    the checkpoint kept elsewhere has no run folder of its own and starts a fresh one."""
    from convnet.core.cli import main

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first"
    train(first, "train.max_steps=2")
    last = first / "checkpoints" / "last.safetensors"
    assert main(["run", str(TINY), "--set", "train.max_steps=4", "--resume", str(last), "--quiet"]) == 0
    assert f"run folder: {first}" in capsys.readouterr().out
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4] and not (tmp_path / "runs").exists()
    # given from inside checkpoints/, and past a metrics line that is not UTF-8 (a damaged file)
    with (first / "metrics.jsonl").open("ab") as f:
        f.write(b"\xff\xfe{\n")
    monkeypatch.chdir(last.parent)
    assert main(["run", str(TINY), "--set", "train.max_steps=5", "--resume", last.name, "--quiet"]) == 0
    assert f"run folder: {first}" in capsys.readouterr().out
    assert not (last.parent / "runs").exists()
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(last.read_bytes())
    assert main(["run", str(TINY), "--set", "train.max_steps=6", "--resume", str(copy), "--quiet"]) == 0
    fresh = Path(capsys.readouterr().out.split("run folder: ", 1)[1].strip())
    assert fresh.parts[0] == "runs" and (tmp_path / fresh / "metrics.jsonl").is_file()
