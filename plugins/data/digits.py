"""scikit-learn's bundled 8x8 handwritten digits (1,797 real images), upsampled."""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch.utils.data import TensorDataset

from convnet.core import DataContext, DatasetSplits, generator


@attrs.define
class DigitsOptions:
    val_fraction: float = attrs.field(default=0.2, validator=[v.gt(0.0), v.lt(1.0)])
    split_seed: int = attrs.field(default=0, validator=v.ge(0))


class _Labelled(TensorDataset):
    def __getitem__(self, index: int):  # (image, label) with a plain int label
        image, label = super().__getitem__(index)
        return image, int(label)


def build_digits(options: DigitsOptions, ctx: DataContext) -> DatasetSplits:
    from sklearn.datasets import load_digits

    c, h, w = ctx.recipe.model.input
    if c not in (1, 3):
        raise ctx.error(f"digits are grey: model.input needs 1 or 3 channels, found {c}")
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    images = ((images - 0.3) / 0.4).expand(-1, c, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=generator(options.split_seed, 0xD161))
    n_val = max(1, int(round(len(labels) * options.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return DatasetSplits(_Labelled(images[train], labels[train]), _Labelled(images[val], labels[val]),
                         10, [str(i) for i in range(10)], "digits")
