"""``convnet stats``: the training set's mean image and RGB principal components.

The paper subtracts "the mean activity over the training set from each pixel" and draws
its colour augmentation along the principal components of "the set of RGB pixel values
throughout the ImageNet training set". Both are computed here in one streaming pass over
the un-augmented training split, in float64, holding only fixed-size accumulators:

* ``mean`` — the per-pixel mean image ``[C, H, W]`` (float32, on the images' own scale:
  0-255 for the uint8 images the ``imagenet`` dataset yields);
* ``eigvals``/``eigvecs`` — eigen-decomposition of the ``C x C`` covariance of all pixel
  values (centred on the global per-channel mean), largest eigenvalue first; the
  eigenvectors are the COLUMNS of ``eigvecs``;
* ``rgb_mean`` — the per-channel mean (for the cheaper ``mean-rgb`` subtraction).

Batches are merged with Chan et al.'s pairwise update, so the result does not depend on
the batch size beyond rounding and does not lose precision over a million images.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import attrs
import torch

from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.checkpoint import usual_mode
from convnet.core.errors import ConvnetError, DataError
from convnet.core.registry import Registries

STATS_KEYS = ("mean", "eigvals", "eigvecs")


@attrs.define
class PixelStats:
    """Running per-pixel sums and the pixel-value covariance (Chan's merge)."""

    image_sum: torch.Tensor | None = None
    images: int = 0
    pixels: int = 0
    channel_mean: torch.Tensor | None = None
    comoment: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        """``batch``: ``[N, C, H, W]`` images of one shape."""
        x = batch.to(torch.float64)
        n, c = x.shape[:2]
        if self.image_sum is None:
            self.image_sum = torch.zeros(x.shape[1:], dtype=torch.float64)
            self.channel_mean = torch.zeros(c, dtype=torch.float64)
            self.comoment = torch.zeros(c, c, dtype=torch.float64)
        elif x.shape[1:] != self.image_sum.shape:
            raise DataError(
                f"images of different shapes: {list(x.shape[1:])} after {list(self.image_sum.shape)}; "
                "the mean image needs one size (the dataset's preprocessing should fix it)"
            )
        self.image_sum += x.sum(0)
        pixels = x.permute(1, 0, 2, 3).reshape(c, -1)
        m = pixels.shape[1]
        mean_b = pixels.mean(1)
        centred = pixels - mean_b[:, None]
        comoment_b = centred @ centred.T
        total = self.pixels + m
        delta = mean_b - self.channel_mean
        self.comoment += comoment_b + torch.outer(delta, delta) * (self.pixels * m / total)
        self.channel_mean += delta * (m / total)
        self.pixels = total
        self.images += n

    def result(self) -> dict[str, torch.Tensor]:
        if not self.images:
            raise DataError("no readable training images: cannot compute statistics")
        cov = self.comoment / max(self.pixels - 1, 1)
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp(min=0.0)  # a covariance is PSD; tiny negatives are rounding
        order = torch.argsort(eigvals, descending=True)
        return {
            "mean": (self.image_sum / self.images).float().contiguous(),
            "eigvals": eigvals[order].float().contiguous(),
            "eigvecs": eigvecs[:, order].float().contiguous(),
            "rgb_mean": self.channel_mean.float().contiguous(),
            "covariance": cov.float().contiguous(),
        }


def default_out(recipe: schema.Recipe) -> Path:
    """Where ``convnet stats`` writes without ``--out``: next to the dataset,
    ``<data.dataset.root>/stats.safetensors``; for a dataset without a root, the file an
    augmenter's ``stats`` option names, else ``runs/<recipe>/stats.safetensors``."""
    root = getattr(recipe.data.dataset.options, "root", None)
    if isinstance(root, str) and root:
        return Path(root).expanduser() / "stats.safetensors"
    for comp in [*recipe.data.train_augment, *recipe.data.eval_augment]:
        path = getattr(comp.options, "stats", None)
        if isinstance(path, str) and path:
            return Path(path)
    return Path("runs") / (recipe.name or "recipe") / "stats.safetensors"


def readers(recipe: schema.Recipe) -> dict[str, str]:
    """Recipe path -> the stats file each augmenter reads (``data.train_augment[0].stats``)."""
    out = {}
    for split in ("train_augment", "eval_augment"):
        for i, comp in enumerate(getattr(recipe.data, split)):
            path = getattr(comp.options, "stats", None)
            if isinstance(path, str) and path:
                out[f"data.{split}[{i}].stats"] = path
    return out


def check_target(path: str | Path, force: bool) -> str | None:
    """Before the (long) pass: an error for a target that can never be written; a note when a
    file is there already (kept unless the new statistics are the same, or ``force``)."""
    path = Path(path)
    if path.is_dir():
        raise ConvnetError(f"{path}: is a folder; give --out a file name (e.g. {path / 'stats.safetensors'})")
    if path.exists() and not force:
        return (
            f"note: {path} exists; it is replaced only with --force (statistics that come out the same "
            "leave it as it is)"
        )
    return None


def _same(path: Path, tensors: dict[str, torch.Tensor]) -> bool:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        old = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return False
    return set(old) == set(tensors) and all(
        old[k].shape == tensors[k].shape and torch.allclose(old[k].double(), tensors[k].double(), rtol=1e-6, atol=1e-6)
        for k in tensors
    )


def save_checked(
    path: str | Path, tensors: dict[str, torch.Tensor], summary: dict[str, Any], recipe_name: str, force: bool = False
) -> tuple[Path, str]:
    """``save``, but a different existing file is replaced only with ``force``: without it the new
    statistics go beside it (``stats.new.safetensors``, so hours of streaming are not lost) and a
    ``ConvnetError`` says so. Returns the path and what happened."""
    path = Path(path)
    if path.exists():
        if _same(path, tensors):
            return path, "unchanged: it already held these statistics"
        if not force:
            aside = save(path.with_name(f"{path.stem}.new{path.suffix}"), tensors, summary, recipe_name)
            raise ConvnetError(
                f"{path}: exists and holds different statistics; not replaced without --force "
                f"(the new ones are in {aside})"
            )
        return save(path, tensors, summary, recipe_name), "replaced the different statistics it held (--force)"
    return save(path, tensors, summary, recipe_name), "written"


def compute(
    recipe: schema.Recipe, registries: Registries, batch_size: int = 64, limit: int = 0, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stream the training split (no augmentation) and return the tensors and a summary."""
    from tqdm import tqdm

    splits = cdata.build_dataset(recipe, registries)
    total = len(splits.train)
    n = total if not limit else min(limit, total)
    dataset = cdata.Augmented(splits.train, [], recipe.seed, cdata.STREAM_EVAL_AUGMENT)
    # --limit: images spread evenly over the split, which folder datasets order by class (the
    # first N would be the first classes only); read in order, as the whole split is.
    chosen = [i * total // n for i in range(n)]
    batches = [chosen[i : i + batch_size] for i in range(0, n, batch_size)]
    stats = PixelStats()
    skipped = 0
    named: list[str] = []
    with tqdm(total=n, unit="img", desc="stats", disable=not progress, dynamic_ncols=True) as bar:
        for images, _, _, bad in cdata.loader(dataset, batches, recipe.data.workers):
            skipped += len(bad)
            named += [cdata.sample_name(splits.train, i) for i in bad[: max(0, 3 - len(named))]]
            cdata.check_bad_samples(splits.train, bad, recipe.data.bad_samples, "training set (stats)")
            if len(images):
                stats.add(images)
            bar.update(len(images) + len(bad))
    if skipped:
        more = f" (and {skipped - len(named)} more)" if skipped > len(named) else ""
        print(f"stats: skipped {skipped} unreadable training sample(s): {', '.join(named)}{more}", file=sys.stderr)
    tensors = stats.result()
    summary = {
        "images": stats.images,
        "skipped": skipped,
        "pixels": stats.pixels,
        "rgb_mean": [round(float(v), 4) for v in tensors["rgb_mean"]],
        "eigvals": [round(float(v), 4) for v in tensors["eigvals"]],
    }
    return tensors, summary


def save(path: str | Path, tensors: dict[str, torch.Tensor], summary: dict[str, Any], recipe_name: str) -> Path:
    """Write atomically (temp file, then rename), as a plain safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"convnet.stats": json.dumps(summary), "convnet.recipe": recipe_name})
        usual_mode(str(tmp))  # next to a shared dataset: readable as the images are
        tmp.replace(path)
    except OSError as exc:
        raise ConvnetError(f"{path}: cannot write statistics: {exc.strerror or exc}") from None
    return path


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a stats file; one clear error if it is missing or lacks a key."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no statistics file; make it with `convnet stats RECIPE --out {path}`")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a valid safetensors statistics file: {exc}") from None
    missing = [k for k in STATS_KEYS if k not in tensors]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)} (expected keys {', '.join(STATS_KEYS)})")
    return tensors
