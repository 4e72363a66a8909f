"""tower-parallel and ddp in real processes (gloo on this CPU) against single, and a rank
that dies mid-run. Every launch has a hard timeout and its own free port."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core.engine import Run

LAUNCH_TIMEOUT = 120  # seconds; a launch that takes longer is killed and the test fails

# Every kind of exchange tower-parallel has: the image replicated into a cross conv, local
# layers, a cross conv reading both towers (conv3 -> whole, its 3 maps do not split in 2),
# a replicated activation read by a cross conv (conv4), a replicated tensor scattered into
# a local fc (fc6), a cross fc (fc7), and the last layer whole (5 classes).
TINY = """
seed = 3
parallel = { strategy = "single", device = "cpu" }
evaluate = [{ name = "topk", k = [1, 2] }]
[model]
input = [3, 16, 16]
num_classes = 5
towers = 2
layers = [
    { name = "conv", id = "conv1", towers = "cross", out = 8, kernel = 3, padding = 1, weight_init = "kaiming" },
    { name = "relu" },
    { name = "lrn", impl = "reference" },
    { name = "maxpool", kernel = 2, stride = 2 },
    { name = "conv", id = "conv2", out = 8, kernel = 3, padding = 1, weight_init = "kaiming", bias = 0.1 },
    { name = "relu" },
    { name = "conv", id = "conv3", towers = "cross", out = 3, kernel = 3, padding = 1, weight_init = "kaiming" },
    { name = "relu" },
    { name = "conv", id = "conv4", towers = "cross", out = 4, kernel = 3, padding = 1, weight_init = "kaiming" },
    { name = "relu" },
    { name = "maxpool", kernel = 2, stride = 2 },
    { name = "conv", id = "conv5", towers = "cross", out = 3, kernel = 1, weight_init = "kaiming" },
    { name = "flatten" },
    { name = "fc", id = "fc6", out = 16, weight_init = "kaiming", bias = 0.1 },
    { name = "relu" },
    { name = "fc", id = "fc7", towers = "cross", out = 16, weight_init = "kaiming" },
    { name = "relu" },
    { name = "dropout", p = 0.5 },
    { name = "fc", id = "fc8", towers = "cross", out = 5, weight_init = "kaiming" },
]
[data]
batch_size = 16
workers = 0
[data.dataset]
name = "synthetic"
train_size = 48
val_size = 21
[train]
epochs = 3
max_steps = 5
log_every = 1
optimizer = { name = "paper-sgd", lr = 0.05 }
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack with its output.
    env.update(
        {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PYTHONFAULTHANDLER": "1"}, **extra
    )
    return env


def _spawn_ranks(
    args: list[str], world: int, program: tuple[str, ...] = ("-m", "convnet.core")
) -> list[subprocess.Popen]:
    """One process per rank with the environment torchrun would give it."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, *program, *args],
            env=_env(
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                LOCAL_WORLD_SIZE=str(world),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for r in range(world)
    ]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out + err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"multi-process run still going after {timeout} s (hang)")
    return results


PORT_TAKEN = ("could not join the process group", "address already in use", "EADDRINUSE")


def _run_ranks(
    args: list[str], world: int, timeout: float = LAUNCH_TIMEOUT, program: tuple[str, ...] = ("-m", "convnet.core")
) -> list[tuple[int, str]]:
    """Launch, wait, and relaunch on another port if the free port was taken meanwhile by
    another program (the check-then-bind race of picking a free port)."""
    for _ in range(3):
        results = _wait_all(_spawn_ranks(args, world, program), timeout)
        if not any(code and any(m in text for m in PORT_TAKEN) for code, text in results):
            return results
    return results


def _torchrun(args: list[str], nproc: int) -> tuple[int, str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "convnet.core",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    return _wait_all([proc], LAUNCH_TIMEOUT)[0]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def _evals(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "lr"} for r in records if r["kind"] in ("eval", "final")]


def _single(recipe_path: Path, out: Path, *sets: str, resume: Path | None = None) -> Path:
    recipe = cn.load_recipe(str(recipe_path), list(sets))
    Run(recipe, out=out, resume=resume, quiet=True).train()
    return out


def _assert_same_checkpoint(a: Path, b: Path, rel: float) -> None:
    ta, tb = load_file(a / "checkpoints" / "last.safetensors"), load_file(b / "checkpoints" / "last.safetensors")
    model = sorted(k for k in ta if not k.startswith("rng/"))
    assert model == sorted(k for k in tb if not k.startswith("rng/")), "checkpoint formats differ"
    for k in model:
        scale = ta[k].abs().max().item() or 1.0
        assert (ta[k] - tb[k]).abs().max().item() <= rel * scale, k


def _assert_same_losses(a: dict[int, float], b: dict[int, float], rel: float) -> None:
    assert sorted(a) == sorted(b) and a
    for step in a:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


def test_tower_parallel_two_processes_follow_single(tiny: Path, tmp_path: Path) -> None:
    single = _single(tiny, tmp_path / "single")
    for code, text in _run_ranks(
        [
            "run",
            str(tiny),
            "--quiet",
            "--out",
            str(tmp_path / "tp"),
            "--set",
            "parallel.strategy=tower-parallel",
            "--set",
            "parallel.timeout=60",
        ],
        world=2,
    ):
        assert code == 0, text
    _assert_same_losses(_losses(single), _losses(tmp_path / "tp"), 1e-5)
    assert len(_losses(single)) == 5
    _assert_same_checkpoint(single, tmp_path / "tp", 1e-5)
    assert _evals(single) == _evals(tmp_path / "tp")
    assert not (tmp_path / "tp" / "checkpoints" / "rank1").exists()


def test_tower_parallel_resumes_a_single_checkpoint(tiny: Path, tmp_path: Path) -> None:
    """Checkpoints are one format: 2 steps under single, 3 more under tower-parallel ==
    5 under single (the resume loads, slices and re-gathers model and optimizer state)."""
    straight = _single(tiny, tmp_path / "straight")
    first = _single(tiny, tmp_path / "first", "train.max_steps=2")
    resumed = tmp_path / "resumed"
    for code, text in _run_ranks(
        [
            "run",
            str(tiny),
            "--quiet",
            "--out",
            str(resumed),
            "--resume",
            str(first / "checkpoints" / "last.safetensors"),
            "--set",
            "parallel.strategy=tower-parallel",
            "--set",
            "parallel.timeout=60",
        ],
        world=2,
    ):
        assert code == 0, text
    tail = {s: v for s, v in _losses(straight).items() if s > 2}
    _assert_same_losses(tail, _losses(resumed), 1e-5)
    _assert_same_checkpoint(straight, resumed, 1e-5)


# A third party's optimizer with a 0-d state per parameter (AdamW's ``step``), registered in
# each rank's own registries: its state is gathered whole at a save and sliced at a resume.
ADAMW_RUN = """
import sys, attrs, torch
import convnet.core as cn
from convnet.core import plugins
from convnet.core.engine import Run

@attrs.define
class AdamWOptions:
    lr: float = 0.01

_, regs = plugins.create_manager()
regs.current_plugin = ("test-adamw", "tests")
regs.optimizer.add(
    "adamw", lambda o, ctx: torch.optim.AdamW([p for _, p in ctx.parameters], lr=o.lr), AdamWOptions, "AdamW"
)
recipe_path, out, resume, *sets = sys.argv[1:]
recipe = cn.load_recipe(recipe_path, ["train.optimizer={name='adamw'}", *sets], registries=regs)
Run(recipe, out=out, resume=resume or None, registries=regs, quiet=True).train()
"""


@pytest.mark.slow  # four processes launched, two runs of them in sequence
def test_tower_parallel_saves_and_resumes_an_optimizer_with_a_0d_state(tiny: Path, tmp_path: Path) -> None:
    """2 steps of AdamW under single, 3 more under tower-parallel == 5 under single, and the
    checkpoint's 0-d ``step`` states are 5 (not gathered as rows, nor sliced at the resume)."""

    def single(out: Path, *sets: str, resume: str = "") -> None:
        done = subprocess.run(
            [sys.executable, "-c", ADAMW_RUN, str(tiny), str(out), resume, *sets],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=LAUNCH_TIMEOUT,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    single(tmp_path / "straight")
    single(tmp_path / "first", "train.max_steps=2")
    resumed = tmp_path / "resumed"
    first = str(tmp_path / "first" / "checkpoints" / "last.safetensors")
    sets = ["parallel.strategy=tower-parallel", "parallel.timeout=60"]
    for code, text in _run_ranks([str(tiny), str(resumed), first, *sets], world=2, program=("-c", ADAMW_RUN)):
        assert code == 0, text
    _assert_same_losses({s: v for s, v in _losses(tmp_path / "straight").items() if s > 2}, _losses(resumed), 1e-5)
    _assert_same_checkpoint(tmp_path / "straight", resumed, 1e-5)
    saved = load_file(resumed / "checkpoints" / "last.safetensors")
    steps = [k for k in saved if k.startswith("optimizer/") and k.endswith("/step")]
    assert steps and all(saved[k].dim() == 0 and float(saved[k]) == 5.0 for k in steps)


def test_ddp_two_processes_half_batch_each_follow_single(tiny: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks x 8 samples == one process x 16: losses, weights, evaluation."""
    single = _single(tiny, tmp_path / "single")
    code, text = _torchrun(
        [
            "run",
            str(tiny),
            "--quiet",
            "--out",
            str(tmp_path / "ddp"),
            "--set",
            "parallel.strategy=ddp",
            "--set",
            "parallel.timeout=60",
        ],
        nproc=2,
    )
    assert code == 0, text
    _assert_same_losses(_losses(single), _losses(tmp_path / "ddp"), 1e-5)
    _assert_same_checkpoint(single, tmp_path / "ddp", 1e-5)
    # 21 validation samples split 11 + 10 over the ranks, counts summed: the same numbers.
    assert _evals(single) == _evals(tmp_path / "ddp")
    assert _evals(single)[0]["samples"] == 21


def test_ddp_four_processes_draw_singles_dropout_masks(tiny: Path, tmp_path: Path) -> None:
    """4 ranks x 4 samples, dropout 0.5: each rank draws its rows of single's masks."""
    single = _single(tiny, tmp_path / "single")
    for code, text in _run_ranks(
        [
            "run",
            str(tiny),
            "--quiet",
            "--out",
            str(tmp_path / "ddp4"),
            "--set",
            "parallel.strategy=ddp",
            "--set",
            "parallel.timeout=120",
        ],
        world=4,
        timeout=300,
    ):
        assert code == 0, text
    _assert_same_losses(_losses(single), _losses(tmp_path / "ddp4"), 1e-5)
    _assert_same_checkpoint(single, tmp_path / "ddp4", 1e-5)


# A rank that trains (or fails at its first step), keeps its Run (as the CLI does until it
# returns, as a program that uses the Run does), and names the threads it still has.
THREADS_AFTER_RUN = """
import os, sys
import convnet.core as cn
from convnet.core.engine import Run
recipe, out, ending, *sets = sys.argv[1:]
run = Run(cn.load_recipe(recipe, sets), out=out, quiet=True)
if ending == "fails" or (ending == "rank-1-fails" and os.environ["RANK"] == "1"):
    def fail(*args):
        raise ValueError("a step that fails")
    run._train_step = fail
try:
    run.train()
except ValueError as exc:
    print("failed:", exc)
print("threads:", *sorted({open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc")
@pytest.mark.parametrize("ending", ["finishes", "fails"])
@pytest.mark.parametrize("strategy", ["ddp", "tower-parallel"])
def test_a_run_that_ends_leaves_no_process_group_threads(
    tiny: Path, tmp_path: Path, strategy: str, ending: str
) -> None:
    """The end of a run, or its failure, ends gloo's threads: left running to the interpreter's
    exit, one of them may take the GIL during finalization and abort the rank (exit -6,
    "terminate called without an active exception"). DDP's reducer held the group past
    destroy_process_group, and a failed run did not destroy it at all."""
    results = _run_ranks(
        [str(tiny), str(tmp_path / "out"), ending, f"parallel.strategy={strategy}", "parallel.timeout=60"],
        world=2,
        program=("-c", THREADS_AFTER_RUN),
    )
    for rank, (code, text) in enumerate(results):
        assert code == 0, text
        assert ("failed: a step that fails" in text) == (ending == "fails"), text
        threads = next(line for line in text.splitlines() if line.startswith("threads:")).split()[1:]
        left = [t for t in threads if "gloo" in t or "tcpstore" in t]
        assert not left, f"rank {rank} still runs {left} after a run that {ending}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="the rank's script reads thread names from /proc")
@pytest.mark.parametrize("strategy", ["ddp", "tower-parallel"])
def test_a_rank_that_fails_with_an_error_stops_the_others_at_once(tiny: Path, tmp_path: Path, strategy: str) -> None:
    """Rank 1's step raises and rank 1 lives on (a program that carries on after a failed run);
    it has let go of the process group, so rank 0's next collective fails on the closed
    connection instead of waiting out the timeout (600 s here, as by default)."""
    released = tmp_path / "rank-0-ended"
    rank_1_lives_on = THREADS_AFTER_RUN + (
        "import time\n"
        f"while os.environ['RANK'] == '1' and not os.path.exists({str(released)!r}):\n"
        "    time.sleep(0.1)\n"
    )
    procs = _spawn_ranks(
        [str(tiny), str(tmp_path / "out"), "rank-1-fails", f"parallel.strategy={strategy}", "parallel.timeout=600"],
        world=2,
        program=("-c", rank_1_lives_on),
    )
    try:
        out0, err0 = procs[0].communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        out0 = err0 = ""
    finally:
        released.touch()
    (code1, text1), *_ = _wait_all(procs[1:], LAUNCH_TIMEOUT)
    if procs[0].returncode is None:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail(f"rank 0 still waits {LAUNCH_TIMEOUT} s after rank 1 failed; rank 1: {text1}")
    assert code1 == 0 and "failed: a step that fails" in text1, text1
    text0 = out0 + err0
    assert procs[0].returncode != 0 and "LostPeerError" in text0 and "Connection closed" in text0, text0


@pytest.mark.parametrize(
    "strategy,how",
    [("ddp", signal.SIGKILL), ("tower-parallel", signal.SIGSTOP)],
    ids=["ddp-rank-killed", "tower-parallel-rank-hangs"],
)
def test_a_rank_that_dies_stops_the_others_with_a_clear_error(
    tiny: Path, tmp_path: Path, strategy: str, how: signal.Signals
) -> None:
    """A killed peer is noticed at once (the connection drops); a hung one after the
    process group's timeout."""
    out = tmp_path / "run"
    procs = _spawn_ranks(
        [
            "run",
            str(tiny),
            "--quiet",
            "--out",
            str(out),
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.epochs=100000",
            "--set",
            f"parallel.strategy={strategy}",
            "--set",
            "parallel.timeout=10",
        ],
        world=2,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert procs[0].poll() is None and procs[1].poll() is None, "a rank ended before the kill"
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.1)
        os.kill(procs[1].pid, how)
        killed_at = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("rank 0 still running 60 s after rank 1 died or hung")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate(timeout=10)
    assert procs[0].returncode == 1, err
    assert time.monotonic() - killed_at < 60
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"convnet: error: {strategy} rank 0 of 2:"), err
    assert "another process probably died" in last
    assert "Traceback" not in err


COLLECTIVES = """
import os, sys, torch
from convnet.plugins.parallel.ddp import DDP, DDPOptions
s = DDP(DDPOptions(device="cpu", timeout=60), batch_size=4)
s.start()
r = s.rank
# uneven shares, as shard_eval gives 21 samples over 2 ranks
idx = torch.tensor(s.shard_eval(list(range(21))))
feat = idx[:, None].double() * torch.tensor([[1.0, -1.0]])
print("shard", idx.tolist())
print("sum", s.all_reduce_sum(torch.tensor([len(idx), r + 1.0], dtype=torch.float64)).tolist())
print("idx", s.all_gather_cat(idx).tolist())
print("feat", s.all_gather_cat(feat).tolist())
print("batch", s.shard_batch(list(range(100, 108))))
# rank 1 has nothing and does not know the trailing shape (an evaluator's torch.empty(0, 0))
some = torch.arange(6.0).reshape(3, 2) if r == 0 else torch.empty(0, 0)
print("some", s.all_gather_cat(some).tolist())
print("none", list(s.all_gather_cat(torch.empty(0, 0)).shape))
s.close()
"""


def test_ddp_sharding_and_reductions_over_two_processes() -> None:
    """Evaluation shares cover every sample once; the reductions see every rank's (uneven) part."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COLLECTIVES],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    outputs = []
    for code, text in _wait_all(procs, LAUNCH_TIMEOUT):
        assert code == 0, text
        outputs.append(
            {
                line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
                for line in text.splitlines()
                if line.split(" ", 1)[0] in ("shard", "sum", "idx", "feat", "batch", "some", "none")
            }
        )
    assert outputs[0]["shard"] == list(range(0, 11)) and outputs[1]["shard"] == list(range(11, 21))
    for out in outputs:
        assert out["sum"] == [21.0, 3.0]
        assert out["idx"] == list(range(21))
        assert out["feat"] == [[float(i), -float(i)] for i in range(21)]
        assert out["some"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] and out["none"] == [0, 0]
    assert outputs[0]["batch"] == [100, 101, 102, 103] and outputs[1]["batch"] == [104, 105, 106, 107]


@pytest.mark.slow  # five runs of alexnet-digits, two of them multi-process
def test_with_dropout_on_every_strategy_follows_single_on_alexnet_digits(tmp_path: Path) -> None:
    """alexnet-digits keeps its two dropout 0.5 layers: every strategy draws, for each element,
    the mask single draws (keyed by global sample and feature), so single, model-parallel
    (per tower and fused), tower-parallel (2 processes) and ddp (2 processes x 32) give the
    same 5 losses (float32, 1e-5) and weights."""
    sets = ["train.max_steps=5", "train.log_every=1", "evaluate=[]"]
    single = _single(Path("alexnet-digits"), tmp_path / "single", *sets, "parallel.device=cpu")
    runs = {"single": single}
    for name, fuse in (("per-tower", "false"), ("fused", "true")):
        runs[name] = _single(
            Path("alexnet-digits"),
            tmp_path / name,
            *sets,
            "parallel.strategy=model-parallel",
            'parallel.devices=["cpu", "cpu"]',
            f"parallel.fuse_shared_devices={fuse}",
        )
    args = [
        "run",
        "alexnet-digits",
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
        "--set",
        "parallel.device=cpu",
        "--set",
        "parallel.timeout=300",
    ]
    for strategy in ("tower-parallel", "ddp"):
        for code, text in _run_ranks(
            [*args, "--out", str(tmp_path / strategy), "--set", f"parallel.strategy={strategy}"], world=2, timeout=600
        ):
            assert code == 0, text
        runs[strategy] = tmp_path / strategy
    losses = _losses(single)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for out in runs.values():
        _assert_same_losses(losses, _losses(out), 1e-5)
        # float32 summation orders differ (grouped vs per-tower convs, sharded gradients); the
        # small biases (conv1's, conv3's: sums of 64 x HW terms that mostly cancel) end up to
        # ~1.2e-3 of their own scale apart. In float64 the same 5 steps agree to 6e-16 (measured),
        # and the tiny recipe's strategy tests above compare weights at 1e-5 with dropout on.
        _assert_same_checkpoint(single, out, 1e-2)


def _last_logged_step(out: Path) -> int:
    """The last training step metrics.jsonl records while a run writes it (a partial line is skipped)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if line.endswith("}") and '"train"' in line), default=0)


def _torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _torchrun_until_step(
    tiny: Path, out: Path, strategy: str, step: int
) -> tuple[subprocess.Popen, list[str], list[str]]:
    """A 2-rank torchrun training for ever into ``out``, returned once it has logged ``step``:
    (the launcher's process, the launch command, the --set arguments)."""
    sets = ["--set", f"parallel.strategy={strategy}", "--set", "parallel.timeout=60"]
    sets += ["--set", "train.epochs=1000", "--set", "train.log_every=1"]
    launch = _torchrun_cmd("--standalone", "--nproc-per-node=2", "-m", "convnet.core", "run", str(tiny), "--quiet")
    proc = subprocess.Popen(
        [*launch, "--out", str(out), *sets],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while _last_logged_step(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    return proc, launch, sets


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "tower-parallel"])
def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step_and_the_printed_command_resumes(
    tiny: Path, tmp_path: Path, strategy: str
) -> None:
    """The terminal's Ctrl-C reaches torchrun and both workers (and torchrun forwards it again):
    every rank stops after the same step, one checkpoint is written, and the printed torchrun
    command resumes to exactly the weights of a run that was never interrupted."""
    out = tmp_path / "run"
    proc, launch, sets = _torchrun_until_step(tiny, out, strategy, 3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does to the foreground group
    ((_, text),) = _wait_all([proc], LAUNCH_TIMEOUT)
    steps = {int(n) for n in re.findall(r"interrupted at step (\d+)", text)}
    assert len(steps) == 1 and len(re.findall(r"interrupted at step", text)) == 2, text  # both ranks, one step
    step = steps.pop()
    last = out / "checkpoints" / "last.safetensors"
    assert json.loads(cn.load_checkpoint(last)[1]["convnet.state"])["step"] == step
    # torchrun itself ends with its own SignalException traceback (exit 1); no frame is ours.
    assert not re.search(r'File "[^"]*/(core|plugins/\w+)/\w+\.py"', text), text
    argv = shlex.split(re.search(r"resume with: (.+)", text).group(1))
    assert argv[:5] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "convnet.core"], argv

    stop = ["--set", f"train.max_steps={step + 2}"]
    resumed = subprocess.run(_torchrun_cmd(*argv[1:], *stop), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    code, text = _wait_all(
        [
            subprocess.Popen(
                [*launch, "--out", str(tmp_path / "straight"), *sets, *stop],
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        ],
        LAUNCH_TIMEOUT,
    )[0]
    assert code == 0, text
    _assert_same_checkpoint(out, tmp_path / "straight", 0.0)


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (from /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for child in children:
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "tower-parallel"])
def test_a_ctrl_c_heard_by_one_rank_only_stops_every_rank_at_one_step(
    tiny: Path, tmp_path: Path, strategy: str
) -> None:
    """SIGINT to rank 1 alone (a signal sent to one process, or a terminal race): every rank
    still stops after the same step with one checkpoint. Tower-parallel's ranks share a batch
    and sum no data, so its stop needs its own agreement."""
    out = tmp_path / "run"
    proc, _, _ = _torchrun_until_step(tiny, out, strategy, 3)
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGINT)
    ((_, text),) = _wait_all([proc], LAUNCH_TIMEOUT)
    steps = {int(n) for n in re.findall(r"interrupted at step (\d+)", text)}
    assert len(steps) == 1 and len(re.findall(r"interrupted at step", text)) == 2, text
    last = out / "checkpoints" / "last.safetensors"
    assert json.loads(cn.load_checkpoint(last)[1]["convnet.state"])["step"] == steps.pop()
    assert "another process probably died" not in text, text


@pytest.mark.slow
def test_ddp_over_two_nodes_on_one_machine_follows_single(tiny: Path, tmp_path: Path) -> None:
    """Two torchrun launches, one process each, meeting through a c10d rendezvous on 127.0.0.1
    (as two machines would): the losses and weights of one process with the whole batch."""
    single = _single(tiny, tmp_path / "single")
    port = _free_port()
    node = _torchrun_cmd(
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=convnet-two-nodes",
        "-m",
        "convnet.core",
        "run",
        str(tiny),
        "--quiet",
        "--out",
        str(tmp_path / "nodes"),
        "--set",
        "parallel.strategy=ddp",
        "--set",
        "parallel.timeout=60",
    )
    procs = []
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                node, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
        )
        time.sleep(0.5)  # the first launch hosts the rendezvous store
    for code, text in _wait_all(procs, LAUNCH_TIMEOUT):
        assert code == 0, text
    _assert_same_losses(_losses(single), _losses(tmp_path / "nodes"), 1e-5)
    _assert_same_checkpoint(single, tmp_path / "nodes", 1e-5)


def test_only_the_process_groups_failures_are_reported_as_a_lost_peer() -> None:
    """collective() wraps local code too (a tower's forward): a layer's error or an out-of-memory
    is that rank's own and keeps its message; a gloo failure is a lost peer."""
    from convnet.plugins.parallel.ddp import DDP, DDPOptions
    from convnet.plugins.parallel.distributed import LostPeerError

    strategy = DDP(DDPOptions(device="cpu", timeout=60), batch_size=4)
    local = pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied")
    with local, strategy.collective("exchanging activations"):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")
    lost = pytest.raises(LostPeerError, match="exchanging activations failed, another process probably died")
    with lost, strategy.collective("exchanging activations"):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
