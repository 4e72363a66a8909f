"""Training-step throughput: the paper's network (two towers, LRN, paper SGD) against
torchvision's ``alexnet()`` trained the usual way (torch.optim.SGD), in one run.

    python benchmarks/train_throughput.py                        # CPU here: batch 32
    python benchmarks/train_throughput.py --compile              # eager and compiled (train.compile's options)
    python benchmarks/train_throughput.py --device cuda --batch 128 --channels-last --autocast bfloat16
    python benchmarks/train_throughput.py --device cuda --variants eager channels_last bf16 compiled --json OUT

Synthetic data already on the device, so this measures the model and optimizer only. Without
``--variants`` each network runs as it trains by default: torchvision's ``alexnet()`` in NCHW (its
reference script has no channels_last), ours as its recipe says (alexnet-imagenet sets
``train.channels_last``); the header line says which. Prints
images/s for each and the ratio ours / torchvision (above 1 = ours faster): the median over the
interleaved rounds of the per-round ratio (a slow spell of a shared machine hits both alike). With
``--strategies`` it also times other registered strategies (e.g. model-parallel with both
towers on the one device) against ``single``; with ``--inductor-layers``, ours with every relu
and maxpool ``opaque_under_compile = false`` (what that option gains under torch.compile); with
``--multi-tensor-sgd``, ours with the paper-sgd step as four multi-tensor passes instead of the
fused CPU operator; with ``--torch-max-pool``, ours with every maxpool ``impl = "torch"`` (torch's
NCHW CPU kernel instead of convnet's).
``--variants`` times several set-ups in one interleaved run, each for both networks: eager
(float32, contiguous), channels_last,
bf16 (channels_last + bfloat16 autocast), compiled (bf16 under torch.compile; a network that
does not compile here is reported as such, not timed), compiled_f32 (float32, contiguous, compiled),
compiled_cl (float32, channels_last, compiled). ``--compile`` is ``--variants eager compiled_f32``;
``--cpu-fast`` is ``--variants eager channels_last compiled_f32 compiled_cl`` (float32 throughout).
Compiling uses ``nn.Module.compile`` with the options ``train.compile`` uses; the optimizer step
stays eager for both networks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

import convnet.core as cn
from convnet.core import build_strategy, cpu_memory, load_plugins
from convnet.core.compiling import compile_in_place
from convnet.core.components import build_optimizer
from convnet.core.layer_edits import raw_layer_ids
from convnet.core.recipe import load_raw


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    warmup: int,
    autocast: bool,
) -> list[float]:
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


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    autocast: bool
    compiled: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("eager", False, False),
        Variant("channels_last", True, False),
        Variant("bf16", True, True),
        Variant("compiled", True, True, True),
        Variant("compiled_f32", False, False, True),
        Variant("compiled_cl", True, False, True),
    )
}


def ours(
    strategy_name: str,
    args: argparse.Namespace,
    device: torch.device,
    inductor_layers: bool = False,
    multi_tensor_sgd: bool = False,
    torch_max_pool: bool = False,
):
    regs = load_plugins()
    sets = [f"data.batch_size={args.batch}", f"parallel.strategy={strategy_name}"]
    raw_layers = load_raw(args.recipe)[0]["model"]["layers"]
    layer_ids = list(zip(raw_layer_ids(raw_layers), (layer.get("name") for layer in raw_layers)))
    if inductor_layers:  # every relu and maxpool left to inductor under torch.compile
        sets += [f"model.layers.{i}.opaque_under_compile=false" for i, name in layer_ids if name in ("relu", "maxpool")]
    if torch_max_pool:  # torch's NCHW max-pool kernel, not convnet's
        sets += [f'model.layers.{i}.impl="torch"' for i, name in layer_ids if name == "maxpool"]
    if strategy_name == "single":
        sets.append(f"parallel.device={device}")
    elif strategy_name == "model-parallel":
        sets.append(f'parallel.devices=["{device}", "{device}"]')
    recipe = cn.load_recipe(args.recipe, sets, regs)
    strategy = build_strategy(recipe, regs)
    module = strategy.prepare(cn.build_model(recipe, "cpu", regs))
    optimizer = build_optimizer(recipe, regs, list(strategy.named_parameters(module)))
    if multi_tensor_sgd:  # the paper-sgd step as four multi-tensor passes, not the fused operator
        optimizer.fused = False
    return module, optimizer, tuple(recipe.model.input), recipe.model.num_classes, recipe.train.channels_last


def torchvision_alexnet(args: argparse.Namespace, device: torch.device):
    module = torchvision.models.alexnet(num_classes=1000).to(device)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return module, optimizer, (3, 224, 224), 1000, False


class Contender:
    """A model, its optimizer and a fixed synthetic batch on the device, set up as ``variant`` says."""

    def __init__(
        self, name: str, built, args: argparse.Namespace, device: torch.device, variant: Variant | None = None
    ) -> None:
        self.name = name
        self.module, self.optimizer, shape, classes, trained_channels_last = built
        # Without --variants each network runs as it trains by default (our recipe may set
        # train.channels_last; torchvision's reference script trains NCHW), plus the flags given.
        self.variant = variant or Variant(
            "default", args.channels_last or trained_channels_last, args.autocast == "bfloat16"
        )
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(args.batch, *shape, generator=g).to(device)
        if self.variant.channels_last:
            self.module.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(classes, (args.batch,), generator=g).to(device)
        self.module.train()
        if self.variant.compiled:
            compile_in_place(self.module)
        self.times: list[float] = []
        self.rounds: list[float] = []  # the median step time of each round
        self.unavailable: str | None = None

    def run(self, steps: int, warmup: int, autocast: bool | None = None) -> None:
        if self.unavailable:
            return
        autocast = self.variant.autocast if autocast is None else autocast
        try:
            times = time_steps(self.module, self.optimizer, self.x, self.y, steps, warmup, autocast)
        except Exception as exc:  # torch.compile without a working backend here: say so, time the rest
            if not self.variant.compiled:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            self.unavailable = f"{type(exc).__name__}: {first[:200]}"
            return
        self.times += times
        if times:
            self.rounds.append(statistics.median(times))

    def rate(self, batch: int) -> float:
        return batch / statistics.median(self.times)


def ratio(base: Contender, other: Contender) -> float:
    """images/s of ``other`` over ``base``: the median of the per-round ratios."""
    return statistics.median(b / o for b, o in zip(base.rounds, other.rounds))


def contenders_for(args: argparse.Namespace, device: torch.device) -> list[Contender]:
    """torchvision's alexnet() and ours (then any --strategies) for each variant, in that order."""
    variants = [VARIANTS[v] for v in args.variants] if args.variants else [None]
    out = []
    for variant in variants:
        tag = f" [{variant.name}]" if variant else ""
        group = [
            Contender(f"torchvision alexnet() + SGD{tag}", torchvision_alexnet(args, device), args, device, variant),
            Contender(f"{args.recipe} single{tag}", ours("single", args, device), args, device, variant),
        ]
        group += [
            Contender(f"{args.recipe} {s}{tag}", ours(s, args, device), args, device, variant) for s in args.strategies
        ]
        if args.inductor_layers:
            name = f"{args.recipe} single, inductor relu/maxpool{tag}"
            group.append(Contender(name, ours("single", args, device, inductor_layers=True), args, device, variant))
        if args.multi_tensor_sgd:
            name = f"{args.recipe} single, multi-tensor paper-sgd{tag}"
            group.append(Contender(name, ours("single", args, device, multi_tensor_sgd=True), args, device, variant))
        if args.torch_max_pool:
            name = f"{args.recipe} single, torch's max-pool{tag}"
            group.append(Contender(name, ours("single", args, device, torch_max_pool=True), args, device, variant))
        if variant is None:  # each as it trains by default: say in which layout
            for c in group:
                c.name += " [channels_last]" if c.variant.channels_last else " [NCHW]"
        out += group
    return out


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Build every contender, run them in interleaved rounds, print and return the results."""
    contenders = contenders_for(args, device)
    # Interleaved rounds: a slow spell of a shared machine hits every contender alike.
    for c in contenders:
        c.run(0, args.warmup)
    for _ in range(args.rounds):
        for c in contenders:
            c.run(args.steps, 0)
    rows = []
    per_variant = 2 + len(args.strategies) + args.inductor_layers + args.multi_tensor_sgd + args.torch_max_pool
    for i in range(0, len(contenders), per_variant):
        tv, single, *others = contenders[i : i + per_variant]
        for c in (tv, single, *others):
            if c.unavailable:
                print(f"{c.name:<48} not timed: {c.unavailable}")
                rows.append({"name": c.name, "variant": c.variant.name, "unavailable": c.unavailable})
                continue
            print(
                f"{c.name:<48} {1000 * statistics.median(c.times):9.1f} ms/step  {c.rate(args.batch):9.1f} images/s "
                f"(median of {len(c.times)})"
            )
            row = {
                "name": c.name,
                "variant": c.variant.name,
                "ms_per_step": 1000 * statistics.median(c.times),
                "images_per_s": c.rate(args.batch),
                "timed_steps": len(c.times),
            }
            if c is single and not tv.unavailable:
                row["ratio_vs_torchvision"] = ratio(tv, c)
                print(
                    f"ratio {args.recipe} / torchvision{' [' + c.variant.name + ']' if args.variants else ''}: "
                    f"{row['ratio_vs_torchvision']:.2f}x images/s"
                )
            if c in others and not single.unavailable:
                row["ratio_vs_single"] = ratio(single, c)
                print(
                    f"ratio {c.name} / single: {row['ratio_vs_single']:.2f}x images/s "
                    f"(overhead {100 * (1 / row['ratio_vs_single'] - 1):+.1f}%)"
                )
            rows.append(row)
    return {
        "device": device_name(device),
        "batch": args.batch,
        "recipe": args.recipe,
        "torch": torch.__version__,
        "rows": rows,
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=[],
        help="time these set-ups instead of the one --channels-last/--autocast describe",
    )
    p.add_argument("--strategies", nargs="*", default=[], help="also time these strategies against single")
    p.add_argument(
        "--inductor-layers",
        action="store_true",
        help="also time ours with relu and maxpool opaque_under_compile = false (inductor's code for them "
        "when compiled), against ours as its recipe says",
    )
    p.add_argument(
        "--multi-tensor-sgd",
        action="store_true",
        help="also time ours with the paper-sgd step as multi-tensor passes (PaperSGD(fused=False)), against "
        "ours with the fused step (the default)",
    )
    p.add_argument(
        "--torch-max-pool",
        action="store_true",
        help='also time ours with every maxpool impl = "torch" (torch\'s NCHW CPU kernel), against ours with '
        "convnet's (the default)",
    )
    p.add_argument("--compile", action="store_true", help="the same as --variants eager compiled_f32")
    p.add_argument(
        "--cpu-fast", action="store_true", help="the same as --variants eager channels_last compiled_f32 compiled_cl"
    )
    p.add_argument(
        "--reuse-cpu-memory",
        action="store_true",
        help="train.reuse_cpu_memory for this process, so for both networks (benchmarks/cpu_memory.py "
        "times it against without, in separate processes)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.reuse_cpu_memory and not cpu_memory.reuse_freed_memory():
        p.error("--reuse-cpu-memory: this C library is not glibc")
    if args.compile:
        args.variants = list(dict.fromkeys([*args.variants, "eager", "compiled_f32"]))
    if args.cpu_fast:
        args.variants = list(dict.fromkeys([*args.variants, "eager", "channels_last", "compiled_f32", "compiled_cl"]))
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    args.batch = args.batch or (128 if device.type == "cuda" else 32)
    args.steps = args.steps or (10 if device.type == "cuda" else 2)
    args.rounds = args.rounds or (5 if device.type == "cuda" else 4)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    setup = (
        f"variants {' '.join(args.variants)}"
        if args.variants
        else f"channels_last={args.channels_last}, autocast={args.autocast}"
    )
    reuse = ", reuse_cpu_memory" if args.reuse_cpu_memory else ""
    print(f"device {device_name(device)}, batch {args.batch}, {setup}{reuse}, torch {torch.__version__}")
    result = measure(args, device)
    result["reuse_cpu_memory"] = args.reuse_cpu_memory
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
