"""Patches of the colour photographs that scikit-image and scikit-learn ship (no download).

One class per photograph: which picture does a square patch come from. Ten real photographs
by default, eight from ``skimage.data`` (the ``photos`` extra: ``pip install 'convnet[photos]'``)
and the two of ``sklearn.datasets.load_sample_images``. Each photograph is resized once so its
shorter side is ``size`` pixels (antialiased bilinear, as ``resize-shorter``), then cut into a
``grid`` x ``grid`` chequer of cells. The validation cells are one per row of cells, on a
diagonal that ``split_seed`` shifts, so validation areas lie all over each picture; validation
patches lie wholly inside a validation cell and training patches touch none, so no validation
pixel is ever seen in training. Patch positions are drawn uniformly (with ``split_seed``) among
the positions allowed, and the patches are held in memory as uint8 ``[3, patch, patch]``
(0-255), like the ``imagenet`` dataset's images: the recipe's augmenters crop and normalise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v

from convnet.core import DataContext, DatasetSplits, eight_bit, generator
from convnet.plugins.data.labelled import LabelledTensors

EXTRA = "pip install 'convnet[photos]'  (or: pip install scikit-image)"


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        image = getattr(skimage.data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)

    return load


def _sklearn(file: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file)

    return load


# class name -> (the package that ships it, how to load it as [H, W, 3] uint8)
PHOTOS: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "astronaut": ("scikit-image", _skimage("astronaut")),
    "chelsea": ("scikit-image", _skimage("chelsea")),
    "coffee": ("scikit-image", _skimage("coffee")),
    "rocket": ("scikit-image", _skimage("rocket")),
    "hubble_deep_field": ("scikit-image", _skimage("hubble_deep_field")),
    "retina": ("scikit-image", _skimage("retina")),
    "ihc": ("scikit-image", _skimage("immunohistochemistry")),
    "motorcycle": ("scikit-image", _skimage("stereo_motorcycle")),
    "china": ("scikit-learn", _sklearn("china.jpg")),
    "flower": ("scikit-learn", _sklearn("flower.jpg")),
}


def _known_photo(instance: object, attribute: attrs.Attribute, value: list[str]) -> None:
    unknown = [p for p in value if p not in PHOTOS]
    if not value or unknown or len(set(value)) != len(value):
        raise ValueError(
            f"{attribute.name!r}: expected distinct names among {', '.join(PHOTOS)}; found {value!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )


@attrs.define
class PhotosOptions:
    photos: list[str] = attrs.field(factory=lambda: list(PHOTOS), validator=_known_photo)
    size: int = attrs.field(default=256, validator=[v.ge(16), v.le(2048)])  # shorter side after resizing
    patch: int = attrs.field(default=36, validator=[v.ge(4), v.le(512)])
    grid: int = attrs.field(default=4, validator=[v.ge(2), v.le(32)])
    train_per_photo: int = attrs.field(default=300, validator=[v.gt(0), v.le(100_000)])
    val_per_photo: int = attrs.field(default=60, validator=[v.gt(0), v.le(100_000)])
    split_seed: int = attrs.field(default=0, validator=v.ge(0))


def load_photo(name: str) -> np.ndarray:
    """One photograph as ``[H, W, 3]`` uint8; when its package is missing, an ImportError naming the extra."""
    package, load = PHOTOS[name]
    try:
        image = load()
    except ImportError as exc:
        raise ImportError(f"the photograph {name!r} is shipped by {package}, which is not installed: {EXTRA}") from exc
    return np.array(image[..., :3], dtype=np.uint8)  # a writable copy


def resize_shorter(image: np.ndarray, size: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, h, w]`` uint8 with the shorter side ``size`` (antialiased)."""
    x = torch.tensor(image).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    out = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def validation_mask(height: int, width: int, grid: int, split_seed: int) -> torch.Tensor:
    """``[H, W]`` bool: the validation cells, one per row of cells, on a diagonal shifted by the seed."""
    rows = torch.linspace(0, height, grid + 1).round().long()
    cols = torch.linspace(0, width, grid + 1).round().long()
    mask = torch.zeros(height, width, dtype=torch.bool)
    for r in range(grid):
        c = (r + split_seed) % grid
        mask[rows[r] : rows[r + 1], cols[c] : cols[c + 1]] = True
    return mask


def window_counts(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """``[H - patch + 1, W - patch + 1]``: how many ``mask`` pixels each patch position covers."""
    m = F.pad(mask.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    return m[patch:, patch:] - m[:-patch, patch:] - m[patch:, :-patch] + m[:-patch, :-patch]


def draw_positions(allowed: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` (row, column) top-left corners drawn uniformly, with replacement, where ``allowed``."""
    where = allowed.nonzero()
    if len(where) == 0:
        raise ValueError("no position for a patch")
    return where[torch.randint(len(where), (count,), generator=gen)]


def cut(image: torch.Tensor, corners: torch.Tensor, patch: int) -> torch.Tensor:
    return torch.stack([image[:, y : y + patch, x : x + patch] for y, x in corners.tolist()])


def patch_corners(
    height: int, width: int, options: PhotosOptions, photo_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train corners, val corners, validation mask) of one resized photograph: ``[N, 2]`` top-left
    (row, column) corners; validation patches lie inside the mask, training patches outside it."""
    mask = validation_mask(height, width, options.grid, options.split_seed)
    counts = window_counts(mask, options.patch)
    gen = generator(options.split_seed, 0xF070, photo_index)
    train = draw_positions(counts == 0, options.train_per_photo, gen)
    val = draw_positions(counts == options.patch * options.patch, options.val_per_photo, gen)
    return train, val, mask


def read_patch(path: Path, patch: int) -> torch.Tensor:
    """A user's picture as a validation patch: the central square, resized to ``patch``."""
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.asarray(eight_bit(img).convert("RGB"), dtype=np.uint8)
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_shorter(rgb[top : top + side, left : left + side], patch)


def build_photos(options: PhotosOptions, ctx: DataContext) -> DatasetSplits:
    c = ctx.recipe.model.input[0]
    if c != 3:
        raise ctx.error(f"photos are RGB: model.input needs 3 channels, found {c}")
    if ctx.recipe.model.num_classes != len(options.photos):
        raise ctx.error(
            f"{len(options.photos)} photographs are {len(options.photos)} classes, "
            f"but model.num_classes = {ctx.recipe.model.num_classes}"
        )
    cell = options.size // options.grid
    if options.patch > cell:
        raise ctx.error(
            f"patch {options.patch} does not fit in a validation cell of ~{cell} pixels "
            f"(size {options.size} / grid {options.grid})"
        )

    def read_file(path: Path) -> torch.Tensor:
        return read_patch(path, options.patch)

    if ctx.purpose == "predict":
        empty = torch.zeros(0, 3, options.patch, options.patch, dtype=torch.uint8)
        none = LabelledTensors(empty, torch.zeros(0, dtype=torch.long))
        return DatasetSplits(none, none, len(options.photos), list(options.photos), "photos", read_file=read_file)
    train, val, train_labels, val_labels = [], [], [], []
    for i, name in enumerate(options.photos):
        try:
            image = resize_shorter(load_photo(name), options.size)
        except ImportError as exc:
            raise ctx.error(str(exc)) from None
        train_corners, val_corners, _ = patch_corners(image.shape[1], image.shape[2], options, i)
        train.append(cut(image, train_corners, options.patch))
        val.append(cut(image, val_corners, options.patch))
        train_labels.append(torch.full((len(train_corners),), i, dtype=torch.long))
        val_labels.append(torch.full((len(val_corners),), i, dtype=torch.long))
    return DatasetSplits(
        LabelledTensors(torch.cat(train), torch.cat(train_labels)),
        LabelledTensors(torch.cat(val), torch.cat(val_labels)),
        len(options.photos),
        list(options.photos),
        "photos",
        read_file=read_file,
    )
