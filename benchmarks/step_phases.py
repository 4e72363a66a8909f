"""Where a training step's time goes: forward, backward and optimizer step, timed apart, for
torchvision's ``alexnet()`` and the paper's network, set up as one ``train_throughput`` variant,
interleaved in one run.

    python benchmarks/step_phases.py                         # eager, channels_last (CPU: batch 32)
    python benchmarks/step_phases.py --variant compiled_cl --rounds 6

Prints each phase's median (ms) and ours / torchvision per phase (above 1 = ours slower), the
median over rounds of the per-round ratio, as ``train_throughput.py`` does for whole steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import train_throughput as tt
from torch import nn

from convnet.core import cpu_memory

PHASES = ("forward", "backward", "step")


def timed_step(c: tt.Contender) -> tuple[float, float, float]:
    c.optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(c.module(c.x).float(), c.y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    c.optimizer.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--variant", choices=list(tt.VARIANTS), default="channels_last")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reuse-cpu-memory", action="store_true", help="train.reuse_cpu_memory for this process")
    args = p.parse_args(argv)
    if args.reuse_cpu_memory and not cpu_memory.reuse_freed_memory():
        p.error("--reuse-cpu-memory: this C library is not glibc")
    device = torch.device("cpu")
    variant = tt.VARIANTS[args.variant]
    contenders = [
        tt.Contender("torchvision alexnet()", tt.torchvision_alexnet(args, device), args, device, variant),
        tt.Contender(args.recipe, tt.ours("single", args, device), args, device, variant),
    ]
    for c in contenders:
        for _ in range(args.warmup):
            timed_step(c)
    rounds: dict[str, list[tuple[float, float, float]]] = {c.name: [] for c in contenders}
    for _ in range(args.rounds):
        for c in contenders:
            times = [timed_step(c) for _ in range(args.steps)]
            rounds[c.name].append(tuple(statistics.median(t[i] for t in times) for i in range(3)))
    reuse = ", reuse_cpu_memory" if args.reuse_cpu_memory else ""
    print(
        f"variant {args.variant}{reuse}, batch {args.batch}, {args.rounds} x {args.steps} steps, "
        f"torch {torch.__version__}"
    )
    for name, per_round in rounds.items():
        ms = [1000 * statistics.median(r[i] for r in per_round) for i in range(3)]
        phases = "  ".join(f"{ph} {v:7.1f} ms" for ph, v in zip(PHASES, ms))
        print(f"  {name:28s} {phases}  total {sum(ms):7.1f} ms")
    base, ours = (rounds[c.name] for c in contenders)
    ratios = [statistics.median(o[i] / b[i] for b, o in zip(base, ours)) for i in range(3)]
    total = statistics.median(sum(o) / sum(b) for b, o in zip(base, ours))
    phases = "  ".join(f"{ph} {r:.2f}x" for ph, r in zip(PHASES, ratios))
    print(f"  ours / torchvision (time)   {phases}  total {total:.2f}x")


if __name__ == "__main__":
    main()
