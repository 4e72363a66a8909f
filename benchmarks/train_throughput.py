"""Training-step throughput: the paper's network (two towers, LRN, paper SGD) against
torchvision's ``alexnet()`` trained the usual way (torch.optim.SGD), in one run.

    python benchmarks/train_throughput.py                        # CPU here: batch 32
    python benchmarks/train_throughput.py --device cuda --batch 128 --channels-last --autocast bfloat16

Synthetic data already on the device, so this measures the model and optimizer only. Prints
images/s for each and the ratio ours / torchvision (above 1 = ours faster). With
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


def measure(name: str, built, args: argparse.Namespace, device: torch.device) -> float:
    module, optimizer, shape, classes = built
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(classes, (args.batch,), generator=g).to(device)
    module.train()
    times = time_steps(module, optimizer, x, y, args.steps, args.warmup, args.autocast == "bfloat16")
    median = statistics.median(times)
    rate = args.batch / median
    print(f"{name:<32} {median * 1000:9.1f} ms/step  {rate:9.1f} images/s  (median of {len(times)})", flush=True)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none")
    p.add_argument("--strategies", nargs="*", default=[], help="also time these strategies against single")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.batch = args.batch or (128 if device.type == "cuda" else 32)
    args.steps = args.steps or (20 if device.type == "cuda" else 5)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, batch {args.batch}, channels_last={args.channels_last}, autocast={args.autocast}, "
          f"torch {torch.__version__}")
    base = measure("torchvision alexnet() + SGD", torchvision_alexnet(args, device), args, device)
    single = measure(f"{args.recipe} single", ours("single", args, device), args, device)
    print(f"ratio {args.recipe} / torchvision: {single / base:.2f}x images/s")
    for strategy in args.strategies:
        rate = measure(f"{args.recipe} {strategy}", ours(strategy, args, device), args, device)
        print(f"ratio {strategy} / single: {rate / single:.2f}x images/s (overhead {100 * (single / rate - 1):+.1f}%)")


if __name__ == "__main__":
    main()
