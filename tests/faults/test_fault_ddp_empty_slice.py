"""ddp with a rank whose whole slice of a batch is unreadable: the step goes on, no rank waits.

Two real processes under torchrun (gloo on ``lo``, a 30 s collective timeout). The training
set is the fixture plugin's constant dataset with unreadable samples chosen from the engine's
own batch order: in step 1 rank 1's whole slice, in step 2 the whole global batch, in step 3
rank 0's whole slice. Every rank takes part in every step's collectives; a rank with no
sample contributes nothing, the loss and gradient are the mean over the readable samples of
all ranks (so ddp follows a single process reading the same batches), and the step with no
readable sample at all is skipped alike on every rank. Before, the empty rank skipped the
forward and its peer waited in DDP's all-reduce until the timeout.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from faultkit import CONVNET, env
from safetensors.torch import load_file

from convnet.core import data as cdata

SEED, SIZE, BATCH = 5, 16, 4
RECIPE = """
seed = {seed}
parallel = {{ strategy = "single", device = "cpu" }}
evaluate = [{{ name = "topk", k = [1] }}]
[model]
input = [3, 8, 8]
num_classes = 4
layers = [
    {{ name = "conv", out = 4, kernel = 3, weight_init = "kaiming" }},
    {{ name = "relu" }},
    {{ name = "flatten" }},
    {{ name = "dropout" }},
    {{ name = "fc", out = 4 }},
]
[data]
batch_size = {batch}
[data.dataset]
name = "fixture_constant"
size = {size}
unreadable = {unreadable}
[train]
epochs = 1
log_every = 1
optimizer = {{ name = "paper-sgd", lr = 0.05 }}
"""


def _unreadable() -> list[int]:
    b = cdata.train_batches(SIZE, BATCH, SEED, 0)
    half = BATCH // 2
    return sorted(b[0][half:] + b[1] + b[2][:half])  # rank 1's slice; everything; rank 0's slice


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_ddp_rank_with_nothing_readable_takes_part_and_the_step_goes_on(tmp_path, tmp_path_factory, ledger) -> None:
    from fixtures.plugin_install import install

    site = install(["good-extra"], tmp_path_factory.mktemp("site"))
    recipe = tmp_path / "empty-slice.toml"
    recipe.write_text(RECIPE.format(seed=SEED, batch=BATCH, size=SIZE, unreadable=_unreadable()), encoding="utf-8")
    run_env = dict(
        env(), PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), GLOO_SOCKET_IFNAME="lo"
    )
    single = tmp_path / "single"
    done = subprocess.run(
        [*CONVNET, "run", str(recipe), "--out", str(single), "--quiet"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = tmp_path / "ddp"
    # A hang would end in the 30 s collective timeout with exit 1 (LostPeerError), not exit 0.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "-m",
            "convnet.core",
            "run",
            str(recipe),
            "--out",
            str(ddp),
            "--quiet",
            "--set",
            "parallel.strategy=ddp",
            "--set",
            "parallel.timeout=30",
        ],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    want, got = _records(single), _records(ddp)
    losses = {r["step"]: r["loss"] for r in want if r["kind"] == "train"}
    ddp_losses = {r["step"]: r["loss"] for r in got if r["kind"] == "train"}
    assert sorted(ddp_losses) == sorted(losses) == [1, 2, 3, 4]
    assert math.isnan(losses[2]) and math.isnan(ddp_losses[2])  # nothing readable anywhere: skipped alike
    for step in (1, 3, 4):
        assert math.isfinite(ddp_losses[step])
        assert abs(ddp_losses[step] - losses[step]) <= 1e-5 * abs(losses[step]), step
    epoch = {r["kind"]: r for r in got}["eval"]
    assert epoch["skipped_samples"] == len(_unreadable()) == 8
    ta, tb = load_file(single / "checkpoints" / "last.safetensors"), load_file(ddp / "checkpoints" / "last.safetensors")
    for key in (k for k in ta if k.startswith("model/")):
        assert (ta[key] - tb[key]).abs().max().item() <= 1e-5 * (ta[key].abs().max().item() or 1.0), key
    ledger.record(
        "ddp rank whose whole slice is unreadable (2 gloo ranks)",
        "step went on (empty rank joined the all-reduce); all-empty step skipped on both; losses and weights = single",
        lost=False,
    )
