"""SIGKILL a process while it writes checkpoints: the file on disk is always a whole one.

The test starts a child process that saves ~4 MB checkpoints in a loop (each tagged with its
number, its tensors derived from that number) and kills it after a hypothesis-chosen delay.
The checkpoint left must load and be internally consistent: all tensors from the same save.
Whether the kill landed inside a write shows afterwards as a leftover temp file.

The child comes from a forkserver, not from os.fork() of this process: forking a process whose
threads are running is unsafe (Python 3.12 warns about it). The server is a fresh interpreter,
kept to one thread (no BLAS/OpenMP pools), that imports torch once, so each child still starts
in milliseconds instead of the seconds a fresh interpreter takes to import torch.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import time

import pytest
import torch
from faultkit import save_checkpoints_until_killed
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.core import checkpoint as ckpt

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["faultkit"])  # torch and the checkpoint code, imported once in the server
    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)  # read when the server starts: no thread pools in the process that forks
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return ctx


@settings(max_examples=20)
@given(delay=st.floats(0.0, 0.15))
def test_sigkill_while_saving_leaves_a_whole_checkpoint(tmp_path_factory, ledger, forkserver, delay: float) -> None:
    path = tmp_path_factory.mktemp("kill") / "last.safetensors"
    ready = forkserver.Event()
    child = forkserver.Process(target=save_checkpoints_until_killed, args=(str(path), ready), daemon=True)
    child.start()
    try:
        assert ready.wait(timeout=120), f"the writer never finished its first checkpoint (exit code {child.exitcode})"
        time.sleep(delay)
    finally:
        child.kill()  # SIGKILL
        child.join()
    mid_write = any(p.name.endswith(".tmp") for p in path.parent.iterdir())
    tensors, meta = ckpt.load(path)
    step = ckpt.state_of(meta, path)["step"]
    assert step >= 1
    assert all(torch.equal(tensors[f"model/t{k}"], torch.full((16384,), float(k + step))) for k in range(64))
    ledger.record(
        "SIGKILL of a process saving checkpoints in a loop",
        "killed inside a write (temp file left), previous checkpoint whole"
        if mid_write
        else "killed between writes, last checkpoint whole",
    )
