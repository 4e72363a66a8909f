"""The cost of keyed dropout (convnet.core.keyed) against torch's nn.Dropout, on the CPU.

    python benchmarks/dropout.py [--rounds 20] [--step-rounds 4] [--batch 32] [--threads 1]

1. The layer alone at AlexNet's fc6/fc7 shape [128, 4096], forward + backward.
2. One alexnet-imagenet train step (forward, cross-entropy, backward, paper-SGD step) at
   ``--batch``, the same network with its two dropout layers keyed or torch's.

Variants take turns within each round, so load from other processes hits them alike; the
median per variant is reported with the ratio keyed / torch measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from convnet.core import keyed
from convnet.plugins.layers.shapeless import KeyedDropout


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(variants: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            t = _timed(fn)
            if r >= warmup:
                times[name].append(t)
    return times


def _report(title: str, times: dict[str, list[float]], base: str) -> None:
    ref = statistics.median(times[base])
    print(title)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<28} {med * 1000:9.2f} ms (min {min(ts) * 1000:.2f})  ratio vs {base} {med / ref:5.2f}")


def layer(rounds: int) -> None:
    x = torch.randn(128, 4096, requires_grad=True)
    grad = torch.randn(128, 4096)
    samples = torch.arange(128)
    torch_drop, keyed_drop = nn.Dropout(0.5), KeyedDropout(0.5, "fc6")
    step = iter(range(10**9))

    def run_torch() -> None:
        torch_drop(x).backward(grad)

    def run_keyed() -> None:
        with keyed.keyed_draws(0, next(step), samples):
            keyed_drop(x).backward(grad)

    _report(
        "dropout p=0.5 on [128, 4096], forward + backward:",
        _interleaved({"torch nn.Dropout": run_torch, "keyed": run_keyed}, rounds, 3),
        "torch nn.Dropout",
    )


def train_step(rounds: int, batch: int) -> None:
    from convnet.core import build_model, load_recipe, plugins
    from convnet.plugins.optim.paper_sgd import PaperSGD

    regs = plugins.registries()
    recipe = load_recipe("alexnet-imagenet", ["data.train_augment=[]", "data.eval_augment=[]"], regs)
    keyed_model = build_model(recipe, registries=regs)
    torch_model = copy.deepcopy(keyed_model)
    for name, module in list(torch_model.layers.items()):
        if isinstance(module, KeyedDropout):
            torch_model.layers[name] = nn.Dropout(module.p)
    assert sum(isinstance(m, KeyedDropout) for m in keyed_model.modules()) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 227, 227, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    samples = torch.arange(batch)
    opts = {id(m): PaperSGD(m.parameters(), lr=1e-3) for m in (keyed_model, torch_model)}
    step = iter(range(10**9))

    def one(model: nn.Module, draws: bool) -> Callable[[], None]:
        def run() -> None:
            opt = opts[id(model)]
            opt.zero_grad(set_to_none=True)
            if draws:
                with keyed.keyed_draws(0, next(step), samples):
                    logits = model(x)
            else:
                logits = model(x)
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()

        return run

    _report(
        f"alexnet-imagenet train step, batch {batch}:",
        _interleaved({"torch nn.Dropout": one(torch_model, False), "keyed": one(keyed_model, True)}, rounds, 1),
        "torch nn.Dropout",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--step-rounds", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads"
    )
    layer(args.rounds)
    if args.step_rounds:
        train_step(args.step_rounds, args.batch)


if __name__ == "__main__":
    main()
