"""SIGKILL a training process anywhere, as many times as hypothesis likes: nothing is lost.

One example is a chain: start ``convnet run`` (a checkpoint every step), kill it at a chosen
point, check that the folder holds a loadable checkpoint, resume, maybe kill again, ... and
finally let it finish. The final weights must be bitwise those of the uninterrupted run.

A kill point is a step and a moment: ``"step"`` kills as soon as that step's metrics line
appears (the step's checkpoint save follows it at once), ``"write"`` waits for a checkpoint
temp file to appear and kills while it is being written. Whether a kill really landed inside a
write is seen afterwards (the temp file is left behind) and counted in the ledger.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from faultkit import KILL_SETS, convnet_run, last_step, model_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convnet.core import checkpoint as ckpt

TOTAL_STEPS = 12  # tiny.toml: 3 epochs of 4 steps


def _kill_at(out: Path, proc, step: int, moment: str) -> str:
    """Kill ``proc`` at the moment; say where it landed."""
    ckdir = out / "checkpoints"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if last_step(out / "metrics.jsonl") >= step:
            break
        time.sleep(0.002)
    if moment == "write":
        while proc.poll() is None and time.monotonic() < deadline:
            if ckdir.is_dir() and any(n.endswith(".tmp") for n in os.listdir(ckdir)):
                break
            time.sleep(0.0003)
    if proc.poll() is not None:
        proc.communicate()
        return "run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    if ckdir.is_dir() and any(n.endswith(".tmp") for n in os.listdir(ckdir)):
        return "killed while a checkpoint was being written"
    return "killed between checkpoint writes"


kill_points = st.lists(
    st.tuples(st.integers(1, TOTAL_STEPS - 2), st.sampled_from(["step", "write"])), min_size=1, max_size=3
).map(sorted)


@pytest.mark.slow
@settings(max_examples=max(2, settings.default.max_examples // 10), suppress_health_check=[HealthCheck.too_slow])
@given(points=kill_points)
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_weights(
    tmp_path_factory, uninterrupted, ledger, points
) -> None:
    out = tmp_path_factory.mktemp("killed")
    last = out / "checkpoints" / "last.safetensors"
    seen = 0
    for step, moment in points:
        proc = convnet_run(out, *KILL_SETS, resume=last if last.exists() else None, overwrite=not last.exists())
        where = _kill_at(out, proc, max(step, seen + 1), moment)
        seen = last_step(out / "metrics.jsonl")
        lost = False
        if last.exists():
            try:
                _, meta = ckpt.load(last)  # whole, whatever the moment of the kill
                assert ckpt.state_of(meta, last)["step"] <= seen
            except Exception:
                lost = True
                raise
            finally:
                ledger.record("SIGKILL of `convnet run` (hypothesis-chosen step/moment)", where, lost)
            best = out / "checkpoints" / "best.safetensors"
            if best.exists():
                ckpt.load(best)
        else:
            ledger.record(
                "SIGKILL of `convnet run` (hypothesis-chosen step/moment)",
                "killed before the first checkpoint (restarted from scratch)",
            )
    proc = convnet_run(out, *KILL_SETS, resume=last if last.exists() else None, overwrite=not last.exists())
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert model_bytes(last) == uninterrupted
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]  # litter cleaned by the next save
