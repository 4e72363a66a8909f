"""Step time of a recipe's network under single, model-parallel and tower-parallel, in one run.

    python benchmarks/parallel.py                                   # alexnet-imagenet, CPU, batch 8
    python benchmarks/parallel.py --device cuda:0 --batch 128       # one GPU: both towers on it
    python benchmarks/parallel.py --devices cuda:0,cuda:1 --batch 128   # two GPUs: the paper's split

A step is forward, loss, backward and the optimizer step on one synthetic batch already on
the device (the data pipeline is not measured). model-parallel puts tower t on
``devices[t]`` (default: every tower on ``--device``); towers sharing a device run fused as
one grouped layer, and ``model-parallel/per-tower`` runs each tower as its own modules as
on distinct devices. tower-parallel runs one process per tower over gloo (CPU) or nccl
(CUDA), each timing the same steps with a barrier around each.
Prints the median step time, the ratio to ``single`` measured in the same run, and the
bytes the strategy exchanges between towers per step (forward and backward, from its
``describe``). Needs as many devices as towers for tower-parallel on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

import convnet.core as cn
from convnet.core import build_strategy, plugins
from convnet.core.components import build_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANTS = {  # label -> (strategy, extra overrides)
    "single": ("single", []),
    "model-parallel": ("model-parallel", []),
    "model-parallel/per-tower": ("model-parallel", ["parallel.fuse_shared_devices=false"]),
    "tower-parallel": ("tower-parallel", []),
}


def _recipe(args: argparse.Namespace, variant: str, devices: list[str]):
    strategy, extra = VARIANTS[variant]
    sets = [f"data.batch_size={args.batch}", f"parallel.strategy={strategy}", *extra, *args.set]
    if strategy == "single":
        sets.append(f"parallel.device={devices[0]}")
    elif strategy == "model-parallel":
        sets.append("parallel.devices=[" + ", ".join(f'"{d}"' for d in devices) + "]")
    else:
        sets.append(f"parallel.device={'cuda' if devices[0].startswith('cuda') else 'cpu'}")
    return cn.load_recipe(args.recipe, sets, plugins.registries())


class Stepper:
    """One variant ready to step: module, optimizer and a synthetic batch on its device."""

    def __init__(self, args: argparse.Namespace, variant: str, devices: list[str]) -> None:
        regs = plugins.registries()
        recipe = _recipe(args, variant, devices)
        self.strategy = build_strategy(recipe, regs)
        model = cn.build_model(recipe, "cpu", regs)
        self.described = self.strategy.describe(model)
        self.module = self.strategy.prepare(model)
        self.optimizer = build_optimizer(recipe, regs, list(self.strategy.named_parameters(self.module)))
        self.device = self.strategy.input_device
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, *recipe.model.input, generator=g).to(self.device)
        self.y = torch.randint(recipe.model.num_classes, (args.batch,), generator=g).to(self.device)
        self.module.train()
        self.times: list[float] = []

    def step(self, barrier=None) -> float:
        if barrier is not None:
            barrier()
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.module(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        if barrier is not None:
            barrier()
        return time.perf_counter() - start


def time_interleaved(
    args: argparse.Namespace, variants: dict[str, list[str]]
) -> dict[str, tuple[list[float], list[dict]]]:
    """Variants in this process, one step of each in turn, so drifting load hits all alike."""
    steppers = {name: Stepper(args, name, devices) for name, devices in variants.items()}
    for i in range(args.warmup + args.steps):
        for s in steppers.values():
            t = s.step()
            if i >= args.warmup:
                s.times.append(t)
    return {name: (s.times, s.described) for name, s in steppers.items()}


def time_strategy(
    args: argparse.Namespace, variant: str, devices: list[str], barrier=None
) -> tuple[list[float], list[dict]]:
    s = Stepper(args, variant, devices)
    times = []
    for i in range(args.warmup + args.steps):
        t = s.step(barrier)
        if i >= args.warmup:
            times.append(t)
    s.strategy.close()
    return times, s.described


def _tower_rank(rank: int, world: int, port: int, args: argparse.Namespace, devices: list[str], out: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(args.tower_threads)
    import torch.distributed as dist

    times, described = time_strategy(args, "tower-parallel", devices, barrier=lambda: dist.barrier())
    if rank == 0:
        Path(out).write_text(repr((times, described)), encoding="utf-8")


def time_tower_parallel(args: argparse.Namespace, devices: list[str], towers: int) -> tuple[list[float], list[dict]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        mp.start_processes(
            _tower_rank, args=(towers, port, args, devices, out), nprocs=towers, join=True, start_method="spawn"
        )
        import ast

        return ast.literal_eval(Path(out).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="single's device; model-parallel's too unless --devices")
    p.add_argument("--devices", default="", help="comma-separated, one per tower, for model/tower-parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0 = leave as is)")
    p.add_argument(
        "--tower-threads",
        type=int,
        default=0,
        help="torch threads per tower-parallel process (default: threads / towers)",
    )
    p.add_argument("--skip", default="", help="comma-separated strategies not to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    towers = cn.load_recipe(args.recipe, args.set, plugins.registries()).model.towers
    devices = args.devices.split(",") if args.devices else [args.device] * towers
    args.tower_threads = args.tower_threads or max(torch.get_num_threads() // towers, 1)
    skip = set(filter(None, args.skip.split(",")))

    print(
        f"{args.recipe}: batch {args.batch}, {towers} towers, {args.steps} timed steps after {args.warmup}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, devices {devices}",
        flush=True,
    )
    local = {
        name: ([args.device] if name == "single" else devices)
        for name in VARIANTS
        if name != "tower-parallel" and name not in skip
    }
    results = time_interleaved(args, local)
    if "tower-parallel" not in skip:
        results["tower-parallel"] = time_tower_parallel(args, devices, towers)
    for name, (times, _) in results.items():
        print(f"  {name:<25} median step {statistics.median(times) * 1000:9.1f} ms", flush=True)

    base = statistics.median(results["single"][0]) if "single" in results else None
    print(f"\n{'strategy':<26}{'median ms':>11}{'min ms':>10}{'vs single':>11}{'exchanged MB/step':>19}")
    rows = []
    for name, (times, described) in results.items():
        median = statistics.median(times)
        ratio = f"{median / base:.3f}" if base else "-"
        exchanged = sum(d.get("exchanged_bytes_per_step", 0) for d in described) / 2**20
        print(f"{name:<26}{median * 1000:>11.1f}{min(times) * 1000:>10.1f}{ratio:>11}{exchanged:>19.2f}")
        rows.append(
            {
                "strategy": name,
                "median_ms": median * 1000,
                "min_ms": min(times) * 1000,
                "time_vs_single": median / base if base else None,
                "exchanged_mb_per_step": exchanged,
                "timed_steps": len(times),
            }
        )
    if args.json:
        meta = {"recipe": args.recipe, "batch": args.batch, "devices": devices, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
