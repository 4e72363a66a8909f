"""CPU train-step time of the paper's network beside torchvision's alexnet(), same batch.

    python benchmarks/train_step_cpu.py [--batch 32] [--rounds 6] [--lrn-impl auto]

One train step = zero_grad, forward, cross-entropy, backward, optimizer step (the paper's
SGD for every model, so only the networks differ). The models take turns within each
round, so load from other processes hits them alike; the median per model is reported,
and the ratio against torchvision's alexnet() measured in the same run. Synthetic data:
one fixed batch of 3x227x227 images (torchvision's adaptive pooling takes 227 as well).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn


def paper_models(lrn_impls: list[str]) -> dict[str, nn.Module]:
    from convnet.core import build_model, load_recipe, plugins

    regs = plugins.registries()
    clear = (
        []
        if all(n in regs.augmenter for n in ("mean-image", "random-crop", "hflip", "pca-lighting", "ten-crop"))
        else ["data.train_augment=[]", "data.eval_augment=[]"]
    )
    recipe = load_recipe("alexnet-imagenet", clear, regs)
    out = {}
    for impl in lrn_impls:
        sets = [
            f'model.layers[{i}].impl="{impl}"' for i, layer in enumerate(recipe.model.layers) if layer.name == "lrn"
        ]
        out[f"alexnet-imagenet (2 towers, LRN {impl})"] = build_model(
            load_recipe("alexnet-imagenet", clear + sets, regs), registries=regs
        )
    tv = load_recipe("alexnet-torchvision", clear, regs)
    out["alexnet-torchvision recipe"] = build_model(tv, registries=regs)
    return out


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    import torchvision

    from convnet.plugins.optim.paper_sgd import PaperSGD

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lrn-impl", nargs="+", default=["auto", "torch"], help="one alexnet-imagenet row per LRN impl")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {"torchvision alexnet()": torchvision.models.alexnet(weights=None)} | paper_models(args.lrn_impl)
    opts = {k: PaperSGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 227, 227, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    for m in models.values():
        m.train()
    times: dict[str, list[float]] = {k: [] for k in models}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for r in range(args.warmup + args.rounds):
            for k, m in models.items():
                t = train_step(m, opts[k], x, y)
                if r >= args.warmup:
                    times[k].append(t)
    for message in sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)}):
        print(f"note: {message}")
    base = statistics.median(times["torchvision alexnet()"])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; batch {args.batch}, {args.rounds} timed rounds after {args.warmup} warm-up"
    )
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:<42} {med * 1000:9.1f} ms/step (min {min(ts) * 1000:.1f})  ratio vs torchvision {med / base:5.2f}")


if __name__ == "__main__":
    main()
