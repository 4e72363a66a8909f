"""Several trained networks' softmax outputs averaged (the paper's "5 CNNs" row).

Member 0 is the network being evaluated (the run's final weights, or the first
``--checkpoint`` of ``convnet eval``); the option ``checkpoints`` lists the other members.
Each member's own errors are reported beside the ensemble's. An ensemble of one member
is that member.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs import validators as v

from convnet.core import BuildContext, EvalContext, Evaluator, check_compatible, load_checkpoint, model_tensors
from convnet.plugins.evaluate.common import count_errors, split_prefix, usable_ks
from convnet.plugins.evaluate.topk import _ks, label_rank


@attrs.define
class EnsembleOptions:
    checkpoints: list[str] = attrs.Factory(list)
    k: list[int] = attrs.field(default=attrs.Factory(lambda: [1, 5]), validator=_ks)
    split: str = attrs.field(default="val", validator=v.in_(("train", "val")))


def load_member(path: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, checked against this recipe's model (one error naming the
    first mismatched tensor and both shapes)."""
    tensors, _ = load_checkpoint(path)
    state = model_tensors(tensors)
    check_compatible(path, expected, state)
    return state


class Ensemble(Evaluator):
    when = "end"

    def __init__(self, options: EnsembleOptions, ctx: BuildContext) -> None:
        self.options = options

    def _probs(self, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
        pred = ctx.predict(self.options.split, transform=ctx.module)
        order = torch.argsort(pred.indices)
        return torch.softmax(pred.logits[order].double(), dim=1), pred.labels[order]

    def _errors(self, ctx: EvalContext, probs: torch.Tensor, labels: torch.Tensor, ks: list[int]) -> list[float]:
        rank = label_rank(probs, labels)
        rates, _ = count_errors(ctx.strategy, [int((rank >= k).sum()) for k in ks], len(labels))
        return rates

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        ks = usable_ks(self.options.k, ctx.recipe.model.num_classes)
        own = ctx.strategy.state_dict(ctx.module)
        own = {name: t.detach().clone() for name, t in own.items()}
        states = [load_member(p, own) for p in self.options.checkpoints]  # all checked before any work
        probs, labels = self._probs(ctx)
        members = [(ctx.weights, self._errors(ctx, probs, labels, ks))]
        total = probs.clone()
        try:
            for path, state in zip(self.options.checkpoints, states):
                ctx.strategy.load_state_dict(ctx.module, state)
                p, member_labels = self._probs(ctx)
                if not torch.equal(member_labels, labels):
                    raise AssertionError("ensemble members saw different samples")
                members.append((path, self._errors(ctx, p, labels, ks)))
                total += p
        finally:
            if states:
                ctx.strategy.load_state_dict(ctx.module, own)
        ensemble = self._errors(ctx, total / len(members), labels, ks)
        prefix = split_prefix(self.options.split)
        out: dict[str, Any] = {f"{prefix}ensemble_size": len(members)}
        for j, k in enumerate(ks):
            out[f"{prefix}ensemble_top{k}_error"] = ensemble[j]
        out[f"{prefix}ensemble_members"] = [
            {"member": name, **{f"top{k}_error": errs[j] for j, k in enumerate(ks)}} for name, errs in members
        ]
        return out
