"""Random images and labels of the recipe's shape: smoke tests and benchmarks."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v
from torch.utils.data import Dataset

from convnet.core import DataContext, DatasetSplits, generator


@attrs.define
class SyntheticOptions:
    train_size: int = attrs.field(default=256, validator=v.gt(0))
    val_size: int = attrs.field(default=64, validator=v.gt(0))
    seed: int = attrs.field(default=0, validator=v.ge(0))
    dtype: str = attrs.field(default="float32", validator=v.in_(("float32", "uint8")))


# Keeps this dataset's draws apart from every other use of generator(seed, ...).
SYNTHETIC_STREAM = 0x5EED


class SyntheticImages(Dataset):
    """Each sample generated from its index, so nothing is held in memory."""

    def __init__(self, size: int, shape: tuple[int, ...], classes: int, seed: int, dtype: str) -> None:
        self.size, self.shape, self.classes, self.seed, self.dtype = size, shape, classes, seed, dtype

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = generator(self.seed, SYNTHETIC_STREAM, index)
        label = int(torch.randint(self.classes, (), generator=g))
        if self.dtype == "uint8":
            image = torch.randint(0, 256, self.shape, generator=g, dtype=torch.uint8)
        else:
            image = torch.randn(self.shape, generator=g)
        return image, label


def build_synthetic(options: SyntheticOptions, ctx: DataContext) -> DatasetSplits:
    shape = tuple(ctx.recipe.model.input)
    k = ctx.recipe.model.num_classes
    return DatasetSplits(
        SyntheticImages(options.train_size, shape, k, options.seed, options.dtype),
        SyntheticImages(options.val_size, shape, k, options.seed + 1, options.dtype),
        k,
        None,
        "synthetic",
    )
