"""Augmenters: the paper's crops, flips, PCA lighting, mean subtraction and ten-crop test views.

Listed per split in a recipe (``data.train_augment``, ``data.eval_augment``), applied in order.

Value scale. Decoded images are uint8 ``[C, H, W]`` on 0-255 (float images, e.g. the digits,
pass through unchanged in dtype). The geometric augmenters (resize-shorter, center-crop,
random-crop, random-shift, hflip, ten-crop) keep the dtype, so workers move and crop bytes.
mean-image, mean-rgb, pca-lighting and to-float return float32 on the same 0-255 scale: after
mean subtraction values are centred on 0, roughly -128..128, what the paper's network was fed.
Put ``to-float`` with ``scale = 0.00392156862745098`` (1/255) in a recipe that wants [0, 1].

Channels. Augmenters take 1- or 3-channel images; grey/RGBA/CMYK -> RGB conversion belongs
to the decoder (the dataset plugin). mean-image, mean-rgb and pca-lighting check that the
image's channels match their statistics and say so otherwise.

Randomness. Each sample's draws are a pure function of its key, a hash of (run seed, stream,
epoch, sample index, position in the chain): the same in any data-loader worker, after a
resume, and in either placement (``data.augment_on = "worker"`` per image, or ``"device"``
batched after transfer: one call per augmenter per batch, the crop and flip as one indexing
kernel each). See ``convnet.plugins.augment.draws``.

Ten-crop contract (with the ``ten-crop`` evaluator). ``ten-crop`` turns one ``[C, H, W]``
image into ``[10, C, size, size]``: top-left, top-right, bottom-left, bottom-right, centre
(offset ``(H - size) // 2``), then the same five mirrored left-right. The collated eval
batch is ``[N, 10, C, size, size]``; the evaluator flattens it to ``[N * 10, C, size, size]``,
runs the network and averages the softmax over the 10 views. Augmenters placed after
``ten-crop`` see the extra leading dimension (mean-image and pca-lighting broadcast over it).

Small images. An image smaller than a crop (center-crop, random-crop, ten-crop) is resized
up, aspect kept, and counted; a ``SmallImageWarning`` reports the count when the loader's
pass ends (per epoch in training), summed over workers.

Mean image and crops. The paper subtracts the mean of the 256x256 images, then crops: put
``mean-image`` before ``random-crop`` to do exactly that (the bundled ImageNet recipe does).
After a crop, mean-image subtracts the mean's centre window, exact only for centre crops.
"""

from __future__ import annotations

from convnet.core import Registries, hookimpl
from convnet.plugins.augment import geometry as g
from convnet.plugins.augment import photometric as p


@hookimpl
def convnet_register(registries: Registries) -> None:
    add = registries.augmenter.add
    add(
        "resize-shorter",
        g.ResizeShorter,
        g.ResizeShorterOptions,
        "shorter side to size (the paper's 256), aspect kept, antialiased bilinear",
    )
    add("center-crop", g.CenterCrop, g.CenterCropOptions, "the central size x size window (default 227)")
    add(
        "random-crop",
        g.RandomCrop,
        g.RandomCropOptions,
        "a size x size window uniform over all positions (the paper's 227), optional padding",
    )
    add(
        "random-shift",
        g.RandomShift,
        g.RandomShiftOptions,
        "translate by up to max_shift pixels, border repeated: a random crop at the image's own size",
    )
    add("hflip", g.HFlip, g.HFlipOptions, "mirror left-right with probability p (the paper's 0.5)")
    add(
        "ten-crop",
        g.TenCrop,
        g.TenCropOptions,
        "test views: 4 corners + centre and their mirrors -> [10, C, size, size] per image",
    )
    add(
        "mean-image",
        p.MeanImage,
        p.MeanImageOptions,
        "subtract the per-pixel mean image from `convnet stats` (uint8 -> float32, 0-255 scale)",
    )
    add("mean-rgb", p.MeanRgb, p.MeanRgbOptions, "subtract a per-channel mean (optionally divide by std)")
    add(
        "pca-lighting",
        p.PcaLighting,
        p.PcaLightingOptions,
        "the paper's colour noise along the RGB principal components, alpha ~ N(0, 0.1) per image",
    )
    add("to-float", p.ToFloat, p.ToFloatOptions, "convert to float32, times scale (1/255 for [0, 1])")
