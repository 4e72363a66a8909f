"""The interface evaluators implement, and the shared predictions they read."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import attrs
import torch
from torch import nn

from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.strategy import Strategy


@attrs.define
class Predictions:
    """Logits, labels and dataset indices of a split, on the CPU, on this process's share."""

    logits: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: int = 0


@attrs.define
class EvalContext:
    """What an evaluator sees: the model, the data, the strategy, the run folder."""

    recipe: schema.Recipe
    module: nn.Module
    strategy: Strategy
    splits: cdata.DatasetSplits
    eval_augmenters: list
    out: Path | None
    epoch: int
    final: bool
    _cache: dict[str, Predictions] = attrs.Factory(dict)

    def predict(self, split: str = "val", batch_size: int | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Predictions:
        """Run the model on a split (eval augmentation applied); cached per split."""
        if transform is None and split in self._cache:
            return self._cache[split]
        dataset = getattr(self.splits, split)
        ds = cdata.Augmented(dataset, self.eval_augmenters, self.recipe.seed, cdata.STREAM_EVAL_AUGMENT)
        bs = batch_size or self.recipe.data.eval_batch_size or self.recipe.data.batch_size
        batches = cdata.eval_batches(len(dataset), bs, self.strategy.shard_eval)
        loader = cdata.loader(ds, batches, self.recipe.data.workers)
        logits, labels, indices, skipped = [], [], [], 0
        was_training = self.module.training
        self.module.eval()
        dtype = next(iter(self.module.parameters())).dtype
        try:
            with torch.no_grad():
                for images, y, idx, bad in loader:
                    skipped += bad
                    if len(y) == 0:
                        continue
                    x = images.to(self.strategy.input_device, dtype=dtype, non_blocking=True)
                    out = self.module(x) if transform is None else transform(x)
                    logits.append(out.float().cpu())
                    labels.append(y)
                    indices.append(idx)
        finally:
            self.module.train(was_training)
        pred = Predictions(torch.cat(logits) if logits else torch.empty(0, self.recipe.model.num_classes),
                           torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
                           torch.cat(indices) if indices else torch.empty(0, dtype=torch.long), skipped)
        if transform is None:
            self._cache[split] = pred
        return pred


class Evaluator:
    """Computes metrics. ``when``: "epoch" (after every epoch) or "end" (once, at the end)."""

    when: str = "epoch"

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError


def run_evaluators(evaluators: list[tuple[str, Evaluator]], ctx: EvalContext) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for _, ev in evaluators:
        if ctx.final or ev.when == "epoch":
            results.update(ev(ctx))
    return results
