"""The paper's whole training input path, images/s per core: folder vs packed shards vs torchvision.

Real photographs at ImageNet sizes: crops of scikit-learn's two sample photos (china.jpg,
flower.jpg) and, when scikit-image is installed, its colour photographs (astronaut, chelsea,
coffee, rocket, motorcycle, hubble, retina, ihc), rescaled to about 500x375 or 375x500 and
saved at JPEG quality 90 into an ImageFolder tree. Statistics for the mean image and the PCA
lighting are computed from that tree (`convnet stats`' code). Then, in ONE process with one
torch thread (so images/s is per core), the pipelines take turns, ``--repeat`` rounds:

1. ``torchvision``: ImageFolder + Resize(256) + RandomCrop(227) + RandomHorizontalFlip +
   ToTensor + Normalize, DataLoader batches of 128 (torchvision's ImageNet reference);
2. ``imagenet``: convnet's folder dataset (decode, shorter side 256, centre 256), uint8 batches
   of 128, then the paper's chain batched (random-crop 227, hflip, pca-lighting, mean-image:
   ``data.augment_on = "device"``, on the CPU);
3. ``packed jpeg`` / ``packed raw``: the same on the packed shards (``convnet pack``); and
   ``packed jpeg, CPU share``: read, decode and collate only, what stays on the CPU when
   the chain runs batched on a GPU;
4. ``floor jpeg`` / ``floor raw``: reading (and decoding) the same packed samples alone.

Ratios are against (1) in the same round. Then the packed-jpeg time is split into its parts
(read + crc, decode, collate, each augmenter) and the decoders are compared.

Usage: ``python benchmarks/packed_pipeline.py [--images 384] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from convnet.core import data as cdata
from convnet.core import plugins, stats
from convnet.core.data import DataContext
from convnet.core.data import augment_batch as _device_augment
from convnet.core.recipe import load_recipe

SEED, BATCH = 0, 128
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


def photographs() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    try:
        import skimage
    except ImportError:
        return photos
    folder = Path(skimage.__file__).parent / "data"
    for name in SKIMAGE_PHOTOS:
        if (folder / name).exists():
            with Image.open(folder / name) as img:
                photos.append(img.convert("RGB"))
    return photos


def write_tree(root: Path, n: int, classes: int = 4) -> None:
    """ImageNet-sized JPEGs (q90): a random crop of a photograph (60-100 % of each side),
    rescaled to ~500x375 (landscape) or ~375x500 (portrait)."""
    photos = photographs()
    rng = np.random.default_rng(SEED)
    for split, count in (("train", n), ("val", classes * 2)):
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            size = (int(rng.integers(450, 501)), int(rng.integers(333, 376)))
            if rng.random() < 0.3:
                size = size[::-1]
            img = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:05d}.jpg", quality=90)


RECIPE = """
description = "packed pipeline benchmark"
seed = 0
[model]
input = [3, 227, 227]
num_classes = 4
[[model.layers]]
name = "flatten"
[[model.layers]]
name = "fc"
out = 4
[data]
batch_size = 128
[data.dataset]
name = "imagenet"
root = "{root}"
"""


def chain(registries, stats_path: Path) -> list:
    spec = [
        ("random-crop", {"size": 227}),
        ("hflip", {"p": 0.5}),
        ("pca-lighting", {"std": 0.1, "stats": str(stats_path)}),
        ("mean-image", {"stats": str(stats_path)}),
    ]
    out = []
    for i, (name, options) in enumerate(spec):
        entry = registries.augmenter.get(name)
        out.append(entry.factory(entry.options(**options), DataContext(None, registries, f"data.train_augment[{i}]")))
    return out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    registries = plugins.registries()
    from convnet.plugins.data.pack import PackSettings, pack
    from convnet.plugins.data.packed import PackedOptions, build_packed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tree(tmp / "imagenet", args.images)
        (tmp / "r.toml").write_text(RECIPE.format(root=tmp / "imagenet"))
        recipe = load_recipe(str(tmp / "r.toml"), registries=registries)
        tensors, _ = stats.compute(recipe, registries, progress=False)
        stats_path = stats.save(tmp / "stats.safetensors", tensors, {}, "bench")
        for fmt in ("jpeg", "raw"):
            pack(recipe, registries, tmp / fmt, PackSettings(fmt), workers=0, progress=False)
        folder = cdata.build_dataset(recipe, registries).train
        packed = {
            fmt: build_packed(PackedOptions(str(tmp / fmt)), DataContext(recipe, registries)).train
            for fmt in ("jpeg", "raw")
        }
        ours = chain(registries, stats_path)
        n = len(folder)
        sizes = [os.path.getsize(folder.path(i)) for i in range(n)]
        dims = [sorted(Image.open(folder.path(i)).size, reverse=True) for i in range(n)]
        print(
            f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, 1 thread; {n} photographs, mean "
            f"{np.mean([d[0] for d in dims]):.0f}x{np.mean([d[1] for d in dims]):.0f} (long x short side), "
            f"{np.mean(sizes) / 1024:.0f} KB; packed jpeg q95 {packed['jpeg'].index['size'].mean() / 1024:.0f} KB, "
            f"raw {packed['raw'].index['size'].mean() / 1024:.0f} KB"
        )
        errors = [
            (packed["jpeg"][j][0].double() - folder[int(i)][0].double()).abs()
            for j, i in enumerate(packed["jpeg"].index["source"])
        ]
        err = torch.stack(errors)
        print(
            f"packed jpeg vs the folder dataset's tensors: mean |error| {float(err.mean()):.2f}, max "
            f"{float(err.max()):.0f} grey levels, PSNR {float(10 * torch.log10(255.0**2 / (err**2).mean())):.1f} dB"
        )
        rates = rounds(pipelines(tmp, folder, packed, ours, tensors), n, args.repeat)
        report(rates)
        breakdown(packed["jpeg"], ours, n)
        decoders(folder, packed["jpeg"], n)


def pipelines(tmp: Path, folder, packed: dict, ours: list, tensors: dict) -> dict[str, Callable[[int], int]]:
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    from torch.utils.data import DataLoader

    rgb = tensors["rgb_mean"] / 255.0
    reference = tvd.ImageFolder(
        str(tmp / "imagenet" / "train"),
        transform=T.Compose(
            [
                T.Resize(256),
                T.RandomCrop(227),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(rgb.tolist(), [0.229, 0.224, 0.225]),
            ]
        ),
    )

    def torchvision_way(epoch: int) -> int:
        torch.manual_seed(epoch)
        loader = DataLoader(reference, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
        return sum(len(x) for x, _ in loader)

    def convnet(dataset) -> Callable[[int], int]:
        plain = cdata.Augmented(dataset, [], SEED, cdata.STREAM_TRAIN_AUGMENT)

        def run(epoch: int) -> int:
            count = 0
            batches = cdata.train_batches(len(dataset), BATCH, SEED, epoch)
            for images, _, indices, _ in cdata.loader(plain, batches, 0):
                count += len(_device_augment(ours, images, SEED, epoch, indices))
            return count

        return run

    def collated(dataset) -> Callable[[int], int]:
        """The CPU's share when the chain runs batched on a GPU (``augment_on = "device"``)."""
        plain = cdata.Augmented(dataset, [], SEED, cdata.STREAM_TRAIN_AUGMENT)

        def run(epoch: int) -> int:
            batches = cdata.train_batches(len(dataset), BATCH, SEED, epoch)
            return sum(len(images) for images, _, _, _ in cdata.loader(plain, batches, 0))

        return run

    def floor(dataset) -> Callable[[int], int]:
        def run(epoch: int) -> int:
            batches = cdata.train_batches(len(dataset), BATCH, SEED, epoch)
            for batch in batches:
                for i in batch:
                    dataset[i]
            return sum(len(b) for b in batches)

        return run

    return {
        "torchvision": torchvision_way,
        "imagenet (folder)": convnet(folder),
        "packed jpeg": convnet(packed["jpeg"]),
        "packed raw": convnet(packed["raw"]),
        "packed jpeg, CPU share*": collated(packed["jpeg"]),
        "floor jpeg (read+decode)": floor(packed["jpeg"]),
        "floor raw (read)": floor(packed["raw"]),
    }


def rounds(pipes: dict[str, Callable[[int], int]], n: int, repeat: int) -> dict[str, list[float]]:
    """Each round runs every pipeline once (turns: drifting load hits all alike); round 0 is a warm-up."""
    rates: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(repeat + 1):
        for name, fn in pipes.items():
            start = time.perf_counter()
            count = fn(r)
            if r:
                rates[name].append(count / (time.perf_counter() - start))
    return rates


def report(rates: dict[str, list[float]]) -> None:
    base = rates["torchvision"]
    print(f"\n{'pipeline (batch 128, 1 core)':<30}{'images/s':>10}{'vs torchvision':>16}   (ratio range over rounds)")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(
            f"  {name:<28}{statistics.median(values):>10.1f}{statistics.median(ratios):>15.2f}x   "
            f"({min(ratios):.2f}-{max(ratios):.2f})"
        )
    for fmt in ("jpeg", "raw"):
        floor = next(v for k, v in rates.items() if k.startswith(f"floor {fmt}"))
        slow = [f / p for f, p in zip(floor, rates[f"packed {fmt}"])]
        print(
            f"  packed {fmt} takes {statistics.median(slow):.2f}x the time of its floor "
            f"({min(slow):.2f}-{max(slow):.2f})"
        )
    slow = [f / p for f, p in zip(rates["floor jpeg (read+decode)"], rates["packed jpeg, CPU share*"])]
    print(
        f"  packed jpeg's CPU share* takes {statistics.median(slow):.2f}x the time of its floor "
        f"({min(slow):.2f}-{max(slow):.2f})"
    )
    print("  * read + decode + collate: what stays on the CPU when the chain runs batched on a GPU")


def _time(fn: Callable[[], object], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def breakdown(split, ours: list, n: int) -> None:
    """Where the packed-jpeg time goes, per image (best of 3): each augmenter is timed on the
    output of the ones before it, less the time of copying that input."""
    from convnet.plugins.data.packed import _decode_torchvision

    idx = list(range(min(n, BATCH)))
    payloads = [split.payload(i) for i in idx]
    images = [_decode_torchvision(p) for p in payloads]
    keys = torch.from_numpy(cdata.sample_keys(SEED, cdata.STREAM_TRAIN_AUGMENT, 0, idx, 0).astype("int64"))
    parts = {
        "read + crc32": _time(lambda: [split.payload(i) for i in idx]),
        "decode (torchvision.io)": _time(lambda: [_decode_torchvision(p) for p in payloads]),
        "collate (stack uint8)": _time(lambda: torch.stack(images)),
    }
    x = torch.stack(images)
    for aug in ours:
        copy = _time(lambda: x.clone())
        parts[f"{type(aug).__name__}.batch"] = max(_time(lambda: aug.batch(x.clone(), keys)) - copy, 0.0)
        x = aug.batch(x.clone(), keys)
    total = sum(parts.values())
    print(f"\nwhere the packed-jpeg time goes (ms per image, best of 3, batch of {len(idx)})")
    for name, seconds in parts.items():
        print(f"  {name:<28}{seconds / len(idx) * 1e3:>8.3f} ms  {seconds / total * 100:5.1f} %")
    print(f"  {'total':<28}{total / len(idx) * 1e3:>8.3f} ms")


def decoders(folder, split, n: int) -> None:
    """PIL vs torchvision on the packed 256x256 JPEGs; PIL full vs draft decode of the originals."""
    from convnet.plugins.data.packed import _decode_pil, _decode_torchvision

    idx = list(range(min(n, BATCH)))
    payloads = [split.payload(i) for i in idx]
    originals = [Path(folder.path(i)).read_bytes() for i in idx]

    def pil_full() -> None:
        for data in originals:
            with Image.open(io.BytesIO(data)) as img:
                img.load()

    def pil_draft() -> None:
        for data in originals:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (256, 256))  # scales by 1/2, 1/4, 1/8 only while staying >= 256
                img.load()

    print(f"\ndecoders (ms per image, best of 3, {len(idx)} images)")
    for name, fn in (
        ("packed 256x256: PIL", lambda: [_decode_pil(p) for p in payloads]),
        ("packed 256x256: torchvision.io", lambda: [_decode_torchvision(p) for p in payloads]),
        ("original ~500x375: PIL", pil_full),
        ("original ~500x375: PIL draft", pil_draft),
    ):
        print(f"  {name:<34}{_time(fn) / len(idx) * 1e3:>8.3f} ms")


if __name__ == "__main__":
    main()
