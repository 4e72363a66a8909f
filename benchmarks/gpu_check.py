"""Everything GPU-side in one command: the CUDA LRN kernel checked and timed, the paper's network
timed against torchvision, both towers on one device, a digits run resumed, the projection of
the paper's 90 epochs. Results go to OUT/gpu_check.json and OUT/gpu_check.md.

    python benchmarks/gpu_check.py OUT              # on a GPU machine: about 5-8 minutes on an H100/H200
    benchmarks/gpu_check.sh OUT                     # the same on a bare machine: installs convnet first
    python benchmarks/gpu_check.py OUT --quick      # tiny sizes (what the test runs on the CPU)

Steps (each reuses the benchmark script that owns it; see docs/gpu.md):
  kernels         JIT-build the LRN kernels; `pytest -m cuda tests/test_lrn_cuda.py tests/test_lrn_ops.py`
  lrn             benchmarks/lrn.py: ms, GB/s, share of copy bandwidth, ratio to F.local_response_norm
  throughput      benchmarks/train_throughput.py: alexnet-imagenet vs torchvision alexnet(), interleaved
                  (eager, channels_last, bf16 autocast, torch.compile)
  model_parallel  benchmarks/parallel.py: model-parallel with both towers on the one device vs single
  digits          alexnet-digits trained end to end, then stopped mid-run and resumed: bit-exact or not
  decode          the input pipeline's GPU decode path (benchmarks/input_pipeline.py's gpu_decode)
  projection      90 epochs x 1.28 M images at the measured images/s, beside the paper's 5-6 days

Without a CUDA device every step that needs one says "skipped" and why, and runs its CPU part
(at quick sizes) under "cpu"; no GPU figure is ever written that was not measured in this run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts, imported as modules

import lrn as lrn_bench  # noqa: E402
import parallel as parallel_bench  # noqa: E402
import train_throughput  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set
PAPER_EPOCHS = 90
PAPER_DAYS = (5, 6)  # "five to six days on two NVIDIA GTX 580 3GB GPUs"
GOALS = {"lrn_speedup_vs_torch": 5.0, "lrn_share_of_copy": 0.70, "throughput_vs_torchvision": 1.2}
NO_GPU = "no CUDA device on this machine"


class Check:
    """What every step sees: where to write, how big to go, whether there is a GPU."""

    def __init__(self, out: Path, quick: bool, cuda: bool) -> None:
        self.out = out
        self.quick = quick
        self.cuda = cuda
        self.results: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        return self.out / name

    def bench_json(self, run: Callable[[list[str]], Any], argv: list[str]) -> dict:
        """Run a benchmark script's main with ``--json`` and read back what it wrote."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "out.json"
            run([*argv, "--json", str(path)])
            return json.loads(path.read_text(encoding="utf-8"))


def skipped(reason: str, **parts: Any) -> dict:
    return {"status": "skipped", "reason": reason, **parts}


# ----------------------------------------------------------------------------- steps
def step_kernels(c: Check) -> dict:
    from convnet.plugins.lrn import kernels

    start = time.perf_counter()
    cpu = kernels.get("cpu")
    cpu_part = {
        "cpu_kernel": "built" if cpu else f"not built: {kernels.failure('cpu')}",
        "build_s": round(time.perf_counter() - start, 1),
    }
    if not c.cuda:
        return skipped(f"{NO_GPU}: the CUDA kernel's tests need one (CI compiles its source with nvcc)", cpu=cpu_part)
    start = time.perf_counter()
    cuda = kernels.get("cuda")
    gpu: dict[str, Any] = {
        "cuda_kernel": "built" if cuda else f"not built: {kernels.failure('cuda')}",
        "build_s": round(time.perf_counter() - start, 1),
    }
    xml = c.path("cuda_tests.xml")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "cuda",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            str(ROOT / "tests" / "test_lrn_cuda.py"),
            str(ROOT / "tests" / "test_lrn_ops.py"),  # opcheck on the CUDA op
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('name')}: {(case.find('failure') or case.find('error')).get('message', '')[:200]}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    gpu.update(pytest_exit_code=proc.returncode, **counts, failed_tests=failed[:20])
    ok = proc.returncode == 0 and counts["skipped"] == 0 and counts["tests"] > 0
    return {"status": "passed" if ok else "failed", "cpu": cpu_part, "gpu": gpu}


def _lrn_summary(rows: list[dict], impl: str) -> list[dict]:
    return [
        {
            k: r[k]
            for k in (
                "shape",
                "dtype",
                "forward_ms",
                "forward_backward_ms",
                "forward_backward_gb_s",
                "copy_gb_s",
                "forward_backward_share_of_copy",
                "forward_speedup_vs_torch",
                "forward_backward_speedup_vs_torch",
            )
        }
        for r in rows
        if r["impl"] == impl
    ]


def step_lrn(c: Check) -> dict:
    cpu_rows = c.bench_json(
        lrn_bench.main, ["--devices", "cpu", "--batch", "2", "--repeat", "2", "--warmup", "1", "--overhead-rounds", "0"]
    )
    cpu_part = {"batch": 2, "rows": _lrn_summary(cpu_rows["rows"], "cpu")}
    if not c.cuda:
        return skipped(f"{NO_GPU}: CUDA timings need one", cpu=cpu_part)
    batch, repeat = ("8", "3") if c.quick else ("128", "20")
    rows = []
    for dtype in ("float32", "bfloat16"):
        rows += c.bench_json(
            lrn_bench.main,
            ["--devices", "cuda", "--batch", batch, "--repeat", repeat, "--warmup", "3", "--dtype", dtype],
        )["rows"]
    cuda_rows = _lrn_summary(rows, "cuda")
    if not cuda_rows:
        return {"status": "failed", "reason": "the cuda kernel is unavailable (see the kernels step)", "cpu": cpu_part}
    goals = {
        "speedup_fwd_bwd_at_least_5x": all(
            r["forward_backward_speedup_vs_torch"] >= GOALS["lrn_speedup_vs_torch"] for r in cuda_rows
        ),
        "share_of_copy_at_least_70pct": all(
            r["forward_backward_share_of_copy"] >= GOALS["lrn_share_of_copy"] for r in cuda_rows
        ),
    }
    return {
        "status": "measured",
        "cpu": cpu_part,
        "gpu": {"batch": int(batch), "rows": cuda_rows, "goals": goals, "all_rows": rows},
    }


def step_throughput(c: Check) -> dict:
    cpu = c.bench_json(
        train_throughput.main,
        ["--device", "cpu", "--batch", "2", "--variants", "eager", "--steps", "1", "--rounds", "1", "--warmup", "0"],
    )
    cpu_part = {"batch": 2, "rows": cpu["rows"], "note": "quick sizes: a smoke run of the code path, not a speed"}
    if not c.cuda:
        return skipped(f"{NO_GPU}: the batch-128 GPU comparison needs one", cpu=cpu_part)
    argv = ["--device", "cuda", "--batch", "128", "--variants", "eager", "channels_last", "bf16", "compiled"]
    argv += ["--steps", "2", "--rounds", "1", "--warmup", "1"] if c.quick else ["--steps", "10", "--rounds", "5"]
    gpu = c.bench_json(train_throughput.main, argv)
    ours = [r for r in gpu["rows"] if "ratio_vs_torchvision" in r]
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    gpu["best"] = best
    gpu["goal_1_2x_torchvision"] = bool(best and best["ratio_vs_torchvision"] >= GOALS["throughput_vs_torchvision"])
    return {"status": "measured", "cpu": cpu_part, "gpu": gpu}


def step_model_parallel(c: Check) -> dict:
    cpu = c.bench_json(
        parallel_bench.main,
        [
            "--recipe",
            "alexnet-digits",
            "--device",
            "cpu",
            "--batch",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--skip",
            "tower-parallel",
        ],
    )
    cpu_part = {**cpu, "note": "alexnet-digits, quick sizes: a smoke run of the code path, not a speed"}
    if not c.cuda:
        return skipped(f"{NO_GPU}: both towers on one GPU needs one", cpu=cpu_part)
    steps = ["--steps", "3", "--warmup", "1"] if c.quick else ["--steps", "20", "--warmup", "3"]
    gpu = c.bench_json(parallel_bench.main, ["--device", "cuda", "--batch", "128", *steps, "--skip", "tower-parallel"])
    return {"status": "measured", "cpu": cpu_part, "gpu": gpu}


def _digits_resume(c: Check, device: str, sets: list[str], stop_at: int) -> dict:
    """Straight run vs. the same run stopped at ``stop_at`` and resumed: the final weights compared."""
    from safetensors.torch import load_file

    import convnet.core as cn

    base = [f"parallel.device={device}", "train.deterministic=true", *sets]
    straight, resumed = c.path(f"digits-{device}-straight"), c.path(f"digits-{device}-resumed")
    start = time.perf_counter()
    summary = cn.train(cn.load_recipe("alexnet-digits", base), out=straight)
    wall = time.perf_counter() - start
    cn.train(cn.load_recipe("alexnet-digits", [*base, f"train.max_steps={stop_at}"]), out=resumed)
    final = cn.train(
        cn.load_recipe("alexnet-digits", base), out=resumed, resume=resumed / "checkpoints" / "last.safetensors"
    )
    a, b = (load_file(str(p / "checkpoints" / "last.safetensors")) for p in (straight, resumed))
    model = [k for k in a if k.startswith("model/")]
    differing = [k for k in model if not torch.equal(a[k], b[k])]
    max_diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in differing), default=0.0)
    return {
        "steps": summary["step"],
        "stopped_at": stop_at,
        "wall_s": round(wall, 1),
        "top1_error": summary.get("top1_error"),
        "top5_error": summary.get("top5_error"),
        "resumed_top1_error": final.get("top1_error"),
        "bit_exact": not differing,
        "tensors_differing": len(differing),
        "of_tensors": len(model),
        "max_abs_difference": max_diff,
    }


def step_digits(c: Check) -> dict:
    quick = ["train.epochs=1", "train.max_steps=8"]  # 8 of the epoch's 22 steps, stopped at 4 and resumed
    cpu_part = _digits_resume(c, "cpu", quick, stop_at=4)
    if not c.cuda:
        return skipped(f"{NO_GPU}: the GPU run and its resume need one", cpu=cpu_part)
    # Full: the recipe's 12 epochs (264 steps), stopped mid-epoch at step 137 and resumed.
    gpu = _digits_resume(c, "cuda", quick if c.quick else [], stop_at=4 if c.quick else 137)
    return {"status": "measured", "cpu": cpu_part, "gpu": gpu}


def step_decode(c: Check) -> dict:
    import input_pipeline

    gpu_decode = getattr(input_pipeline, "gpu_decode", None)
    if gpu_decode is None:
        return skipped(
            "the input pipeline has no GPU decode path yet (benchmarks/input_pipeline.py defines no "
            "gpu_decode); nothing to measure"
        )
    if not c.cuda:
        return skipped(f"{NO_GPU}: GPU decoding needs one")
    return {"status": "measured", "gpu": gpu_decode(images=64 if c.quick else 2048, batch=128, device="cuda")}


def step_projection(c: Check) -> dict:
    throughput = c.results.get("throughput", {})
    best = throughput.get("gpu", {}).get("best") if throughput.get("status") == "measured" else None
    if not best:
        return skipped("no GPU images/s was measured in this run (the throughput step did not run on a GPU)")
    days = PAPER_EPOCHS * IMAGENET_TRAIN_IMAGES / best["images_per_s"] / 86400
    return {
        "status": "measured",
        "gpu": {
            "images_per_s": best["images_per_s"],
            "from": best["name"],
            "epochs": PAPER_EPOCHS,
            "images_per_epoch": IMAGENET_TRAIN_IMAGES,
            "projected_days": days,
            "projected_hours": days * 24,
            "paper_days": list(PAPER_DAYS),
            "paper_hardware": "two NVIDIA GTX 580 3GB",
            "note": "model and optimizer only, synthetic batches on the device: the data pipeline, "
            "evaluation and checkpoints add to this",
        },
    }


STEPS: dict[str, Callable[[Check], dict]] = {
    "kernels": step_kernels,
    "lrn": step_lrn,
    "throughput": step_throughput,
    "model_parallel": step_model_parallel,
    "digits": step_digits,
    "decode": step_decode,
    "projection": step_projection,
}


# ----------------------------------------------------------------------------- report
def environment() -> dict:
    """The machine, and which of pyproject's dependencies are installed at which version."""
    deps = {}
    for name in (
        "torch",
        "torchvision",
        "pluggy",
        "attrs",
        "cattrs",
        "safetensors",
        "tqdm",
        "numpy",
        "pillow",
        "scikit-learn",
        "matplotlib",
        "ninja",
        "tomli-w",
        "pytest",
        "hypothesis",
    ):
        try:
            deps[name] = md.version(name)
        except md.PackageNotFoundError:
            deps[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_cuda": torch.version.cuda,
        "packages": deps,
    }


def _figures(name: str, res: dict) -> str:
    gpu = res.get("gpu") or {}
    if name == "kernels" and gpu:
        return (
            f"{gpu.get('tests', 0)} cuda tests: {gpu.get('failures', 0)} failed, {gpu.get('errors', 0)} errors, "
            f"{gpu.get('skipped', 0)} skipped; kernel {gpu.get('cuda_kernel')}"
        )
    if name == "lrn" and gpu.get("rows"):
        return "; ".join(
            f"{r['dtype']} {r['shape']}: fwd+bwd {r['forward_backward_ms']:.3f} ms, "
            f"{r['forward_backward_share_of_copy']:.0%} of copy, x{r['forward_backward_speedup_vs_torch']:.1f} torch"
            for r in gpu["rows"]
        )
    if name == "throughput" and gpu.get("rows"):
        return "; ".join(
            f"{r['name']}: {r['images_per_s']:.0f} img/s"
            + (f" (x{r['ratio_vs_torchvision']:.2f})" if "ratio_vs_torchvision" in r else "")
            if "images_per_s" in r
            else f"{r['name']}: {r['unavailable']}"
            for r in gpu["rows"]
        )
    if name == "model_parallel" and gpu.get("rows"):
        return "; ".join(
            f"{r['strategy']} {r['median_ms']:.1f} ms ({r['time_vs_single']:.2f}x single's time)" for r in gpu["rows"]
        )
    if name == "digits" and gpu:
        return (
            f"{gpu['steps']} steps in {gpu['wall_s']} s, top-1 {gpu['top1_error']:.2%}; resumed at step "
            f"{gpu['stopped_at']}: {'bit-exact' if gpu['bit_exact'] else 'NOT bit-exact'} "
            f"({gpu['tensors_differing']}/{gpu['of_tensors']} tensors differ, max {gpu['max_abs_difference']:.3g})"
        )
    if name == "projection" and gpu:
        return (
            f"{gpu['projected_days']:.2f} days ({gpu['projected_hours']:.1f} h) at {gpu['images_per_s']:.0f} img/s "
            f"vs the paper's {gpu['paper_days'][0]}-{gpu['paper_days'][1]} days on {gpu['paper_hardware']}"
        )
    if name == "decode" and gpu:
        return json.dumps(gpu)
    return ""


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# gpu_check: {env['gpu'] or 'no GPU (CPU parts only)'}",
        "",
        f"torch {env['torch']} (CUDA {env['torch_cuda']}), Python {env['python']}, {env['cpu_count']} CPUs; "
        f"{'quick sizes' if report['quick'] else 'full sizes'}; {report['wall_s']:.0f} s in all.",
        "",
        "| step | status | GPU figures (measured in this run) | note |",
        "|---|---|---|---|",
    ]
    for name, res in report["steps"].items():
        note = res.get("reason") or res.get("error") or ""
        lines.append(f"| {name} | {res['status']} | {_figures(name, res) or '-'} | {note} |")
    missing = [k for k, v in env["packages"].items() if v is None]
    if missing:
        lines += ["", f"Missing packages: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and the runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the default without a GPU)")
    p.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    p.add_argument("--budget", type=float, default=540.0, help="seconds; later steps are skipped past it")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    check = Check(args.out, quick=args.quick or not cuda, cuda=cuda)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"quick": check.quick, "environment": environment(), "steps": check.results, "wall_s": 0.0}
    for name, step in STEPS.items():
        if args.only and name not in args.only:
            continue
        elapsed = time.perf_counter() - start
        print(f"== {name} ({elapsed:.0f} s in)", flush=True)
        if elapsed > args.budget:
            res = skipped(f"out of time: {elapsed:.0f} s used of the {args.budget:.0f} s budget")
        else:
            t = time.perf_counter()
            try:
                res = step(check)
            except Exception as exc:  # one broken step must not cost the others' figures
                traceback.print_exc()
                res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
            res["seconds"] = round(time.perf_counter() - t, 1)
        check.results[name] = res
        report["wall_s"] = time.perf_counter() - start
        write(report, args.out)  # after every step: a run cut short keeps what it measured
    report["skipped"] = [n for n, r in check.results.items() if r["status"] == "skipped"]
    report["failed"] = [n for n, r in check.results.items() if r["status"] == "failed"]
    write(report, args.out)
    print(markdown(report), flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
