"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upsampled.

The bundled digits are white ink on black: each of the 8x8 pixels counts the ink (0..16) in a
4x4 block of a 32x32 bitmap. ``read_file`` makes a user's image look the same: grey (colour and
transparency flattened onto white), area-averaged down to 8x8, inverted when its border is
brighter than the whole (dark ink on light paper), stretched to the full 0..1 range, then
upsampled and normalised as the bundled images are. The digit should fill the picture, as the
bundled ones fill their box.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v

from convnet.core import DataContext, DatasetSplits, eight_bit, generator
from convnet.plugins.data.labelled import LabelledTensors

CLASSES = [str(i) for i in range(10)]


@attrs.define
class DigitsOptions:
    val_fraction: float = attrs.field(default=0.2, validator=[v.gt(0.0), v.lt(1.0)])
    split_seed: int = attrs.field(default=0, validator=v.ge(0))


def to_input(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``[N, 1, 8, 8]`` digits on 0..1 (ink = 1) -> ``[N, C, H, W]`` model inputs."""
    c, h, w = shape
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    return ((images - 0.3) / 0.4).expand(-1, c, -1, -1).contiguous()


def read_grey(path: Path) -> np.ndarray:
    """Any image file as grey ``[H, W]`` floats on 0..1; transparency is laid over white."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        grey = eight_bit(img).convert("L")  # a 16-bit PNG: scaled, not clipped to white
    return np.asarray(grey, dtype=np.float32) / 255.0


def as_digit(grey: np.ndarray) -> torch.Tensor:
    """A grey picture -> ``[1, 8, 8]`` on 0..1 with the ink bright, as the bundled digits."""
    x = torch.from_numpy(grey)[None, None]
    small = F.interpolate(x, size=(8, 8), mode="area")[0]
    border = torch.cat([x[0, 0, 0], x[0, 0, -1], x[0, 0, :, 0], x[0, 0, :, -1]]).mean()
    if border > x.mean():  # dark ink on light paper (right for every bundled digit, either way round)
        small = 1.0 - small
    lo, hi = small.min(), small.max()
    return (small - lo) / (hi - lo) if hi > lo else torch.zeros_like(small)


def build_digits(options: DigitsOptions, ctx: DataContext) -> DatasetSplits:
    from sklearn.datasets import load_digits

    c, h, w = ctx.recipe.model.input
    if c not in (1, 3):
        raise ctx.error(f"digits are grey: model.input needs 1 or 3 channels, found {c}")
    shape = (c, h, w)
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    images = to_input(images, shape)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=generator(options.split_seed, 0xD161))
    n_val = max(1, round(len(labels) * options.val_fraction))
    val, train = order[:n_val], order[n_val:]

    def read_file(path: Path) -> torch.Tensor:
        return to_input(as_digit(read_grey(path))[None], shape)[0]

    return DatasetSplits(
        LabelledTensors(images[train], labels[train]),
        LabelledTensors(images[val], labels[val]),
        10,
        list(CLASSES),
        "digits",
        read_file=read_file,
    )
