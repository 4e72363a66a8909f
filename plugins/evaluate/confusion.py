"""The confusion matrix of top-1 predictions and the most confused (true, predicted) pairs.

Counts are summed over processes. Pairs are ordered by count, then by true class, then by
predicted class (lower index first), so the list is deterministic. Writes ``confusion.json``
(the matrix, rows = true class, and the pairs); returns the top pairs.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs import validators as v

from convnet.core import BuildContext, EvalContext, Evaluator
from convnet.plugins.evaluate.common import split_prefix, write_json


@attrs.define
class ConfusionOptions:
    pairs: int = attrs.field(default=10, validator=[v.gt(0), v.le(10000)])
    split: str = attrs.field(default="val", validator=v.in_(("train", "val")))


def top1(logits: torch.Tensor) -> torch.Tensor:
    """The predicted class, ties to the lower index (the rule ``topk`` uses)."""
    classes = logits.shape[1]
    best = logits.max(1, keepdim=True).values
    return torch.where(logits == best, torch.arange(classes), classes).min(1).values


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``[classes, classes]`` counts, rows = true class, columns = predicted class; a sample
    whose logits hold a NaN predicts no class and is left out (``Confusion`` counts them)."""
    scored = ~torch.isnan(logits).any(1)
    flat = labels[scored] * classes + top1(logits[scored])
    return torch.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def confused_pairs(matrix: torch.Tensor, n: int) -> list[tuple[int, int, int]]:
    """The ``n`` largest off-diagonal counts as (true, predicted, count), zeros left out."""
    classes = matrix.shape[0]
    pairs = [(-int(matrix[t, p]), t, p) for t in range(classes) for p in range(classes) if t != p and matrix[t, p] > 0]
    return [(t, p, -c) for c, t, p in sorted(pairs)[:n]]


class Confusion(Evaluator):
    when = "end"

    def __init__(self, options: ConfusionOptions, ctx: BuildContext) -> None:
        self.options = options

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        pred = ctx.predict(self.options.split)
        k = ctx.recipe.model.num_classes
        matrix = ctx.strategy.all_reduce_sum(confusion_matrix(pred.logits, pred.labels, k).to(torch.float64))
        matrix = matrix.round().to(torch.long)
        total = ctx.strategy.all_reduce_sum(torch.tensor([float(len(pred.labels))], dtype=torch.float64))
        unscored = int(total.item()) - int(matrix.sum())
        names = ctx.splits.classes or [str(i) for i in range(k)]
        support = matrix.sum(1)
        pairs = [
            {
                "true": names[t],
                "predicted": names[p],
                "true_index": t,
                "predicted_index": p,
                "count": c,
                "rate": c / int(support[t]),
            }
            for t, p, c in confused_pairs(matrix, self.options.pairs)
        ]
        prefix = split_prefix(self.options.split)
        write_json(
            ctx.out,
            f"{prefix}confusion.json",
            {
                "split": self.options.split,
                "classes": names,
                "matrix": matrix.tolist(),
                "pairs": pairs,
                "nan_samples": unscored,
            },
        )
        results: dict[str, Any] = {
            f"{prefix}most_confused": [f"{p['true']}->{p['predicted']}: {p['count']}" for p in pairs[:3]]
        }
        if unscored:  # the network gave NaN for these: they are in no row of the matrix
            results[f"{prefix}confusion_nan_samples"] = unscored
        return results
