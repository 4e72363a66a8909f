"""The paper's test procedure: softmax averaged over ten crops (4 corners + centre, and their
horizontal flips), reported beside the centre crop alone.

Where the views come from, per eval batch:

* ``[N, 10, C, h, w]`` (the recipe's eval augmentation already made ten views, e.g. a
  ``ten-crop`` augmenter): those are used; view 4 is the centre crop (torchvision's
  ``ten_crop`` order: top-left, top-right, bottom-left, bottom-right, centre, then flipped).
* ``[N, C, H, W]``: the evaluator cuts the crops itself, of ``size`` (default: the model's
  input height and width), after padding each side by ``pad`` pixels (default 0) that
  replicate the image's edge. Padding lets a recipe whose images already have the model's
  input size (the digits: 32x32 into 32x32) get distinct corner crops; with ``pad = 0`` there
  the five crops coincide and only the flip differs. ``flip = false`` keeps the five crops.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from attrs import validators as v

from convnet.core import BuildContext, EvalContext, Evaluator, RecipeError, ten_crop_views
from convnet.plugins.evaluate.common import count_errors, split_prefix, usable_ks
from convnet.plugins.evaluate.topk import _ks, label_rank

CENTRE = 4


@attrs.define
class TenCropOptions:
    size: int = attrs.field(default=0, validator=v.ge(0))
    pad: int = attrs.field(default=0, validator=[v.ge(0), v.le(1024)])
    flip: bool = True
    k: list[int] = attrs.field(default=attrs.Factory(lambda: [1, 5]), validator=_ks)
    split: str = attrs.field(default="val", validator=v.in_(("train", "val")))


def ten_crops(images: torch.Tensor, height: int, width: int, flip: bool = True) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, V, C, height, width]`` (V = 10, or 5 without ``flip``)."""
    return ten_crop_views(images, height, width, flip)


class TenCrop(Evaluator):
    when = "end"

    def __init__(self, options: TenCropOptions, ctx: BuildContext) -> None:
        self.options = options
        _, h, w = ctx.recipe.model.input
        self.height, self.width = (options.size, options.size) if options.size else (h, w)
        if (self.height, self.width) != (h, w):
            raise RecipeError(
                f"{ctx.path}.size: crops of {self.height}x{self.width} do not fit the model's input "
                f"{h}x{w} (model.input); leave size = 0 to use the input size"
            )
        if (options.pad or not options.flip) and any(a.name == "ten-crop" for a in ctx.recipe.data.eval_augment):
            raise RecipeError(
                f"{ctx.path}: pad and flip shape the crops the evaluator cuts itself, but the eval "
                "augmentation (ten-crop) already gives the 10 views; leave them at their defaults"
            )
        prefix = split_prefix(options.split)
        ks = usable_ks(options.k, ctx.recipe.model.num_classes)
        self.metrics = (
            f"{prefix}tencrop_samples",
            *(f"{prefix}{view}_top{k}_error" for k in ks for view in ("centre", "tencrop")),
        )

    def views(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            if x.shape[1] != 10:
                raise RecipeError(f"ten-crop: the eval augmentation gives {x.shape[1]} views per image, expected 10")
            if self.options.pad or not self.options.flip:
                raise RecipeError(
                    "ten-crop: pad and flip shape the crops the evaluator cuts itself, but the eval "
                    "augmentation already gives the 10 views; leave them at their defaults"
                )
            return x
        p = self.options.pad
        if p:
            x = F.pad(x, (p, p, p, p), mode="replicate")
        try:
            return ten_crops(x, self.height, self.width, self.options.flip)
        except ValueError as exc:
            raise RecipeError(f"ten-crop: {exc} (images after data.eval_augment, padded by pad = {p})") from None

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        ks = usable_ks(self.options.k, ctx.recipe.model.num_classes)
        centre_wrong, ten_wrong, total = [0] * len(ks), [0] * len(ks), 0
        with ctx.evaluating():
            for x, labels, _ in ctx.batches(self.options.split):
                views = self.views(x)
                # float64 means: averaging ten equal float32 probabilities gives them back exactly.
                n, v = views.shape[:2]
                logits = ctx.module(views.flatten(0, 1)).float()  # one forward for all the views
                probs = torch.softmax(logits, dim=1).double().cpu().reshape(n, v, -1)
                centre_rank = label_rank(probs[:, CENTRE], labels)
                ten_rank = label_rank(probs.mean(1), labels)
                for j, k in enumerate(ks):
                    centre_wrong[j] += int((centre_rank >= k).sum())
                    ten_wrong[j] += int((ten_rank >= k).sum())
                total += len(labels)
        rates, n = count_errors(ctx.strategy, centre_wrong + ten_wrong, total)
        prefix = split_prefix(self.options.split)
        out: dict[str, Any] = {f"{prefix}tencrop_samples": n}
        for j, k in enumerate(ks):
            out[f"{prefix}centre_top{k}_error"] = rates[j]
            out[f"{prefix}tencrop_top{k}_error"] = rates[len(ks) + j]
        return out
