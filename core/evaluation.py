"""The interface evaluators implement, and the shared predictions they read."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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
    skipped: dict[str, int] = attrs.Factory(dict)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and no gradients inside; the module's previous mode restored after."""
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.module.train(was_training)

    def batches(self, split: str = "val", batch_size: int | None = None, indices: Sequence[int] | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's share of a split (or of the samples ``indices`` of it) as
        ``(images on the input device, labels, indices)``.

        Eval augmentation is applied. Use inside ``evaluating()``. Unreadable samples are
        counted in ``self.skipped[split]``.
        """
        dataset = getattr(self.splits, split)
        ds = cdata.Augmented(dataset, self.eval_augmenters, self.recipe.seed, cdata.STREAM_EVAL_AUGMENT)
        bs = batch_size or self.recipe.data.eval_batch_size or self.recipe.data.batch_size
        share = self.strategy.shard_eval(list(range(len(dataset))) if indices is None else list(indices))
        batches = [share[i:i + bs] for i in range(0, len(share), bs)]
        dtype = next(iter(self.module.parameters())).dtype
        self.skipped[split] = 0
        for images, y, idx, bad in cdata.loader(ds, batches, self.recipe.data.workers):
            self.skipped[split] += bad
            if len(y):
                yield images.to(self.strategy.input_device, dtype=dtype, non_blocking=True), y, idx

    def predict(self, split: str = "val", batch_size: int | None = None,
                transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Predictions:
        """Run the model on a split (eval augmentation applied); cached per split.

        A batch of several views per image (``[N, V, C, H, W]``, e.g. from a ``ten-crop``
        eval augmenter) is scored by the softmax averaged over the views, returned as its
        logarithm (a valid logit vector: its softmax is the averaged softmax).
        """
        if transform is None and split in self._cache:
            return self._cache[split]
        model = self.module if transform is None else transform
        logits, labels, indices = [], [], []
        with self.evaluating():
            for x, y, idx in self.batches(split, batch_size):
                out = multiview_logits(model, x) if x.dim() == 5 else model(x)
                logits.append(out.float().cpu())
                labels.append(y)
                indices.append(idx)
        pred = Predictions(torch.cat(logits) if logits else torch.empty(0, self.recipe.model.num_classes),
                           torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
                           torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
                           self.skipped.get(split, 0))
        if transform is None:
            self._cache[split] = pred
        return pred


def multiview_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[N, V, C, H, W]`` -> log of the softmax averaged over the V views, ``[N, classes]``."""
    n, views = x.shape[:2]
    probs = torch.softmax(model(x.flatten(0, 1)).float(), dim=1)
    return probs.reshape(n, views, -1).mean(1).log()


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
