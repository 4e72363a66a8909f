"""The interface evaluators implement, and the shared predictions they read."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.errors import PluginError
from convnet.core.registry import Registries
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
    """What an evaluator sees when it runs.

    ``module`` is the strategy's module (for the canonical weights use
    ``strategy.state_dict(module)``); ``out`` the folder for the evaluator's files (None on
    processes other than the main one: write nothing there); ``epoch`` the 0-based epoch just
    trained; ``final`` True at the end of the run; ``registries`` to build further components;
    ``weights`` says where the evaluated weights come from (a checkpoint path under ``convnet eval``).
    ``predict(split)`` gives logits cached per split, ``batches(split)`` the raw batches.
    """

    recipe: schema.Recipe
    module: nn.Module
    strategy: Strategy
    splits: cdata.DatasetSplits
    eval_augmenters: list
    out: Path | None
    epoch: int
    final: bool
    registries: Registries
    weights: str = "the run's weights"
    _cache: dict[str, Predictions] = attrs.Factory(dict)
    skipped: dict[str, int] = attrs.Factory(dict)
    skipped_names: dict[str, list[str]] = attrs.Factory(dict)

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

    def batches(
        self, split: str = "val", batch_size: int | None = None, indices: Sequence[int] | None = None
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
        batches = [share[i : i + bs] for i in range(0, len(share), bs)]
        dtype = next(iter(self.module.parameters())).dtype
        self.skipped[split] = 0
        # kept across calls: an evaluator that reads a subset must not hide another's skips
        names = self.skipped_names.setdefault(split, [])
        for images, y, idx, bad in cdata.loader(ds, batches, self.recipe.data.workers):
            cdata.check_bad_samples(dataset, bad, self.recipe.data.bad_samples, f"{split} set")
            self.skipped[split] += len(bad)
            names += [cdata.sample_name(dataset, i) for i in bad]
            if len(y):
                yield images.to(self.strategy.input_device, dtype=dtype, non_blocking=True), y, idx

    def predict(
        self,
        split: str = "val",
        batch_size: int | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Predictions:
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
                if transform is None:  # a transform (the ten-crop evaluator's) may cut model.input from x
                    cdata.check_input_shape(x, self.recipe.model.input, "data.dataset and data.eval_augment")
                out = multiview_logits(model, x) if x.dim() == 5 else model(x)
                logits.append(out.float().cpu())
                labels.append(y)
                indices.append(idx)
        pred = Predictions(
            torch.cat(logits) if logits else torch.empty(0, self.recipe.model.num_classes),
            torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
            self.skipped.get(split, 0),
        )
        if transform is None:
            self._cache[split] = pred
        return pred


def multiview_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``[N, V, C, H, W]`` -> log of the softmax averaged over the V views, ``[N, classes]``."""
    n, views = x.shape[:2]
    probs = torch.softmax(model(x.flatten(0, 1)).float(), dim=1)
    return probs.reshape(n, views, -1).mean(1).log()


class Evaluator:
    """Computes metrics: ``ev(ctx: EvalContext) -> dict[str, value]``.

    ``when``: ``"epoch"`` (after every epoch and at the end) or ``"end"`` (only at the end).
    Values are numbers (a 0-d tensor or numpy scalar is converted), strings, or lists and
    dicts of them: they go to metrics.jsonl and eval.json. Numbers must be equal on every
    process (reduce with ``ctx.strategy.all_reduce_sum``); files go to ``ctx.out``.

    ``metrics``: the result keys it reports, where known when it is built (``None``: not
    declared). When every per-epoch evaluator declares them, a run whose ``train.monitor`` is
    none of them stops before training instead of never stepping its schedule.
    """

    when: str = "epoch"
    metrics: tuple[str, ...] | None = None

    def __call__(self, ctx: EvalContext) -> dict[str, Any]:
        raise NotImplementedError


def run_evaluators(evaluators: list[tuple[str, Evaluator]], ctx: EvalContext) -> dict[str, Any]:
    """Every evaluator due now, in recipe order; results merged, each value checked (and 0-d
    tensors converted) so that a bad value names its evaluator and key."""
    results: dict[str, Any] = {}
    for path, ev in evaluators:
        if ctx.final or getattr(ev, "when", "epoch") == "epoch":
            out = ev(ctx)
            if not isinstance(out, dict):
                raise PluginError(f"{path}: the evaluator returned {type(out).__name__}, not a dict of results")
            results.update({key: plain_value(value, f"{path}: result {key!r}") for key, value in out.items()})
    return results


def plain_value(value: Any, where: str) -> Any:
    """``value`` as JSON data (0-d tensors and numpy scalars become numbers), or a PluginError."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise PluginError(
                f"{where} is a tensor of shape {list(value.shape)}; return numbers "
                "(a 0-d tensor is converted; reduce or .tolist() anything larger)"
            )
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, dict):
        return {str(k): plain_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        json.dumps(value)
    except TypeError:
        raise PluginError(
            f"{where} is a {type(value).__name__}, which cannot be saved in metrics.jsonl; "
            "return numbers, strings, or lists and dicts of them"
        ) from None
    return value
