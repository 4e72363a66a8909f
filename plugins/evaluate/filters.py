"""The first layer's kernels as an image grid, one block per tower (the paper's Figure 3), and
a colour-specificity score per tower.

Colour specificity of one ``[3, kh, kw]`` kernel ``w``: the share of its variance that lies
across the RGB channels,

    sum_{c,p} (w[c,p] - mean_c w[c,p])^2  /  sum_{c,p} (w[c,p] - mean w)^2   in [0, 1],

0 for a kernel that is the same in R, G and B (colour-agnostic), near 1 for one whose pattern
is all colour contrast. A kernel of independent random weights scores about 2/3. A tower's
score is the mean over its kernels. The paper's observation (one tower's kernels largely
colour-agnostic, the other's colour-specific) shows as two clearly different tower scores.

Drawing: each kernel is min-max scaled on its own to [0, 255] and magnified ``scale`` times;
kernels sit ``columns`` to a row with ``gap`` white pixels around each; tower blocks are
stacked top to bottom (tower 0 on top) with a black band of ``gap`` pixels between them. The
PNG shows that grid pixel for pixel under a title, each tower's block labelled on the left
with its colour specificity.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v

from convnet.core import BuildContext, EvalContext, Evaluator, RecipeError
from convnet.plugins.evaluate.common import new_figure, require_layer, write_figure, write_json


@attrs.define
class FiltersOptions:
    layer: str = "conv1"
    columns: int = attrs.field(default=16, validator=[v.gt(0), v.le(1024)])
    scale: int = attrs.field(default=0, validator=[v.ge(0), v.le(64)])
    gap: int = attrs.field(default=2, validator=[v.ge(0), v.le(64)])


def colour_specificity(kernels: torch.Tensor) -> torch.Tensor:
    """Per kernel of ``[K, 3, kh, kw]``: the share of its variance across RGB (see module doc)."""
    w = kernels.double().flatten(2)  # K, 3, P
    colour = (w - w.mean(1, keepdim=True)).pow(2).sum((1, 2))
    total = (w - w.mean((1, 2), keepdim=True)).pow(2).sum((1, 2))
    return torch.where(total > 0, colour / total.clamp_min(1e-300), torch.zeros_like(total))


def auto_scale(kh: int, kw: int) -> int:
    """Magnify so a kernel is drawn about 48 pixels wide."""
    return max(1, round(48 / max(kh, kw)))


def grid_size(kernels: int, kh: int, kw: int, towers: int, columns: int, scale: int, gap: int) -> tuple[int, int]:
    """(height, width) in pixels of the filters image."""
    per_tower = kernels // towers
    cols = min(per_tower, columns)
    rows = math.ceil(per_tower / cols)
    block_h = rows * kh * scale + (rows + 1) * gap
    width = cols * kw * scale + (cols + 1) * gap
    return towers * block_h + (towers - 1) * gap, width


def draw(kernels: torch.Tensor, towers: int, columns: int, scale: int, gap: int) -> np.ndarray:
    """``[K, C, kh, kw]`` (C = 1 or 3) -> ``[H, W, 3]`` uint8 image, tower blocks top to bottom."""
    k, c, kh, kw = kernels.shape
    height, width = grid_size(k, kh, kw, towers, columns, scale, gap)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    per_tower = k // towers
    cols = min(per_tower, columns)
    rows = math.ceil(per_tower / cols)
    block_h = rows * kh * scale + (rows + 1) * gap
    w = kernels.detach().double().cpu()
    lo = w.flatten(1).min(1).values[:, None, None, None]
    hi = w.flatten(1).max(1).values[:, None, None, None]
    w = torch.where(hi > lo, (w - lo) / (hi - lo).clamp_min(1e-300), torch.full_like(w, 0.5))
    pixels = (w * 255).round().to(torch.uint8)
    if c == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for t in range(towers):
        top0 = t * (block_h + gap)
        if t:
            image[top0 - gap : top0] = 0
        for i in range(per_tower):
            r, col = divmod(i, cols)
            y = top0 + gap + r * (kh * scale + gap)
            x = gap + col * (kw * scale + gap)
            image[y : y + kh * scale, x : x + kw * scale] = pixels[t * per_tower + i]
    return image


def labelled(grid: np.ndarray, layer: str, shape: tuple[int, ...], towers: int, specificity: list[float] | None) -> Any:
    """The grid at one figure pixel per grid pixel, titled, tower blocks named on the left."""
    height, width = grid.shape[:2]
    left, top, bottom, right = 170, 50, 12, 12
    fig = new_figure(width + left + right, height + top + bottom)
    fw, fh = width + left + right, height + top + bottom
    ax = fig.add_axes((left / fw, bottom / fh, width / fw, height / fh))
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    k, c, kh, kw = shape
    centres = [(t + 0.5) * height / towers for t in range(towers)]
    names = [f"tower {t + 1}" + (f"\ncolour spec. {specificity[t]:.2f}" if specificity else "") for t in range(towers)]
    ax.set_yticks(centres, names, fontsize=9)
    ax.set_xticks([])
    ax.set_title(f"{layer}: {k} kernels of {kh}x{kw}x{c}, each scaled to its own range", fontsize=10)
    return fig


class Filters(Evaluator):
    when = "end"

    def __init__(self, options: FiltersOptions, ctx: BuildContext) -> None:
        self.options = options
        self.path = ctx.path
        require_layer(ctx, "filters", "layer", options.layer)
        self.towers = ctx.recipe.model.towers

    def kernels(self, ctx: EvalContext) -> torch.Tensor:
        state = ctx.strategy.state_dict(ctx.module)
        key = f"layers.{self.options.layer}.weight"
        weight = state.get(key)
        if weight is None or weight.dim() != 4:
            found = "no weight" if weight is None else f"a weight of shape {list(weight.shape)}"
            raise RecipeError(
                f"{self.path}.layer: layer {self.options.layer!r} has {found}; "
                "filters draws a convolution's [out, in, kh, kw] kernels"
            )
        if weight.shape[1] not in (1, 3):
            raise RecipeError(
                f"{self.path}.layer: layer {self.options.layer!r} reads {weight.shape[1]} channels per "
                "kernel; filters draws grey (1) or RGB (3) kernels, i.e. a first layer"
            )
        return weight

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        weight = self.kernels(ctx)
        k, c, kh, kw = weight.shape
        towers = self.towers if k % self.towers == 0 else 1
        scale = self.options.scale or auto_scale(kh, kw)
        name = f"filters_{self.options.layer}"
        out: dict[str, Any] = {}
        per_tower = None
        if c == 3:
            scores = colour_specificity(weight)
            per_tower = [float(s) for s in scores.reshape(towers, -1).mean(1)]
            out[f"{name}_colour_specificity"] = per_tower
            payload = {
                "layer": self.options.layer,
                "shape": [k, c, kh, kw],
                "towers": towers,
                "definition": "per kernel: variance across RGB / total variance; tower = mean over kernels; "
                "random kernels score about 2/3",
                "tower_colour_specificity": per_tower,
                "kernel_colour_specificity": [float(s) for s in scores],
            }
        else:
            payload = {
                "layer": self.options.layer,
                "shape": [k, c, kh, kw],
                "towers": towers,
                "tower_colour_specificity": None,
                "note": "grey kernels: no colour to measure",
            }
        if ctx.out is not None:
            grid = draw(weight, towers, self.options.columns, scale, self.options.gap)
            write_figure(ctx.out, f"{name}.png", labelled(grid, self.options.layer, (k, c, kh, kw), towers, per_tower))
            write_json(ctx.out, f"{name}.json", payload)
        return out
