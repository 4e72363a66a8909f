"""Ctrl-C: a checkpoint at the next step boundary, exit 130, and the exact command to resume."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import time

from faultkit import CONVNET, KILL_SETS, convnet_run, env, last_step, model_bytes

from convnet.core import checkpoint as ckpt


def test_sigint_saves_at_the_next_step_and_prints_the_resume_command(tmp_path, uninterrupted, ledger) -> None:
    out = tmp_path / "run"
    proc = convnet_run(out, *KILL_SETS, "train.log_every=1")
    deadline = time.monotonic() + 240
    while last_step(out / "metrics.jsonl") < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    stopped = re.search(r"interrupted at step (\d+); checkpoint saved to (\S+)", stderr)
    assert stopped, stderr
    step, path = int(stopped.group(1)), stopped.group(2)
    last = out / "checkpoints" / "last.safetensors"
    assert path == str(last) and 5 <= step < 12
    assert ckpt.state_of(ckpt.load(last)[1], last)["step"] == step  # saved at the boundary it names
    command = re.search(r"resume with: (.+)", stderr).group(1)
    argv = shlex.split(command)
    assert argv[:2] == ["convnet", "run"] and "--resume" in argv and "train.checkpoint_every=1" in argv
    done = subprocess.run([*CONVNET, *argv[1:]], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert model_bytes(last) == uninterrupted
    ledger.record(
        "SIGINT (Ctrl-C) during training",
        f"checkpoint at step {step}, exit 130, printed command resumed to the uninterrupted weights",
    )


def test_double_ctrl_c_stops_at_once_and_loses_nothing(tmp_path, uninterrupted, ledger) -> None:
    """An impatient second Ctrl-C stops wherever the run is (a checkpoint write included)."""
    out = tmp_path / "run"
    proc = convnet_run(out, *KILL_SETS)
    deadline = time.monotonic() + 240
    while last_step(out / "metrics.jsonl") < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("convnet: ")
    last = out / "checkpoints" / "last.safetensors"
    step = ckpt.state_of(ckpt.load(last)[1], last)["step"]
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    done = convnet_run(out, *KILL_SETS, resume=last)
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr
    assert model_bytes(last) == uninterrupted
    ledger.record(
        "double Ctrl-C", f"exit 130 at once, checkpoint of step {step} whole, resumed to the uninterrupted weights"
    )
