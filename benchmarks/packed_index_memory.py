"""Resident memory of the `packed` dataset's index at ImageNet scale (1,281,167 training samples).

Writes an index of that many records (the 28-byte records `convnet pack` writes) into a
temporary folder, opens it as a `PackedSplit` and reads VmRSS / RssAnon / RssFile from
/proc/self/status: in the main process before opening, after opening, and after touching
every record (all labels summed, then every record read one by one in a random order, as an
epoch does); then the same inside data-loader workers (2 forked, 1 spawned), each touching
every record. File-backed pages (RssFile) are shared with the page cache and between all
processes mapping the file; anonymous ones (RssAnon) would be a private copy.

Usage: ``python benchmarks/packed_index_memory.py [--samples 1281167]``
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from convnet.plugins.data.pack import INDEX_DTYPE
from convnet.plugins.data.packed import PackedSplit, _torchvision_decodes

MB = 2**20


def status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        fields = [line.split() for line in f]
    return {f[0][:-1]: int(f[1]) * 1024 / MB for f in fields if f[0] in ("VmRSS:", "RssAnon:", "RssFile:")}


def touch(split: PackedSplit, seed: int) -> int:
    """Every record once in a random order (an epoch's access pattern), then every label."""
    total = 0
    for i in np.random.default_rng(seed).permutation(len(split)).tolist():
        total += split._records[i].item()[3]
    return total + int(split.index["label"].sum())


class Probe(Dataset):
    def __init__(self, split: PackedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        before = status()
        touch(self.split, os.getpid())
        after = status()
        return os.getpid(), type(self.split.index).__name__, before, after


def show(where: str, before: dict[str, float], after: dict[str, float]) -> None:
    delta = {k: after[k] - before[k] for k in after}
    print(
        f"  {where:<34} VmRSS +{delta['VmRSS']:5.1f} MB (process total {after['VmRSS']:6.1f}), "
        f"RssAnon +{delta['RssAnon']:5.1f}, RssFile +{delta['RssFile']:5.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_281_167)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "train"
        folder.mkdir()
        index = np.zeros(args.samples, dtype=INDEX_DTYPE)
        index["shard"] = np.arange(args.samples) // 1000
        index["label"] = np.arange(args.samples) % 1000
        index["source"] = np.arange(args.samples)
        np.save(folder / "index.npy", index)
        del index
        size = (folder / "index.npy").stat().st_size / MB
        print(
            f"{platform.machine()}, {os.cpu_count()} CPUs; index of {args.samples:,} records, "
            f"{INDEX_DTYPE.itemsize} bytes each: {size:.1f} MB on disk"
        )
        _torchvision_decodes()  # the decoder's import is not the index's memory
        start = status()
        split = PackedSplit(folder, [f"shard-{k:06d}.tar" for k in range(args.samples // 1000 + 1)], "jpeg")
        opened = status()
        show("main: after opening", start, opened)
        touch(split, 0)
        show("main: after touching every record", start, status())
        for context, workers in (("fork", 2), ("spawn", 1)):
            loader = DataLoader(
                Probe(split),
                batch_size=None,
                num_workers=workers,
                multiprocessing_context=context,
                sampler=range(workers),
                persistent_workers=False,
            )
            for pid, kind, before, after in loader:
                show(f"{context} worker {pid} ({kind})", before, after)


if __name__ == "__main__":
    main()
