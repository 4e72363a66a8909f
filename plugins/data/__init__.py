"""Datasets: digits (real, bundled with scikit-learn), photos (patches of the colour photographs
scikit-image and scikit-learn ship), synthetic, ImageNet from disk, and packed
shards of any of them (the ``convnet pack`` command)."""

from __future__ import annotations

import argparse

from convnet.core import Registries, add_recipe_arguments, hookimpl
from convnet.plugins.data.digits import DigitsOptions, build_digits
from convnet.plugins.data.imagenet import ImageNetOptions, build_imagenet
from convnet.plugins.data.packed import PackedOptions, build_packed
from convnet.plugins.data.photos import PhotosOptions, build_photos
from convnet.plugins.data.synthetic import SyntheticOptions, build_synthetic


@hookimpl
def convnet_register(registries: Registries) -> None:
    registries.dataset.add(
        "digits", build_digits, DigitsOptions, "scikit-learn's 1,797 8x8 handwritten digits, upsampled to model.input"
    )
    registries.dataset.add(
        "photos",
        build_photos,
        PhotosOptions,
        "patches of 10 colour photographs shipped by scikit-image and scikit-learn, one class per photograph",
    )
    registries.dataset.add(
        "synthetic",
        build_synthetic,
        SyntheticOptions,
        "random images and labels of model.input's shape (smoke tests, benchmarks)",
    )
    registries.dataset.add(
        "imagenet",
        build_imagenet,
        ImageNetOptions,
        "ILSVRC-2012 from disk (ImageFolder or devkit layout), shorter side 256, centre crop",
    )
    registries.dataset.add(
        "packed",
        build_packed,
        PackedOptions,
        "a dataset preprocessed once by `convnet pack` (WebDataset tar shards + index)",
    )


def _pack(args: argparse.Namespace) -> int:
    import os

    from convnet.core import RecipeError, load_plugins, load_recipe
    from convnet.plugins.data.pack import REPORT, PackSettings, pack, shown

    for flag, value, low, high in (
        ("--quality", args.quality, 1, 100),
        ("--shard-size", args.shard_size, 1, None),
        ("--workers", args.workers or 0, 0, None),
    ):
        if value < low or (high is not None and value > high):
            raise RecipeError(f"{flag} {value}: expected {low}..{high if high else 'any'}")
    regs = load_plugins(strict=args.strict)
    recipe = load_recipe(args.recipe, args.overrides, regs)
    settings = PackSettings(args.format, args.quality, args.subsampling, args.shard_size)
    workers = args.workers if args.workers is not None else os.cpu_count() or 1
    result = pack(recipe, regs, args.out, settings, workers=workers, progress=not args.quiet)
    counts = ", ".join(f"{split} {n} samples in {result.shards[split]} shards" for split, n in result.samples.items())
    print(
        f"{result.out}: {counts} ({args.format}{f' quality {args.quality}' if args.format == 'jpeg' else ''}; "
        f"{result.written} shards written now)"
    )
    if result.bad:
        print(f"skipped {len(result.bad)} unreadable image(s), listed in {result.out / REPORT}:")
        for line in result.bad:
            print(f"  {shown(line)}")
    return 0


@hookimpl
def convnet_add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pack", help="the recipe's dataset, preprocessed once, as WebDataset tar shards")
    add_recipe_arguments(p)
    p.add_argument("--out", metavar="DIR", required=True, help="folder of the pack (re-run to resume a killed pack)")
    p.add_argument(
        "--format",
        choices=("jpeg", "raw"),
        default="jpeg",
        help="jpeg (default; ~35 KB per 256x256 image) or raw uint8 .npy (lossless, 196 KB)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 1-100 (default 95)")
    p.add_argument(
        "--subsampling",
        choices=("4:2:0", "4:4:4"),
        default="4:2:0",
        help="JPEG chroma subsampling (4:4:4: smaller error, larger files, slower decode)",
    )
    p.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes reading and encoding (default: the number of CPUs; 0 = in this process)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_pack)
