"""Value augmenters: mean-image, mean-rgb, pca-lighting, to-float.

They turn uint8 images into float32 on the same 0-255 scale (no division by 255: the
paper's network took mean-subtracted raw pixel values). The mean and the eigen data come
from the safetensors file ``convnet stats`` writes (``stats = "path"``; keys ``mean``
``[C, H, W]`` on the images' scale, ``eigvals`` ``[C]`` and ``eigvecs`` ``[C, C]`` with the
eigenvectors as columns, of the covariance of pixel values on that scale), or from the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v

from convnet.core import DataContext, DataError
from convnet.plugins.augment.draws import key_of, keys_list, normal


def _positive_list(instance: Any, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is not None and (not value or any(x <= 0 for x in value)):
        raise ValueError(f"{attribute.name!r}: expected a non-empty list of numbers > 0, found {value!r}")


def _non_negative_list(instance: Any, attribute: attrs.Attribute, value: list[float] | None) -> None:
    if value is not None and (not value or any(x < 0 for x in value)):
        raise ValueError(f"{attribute.name!r}: expected a non-empty list of numbers >= 0, found {value!r}")


def _square(instance: Any, attribute: attrs.Attribute, value: list[list[float]] | None) -> None:
    if value is not None and (not value or any(len(row) != len(value) for row in value)):
        raise ValueError(f"{attribute.name!r}: expected a square matrix (a list of equal-length rows), found {value!r}")


def _optional_path(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not value.strip():
        raise ValueError(f"{attribute.name!r}: expected a path to a safetensors file, found an empty string")


def load_stats(path: str, ctx: DataContext, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a ``convnet stats`` file; a recipe error naming the option and file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ctx.error(f"stats: {path}: no such file (write it with `convnet stats RECIPE`)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ctx.error(f"stats: {path}: not a readable safetensors file ({exc})") from None
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ctx.error(
            f"stats: {path} has no {', '.join(map(repr, missing))} "
            f"(found {', '.join(sorted(tensors)) or 'nothing'}); rewrite it with `convnet stats`"
        )
    return tensors


def _add(x: torch.Tensor, other: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``x + other`` as float: an integer image is converted to a fresh float32 tensor and updated
    in place (one fast pass); a float one is updated in place only for the batched forms, which may
    overwrite their input (the engine hands over a batch it no longer needs)."""
    if not x.is_floating_point():
        return x.to(torch.float32).add_(other)
    return x.add_(other) if in_place else x + other


def _check_channels(where: str, image: torch.Tensor, channels: int, what: str) -> None:
    c = image.shape[-3] if image.dim() >= 3 else -1
    if c != channels:
        raise DataError(f"{where}: images have {c} channel(s) (shape {list(image.shape)}), but {what} has {channels}")


# ---------------------------------------------------------------------------- mean-image
@attrs.define
class MeanImageOptions:
    stats: str = attrs.field(validator=_optional_path)


class MeanImage:
    """Subtract the per-pixel mean image. An image smaller than the mean gets the mean's centre
    window (exact after a centre crop; after a random crop put ``mean-image`` first, as the
    paper and cuda-convnet did: mean of the 256x256 image, then crops)."""

    def __init__(self, options: MeanImageOptions, ctx: DataContext) -> None:
        mean = load_stats(options.stats, ctx, ("mean",))["mean"]
        if mean.dim() != 3:
            raise ctx.error(f"stats: {options.stats}: 'mean' should be [C, H, W], found {list(mean.shape)}")
        self.mean = mean.to(torch.float32).contiguous()
        self.where = f"{ctx.path} (mean-image, {options.stats})"
        self._fitted: dict[tuple[int, int, str], torch.Tensor] = {}

    def mean_for(self, image: torch.Tensor) -> torch.Tensor:
        """The mean image's window that ``image`` is measured against."""
        return -self._offset_for(image)

    def _offset_for(self, image: torch.Tensor) -> torch.Tensor:
        _check_channels(self.where, image, self.mean.shape[0], "the mean image")
        h, w = image.shape[-2:]
        key = (h, w, str(image.device))
        if key not in self._fitted:
            mh, mw = self.mean.shape[-2:]
            if h > mh or w > mw:
                raise DataError(f"{self.where}: images are {h}x{w}, larger than the {mh}x{mw} mean image")
            top, left = (mh - h) // 2, (mw - w) // 2
            self._fitted[key] = (-self.mean[:, top : top + h, left : left + w]).contiguous().to(image.device)
        return self._fitted[key]

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _add(image, self._offset_for(image), False)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return _add(images, self._offset_for(images), True)


# ---------------------------------------------------------------------------- mean-rgb
@attrs.define
class MeanRgbOptions:
    mean: list[float] | None = attrs.field(default=None, validator=v.optional(v.min_len(1)))
    std: list[float] | None = attrs.field(default=None, validator=_positive_list)
    stats: str | None = attrs.field(default=None, validator=_optional_path)


class MeanRgb:
    """Subtract one mean per channel (and divide by ``std`` if given): cheaper than the mean image."""

    def __init__(self, options: MeanRgbOptions, ctx: DataContext) -> None:
        if (options.mean is None) == (options.stats is None):
            raise ctx.error("give exactly one of 'mean = [r, g, b]' and 'stats = \"path\"'")
        if options.mean is not None:
            mean = torch.tensor(options.mean, dtype=torch.float32)
        else:
            tensors = load_stats(options.stats, ctx, ("mean",))  # type: ignore[arg-type]
            mean = tensors["rgb_mean"] if "rgb_mean" in tensors else tensors["mean"].double().mean((1, 2))
            mean = mean.to(torch.float32)
        std = torch.tensor(options.std, dtype=torch.float32) if options.std is not None else None
        if std is not None and len(std) != len(mean):
            raise ctx.error(f"std: {len(std)} value(s) for a mean of {len(mean)}")
        self.mean, self.std = mean, std
        self.where = f"{ctx.path} (mean-rgb)"

    def _apply(self, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        if len(self.mean) != 1:
            _check_channels(self.where, x, len(self.mean), "the mean")
        mean = self.mean.to(x.device).view(-1, 1, 1)
        out = _add(x, -mean, in_place)
        return out if self.std is None else out.div_(self.std.to(x.device).view(-1, 1, 1))

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._apply(image, False)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._apply(images, True)


# ---------------------------------------------------------------------------- pca-lighting
@attrs.define
class PcaLightingOptions:
    std: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.le(100.0)])
    stats: str | None = attrs.field(default=None, validator=_optional_path)
    eigvals: list[float] | None = attrs.field(default=None, validator=_non_negative_list)
    eigvecs: list[list[float]] | None = attrs.field(default=None, validator=_square)
    eigvals_range: float = attrs.field(default=255.0, validator=v.gt(0.0))
    pixel_range: float = attrs.field(default=255.0, validator=v.gt(0.0))
    weighting: str = attrs.field(default="eigval", validator=v.in_(("eigval", "stdev")))


class PcaLighting:
    """The paper's colour augmentation: add ``P (alpha * w)`` to every pixel, ``alpha ~ N(0, std)``
    drawn once per image per presentation, ``P`` the eigenvectors (columns).

    ``weighting = "eigval"`` is the paper's formula, ``w = lambda``, applied on [0, 1] pixel values
    (the reading most reproductions use; with eigen data of 0-255 values it adds a few grey levels);
    ``"stdev"`` uses ``sqrt(lambda)`` as cuda-convnet's code did. ``eigvals_range`` is the pixel
    range the eigenvalues were computed on (255 for ``convnet stats`` on uint8 images; 1 for
    the [0.2175, 0.0188, 0.0045] often quoted), ``pixel_range`` the range of the images here.
    """

    def __init__(self, options: PcaLightingOptions, ctx: DataContext) -> None:
        o = options
        inline = o.eigvals is not None or o.eigvecs is not None
        if inline and o.stats is not None:
            raise ctx.error("give either 'stats = \"path\"' or 'eigvals' and 'eigvecs', not both")
        if o.stats is not None:
            t = load_stats(o.stats, ctx, ("eigvals", "eigvecs"))
            eigvals, eigvecs = t["eigvals"].double(), t["eigvecs"].double()
            source = o.stats
        elif o.eigvals is not None and o.eigvecs is not None:
            eigvals, eigvecs = (
                torch.tensor(o.eigvals, dtype=torch.float64),
                torch.tensor(o.eigvecs, dtype=torch.float64),
            )
            source = "the recipe"
        else:
            raise ctx.error(
                "needs the eigen data: 'stats = \"path\"' (from `convnet stats`) or both "
                "'eigvals = [...]' and 'eigvecs = [[...], ...]'"
            )
        c = eigvals.numel()
        if eigvals.dim() != 1 or eigvecs.shape != (c, c):
            raise ctx.error(
                f"eigvals {list(eigvals.shape)} and eigvecs {list(eigvecs.shape)} from {source} "
                "should be [C] and [C, C]"
            )
        if bool((eigvals < -1e-6 * eigvals.abs().max().clamp(min=1)).any()):
            raise ctx.error(f"eigvals from {source} has negative values {eigvals.tolist()}; a covariance has none")
        lam = eigvals.clamp(min=0).numpy() / o.eigvals_range**2  # on [0, 1] pixels
        w = lam if o.weighting == "eigval" else np.sqrt(lam)
        self.std, self.channels = o.std, c
        self.eigvecs = eigvecs.numpy()
        self.weights = w * o.pixel_range  # back to the images' scale
        self.where = f"{ctx.path} (pca-lighting)"

    def offset(self, key: int) -> np.ndarray:
        """``[C]`` float64: the sample's offset, the same for all its pixels."""
        alpha = self.std * np.array(normal(key, self.channels))
        return self.eigvecs @ (alpha * self.weights)

    def offsets(self, keys: torch.Tensor) -> np.ndarray:
        """``[N, C]``: ``offset`` per sample (one at a time, so bit-identical to the per-image form)."""
        return np.array([self.offset(k) for k in keys_list(keys)]).reshape(-1, self.channels)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_channels(self.where, image, self.channels, "the eigen data")
        dtype = image.dtype if image.is_floating_point() else torch.float32
        delta = torch.from_numpy(self.offset(key_of(generator))).to(dtype)
        return _add(image, delta.to(image.device).view(self.channels, 1, 1), False)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        _check_channels(self.where, images, self.channels, "the eigen data")
        dtype = images.dtype if images.is_floating_point() else torch.float32
        delta = torch.from_numpy(self.offsets(keys)).to(dtype).to(images.device)
        return _add(images, delta.view(len(keys), *([1] * (images.dim() - 4)), self.channels, 1, 1), True)


# ---------------------------------------------------------------------------- to-float
@attrs.define
class ToFloatOptions:
    scale: float = attrs.field(default=1.0, validator=v.gt(0.0))


class ToFloat:
    """uint8 (or any) -> float32, times ``scale`` (1/255 for [0, 1] images)."""

    def __init__(self, options: ToFloatOptions, ctx: DataContext) -> None:
        self.scale = options.scale

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = image.to(torch.float32)
        return x if self.scale == 1.0 else x * self.scale

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32)
        return x if self.scale == 1.0 else x.mul_(self.scale)
