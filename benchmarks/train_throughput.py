"""Training-step throughput: the paper's network (two towers, LRN, paper SGD) against
torchvision's ``alexnet()`` trained the usual way (torch.optim.SGD), in one run.

    python benchmarks/train_throughput.py                        # CPU here: batch 32
    python benchmarks/train_throughput.py --compile              # also both compiled (torch.compile)
    python benchmarks/train_throughput.py --device cuda --batch 128 --channels-last --autocast bfloat16

Synthetic data already on the device, so this measures the model and optimizer only. Prints
images/s for each and the ratio ours / torchvision (above 1 = ours faster): the median over the
interleaved rounds of the per-round ratio. ``--compile`` adds a compiled copy of both networks
(``nn.Module.compile`` with the options ``train.compile`` uses; the optimizer step stays eager
for both) and prints compiled against compiled, and each network compiled against eager. With
``--strategies`` it also times other registered strategies (e.g. model-parallel with both
towers on the one device) against ``single``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import convnet.core as cn
from convnet.core import plugins
from convnet.core.compiling import compile_in_place
from convnet.core.engine import build_strategy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(module: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               steps: int, warmup: int, autocast: bool) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = module(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def ours(strategy_name: str, args: argparse.Namespace, device: torch.device):
    regs = plugins.registries()
    sets = [f"data.batch_size={args.batch}", f"parallel.strategy={strategy_name}"]
    if strategy_name == "single":
        sets.append(f"parallel.device={device}")
    elif strategy_name == "model-parallel":
        sets.append(f"parallel.devices=[\"{device}\", \"{device}\"]")
    recipe = cn.load_recipe(args.recipe, sets, regs)
    strategy = build_strategy(recipe, regs)
    module = strategy.prepare(cn.build_model(recipe, "cpu", regs))
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    opt_entry = regs.optimizer.get(recipe.train.optimizer.name)
    optimizer = opt_entry.factory(recipe.train.optimizer.options, list(strategy.named_parameters(module)))
    return module, optimizer, tuple(recipe.model.input), recipe.model.num_classes


def torchvision_alexnet(args: argparse.Namespace, device: torch.device):
    module = torchvision.models.alexnet(num_classes=1000).to(device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return module, optimizer, (3, 224, 224), 1000


class Contender:
    """A model, its optimizer and a fixed synthetic batch on the device."""

    def __init__(self, name: str, built, args: argparse.Namespace, device: torch.device,
                 compiled: bool = False) -> None:
        self.name = name
        self.module, self.optimizer, shape, classes = built
        if compiled:
            compile_in_place(self.module)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, *shape, generator=g).to(device)
        if args.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(classes, (args.batch,), generator=g).to(device)
        self.module.train()
        self.times: list[float] = []
        self.rounds: list[float] = []  # median step time of each round

    def run(self, steps: int, warmup: int, autocast: bool) -> None:
        times = time_steps(self.module, self.optimizer, self.x, self.y, steps, warmup, autocast)
        self.times += times
        if times:
            self.rounds.append(statistics.median(times))

    def rate(self, batch: int) -> float:
        return batch / statistics.median(self.times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none")
    p.add_argument("--strategies", nargs="*", default=[], help="also time these strategies against single")
    p.add_argument("--compile", action="store_true", help="also time both networks compiled")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.batch = args.batch or (128 if device.type == "cuda" else 32)
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    args.rounds = args.rounds or (5 if device.type == "cuda" else 4)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {args.batch}, channels_last={args.channels_last}, autocast={args.autocast}, "
          f"torch {torch.__version__}")
    contenders = [Contender("torchvision alexnet() + SGD", torchvision_alexnet(args, device), args, device),
                  Contender(f"{args.recipe} single", ours("single", args, device), args, device)]
    if args.compile:
        contenders += [Contender("torchvision alexnet() compiled", torchvision_alexnet(args, device), args, device,
                                 compiled=True),
                       Contender(f"{args.recipe} single compiled", ours("single", args, device), args, device,
                                 compiled=True)]
    contenders += [Contender(f"{args.recipe} {s}", ours(s, args, device), args, device) for s in args.strategies]
    # Interleaved rounds: a slow spell of a shared machine hits every contender alike.
    for c in contenders:
        start = time.perf_counter()
        c.run(0, args.warmup, args.autocast == "bfloat16")
        print(f"warm-up {c.name}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.rounds):
        for c in contenders:
            c.run(args.steps, 0, args.autocast == "bfloat16")
    for c in contenders:
        print(f"{c.name:<36} {1000 * statistics.median(c.times):9.1f} ms/step  {c.rate(args.batch):9.1f} images/s "
              f"(median of {len(c.times)})")
    by_name = {c.name: c for c in contenders}
    pairs = [("torchvision alexnet() + SGD", f"{args.recipe} single", "eager vs eager")]
    if args.compile:
        pairs += [("torchvision alexnet() compiled", f"{args.recipe} single compiled", "compiled vs compiled"),
                  (f"{args.recipe} single", f"{args.recipe} single compiled", "ours compiled vs ours eager"),
                  ("torchvision alexnet() + SGD", "torchvision alexnet() compiled", "torchvision compiled vs eager")]
    for base, other, what in pairs:
        print(f"ratio {what}: {_ratio(by_name[base], by_name[other], args.batch)}")
    single = contenders[1].rate(args.batch)
    for c in contenders[4 if args.compile else 2:]:
        rate = c.rate(args.batch)
        print(f"ratio {c.name} / single: {rate / single:.2f}x images/s (overhead {100 * (single / rate - 1):+.1f}%)")


def _ratio(base: Contender, other: Contender, batch: int) -> str:
    """images/s of ``other`` over ``base``: median of the per-round ratios, their range, and of the medians."""
    per_round = [b / o for b, o in zip(base.rounds, other.rounds)]
    return (f"{statistics.median(per_round):.2f}x images/s (rounds {min(per_round):.2f}-{max(per_round):.2f}; "
            f"ratio of overall medians {other.rate(batch) / base.rate(batch):.2f}x)")

if __name__ == "__main__":
    main()
