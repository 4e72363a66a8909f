"""benchmarks/gpu_check.py on a machine without CUDA: it runs its CPU parts at quick sizes and
its JSON says, per step, that the GPU part was skipped and why; no GPU figure appears."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
STEPS = ["kernels", "lrn", "throughput", "model_parallel", "digits", "decode", "projection"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the CPU mode; a GPU machine runs the real thing")
def test_gpu_check_without_a_gpu_runs_its_cpu_parts_and_says_what_it_skipped(tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["quick"] is True and report["environment"]["cuda_available"] is False
    assert list(report["steps"]) == STEPS
    assert report["skipped"] == STEPS and report["failed"] == []
    for name, step in report["steps"].items():
        assert step["status"] == "skipped" and step["reason"], name
        assert "gpu" not in step, f"{name}: a GPU figure without a GPU"
    for name in ("kernels", "lrn", "throughput", "model_parallel", "digits"):
        assert "no CUDA device" in report["steps"][name]["reason"]
        assert report["steps"][name]["cpu"], f"{name}: its CPU part did not run"
    # The CPU parts measured something real.
    assert report["steps"]["kernels"]["cpu"]["cpu_kernel"] == "built"
    assert all(r["forward_ms"] > 0 for r in report["steps"]["lrn"]["cpu"]["rows"])
    assert {r["name"] for r in report["steps"]["throughput"]["cpu"]["rows"]} == {
        "torchvision alexnet() + SGD [eager]",
        "alexnet-imagenet single [eager]",
    }
    assert {r["strategy"] for r in report["steps"]["model_parallel"]["cpu"]["rows"]} == {
        "single",
        "model-parallel",
        "model-parallel/per-tower",
    }
    digits = report["steps"]["digits"]["cpu"]
    assert digits["steps"] == 8 and digits["stopped_at"] == 4
    assert digits["bit_exact"] is True  # resume is bit-exact on the CPU (the engine's promise)
    table = (tmp_path / "gpu_check.md").read_text()
    assert "no GPU (CPU parts only)" in table
    assert all(f"| {name} | skipped | - |" in table for name in STEPS)
