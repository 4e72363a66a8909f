"""``convnet predict``: the top classes of image files, through a recipe's test procedure.

A file becomes an input by the dataset plugin's ``read_file`` (``DatasetSplits.read_file``: an
image as the validation split yields it), then passes through ``data.eval_augment`` as every
validation image does. The network is scored as the recipe's evaluation scores it:

* an eval augmentation that gives several views per image (``ten-crop``): the softmax averaged
  over the views;
* else, an evaluator of the recipe that cuts views itself (one whose class has a
  ``views(x)`` method, ``[N, C, H, W]`` -> ``[N, V, C, h, w]``, as ``ten-crop`` does): the
  softmax averaged over those views, the paper's test;
* else the one image (the centre crop, when the eval augmentation cuts one).

Checkpoints are read with ``convnet.core.checkpoint`` (safetensors; nothing is unpickled).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from convnet.core import checkpoint as ckpt
from convnet.core import data as cdata
from convnet.core import schema
from convnet.core.contracts import BuildContext
from convnet.core.errors import ConvnetError, DataError
from convnet.core.evaluation import multiview_logits
from convnet.core.image_modes import eight_bit
from convnet.core.model import build_model
from convnet.core.registry import Registries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")


@attrs.frozen
class Prediction:
    """One file's result: ``top`` as (class name, probability), most probable first; or
    ``error``, one line saying why the file could not be classified."""

    file: str
    top: list[tuple[str, float]] = attrs.Factory(list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "top5": [[name, p] for name, p in self.top]}


@attrs.frozen
class Predictor:
    """A recipe's network with trained weights, ready to score images read from files."""

    network: torch.nn.Module
    read_file: Callable[[Path], torch.Tensor]
    classes: list[str]
    augmenters: list
    views: Callable[[torch.Tensor], torch.Tensor] | None
    seed: int
    device: torch.device
    dtype: torch.dtype
    method: str
    input_shape: tuple[int, ...] | None = None

    def prepare(self, path: Path, index: int) -> torch.Tensor:
        """The file as the network's input: read, then the eval augmentation (as in ``Augmented``)."""
        image = torch.as_tensor(self.read_file(path))
        for stage, aug in enumerate(self.augmenters):
            g = torch.Generator()
            g.manual_seed(cdata.sample_key(self.seed, cdata.STREAM_EVAL_AUGMENT, 0, index, stage))
            image = aug(image, g)
        return image

    @torch.no_grad()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` or ``[N, V, C, H, W]`` -> ``[N, classes]`` probabilities (float64)."""
        x = batch.to(self.device, self.dtype)
        if x.dim() == 4 and self.views is not None:
            x = self.views(x)
        if self.input_shape is not None:
            cdata.check_input_shape(x, self.input_shape, "data.dataset's read_file and data.eval_augment")
        logits = multiview_logits(self.network, x) if x.dim() == 5 else self.network(x)
        return torch.softmax(logits.double(), dim=1).cpu()

    def end_pass(self) -> None:
        for aug in self.augmenters:
            report = getattr(aug, "end_pass", None)
            if report is not None:
                report(0)


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path | Prediction]:
    """What to classify, in argument order: each file, and a folder's image files (sorted, not
    hidden, not recursive); a ``Prediction`` with ``error`` for a missing path or a folder
    without images."""
    out: list[Path | Prediction] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                out.append(
                    Prediction(str(path), error=f"{path}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
                )
            out += found
        elif path.exists():
            out.append(path)
        else:
            out.append(Prediction(str(path), error=f"{path}: no such file or folder"))
    return out


def _views_of(recipe: schema.Recipe, registries: Registries) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The views of the first evaluator that cuts its own (ten-crop), as the recipe's test does."""
    for i, comp in enumerate(recipe.evaluate):
        path = f"evaluate[{i}]"
        entry = registries.evaluator.get(comp.name, f"{path}.name")
        if callable(getattr(entry.factory, "views", None)):
            return registries.evaluator.build(comp, path, BuildContext(recipe, registries, path)).views
    return None


def load_predictor(
    recipe: schema.Recipe, checkpoint: str | Path, registries: Registries, device: str | torch.device = "cpu"
) -> Predictor:
    """The recipe's network with the checkpoint's weights, its dataset's reader and class names.

    Raises ``DataError`` naming the dataset when its plugin gives no ``read_file``, and
    ``CheckpointError`` naming the file for a checkpoint of another recipe.
    """
    regs = registries
    splits = cdata.build_dataset(recipe, regs, purpose="predict")
    if splits.read_file is None:
        origin = regs.dataset.get(recipe.data.dataset.name, "data.dataset.name").origin
        raise DataError(
            f"dataset {recipe.data.dataset.name!r} ({origin}) cannot read image files: its "
            "DatasetSplits has no read_file, so convnet predict cannot turn a file into an input"
        )
    classes = list(splits.classes) if splits.classes else [str(i) for i in range(splits.num_classes)]
    network = build_model(recipe, "cpu", regs)
    tensors, _ = ckpt.load(checkpoint)
    state = ckpt.model_tensors(tensors)
    ckpt.check_compatible(checkpoint, network.state_dict(), state)
    network.load_state_dict(state)
    dev = torch.device(device)
    network.to(dev).eval()
    augmenters = cdata.build_augmenters(recipe.data.eval_augment, regs, "data.eval_augment", recipe)
    views = _views_of(recipe, regs)
    dtype = next(iter(network.parameters())).dtype
    return Predictor(
        network,
        splits.read_file,
        classes,
        augmenters,
        views,
        recipe.seed,
        dev,
        dtype,
        "views cut by the evaluator, softmax averaged" if views else "the eval augmentation's view(s)",
        tuple(recipe.model.input),
    )


def predict(
    recipe: schema.Recipe | str,
    checkpoint: str | Path,
    files: Sequence[str | os.PathLike],
    registries: Registries | None = None,
    top: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> list[Prediction]:
    """The ``top`` classes of each image file (folders: their image files, sorted).

    ``recipe`` is a loaded recipe or a bundled name / path. One ``Prediction`` per file, in
    order; a file that cannot be read gets ``error`` set and the others go on.
    """
    from convnet.core.plugins import load_plugins
    from convnet.core.recipe import load_recipe

    regs = registries if registries is not None else load_plugins()
    if not isinstance(recipe, schema.Recipe):
        recipe = load_recipe(str(recipe), registries=regs)
    predictor = load_predictor(recipe, checkpoint, regs, device)
    entries = image_files(files)
    results: list[Prediction | None] = [e if isinstance(e, Prediction) else None for e in entries]
    k = min(top, len(predictor.classes))
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        probs = predictor.probabilities(torch.stack([x for _, x in pending]))
        broken = torch.isnan(probs).any(1)
        if broken.any():
            first = entries[pending[int(broken.nonzero()[0])][0]]
            raise ConvnetError(
                f"{checkpoint}: the network's outputs are NaN for {first}: these weights give no "
                "prediction (a run that diverged?)"
            )
        values, indices = probs.topk(k, dim=1)
        for (at, _), p, i in zip(pending, values.tolist(), indices.tolist()):
            results[at] = Prediction(str(entries[at]), [(predictor.classes[c], float(q)) for c, q in zip(i, p)])
        pending.clear()

    for at, path in enumerate(entries):
        if isinstance(path, Prediction):
            continue
        try:
            image = predictor.prepare(path, at)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            results[at] = Prediction(str(path), error=f"{path}: cannot read this image ({reason})")
            continue
        if pending and image.shape != pending[0][1].shape:
            flush()
        pending.append((at, image))
        if len(pending) >= batch_size:
            flush()
    flush()
    predictor.end_pass()
    return [r for r in results if r is not None]


def format_text(prediction: Prediction) -> str:
    lines = [prediction.file]
    lines += [f"  {p * 100:6.2f} %  {name}" for name, p in prediction.top]
    return "\n".join(lines)


def plot_path(path: str | Path, files: Sequence[str | os.PathLike] = ()) -> Path:
    """Where ``--plot`` writes, checked before anything is classified: a format matplotlib draws
    (by the suffix; none means ``.png``, added to the name), and not one of the images ``files``
    names (a plot never replaces an input)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    # pgf needs a LaTeX installation to write: left out rather than failing after the predictions.
    supported = set(FigureCanvasAgg(Figure()).get_supported_filetypes()) - {"pgf"}
    if path.suffix[1:].lower() not in supported:
        raise ConvnetError(
            f"{path}: --plot cannot draw a {path.suffix} file; use one of "
            + ", ".join(f".{fmt}" for fmt in sorted(supported))
        )
    inputs = {os.path.realpath(p) for p in image_files(files) if isinstance(p, Path)}
    if os.path.realpath(path) in inputs:
        raise ConvnetError(f"{path}: --plot names one of the images to classify; give the plot another name")
    return path


def plot(predictions: Sequence[Prediction], path: str | Path, columns: int = 4, limit: int = 48) -> Path:
    """Each image above its top-5 bars, as the paper's Figure 4 (matplotlib, Agg canvas)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    shown = [p for p in predictions if p.error is None][:limit]
    if not shown:
        raise DataError(f"{path}: no image could be classified, nothing to plot")
    cols = min(columns, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(3.2 * cols, 4.2 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1.5] * rows)
    for n, pred in enumerate(shown):
        r, c = divmod(n, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        try:
            with Image.open(pred.file) as img:
                img.thumbnail((256, 256))
                pixels = np.asarray(eight_bit(img).convert("RGB"))
        except Exception:
            pixels = np.full((8, 8, 3), 255, dtype=np.uint8)
        ax.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 64 else "antialiased")
        ax.set_title(Path(pred.file).name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bars = fig.add_subplot(grid[2 * r + 1, c])
        names = [name for name, _ in pred.top][::-1]
        values = [p * 100 for _, p in pred.top][::-1]
        colours = ["#cccccc"] * (len(values) - 1) + ["#d62728"]
        bars.barh(range(len(values)), values, color=colours)
        bars.set_yticks(range(len(values)), names, fontsize=8)
        bars.set_xlim(0, 100)
        for y, value in enumerate(values):
            bars.text(min(value, 70) + 2, y, f"{value:.1f}", va="center", fontsize=7)
        bars.set_xlabel("probability (%)", fontsize=8)
        bars.tick_params(axis="x", labelsize=7)
    more = len([p for p in predictions if p.error is None]) - len(shown)
    fig.suptitle("top-5 predictions" + (f" (first {len(shown)}; {more} more not shown)" if more > 0 else ""))
    path = plot_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=path.suffix[1:].lower())
    except OSError as exc:
        raise ConvnetError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    except Exception as exc:  # a backend's own failure: the predictions were printed already
        raise ConvnetError(f"{path}: cannot draw the plot ({type(exc).__name__}: {exc})") from None
    return path
