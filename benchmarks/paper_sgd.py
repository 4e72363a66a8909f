"""The paper-sgd step alone: the fused CPU operator against the four multi-tensor passes, and
against torch.optim.SGD (what torchvision's reference script steps with), in one run.

    python benchmarks/paper_sgd.py                      # alexnet-imagenet's 61 M parameters
    python benchmarks/paper_sgd.py --recipe alexnet-digits --rounds 20

Each optimizer steps its own copy of the recipe's parameters (in the recipe's layout:
``train.channels_last`` conv weights stay channels_last) with fixed gradients, in interleaved
rounds (a slow spell of a shared machine hits all alike). Prints the median ms per step of each
and the median per-round ratio against the multi-tensor form; checks the fused step's numbers
are the multi-tensor form's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import convnet.core as cn
from convnet.core import load_plugins
from convnet.plugins.optim import fused_step
from convnet.plugins.optim.paper_sgd import PaperSGD


def parameters(recipe_name: str) -> list[torch.Tensor]:
    recipe = cn.load_recipe(recipe_name, [], load_plugins())
    model = cn.build_model(recipe, "cpu")
    if recipe.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return [p.detach() for p in model.parameters()]


def contender(name: str, base: list[torch.Tensor], grads: list[torch.Tensor]):
    params = [torch.nn.Parameter(p.clone()) for p in base]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if name == "torch.optim.SGD":
        return params, torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    return params, PaperSGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, fused=name == "fused")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = p.parse_args(argv)
    if not fused_step.available():
        raise SystemExit(f"the fused step cannot be built here: {fused_step.failure()}")
    base = parameters(args.recipe)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g).to(memory_format=_layout(p)) for p in base]
    names = ["multi-tensor", "fused", "torch.optim.SGD"]
    built = {n: contender(n, base, grads) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up: velocities allocated, kernel loaded
        built[n][1].step()
    for _ in range(args.rounds):
        for n in names:
            opt = built[n][1]
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times[n].append((time.perf_counter() - start) / args.steps)
    same = all(torch.equal(a, b) for a, b in zip(built["multi-tensor"][0], built["fused"][0]))
    count = sum(p.numel() for p in base)
    threads = torch.get_num_threads()
    print(f"{args.recipe}: {count / 1e6:.1f} M parameters, cpu ({threads} threads), torch {torch.__version__}")
    for n in names:
        ratio = statistics.median(m / t for m, t in zip(times["multi-tensor"], times[n]))
        print(f"{n:<16} {1000 * statistics.median(times[n]):7.1f} ms/step  {ratio:.2f}x the multi-tensor form")
    print(f"fused weights equal to the multi-tensor form's after {1 + args.rounds * args.steps} steps: {same}")


def _layout(p: torch.Tensor) -> torch.memory_format:
    if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


if __name__ == "__main__":
    main()
