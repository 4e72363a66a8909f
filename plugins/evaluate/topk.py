"""Top-k error, exact on the whole split and summed over processes."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs import validators as v

from convnet.core import EvalContext, Evaluator
from convnet.plugins.evaluate.common import count_errors, split_prefix, usable_ks


def _ks(instance: Any, attribute: attrs.Attribute, value: list[int]) -> None:
    if not value or any(k <= 0 for k in value):
        raise ValueError(f"expected a non-empty list of positive integers, found {value!r}")


@attrs.define
class TopkOptions:
    k: list[int] = attrs.field(default=attrs.Factory(lambda: [1, 5]), validator=_ks)
    split: str = attrs.field(default="val", validator=v.in_(("train", "val")))


def label_rank(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Where each label's logit ranks (0 = top); ties go to the lower class index.

    Deterministic, unlike ``torch.topk`` whose order among equal values is unspecified. A row
    with a NaN ranks last (wrong for every k): every comparison with NaN is false, which would
    otherwise rank the label first and score a broken network as perfect.
    """
    target = logits.gather(1, labels[:, None])
    above = (logits > target).sum(1)
    classes = torch.arange(logits.shape[1], device=logits.device)
    tied_before = ((logits == target) & (classes[None, :] < labels[:, None])).sum(1)
    return torch.where(torch.isnan(logits).any(1), logits.shape[1], above + tied_before)


def topk_errors(logits: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> dict[int, tuple[int, int]]:
    """k -> (wrong, total)."""
    rank = label_rank(logits, labels)
    return {k: (int((rank >= k).sum()), len(labels)) for k in ks}


class Topk(Evaluator):
    when = "epoch"

    def __init__(self, options: TopkOptions, num_classes: int | None = None) -> None:
        self.options = options
        if num_classes is not None:
            prefix = split_prefix(options.split)
            ks = usable_ks(options.k, num_classes)
            self.metrics = (f"{prefix}samples", *(f"{prefix}top{k}_error" for k in ks))

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        pred = ctx.predict(self.options.split)
        ks = usable_ks(self.options.k, ctx.recipe.model.num_classes)
        counts = topk_errors(pred.logits, pred.labels, ks)
        rates, total = count_errors(ctx.strategy, [counts[k][0] for k in ks], len(pred.labels))
        prefix = split_prefix(self.options.split)
        return {f"{prefix}samples": total, **{f"{prefix}top{k}_error": rate for k, rate in zip(ks, rates, strict=True)}}
