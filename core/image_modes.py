"""Decoded images with more than 8 bits per channel, brought to 8 bits by scaling.

Pillow converts 16-bit greyscale (modes ``I;16*``, and ``I`` when a 16-bit PNG opens as that) to
``L`` or ``RGB`` by clipping every value above 255: a 16-bit photograph comes out nearly white.
Scaling by 255/65535 keeps the picture. Mode ``I`` from other formats (a 32-bit TIFF, which may
hold 0..255) has no fixed range and is left to Pillow. 32-bit float images (mode ``F``) have no
fixed range either, and Pillow would truncate a 0..1 picture to black: they are refused as
unreadable (a ValueError, which the datasets count as an unreadable file and list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(img: Image.Image) -> Image.Image:
    """``img`` itself, or an ``L`` image scaled from its 16-bit values (0..65535 -> 0..255).
    Raises ValueError for a float image (mode ``F``)."""
    if img.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no fixed range to bring to 8 bits")
    if img.mode not in SIXTEEN_BIT and not (img.mode == "I" and img.format == "PNG"):
        return img
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    scaled = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
