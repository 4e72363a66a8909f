"""SIGKILL a process while it writes checkpoints: the file on disk is always a whole one.

The test process forks a child that saves ~4 MB checkpoints in a loop (each tagged with its
number, its tensors derived from that number) and kills it after a hypothesis-chosen delay.
The checkpoint left must load and be internally consistent: all tensors from the same save.
Whether the kill landed inside a write shows afterwards as a leftover temp file.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet.core import checkpoint as ckpt


def _writer(path: Path, ready: int) -> None:
    """Child: save ~4 MB checkpoints in a loop, each tagged with its number, until killed."""
    torch.set_num_threads(1)
    i = 0
    base = [torch.full((16384,), float(k)) for k in range(64)]
    while True:
        i += 1
        ckpt.save(path, {f"model/t{k}": t + i for k, t in enumerate(base)}, {"convnet.state": f"{{\"step\": {i}}}"})
        if i == 1:
            os.write(ready, b"1")


@settings(max_examples=20)
@given(delay=st.floats(0.0, 0.15))
def test_sigkill_while_saving_leaves_a_whole_checkpoint(tmp_path_factory, ledger, delay: float) -> None:
    path = tmp_path_factory.mktemp("kill") / "last.safetensors"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.close(r)
            _writer(path, w)
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 1) == b"1"
        time.sleep(delay)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
    mid_write = any(p.name.endswith(".tmp") for p in path.parent.iterdir())
    tensors, meta = ckpt.load(path)
    step = ckpt.state_of(meta, path)["step"]
    assert step >= 1
    assert all(torch.equal(tensors[f"model/t{k}"], torch.full((16384,), float(k + step))) for k in range(64))
    ledger.record("SIGKILL of a process saving checkpoints in a loop",
                  "killed inside a write (temp file left), previous checkpoint whole" if mid_write
                  else "killed between writes, last checkpoint whole")
