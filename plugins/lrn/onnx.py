"""``convnet::lrn_forward`` in ONNX: the standard ``LRN`` operator.

ONNX's LRN, like Caffe's and PyTorch's, divides alpha by the window size:
y = x / (bias + alpha / size * sum of squares)^beta, so alpha_onnx = size * alpha_paper. Its
window for an even size reaches one channel further up than down, the mirror of ours
(``reference.py``): only odd sizes (the paper's is 5) map onto it exactly, and an even size is
refused rather than exported wrong. onnxscript is imported only when a graph is translated.
"""

from __future__ import annotations

from typing import Any


def lrn_forward(x: Any, size: int, alpha: float, beta: float, k: float, save_scale: bool = True) -> tuple[Any, Any]:
    from onnxscript import ir
    from onnxscript import opset18 as op

    if size % 2 == 0:
        raise ValueError(
            f"LRN with an even size ({size}) has no exact ONNX LRN (its window is mirrored); only odd sizes export"
        )
    if save_scale:
        raise ValueError(
            "LRN traced for training (save_scale=True); export the network for inference "
            "(parameters not requiring grad)"
        )
    y = op.LRN(x, size=size, alpha=float(alpha) * size, beta=float(beta), bias=float(k))
    no_scale = op.Constant(value=ir.tensor([], dtype=ir.DataType.FLOAT))
    return y, no_scale
