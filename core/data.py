"""Datasets, augmentation chains and the loaders the engine iterates.

Randomness is stateless: each sample's augmentation is keyed by (run seed, stream, epoch,
sample index, stage of the chain), and each epoch's order by (run seed, epoch). A run therefore
gives the same batches with any number of workers, after a resume, and with the augmentation
in the workers or batched on the device (both use the train stream's keys).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convnet.core import schema
from convnet.core.errors import ConvnetError, DataError, PluginError, RecipeError
from convnet.core.registry import Registries

# Streams keep the generators of different uses independent for the same (seed, epoch, index).
STREAM_ORDER, STREAM_TRAIN_AUGMENT, STREAM_EVAL_AUGMENT = 0, 1, 2


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    # The shift on a Python int: numpy < 2 refuses uint64 >> int.
    return (
        int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]) >> 1
    )


def generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
GOLDEN_GAMMA = _SPLITMIX[0]  # splitmix64's increment: spaces counters apart before hashing
# The DataLoader's own base seed (its workers' torch seeds); never drawn from the global RNG.
LOADER_SEED = (STREAM_ORDER, 0x10AD)


def splitmix64(z: int) -> int:
    """The splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    z = (z + _SPLITMIX[0]) & _MASK64
    z = ((z ^ (z >> 30)) * _SPLITMIX[1]) & _MASK64
    z = ((z ^ (z >> 27)) * _SPLITMIX[2]) & _MASK64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """``splitmix64`` on a uint64 array (wrapping arithmetic)."""
    z = z + np.uint64(_SPLITMIX[0])
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_SPLITMIX[1])
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_SPLITMIX[2])
    return z ^ (z >> np.uint64(31))


def sample_key(seed: int, stream: int, epoch: int, index: int, stage: int) -> int:
    """The 63-bit augmentation key of one sample at stage ``stage`` of a chain: a splitmix64
    hash of (seed, stream, epoch, index, stage). ``Augmented`` seeds the sample's generator
    for that stage with it."""
    z = int(seed) & _MASK64
    for part in (stream, epoch, index, stage):
        z = splitmix64(z ^ (int(part) & _MASK64))
    return z & _MASK63


def sample_keys(
    seed: int, stream: int, epoch: int, indices: Sequence[int] | np.ndarray | torch.Tensor, stage: int
) -> np.ndarray:
    """``sample_key`` for many indices at once (uint64 array): what the batched placement hands
    each augmenter, so that one drawing from its key gives the same result in either placement."""
    idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    z = np.full(idx.shape, int(seed) & _MASK64, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in (stream, epoch):
            z = _mix_array(z ^ np.uint64(int(part) & _MASK64))
        z = _mix_array(z ^ idx.astype(np.uint64))
        z = _mix_array(z ^ np.uint64(int(stage) & _MASK64))
    return z & np.uint64(_MASK63)


# The stage key the global generators are seeded with for a sample, before its chain runs;
# and for a batch, before a batched (``augment_on = "device"``) chain runs, with its first index.
GLOBALS_STAGE = -1
BATCH_GLOBALS_STAGE = -2


def seed_global_generators(key: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch's CPU generator from a
    key: third-party code that draws from them (many augmentation libraries do) is then as
    reproducible as the rest, with any number of workers and across a resume."""
    random.seed(key)
    np.random.seed(key & 0xFFFFFFFF)
    torch.random.default_generator.manual_seed(key)


@attrs.define
class DatasetSplits:
    """What a dataset plugin returns: map-style datasets of ``(image, label)``.

    Images are ``[C, H, W]`` tensors (uint8 or float). A sample that cannot be read may be
    returned as ``None``: the loader skips and counts it (or fails, if the recipe says so).

    ``read_file`` (optional) turns a user's image file into an image as the validation split
    yields it (before ``data.eval_augment``), raising any exception for a file it cannot read:
    ``convnet predict`` needs it, and names the dataset when it is missing. ``classes`` names
    the labels in its output.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str] | None = None
    name: str = ""
    read_file: Callable[[Path], torch.Tensor] | None = None


@attrs.frozen
class DataContext:
    recipe: schema.Recipe
    registries: Registries
    path: str = "data.dataset"
    # "predict": only ``classes``, ``num_classes`` and ``read_file`` are used, so a dataset may
    # skip scanning its files (the splits may then be empty).
    purpose: str = "train"

    def error(self, message: str) -> RecipeError:
        return RecipeError(f"{self.path}: {message}")


class Augment(Protocol):
    """An augmenter: ``aug(image, generator)`` on one ``[C, H, W]`` image.

    The generator is fresh for each (sample, stage of the chain), seeded with
    ``sample_keys(seed, stream, epoch, [index], stage)``; ``generator.initial_seed()`` is that key.
    ``batch(images, keys)`` (optional) does the same for ``[N, C, H, W]`` on the device after
    transfer, one call per batch; ``keys`` is the ``[N]`` int64 CPU tensor of the same keys, so
    an augmenter that derives its draws from the key (rather than the generator's stream) gives
    the same output per sample in either placement. ``batch`` may overwrite ``images`` (the
    engine hands over a batch it no longer needs; a fresh float batch is costly on a CPU).
    """

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def build_dataset(recipe: schema.Recipe, registries: Registries, purpose: str = "train") -> DatasetSplits:
    """The recipe's dataset; ``purpose="predict"`` lets a dataset skip scanning its files."""
    splits = registries.dataset.build(
        recipe.data.dataset, "data.dataset", DataContext(recipe, registries, purpose=purpose), returns=DatasetSplits
    )
    if splits.num_classes != recipe.model.num_classes:
        raise RecipeError(
            f"{recipe.name or 'recipe'}: model.num_classes = {recipe.model.num_classes}, but dataset "
            f"{recipe.data.dataset.name!r} has {splits.num_classes} classes; set it to match "
            f"(--set model.num_classes={splits.num_classes})"
        )
    return splits


def build_augmenters(
    components: Sequence[schema.Augmenter], registries: Registries, path: str, recipe: schema.Recipe
) -> list[Augment]:
    built = []
    for i, comp in enumerate(components):
        where = f"{path}[{i}]"
        aug = registries.augmenter.build(comp, where, DataContext(recipe, registries, where))
        if not callable(aug):
            raise PluginError(
                f"{where}: augmenter {comp.name!r} from {registries.augmenter.get(comp.name).origin} returned "
                f"{type(aug).__name__}, which is not callable as aug(image, generator)"
            )
        built.append(aug)
    return built


class Augmented(Dataset):
    """A dataset whose samples pass through an augmentation chain, each stage with a generator
    seeded from (seed, stream, epoch, index, stage): no state carries from sample to sample.
    Before the sample is read, the global generators are seeded from (seed, stream, epoch, index)."""

    def __init__(self, base: Dataset, augmenters: Sequence[Augment], seed: int, stream: int) -> None:
        self.base, self.augmenters, self.seed, self.stream = base, list(augmenters), seed, stream
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed_global_generators(sample_key(self.seed, self.stream, self.epoch, index, GLOBALS_STAGE))
        sample = self.base[index]
        if sample is None:
            return Unreadable(index)
        image, label = sample
        for stage, aug in enumerate(self.augmenters):
            g = torch.Generator()
            g.manual_seed(sample_key(self.seed, self.stream, self.epoch, index, stage))
            image = aug(image, g)
        return image, label, index

    def end_pass(self) -> None:
        """Called by ``loader`` when a pass is over: augmenters report what they counted."""
        for aug in self.augmenters:
            report = getattr(aug, "end_pass", None)
            if report is not None:
                report(self.epoch)


def augment_batch(
    augmenters: Sequence[Augment],
    x: torch.Tensor,
    seed: int,
    epoch: int,
    indices: torch.Tensor,
    path: str = "data.train_augment",
) -> torch.Tensor:
    """Batched augmentation after transfer (``data.augment_on = "device"``): one call per
    augmenter per batch.

    Stage i of the chain gets the per-sample keys the worker placement seeds sample i's
    generator with (same stream), so key-driven augmenters crop/flip/light each sample the
    same way in either placement. The global generators are seeded from the batch's first
    sample before the chain: a batched form that draws from them gives the same batches with
    any number of workers (which reseed them per sample in their own processes, not here).
    """
    if len(indices):
        seed_global_generators(sample_key(seed, STREAM_TRAIN_AUGMENT, epoch, int(indices[0]), BATCH_GLOBALS_STAGE))
    for stage, aug in enumerate(augmenters):
        batch = getattr(aug, "batch", None)
        if batch is None:
            raise RecipeError(
                f'{path}[{stage}]: data.augment_on = "device", but augmenter {type(aug).__name__} has no batched form'
            )
        keys = torch.from_numpy(sample_keys(seed, STREAM_TRAIN_AUGMENT, epoch, indices, stage).astype("int64"))
        x = batch(x, keys)
    return x


class Unreadable(NamedTuple):
    """What ``Augmented`` yields for a sample its dataset could not read (``None``)."""

    index: int


def collate(samples: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Stack the readable samples; the dataset indices of those skipped as unreadable (-1 where
    the dataset was not wrapped in ``Augmented`` and the index is unknown)."""
    good = [s for s in samples if s is not None and not isinstance(s, Unreadable)]
    skipped = [s.index if isinstance(s, Unreadable) else -1 for s in samples if s is None or isinstance(s, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([torch.as_tensor(s[0]) for s in good])
    labels = torch.as_tensor([int(s[1]) for s in good], dtype=torch.long)
    indices = torch.as_tensor([int(s[2]) for s in good], dtype=torch.long)
    return images, labels, indices, skipped


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=generator(seed, STREAM_ORDER, epoch)).tolist()


def train_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    shard: Callable[[list[int]], list[int]] | None = None,
) -> list[list[int]]:
    """The epoch's global batches (the last partial one dropped), from batch ``start`` on."""
    order = epoch_order(n, seed, epoch)
    batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    batches = batches[start:]
    return [shard(b) for b in batches] if shard else batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def eval_batches(n: int, batch_size: int, shard: Callable[[list[int]], list[int]] | None = None) -> list[list[int]]:
    indices = list(range(n))
    if shard:
        indices = shard(indices)
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


class Pass:
    """One pass of a DataLoader; when it ends (or is abandoned) the dataset's ``end_pass`` runs."""

    def __init__(self, loader: DataLoader, dataset: Dataset) -> None:
        self.loader, self.dataset = loader, dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        except ConvnetError as exc:
            original = worker_message(exc)
            if original is None:
                raise
            try:
                clean = type(exc)(original)
            except Exception:  # a subclass with another constructor: keep torch's
                raise exc from None
            raise clean from None
        finally:
            end = getattr(self.dataset, "end_pass", None)
            if end is not None:
                end()


def worker_message(exc: BaseException) -> str | None:
    """The message a data-loader worker's error had, or None if ``exc`` is not a re-raised one.

    torch re-raises a worker's exception in the main process as the same type with the worker's
    whole traceback as its message; a ``ConvnetError`` (a corrupt shard, an augmenter's bad
    input) is one line for the user, whichever process raised it.
    """
    text = str(exc)
    if not (text.startswith("Caught ") and "DataLoader worker process" in text):
        return None
    tail = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    at = text.rfind(tail)
    return text[at + len(tail) :].strip() if at >= 0 else None


def loader(dataset: Dataset, batches: Iterable[list[int]], workers: int, pin_memory: bool = False) -> Pass:
    workers = min(workers, os.cpu_count() or 1) if workers else 0
    # Its own generator: a DataLoader otherwise draws its base seed from the global torch RNG
    # at every pass, which would make dropout after a resume differ from a straight run.
    return Pass(
        DataLoader(
            dataset,
            batch_sampler=list(batches),
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=False,
            generator=generator(*LOADER_SEED),
        ),
        dataset,
    )


def sample_name(dataset: Any, index: int) -> str:
    """How a report names a sample: the dataset's ``sample_name(index)`` (a file path), else its index."""
    name = getattr(dataset, "sample_name", None)
    if index >= 0 and callable(name):
        try:
            return str(name(index))
        except Exception:  # naming must never fail a run
            pass
    return f"sample {index}" if index >= 0 else "a sample"


def unreadable_reason(dataset: Any, index: int) -> str:
    """Why sample ``index`` cannot be read, where the dataset can say: its ``read(index)``
    raises the decode error that ``dataset[index]`` turns into None (read again, once)."""
    read = getattr(dataset, "read", None)
    if index >= 0 and callable(read):
        try:
            read(index)
        except Exception as exc:  # the error is the answer
            return (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0][:200]
    return "the dataset gave no sample"


def check_bad_samples(dataset: Any, bad: list[int], policy: str, where: str) -> None:
    """With ``data.bad_samples = "fatal"``, stop at the first unreadable sample, naming it and why."""
    if bad and policy == "fatal":
        first = bad[0]
        more = f" (and {len(bad) - 1} more in the same batch)" if len(bad) > 1 else ""
        raise DataError(
            f"{where}: {sample_name(dataset, first)} is unreadable ({unreadable_reason(dataset, first)}){more}, "
            'and data.bad_samples = "fatal"'
        )


def check_input_shape(images: torch.Tensor, expected: Sequence[int], where: str) -> None:
    """Images (``[..., C, H, W]``) that are not ``model.input``'s shape stop as a recipe error
    naming what gives them, not as a shape error deep inside a layer."""
    shape = list(images.shape[-3:])
    if shape != list(expected):
        raise RecipeError(
            f"{where} give {shape} images but model.input is {list(expected)}: the dataset's size and "
            "the augmenters' crops must give model.input"
        )


def ten_crop_views(images: torch.Tensor, height: int, width: int, flip: bool = True) -> torch.Tensor:
    """The paper's test views of ``[..., C, H, W]`` images, stacked before C: top-left,
    top-right, bottom-left, bottom-right, centre, then (with ``flip``) the same five mirrored.

    ``[C, H, W]`` -> ``[10, C, height, width]``; ``[N, C, H, W]`` -> ``[N, 10, C, height, width]``.
    The ``ten-crop`` augmenter and the ``ten-crop`` evaluator both cut their views here.
    """
    h, w = images.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"crop {height}x{width} is larger than the image {h}x{w}")
    corners = [(0, 0), (0, w - width), (h - height, 0), (h - height, w - width), ((h - height) // 2, (w - width) // 2)]
    crops = [images[..., y : y + height, x : x + width] for y, x in corners]
    if flip:
        crops += [crop.flip(-1) for crop in crops]
    return torch.stack(crops, dim=images.dim() - 3)
