"""Input pipeline speed: decode + the paper's training augmentation, both placements, vs torchvision.

Writes real JPEGs (PIL, smooth random photos-like content, shorter side 256, longer 256-340)
into a temporary ImageFolder tree, reads them with the ``imagenet`` dataset plugin (PIL decode,
shorter side 256, centre 256 crop: the paper's preprocessing) and times, in images/s:

* ``worker``: our chain per image in data-loader workers (``data.augment_on = "worker"``);
* ``device``: uint8 batches collated in workers, then our chain batched in the main process
  on the CPU device (``data.augment_on = "device"``: one call per augmenter per batch);
* ``torchvision``: ``torchvision.transforms.v2`` per image in the same workers: RandomCrop,
  RandomHorizontalFlip, ToDtype and the same mean image and PCA lighting as ``v2.Lambda``.

The chain: random-crop 227, hflip 0.5, pca-lighting 0.1, mean-image (the mean's centre
227 window). Then the augmentation part alone, on decoded uint8 images held in memory, one
process, each batch stacked as the loader would: per image (ours), batched (ours), per image
(torchvision), and ours batched in the bundled ``alexnet-imagenet`` order (mean-image of the
256x256 image first: exact, but then crops and flips move float32). Ratios are against
torchvision measured in the same run.

Usage: ``python benchmarks/input_pipeline.py [--images 512] [--batch 128] [--workers 2] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import Dataset

from convnet.core import data as cdata
from convnet.core import plugins
from convnet.core.data import DataContext
from convnet.core.data import augment_batch as _device_augment

SEED = 0


def write_jpegs(root: Path, n: int, classes: int = 4) -> None:
    rng = np.random.default_rng(SEED)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            long = int(rng.integers(256, 341))
            w, h = (long, 256) if i % 2 else (256, long)
            coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            img = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
            img = img + rng.integers(-12, 13, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def write_stats(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    cov = torch.tensor(
        [[4200.0, 3900.0, 3500.0], [3900.0, 4000.0, 3700.0], [3500.0, 3700.0, 4300.0]], dtype=torch.float64
    )
    vals, vecs = torch.linalg.eigh(cov)
    order = torch.argsort(vals, descending=True)
    stats = {
        "mean": 110 + 20 * torch.rand(3, 256, 256, generator=g),
        "eigvals": vals[order].float(),
        "eigvecs": vecs[:, order].float().contiguous(),
    }
    save_file(stats, str(path))
    return stats


def our_chain(registries: Any, stats: Path, mean_first: bool = False) -> list:
    spec = [
        ("random-crop", {"size": 227}),
        ("hflip", {"p": 0.5}),
        ("pca-lighting", {"std": 0.1, "stats": str(stats)}),
        ("mean-image", {"stats": str(stats)}),
    ]
    if mean_first:
        spec = spec[-1:] + spec[:-1]
    chain = []
    for i, (name, options) in enumerate(spec):
        entry = registries.augmenter.get(name)
        chain.append(entry.factory(entry.options(**options), DataContext(None, registries, f"data.train_augment[{i}]")))
    return chain


def torchvision_chain(stats: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.transforms import v2

    top = (stats["mean"].shape[-1] - 227) // 2
    mean = stats["mean"][:, top : top + 227, top : top + 227].contiguous()
    vecs, vals = stats["eigvecs"], stats["eigvals"] / 255.0  # the paper's alpha * lambda on [0, 1] pixels

    def lighting(img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * 0.1
        return img + (vecs @ (alpha * vals)).view(3, 1, 1)

    return v2.Compose(
        [
            v2.RandomCrop(227),
            v2.RandomHorizontalFlip(0.5),
            v2.ToDtype(torch.float32),
            v2.Lambda(lighting),
            v2.Lambda(lambda img: img - mean),
        ]
    )


class PerImage(Dataset):
    def __init__(self, base: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label, index


def rounds(pipelines: dict[str, Callable[[], int]], repeat: int) -> dict[str, list[float]]:
    """images/s of each pipeline, ``repeat`` rounds, the pipelines taking turns within a round
    (on a shared machine the load drifts; turns keep each round's comparison fair)."""
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeat):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def end_to_end(
    train: Dataset, chain: list, tv: Callable, n: int, batch: int, workers: int, repeat: int
) -> dict[str, list[float]]:
    batches = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
    worker_set = cdata.Augmented(train, chain, SEED, cdata.STREAM_TRAIN_AUGMENT)
    raw_set = cdata.Augmented(train, [], SEED, cdata.STREAM_TRAIN_AUGMENT)

    def run_worker() -> int:
        count = 0
        for images, _, _, _ in cdata.loader(worker_set, batches, workers):
            count += len(images)
        return count

    def run_device() -> int:
        count = 0
        for images, _, indices, _ in cdata.loader(raw_set, batches, workers):
            count += len(_device_augment(chain, images, SEED, 0, indices))  # the batch is ours to overwrite
        return count

    def run_torchvision() -> int:
        count = 0
        for images, _, _, _ in cdata.loader(PerImage(train, tv), batches, workers):
            count += len(images)
        return count

    def run_decode() -> int:
        count = 0
        for images, _, _, _ in cdata.loader(raw_set, batches, workers):
            count += len(images)
        return count

    return rounds(
        {"decode only": run_decode, "worker": run_worker, "device": run_device, "torchvision": run_torchvision}, repeat
    )


def augmentation_only(
    images: torch.Tensor, chain: list, tv: Callable, batch: int, repeat: int, mean_first_chain: list
) -> dict[str, list[float]]:
    """Per-image pipelines go through ``Augmented`` (a generator per sample and stage, as in a
    worker) and stack each batch; the batched ones get a fresh uint8 batch, as after transfer."""
    n = len(images)
    starts = range(0, n, batch)

    class Held(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, index: int):
            return images[index], 0

    ours = cdata.Augmented(Held(), chain, SEED, cdata.STREAM_TRAIN_AUGMENT)

    def per_image() -> int:
        for start in starts:
            torch.stack([ours[i][0] for i in range(start, min(start + batch, n))])
        return n

    def batched(which: list) -> Callable[[], int]:
        def run() -> int:
            for start in starts:
                stop = min(start + batch, n)
                _device_augment(which, images[start:stop].clone(), SEED, 0, torch.arange(start, stop))
            return n

        return run

    def torchvision_per_image() -> int:
        for start in starts:
            torch.stack([tv(images[i]) for i in range(start, min(start + batch, n))])
        return n

    return rounds(
        {
            "worker": per_image,
            "device": batched(chain),
            "torchvision": torchvision_per_image,
            "device, mean 1st": batched(mean_first_chain),
        },
        repeat,
    )


def report(title: str, rates: dict[str, list[float]]) -> None:
    """Median images/s, and the median over rounds of the ratio to torchvision's same round."""
    base = rates["torchvision"]
    print(f"\n{title}")
    print(f"  {'pipeline':<18}{'images/s':>10}{'vs torchvision':>16}   (ratio range over rounds)")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(
            f"  {name:<18}{statistics.median(values):>10.0f}{statistics.median(ratios):>15.2f}x"
            f"   ({min(ratios):.2f}-{max(ratios):.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    registries = plugins.registries()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{args.images} JPEGs, batch {args.batch}, {args.workers} worker(s), {args.threads} main thread(s), "
        f"{args.repeat} rounds, medians"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root / "jpegs", args.images)
        stats = write_stats(root / "stats.safetensors")
        entry = registries.dataset.get("imagenet")
        splits = entry.factory(entry.options(root=str(root / "jpegs")), DataContext(None, registries))
        chain = our_chain(registries, root / "stats.safetensors")
        tv = torchvision_chain(stats)
        rates = end_to_end(splits.train, chain, tv, args.images, args.batch, args.workers, args.repeat)
        report(f"decode + augmentation, {args.workers} worker(s)", rates)
        images = torch.stack([splits.train[i][0] for i in range(args.images)])
        report(
            "augmentation alone (decoded uint8 3x256x256 in memory, one process, batches stacked)",
            augmentation_only(
                images,
                chain,
                tv,
                args.batch,
                args.repeat,
                our_chain(registries, root / "stats.safetensors", mean_first=True),
            ),
        )


if __name__ == "__main__":
    main()
