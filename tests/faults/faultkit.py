"""Helpers of the faults suite: run ``convnet`` as a real process, read weights, keep a ledger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from convnet.core import checkpoint as ckpt

TINY = Path(__file__).parents[1] / "fixtures" / "recipes" / "tiny.toml"
CONVNET = [sys.executable, "-m", "convnet.core"]
# Every checkpoint written, each step: the most places for a kill to land in a write.
KILL_SETS = ("train.checkpoint_every=1",)


class Ledger:
    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.lost: dict[str, int] = Counter()

    def record(self, fault: str, outcome: str, lost: bool = False) -> None:
        self.outcomes[fault][outcome] += 1
        self.lost[fault] += int(lost)

    def table(self) -> list[str]:
        rows = ["| fault | injected | what happened | data lost |", "|---|---|---|---|"]
        for fault, outcomes in self.outcomes.items():
            what = "; ".join(f"{n}x {o}" for o, n in outcomes.most_common())
            rows.append(f"| {fault} | {sum(outcomes.values())} | {what} | {self.lost[fault] or 'none'} |")
        return rows


def env() -> dict[str, str]:
    """One thread per process: the same arithmetic in every run, and no fighting over 2 cores."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def sets(*overrides: str) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def convnet_run(
    out: Path, *overrides: str, resume: Path | None = None, recipe: Path = TINY, overwrite: bool = False, **popen
) -> subprocess.Popen:
    args = [*CONVNET, "run", str(recipe), *sets(*overrides), "--out", str(out), "--quiet"]
    if resume is not None:
        args += ["--resume", str(resume)]
    if overwrite:  # a run killed before its first checkpoint starts again from scratch in its folder
        args += ["--overwrite"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), **popen)


def model_bytes(path: Path) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in load_file(str(path)).items() if k.startswith("model/")}


def last_step(metrics: Path) -> int:
    """The last training step a run folder's metrics.jsonl records (0 if none yet)."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}") and '"train"' in line]
    return max(steps, default=0)


def save_checkpoints_until_killed(path: str, ready) -> None:
    """Child process: save ~4 MB checkpoints in a loop, each tagged with its number; set ``ready``
    (a multiprocessing Event) once the first is whole."""
    torch.set_num_threads(1)
    i = 0
    base = [torch.full((16384,), float(k)) for k in range(64)]
    while True:
        i += 1
        ckpt.save(path, {f"model/t{k}": t + i for k, t in enumerate(base)}, {"convnet.state": f'{{"step": {i}}}'})
        if i == 1:
            ready.set()
