"""LRN speed: every implementation on every device present, on the paper's LRN shapes.

Prints, per shape and pass (forward alone under no_grad; forward + backward), the median time,
the bandwidth counted from the minimal bytes (each input read once, each output written once:
forward reads x and writes y; forward + backward also reads the output gradient and x and writes
the input gradient), that bandwidth as a share of a plain device copy of the same tensor timed
in the same run (``copy``: read once, write once: the most an elementwise pass can move), and
the speed-up over ``torch`` (F.local_response_norm) measured in the same run; the cost of the
custom-operator wrapping (``local_response_norm`` through ``convnet::lrn_forward`` and its
registered backward) against calling the two kernel ops directly; and, on the CPU, forward +
backward with the scale saved against recomputed by the backward.
Usage: ``python benchmarks/lrn.py [--batch 128 32] [--repeat 5] [--dtype float32] [--layouts nchw nhwc]
[--only-overhead] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from convnet.plugins.lrn import kernels, local_response_norm, ops

CHANNELS_HW = ((96, 55), (256, 27))  # conv1 and conv2 outputs in the paper (per whole network)
PAPER = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], device: str, repeat: int, warmup: int, best: bool = False) -> float:
    """Median time of ``repeat`` runs (the fastest with ``best``: on a shared machine the least disturbed)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def _impls(device: str) -> list[str]:
    names = ["torch", "reference"]
    kernel = "cpu" if device == "cpu" else "cuda"
    if kernels.get(kernel) is not None:
        names.append(kernel)
    else:
        print(f"# {kernel} kernel unavailable on {device}: {kernels.failure(kernel)}")
    return names


LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def bench(
    device: str, shape: tuple[int, ...], dtype: torch.dtype, repeat: int, warmup: int, layout: str = "nchw"
) -> list[dict]:
    """Time every implementation on one shape; print a line each and return them as dicts."""
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype, memory_format=fmt)
    grad = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype, memory_format=fmt)
    nbytes = x.numel() * x.element_size()
    copy_target = torch.empty_like(x)
    copy_s = _time(lambda: copy_target.copy_(x), device, repeat, warmup)
    copy_gbs = 2 * nbytes / copy_s / 1e9
    rows = []
    for impl in _impls(device):

        def forward(impl: str = impl) -> None:
            with torch.no_grad():
                local_response_norm(x, impl=impl, **PAPER)

        def forward_backward(impl: str = impl) -> None:
            xr = x.detach().requires_grad_(True)
            local_response_norm(xr, impl=impl, **PAPER).backward(grad)

        rows.append((impl, _time(forward, device, repeat, warmup), _time(forward_backward, device, repeat, warmup)))
    base = {r[0]: r for r in rows}["torch"]
    dtype_name = str(dtype).replace("torch.", "")
    label = f"{device} {list(shape)} {dtype_name}" + (f" {layout}" if layout != "nchw" else "")
    print(f"{label:<34} {'copy':<10} {copy_s * 1e3:9.2f} ms {copy_gbs:7.2f} GB/s (read + write, the bandwidth ceiling)")
    out = []
    for impl, fwd, both in rows:
        fwd_gbs, both_gbs = 2 * nbytes / fwd / 1e9, 5 * nbytes / both / 1e9
        print(
            f"{label:<34} {impl:<10} fwd {fwd * 1e3:9.2f} ms {fwd_gbs:7.2f} GB/s ({fwd_gbs / copy_gbs:4.0%} of copy) "
            f"x{base[1] / fwd:6.2f}   fwd+bwd {both * 1e3:9.2f} ms {both_gbs:7.2f} GB/s "
            f"({both_gbs / copy_gbs:4.0%}) x{base[2] / both:6.2f}",
            flush=True,
        )
        out.append(
            {
                "device": device,
                "shape": list(shape),
                "dtype": dtype_name,
                "layout": layout,
                "impl": impl,
                "copy_ms": copy_s * 1e3,
                "copy_gb_s": copy_gbs,
                "forward_ms": fwd * 1e3,
                "forward_gb_s": fwd_gbs,
                "forward_share_of_copy": fwd_gbs / copy_gbs,
                "forward_speedup_vs_torch": base[1] / fwd,
                "forward_backward_ms": both * 1e3,
                "forward_backward_gb_s": both_gbs,
                "forward_backward_share_of_copy": both_gbs / copy_gbs,
                "forward_backward_speedup_vs_torch": base[2] / both,
            }
        )
    return out


OVERHEAD_SHAPES = ((32, 96, 55, 55), (32, 256, 27, 27), (64, 16, 32, 32), (8, 16, 8, 8))


def op_overhead(device: str, dtype: torch.dtype, rounds: int, repeat: int) -> None:
    """The custom-op wrapping (``local_response_norm`` -> ``convnet::lrn_forward`` with its
    registered autograd) against calling the kernel's two ops directly, without autograd.

    Interleaved rounds, each the fastest of ``repeat`` runs of both; printed: the median over rounds
    of the extra time per call and of (wrapped / direct - 1). The tiny last shape shows the fixed
    per-call cost, which the paper's shapes dilute."""
    kernel = "cpu" if device == "cpu" else "cuda"
    if kernels.get(kernel) is None:
        return
    fwd_op, bwd_op = torch.ops.convnet.lrn_forward.default, torch.ops.convnet.lrn_backward.default
    args = (PAPER["size"], PAPER["alpha"], PAPER["beta"], PAPER["k"])
    save = not ops.recomputes_scale(torch.device(device))  # as local_response_norm does
    for shape in OVERHEAD_SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

        def wrapped_fwd() -> None:
            with torch.no_grad():
                local_response_norm(x, impl=kernel, **PAPER)

        def direct_fwd() -> None:
            fwd_op(x, *args, False)

        def wrapped_both() -> None:
            xr = x.detach().requires_grad_(True)
            local_response_norm(xr, impl=kernel, **PAPER).backward(grad)

        def direct_both() -> None:
            _, scale = fwd_op(x, *args, save)
            bwd_op(grad, x, scale, *args)

        extra: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}  # wrapped - direct, seconds
        ratio: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
        for i in range(rounds):
            for key, wrapped, direct in (("fwd", wrapped_fwd, direct_fwd), ("fwd+bwd", wrapped_both, direct_both)):
                if i % 2:  # alternate which goes first: the second of a pair finds warmer caches and allocator
                    d, w = _time(direct, device, repeat, 1, best=True), _time(wrapped, device, repeat, 1, best=True)
                else:
                    w, d = _time(wrapped, device, repeat, 1, best=True), _time(direct, device, repeat, 1, best=True)
                extra[key].append(w - d)
                ratio[key].append(w / d - 1)
        print(
            f"{device} {list(shape)!s:<18} {str(dtype).replace('torch.', ''):<8} op overhead: "
            + "   ".join(
                f"{k} {1e6 * statistics.median(extra[k]):+8.1f} us = {100 * statistics.median(ratio[k]):+6.2f}%"
                for k in extra
            ),
            flush=True,
        )


def scale_choice(device: str, dtype: torch.dtype, rounds: int, repeat: int, layouts: list[str]) -> None:
    """Forward + backward through the kernel's ops with the scale saved by the forward against
    recomputed by the backward (what training on the CPU does), interleaved, on the paper's shapes
    at batch 32. Printed: each one's median time and recomputed / saved (below 1: recomputing wins)."""
    if device != "cpu" or kernels.get("cpu") is None:
        return
    fwd_op, bwd_op = torch.ops.convnet.lrn_forward.default, torch.ops.convnet.lrn_backward.default
    args = (PAPER["size"], PAPER["alpha"], PAPER["beta"], PAPER["k"])
    for (channels, hw), layout in ((ch, lay) for ch in CHANNELS_HW for lay in layouts):
        gen = torch.Generator().manual_seed(0)
        fmt = LAYOUTS[layout]
        x = torch.randn((32, channels, hw, hw), generator=gen).to(dtype=dtype, memory_format=fmt).relu()
        grad = torch.randn(x.shape, generator=gen).to(dtype=dtype, memory_format=fmt)

        def both(save: bool) -> Callable[[], None]:
            def run() -> None:
                _, scale = fwd_op(x, *args, save)
                bwd_op(grad, x, scale, *args)

            return run

        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(rounds):
            for save in (True, False) if i % 2 else (False, True):
                times[save].append(_time(both(save), device, repeat, 1))
        saved, recomputed = statistics.median(times[True]), statistics.median(times[False])
        print(
            f"{device} {[32, channels, hw, hw]!s:<18} {layout} fwd+bwd with the scale saved {saved * 1e3:7.2f} ms, "
            f"recomputed {recomputed * 1e3:7.2f} ms: x{recomputed / saved:.2f}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 32], help="batch sizes (default 128 32)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument(
        "--overhead-rounds",
        type=int,
        default=5,
        help="interleaved rounds of the op-wrapping overhead measurement (0: skip it)",
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=list(LAYOUTS),
        default=["nchw"],
        help="memory layouts of the input (nhwc: channels_last, as train.channels_last gives the layer)",
    )
    parser.add_argument("--only-overhead", action="store_true", help="measure only the op-wrapping overhead")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--devices",
        nargs="+",
        choices=["cpu", "cuda"],
        default=None,
        help="default: the CPU, and cuda where there is one",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices: {', '.join(devices)}"
        f"{'' if 'cuda' in devices else ' (no GPU here: no cuda numbers)'}"
    )
    print("# ratio x = torch's time / this time (higher is faster); GB/s over the minimal bytes")
    rows = []
    for device in devices:
        if args.overhead_rounds:
            op_overhead(device, dtype, args.overhead_rounds, args.repeat)
            scale_choice(device, dtype, args.overhead_rounds, args.repeat, args.layouts)
        if args.only_overhead:
            continue
        rows += [
            row
            for batch in args.batch
            for channels, hw in CHANNELS_HW
            for layout in args.layouts
            for row in bench(device, (batch, channels, hw, hw), dtype, args.repeat, args.warmup, layout)
        ]
    if args.json:
        meta = {
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
