"""``train.reuse_cpu_memory`` against glibc's default allocation, for both networks.

The setting is per process, so each measurement is a fresh ``train_throughput.py`` process,
alternately without and with ``--reuse-cpu-memory`` (the order swapped every round, so a slow
spell of a shared machine hits both alike); inside each, torchvision's ``alexnet()`` and the
paper's network run interleaved as ``train_throughput.py`` runs them.

    python benchmarks/cpu_memory.py                  # CPU, batch 32, each network as it trains
    python benchmarks/cpu_memory.py --rounds 6 --variants channels_last

Prints each network's median ms/step without and with, and with / without in images/s (above
1 = the setting is faster): the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one_process(reuse: bool, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """ms/step of each network in one fresh process."""
    cmd = [sys.executable, str(HERE / "train_throughput.py"), "--device", "cpu", "--batch", str(args.batch)]
    cmd += ["--recipe", args.recipe, "--rounds", str(args.inner_rounds), "--steps", "1", "--json", str(out)]
    if args.variants:
        cmd += ["--variants", *args.variants]
    if reuse:
        cmd.append("--reuse-cpu-memory")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    return {row["name"]: row["ms_per_step"] for row in rows if "ms_per_step" in row}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="alexnet-imagenet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="pairs of processes (without, with)")
    p.add_argument("--inner-rounds", type=int, default=3, help="interleaved rounds inside each process")
    p.add_argument("--variants", nargs="*", default=[], help="train_throughput.py --variants (default: as each trains)")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    times: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for reuse in (False, True) if i % 2 == 0 else (True, False):
                times[reuse].append(one_process(reuse, args, Path(tmp) / "round.json"))
    print(f"cpu, batch {args.batch}, {args.rounds} rounds of a process without and one with --reuse-cpu-memory")
    result = {"batch": args.batch, "recipe": args.recipe, "rows": []}
    for name in times[False][0]:
        without = [t[name] for t in times[False]]
        with_ = [t[name] for t in times[True]]
        speedup = statistics.median(w / r for w, r in zip(without, with_))
        print(
            f"{name:<48} without {statistics.median(without):8.1f} ms/step   with {statistics.median(with_):8.1f} "
            f"ms/step   with / without {speedup:.2f}x images/s"
        )
        result["rows"].append(
            {
                "name": name,
                "ms_per_step_without": statistics.median(without),
                "ms_per_step_with": statistics.median(with_),
                "speedup": speedup,
            }
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
