"""Geometric augmenters: resize-shorter, center-crop, random-crop, random-shift, hflip, ten-crop.

They keep the image's dtype (uint8 stays uint8) and act on the last two dimensions, so an
image may be ``[C, H, W]`` or carry leading dimensions (``[10, C, H, W]`` after ``ten-crop``).
An image smaller than a crop is resized up (aspect kept) and counted; the count is reported
as a warning when the loader's pass ends (per epoch for training), summed over workers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v
from torch.utils.data import get_worker_info

from convnet.core import DataContext, DataError, ten_crop_views
from convnet.plugins.augment.draws import below, key_of, keys_list, uniform

_SLOTS = 258  # the main process + up to 256 workers (schema caps data.workers at 256) + spare


class SmallImageWarning(UserWarning):
    """Images smaller than a crop were resized up."""


class SmallImages:
    """Per-pass count of images resized up to fit a crop, in shared memory, one slot per worker."""

    def __init__(self, where: str, size: int) -> None:
        self.where, self.size = where, size
        self.counts = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()

    def add(self, n: int = 1) -> None:
        info = get_worker_info()
        slot = 0 if info is None else min(info.id + 1, _SLOTS - 1)
        self.counts[slot] += n

    def take(self) -> int:
        total = int(self.counts.sum())
        self.counts.zero_()
        return total

    def end_pass(self, epoch: int) -> None:
        total = self.take()
        if total:
            when = f" in epoch {epoch + 1}" if "train_augment" in self.where else " in this pass"
            warnings.warn(
                f"{self.where}: {total} image(s) smaller than {self.size}x{self.size} were resized "
                f"up to fit the crop{when}",
                SmallImageWarning,
                stacklevel=2,
            )

    def warn_batch(self, h: int, w: int) -> None:
        warnings.warn(
            f"{self.where}: a batch of {h}x{w} images is smaller than the crop {self.size}x{self.size}; resized up",
            SmallImageWarning,
            stacklevel=3,
        )


def _size_field(default: int) -> Any:
    return attrs.field(default=default, validator=[v.gt(0), v.le(65536)])


def resize(x: torch.Tensor, height: int, width: int, mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resize the last two dimensions; uint8 stays uint8 (rounded) on any device."""
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    if (h, w) == (height, width):
        return x
    flat = x.reshape(-1, c, h, w)
    kwargs: dict[str, Any] = {"mode": mode}
    if mode != "nearest":
        kwargs.update(align_corners=False, antialias=antialias)
    if flat.dtype == torch.uint8 and flat.device.type != "cpu":
        out = F.interpolate(flat.float(), size=(height, width), **kwargs).round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = F.interpolate(
            flat if flat.is_floating_point() or flat.dtype == torch.uint8 else flat.float(),
            size=(height, width),
            **kwargs,
        )
    return out.reshape(*lead, c, height, width)


def _fit(x: torch.Tensor, size: int, small: SmallImages, batched: bool) -> torch.Tensor:
    """Resize up, aspect kept, so that both sides are at least ``size``; count what was resized."""
    h, w = x.shape[-2:]
    if h >= size and w >= size:
        return x
    factor = max(size / h, size / w)
    nh, nw = max(size, math.ceil(h * factor - 1e-9)), max(size, math.ceil(w * factor - 1e-9))
    if batched:  # the device placement has no pass end to report at: warn now (once per size)
        small.warn_batch(h, w)
    else:
        small.add(1)
    return resize(x, nh, nw)


def _pad(x: torch.Tensor, padding: int, mode: str, fill: float, where: str) -> torch.Tensor:
    if not padding:
        return x
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    if mode == "constant":
        if not flat.is_floating_point():
            info = torch.iinfo(flat.dtype)
            if fill != int(fill) or not info.min <= fill <= info.max:
                raise DataError(
                    f"{where}: fill = {fill} does not fit {flat.dtype} images (whole numbers "
                    f"{info.min}..{info.max}); give a fill in the images' own range"
                )
        out = F.pad(flat, (padding,) * 4, mode="constant", value=fill)
    else:
        if mode == "reflect" and padding >= min(h, w):
            raise DataError(f"{where}: reflect padding {padding} needs images larger than {padding}, found {h}x{w}")
        out = F.pad(flat, (padding,) * 4, mode="replicate" if mode == "edge" else "reflect")
    return out.reshape(*lead, c, h + 2 * padding, w + 2 * padding)


def _one_kernel(x: torch.Tensor) -> bool:
    """Batched crops and flips: one indexing kernel on an accelerator; on the CPU, where a call costs
    microseconds and TensorIterator's gathers run several times slower than strided copies, a copy
    per image into one output is faster."""
    return x.device.type != "cpu"


def window_gather(
    x: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    size: int,
    one_kernel: bool | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """``[N, ..., H, W]`` -> ``[N, ..., size, width]`` (``width`` defaults to ``size``): sample n's
    window at (tops[n], lefts[n])."""
    n, height, width = x.shape[0], size, width or size
    flat = x.reshape(n, -1, x.shape[-2], x.shape[-1])
    if one_kernel if one_kernel is not None else _one_kernel(x):
        windows = flat.unfold(2, height, 1).unfold(3, width, 1)  # a view [N, K, H-h+1, W-w+1, h, w]
        rows, cols = tops.to(x.device), lefts.to(x.device)
        out = windows[torch.arange(n, device=x.device), :, rows, cols]
    else:
        out = torch.empty(n, flat.shape[1], height, width, dtype=x.dtype, device=x.device)
        for i, (t, l) in enumerate(zip(tops.tolist(), lefts.tolist())):
            out[i].copy_(flat[i, :, t : t + height, l : l + width])
    return out.reshape(*x.shape[:-2], height, width)


def flip_where(x: torch.Tensor, flip: torch.Tensor, one_kernel: bool | None = None) -> torch.Tensor:
    """Mirror sample n of ``[N, ..., W]`` where ``flip[n]``; may reuse ``x``'s memory on the CPU."""
    if one_kernel if one_kernel is not None else _one_kernel(x):
        w = x.shape[-1]
        ar = torch.arange(w, device=x.device)
        cols = torch.where(flip.to(x.device)[:, None], ar.flip(0), ar)
        shape = [x.shape[0]] + [1] * (x.dim() - 2) + [w]
        return torch.gather(x, -1, cols.view(shape).expand_as(x))
    for i in flip.nonzero().flatten().tolist():
        x[i] = x[i].flip(-1)
    return x


# ---------------------------------------------------------------------------- resize-shorter
@attrs.define
class ResizeShorterOptions:
    size: int = _size_field(256)
    interpolation: str = attrs.field(default="bilinear", validator=v.in_(("bilinear", "bicubic", "nearest")))
    antialias: bool = True


class ResizeShorter:
    """Shorter side to ``size``, aspect kept (longer side rounded): the paper's 256."""

    def __init__(self, options: ResizeShorterOptions, ctx: DataContext) -> None:
        self.options = options

    def target(self, h: int, w: int) -> tuple[int, int]:
        s = self.options.size
        if h <= w:
            return s, max(1, round(w * s / h))
        return max(1, round(h * s / w)), s

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, *self.target(*x.shape[-2:]), mode=self.options.interpolation, antialias=self.options.antialias)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._apply(image)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._apply(images)


# ---------------------------------------------------------------------------- center-crop
@attrs.define
class CenterCropOptions:
    size: int = _size_field(227)


class CenterCrop:
    """The central ``size`` x ``size`` window (offset ``(H - size) // 2``, as cuda-convnet)."""

    def __init__(self, options: CenterCropOptions, ctx: DataContext) -> None:
        self.size = options.size
        self.small = SmallImages(f"{ctx.path} (center-crop)", self.size)

    def end_pass(self, epoch: int) -> None:
        self.small.end_pass(epoch)

    def _apply(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        s = self.size
        x = _fit(x, s, self.small, batched)
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        return x[..., top : top + s, left : left + s]

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._apply(image, False)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._apply(images, True).contiguous()


# ---------------------------------------------------------------------------- random-crop
@attrs.define
class RandomCropOptions:
    size: int = _size_field(227)
    padding: int = attrs.field(default=0, validator=[v.ge(0), v.le(4096)])
    padding_mode: str = attrs.field(default="constant", validator=v.in_(("constant", "edge", "reflect")))
    fill: float = 0.0


class RandomCrop:
    """A ``size`` x ``size`` window, uniform over all positions (after optional padding)."""

    def __init__(self, options: RandomCropOptions, ctx: DataContext) -> None:
        self.options = options
        self.small = SmallImages(f"{ctx.path} (random-crop)", options.size)

    def end_pass(self, epoch: int) -> None:
        self.small.end_pass(epoch)

    def _prepare(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        o = self.options
        return _fit(_pad(x, o.padding, o.padding_mode, o.fill, self.small.where), o.size, self.small, batched)

    def offset(self, key: int, h: int, w: int) -> tuple[int, int]:
        """Top and left of the sample's window in an ``h`` x ``w`` (padded, fitted) image."""
        s = self.options.size
        u = uniform(key, 2)
        return below(u[0], h - s + 1), below(u[1], w - s + 1)

    def offsets(self, keys: torch.Tensor, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.offset(k, h, w) for k in keys_list(keys)]
        return (
            np.array([t for t, _ in pairs], dtype=np.int64).reshape(-1),
            np.array([l for _, l in pairs], dtype=np.int64).reshape(-1),
        )

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = self._prepare(image, False)
        t, l = self.offset(key_of(generator), *x.shape[-2:])
        s = self.options.size
        return x[..., t : t + s, l : l + s]

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = self._prepare(images, True)
        tops, lefts = self.offsets(keys, *x.shape[-2:])
        return window_gather(x, torch.from_numpy(tops), torch.from_numpy(lefts), self.options.size)


# ---------------------------------------------------------------------------- random-shift
@attrs.define
class RandomShiftOptions:
    max_shift: int = attrs.field(default=1, validator=[v.ge(0), v.le(4096)])
    padding_mode: str = attrs.field(default="edge", validator=v.in_(("constant", "edge", "reflect")))
    fill: float = 0.0


class RandomShift:
    """Translate by up to ``max_shift`` pixels each way, uniform over the (2 max_shift + 1)^2
    shifts, the uncovered border repeated (or filled): a random crop of the padded image at the
    image's own size, whatever that size is."""

    def __init__(self, options: RandomShiftOptions, ctx: DataContext) -> None:
        self.options = options
        self.where = f"{ctx.path} (random-shift)"

    def shift(self, key: int) -> tuple[int, int]:
        """Top and left of the window in the padded image (``max_shift`` = no shift)."""
        u = uniform(key, 2)
        span = 2 * self.options.max_shift + 1
        return below(u[0], span), below(u[1], span)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        return _pad(x, o.max_shift, o.padding_mode, o.fill, self.where)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = image.shape[-2:]
        t, l = self.shift(key_of(generator))
        if self.options.padding_mode == "edge":  # two small gathers instead of padding the whole image
            p = self.options.max_shift
            rows = torch.arange(t - p, t - p + h).clamp_(0, h - 1)
            cols = torch.arange(l - p, l - p + w).clamp_(0, w - 1)
            return image.index_select(-2, rows.to(image.device)).index_select(-1, cols.to(image.device))
        return self._pad(image)[..., t : t + h, l : l + w]

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        shifts = [self.shift(k) for k in keys_list(keys)]
        tops = torch.tensor([t for t, _ in shifts], dtype=torch.int64)
        lefts = torch.tensor([l for _, l in shifts], dtype=torch.int64)
        return window_gather(self._pad(images), tops, lefts, h, width=w)


# ---------------------------------------------------------------------------- hflip
@attrs.define
class HFlipOptions:
    p: float = attrs.field(default=0.5, validator=[v.ge(0.0), v.le(1.0)])


class HFlip:
    """Mirror left-right with probability ``p`` (the paper's 0.5)."""

    def __init__(self, options: HFlipOptions, ctx: DataContext) -> None:
        self.p = options.p

    def flip(self, key: int) -> bool:
        return uniform(key, 1)[0] < self.p

    def flips(self, keys: torch.Tensor) -> np.ndarray:
        return np.array([self.flip(k) for k in keys_list(keys)], dtype=bool).reshape(-1)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return image.flip(-1) if self.flip(key_of(generator)) else image

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return flip_where(images, torch.from_numpy(self.flips(keys)))


# ---------------------------------------------------------------------------- ten-crop
@attrs.define
class TenCropOptions:
    size: int = _size_field(227)


class TenCrop:
    """``[C, H, W]`` -> ``[10, C, size, size]``: top-left, top-right, bottom-left, bottom-right,
    centre, then the same five mirrored; batched ``[N, C, H, W]`` -> ``[N, 10, C, size, size]``."""

    def __init__(self, options: TenCropOptions, ctx: DataContext) -> None:
        self.size = options.size
        self.small = SmallImages(f"{ctx.path} (ten-crop)", self.size)

    def end_pass(self, epoch: int) -> None:
        self.small.end_pass(epoch)

    def _apply(self, x: torch.Tensor, batched: bool) -> torch.Tensor:
        s = self.size
        x = _fit(x, s, self.small, batched)
        return ten_crop_views(x, s, s)

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._apply(image, False)

    def batch(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self._apply(images, True)
