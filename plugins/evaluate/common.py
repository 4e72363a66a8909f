"""Helpers the evaluators share: where an evaluator sits in the recipe, the network's layers,
tensors to images, and writing results into the run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convnet.core import BuildContext, ConvnetError, EvalContext, Network, RecipeError, build_model, layer_ids


def usable_ks(ks: list[int], num_classes: int) -> list[int]:
    """The k of top-k that mean something for this many classes."""
    return [k for k in ks if k <= num_classes]


def split_prefix(split: str) -> str:
    """Result keys carry the split unless it is the validation split: ``train_top1_error``."""
    return "" if split == "val" else f"{split}_"


def require_layer(ctx: BuildContext, name: str, option: str, layer: str) -> None:
    """A recipe error naming the option when the model has no layer of that id."""
    ids = layer_ids((spec.name, spec.id) for spec in ctx.recipe.model.layers)
    if layer not in ids:
        raise RecipeError(
            f"{ctx.path}.{option}: evaluator {name!r} asks for layer {layer!r}, which this "
            f"model does not have (layers: {', '.join(ids)})"
        )


def network_of(module: nn.Module) -> Network:
    """The single-device ``Network`` inside a strategy's module (DDP wraps it as ``.module``)."""
    seen = module
    while not isinstance(seen, Network):
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            raise ConvnetError(
                f"this parallelism strategy's module ({type(module).__name__}) does not expose the "
                'network\'s layers; run this evaluator with parallel.strategy = "single" or "ddp"'
            )
        seen = inner
    return seen


def feature_network(ctx: EvalContext) -> Network:
    """A ``Network`` whose ``features`` can be read: the strategy's own (single, ddp), or else a
    single-device copy of the canonical weights on the input device (model- and tower-parallel
    modules split layers into pieces that have no per-layer output)."""
    try:
        return network_of(ctx.module)
    except ConvnetError:
        net = build_model(ctx.recipe, "cpu", registries=ctx.registries)
        net.load_state_dict(ctx.strategy.state_dict(ctx.module))
        return net.to(ctx.strategy.input_device).eval()


def to_display(image: torch.Tensor) -> np.ndarray:
    """A ``[C, H, W]`` image (any range) as ``[H, W, 3]`` uint8: uint8 kept, floats min-max scaled."""
    image = image.detach().cpu()
    if image.dim() != 3:
        raise ValueError(f"expected a [C, H, W] image, found shape {list(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] != 3:
        image = image[:3] if image.shape[0] > 3 else image[:1].expand(3, -1, -1)
    if image.dtype == torch.uint8:
        arr = image.permute(1, 2, 0).numpy()
    else:
        x = image.double()
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
        arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.ascontiguousarray(arr)


def write_json(out: Path | None, name: str, payload: Any) -> Path | None:
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def write_png(out: Path | None, name: str, pixels: np.ndarray) -> Path | None:
    """Save ``[H, W, 3]`` uint8 pixels as a PNG, exactly that many pixels."""
    if out is None:
        return None
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    Image.fromarray(pixels, mode="RGB").save(path)
    return path


def write_figure(out: Path | None, name: str, fig: Any) -> Path | None:
    """Save a matplotlib Figure (made on an Agg canvas, no pyplot) as a PNG under ``out``."""
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, format="png")
    return path


def new_figure(width_px: float, height_px: float, dpi: int = 100) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def count_errors(ctx_strategy: Any, wrong: list[int], total: int) -> tuple[list[float], int]:
    """Error rates from this process's counts, summed over processes."""
    t = ctx_strategy.all_reduce_sum(torch.tensor([*list(wrong), total], dtype=torch.float64))
    n = int(t[-1])
    return [float(w) / n if n else float("nan") for w in t[:-1].tolist()], n
