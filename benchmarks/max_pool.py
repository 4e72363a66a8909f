"""The maxpool layer alone on NCHW CPU tensors: convnet's kernel (``impl = "auto"``) against torch's
(``impl = "torch"``), at the pooling shapes of a recipe, in one run.

    python benchmarks/max_pool.py                     # alexnet-imagenet's three pools, batch 32
    python benchmarks/max_pool.py --batch 128 --rounds 20

For each pool of the recipe (its input shape from the model's summary), forward alone and
forward + backward through the layer, the two kernels in interleaved rounds (a slow spell of a
shared machine hits both alike). Prints the median ms of each and the median per-round ratio
torch / convnet (above 1 = convnet's faster), and checks both give the same output and gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import convnet.core as cn
from convnet.core import load_plugins
from convnet.plugins.layers import max_pool_kernel
from convnet.plugins.layers.shapeless import MaxPool2d


def pools(recipe_name: str) -> list[tuple[str, MaxPool2d, tuple[int, ...]]]:
    """``(layer id, layer, input shape without the batch)`` for each maxpool of the recipe."""
    recipe = cn.load_recipe(recipe_name, [], load_plugins())
    model = cn.build_model(recipe, "cpu")
    shapes: dict[str, tuple[int, ...]] = {}

    def keep_shape(name: str):
        def hook(module: MaxPool2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            shapes[name] = tuple(inputs[0].shape[1:])

        return hook

    hooks = [
        module.register_forward_hook(keep_shape(name))
        for name, module in model.named_modules()
        if isinstance(module, MaxPool2d)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *recipe.model.input))
    for hook in hooks:
        hook.remove()
    return [(name, module, shapes[name]) for name, module in model.named_modules() if name in shapes]


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3, help="calls per round")
    args = p.parse_args(argv)
    if not max_pool_kernel.available():
        raise SystemExit(f"the max-pool kernel cannot be built here: {max_pool_kernel.failure()}")
    print(f"{args.recipe}, batch {args.batch}, cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    for name, layer, shape in pools(args.recipe):
        k, s, pad = layer.kernel_size, layer.stride, layer.padding
        impls = {impl: MaxPool2d(k, s, pad, impl=impl) for impl in ("torch", "auto")}
        g = torch.Generator().manual_seed(0)
        x = torch.relu(torch.randn(args.batch, *shape, generator=g)).requires_grad_()
        grad = torch.randn(impls["torch"](x).shape, generator=g)

        def forward(pool: MaxPool2d) -> None:
            with torch.no_grad():
                pool(x)

        def both(pool: MaxPool2d) -> None:
            x.grad = None
            pool(x).backward(grad)

        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for phase, fn in (("forward", forward), ("forward + backward", both)):
                for impl, pool in impls.items():
                    times.setdefault((phase, impl), []).append(timed(lambda: fn(pool), args.repeat))
        outputs = []
        for pool in impls.values():
            both(pool)
            outputs.append((pool(x).detach(), x.grad.clone()))
        same = all(torch.equal(a, b) for a, b in zip(*outputs))
        print(f"{name}: {k}x{k} stride {s} on [{args.batch}, {', '.join(map(str, shape))}]")
        for phase in ("forward", "forward + backward"):
            torch_t, ours_t = times[(phase, "torch")], times[(phase, "auto")]
            ratio = statistics.median(t / o for t, o in zip(torch_t, ours_t))
            print(
                f"  {phase:<19} torch {1000 * statistics.median(torch_t):7.2f} ms  convnet "
                f"{1000 * statistics.median(ours_t):7.2f} ms  {ratio:.2f}x"
            )
        print(f"  same output and gradient: {same}")


if __name__ == "__main__":
    main()
