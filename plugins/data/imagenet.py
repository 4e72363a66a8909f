"""ImageNet (ILSVRC-2012) from disk, preprocessed as the paper: shorter side to 256, centre crop.

Two layouts are read (``layout = "auto"`` picks by what is in ``root``):

* ``folders`` — torchvision's ImageFolder layout: ``root/train/<class>/*.JPEG`` and
  ``root/val/<class>/*.JPEG``; classes are the sorted folder names of ``train/``.
* ``devkit`` — the ILSVRC2012 layout torchvision's ``ImageNet`` knows: ``root/meta.bin``
  (written by torchvision from ``ILSVRC2012_devkit_t12.tar.gz``; made here from the archive
  if only the archive is present) beside ``train/<wnid>/`` and ``val/``, where ``val/`` is
  either wnid folders or the 50,000 flat ``ILSVRC2012_val_*.JPEG`` files labelled by the
  devkit's ground truth. Nothing is ever downloaded.

Each sample is a ``uint8 [3, 256, 256]`` tensor; the mean image is subtracted later by an
augmenter. A file that cannot be decoded comes back as ``None``: the loader skips and counts it.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import numpy as np
import torch
from attrs import validators as v
from PIL import Image
from torch.utils.data import Dataset

from convnet.core import DataContext, DataError, DatasetSplits, eight_bit

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
META_FILE = "meta.bin"
DEVKIT_ARCHIVE = "ILSVRC2012_devkit_t12.tar.gz"
LAYOUT_HELP = (
    "expected <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG (ImageFolder layout), "
    f"or the ILSVRC2012 devkit layout ({META_FILE} or {DEVKIT_ARCHIVE} beside train/<wnid>/ and val/)"
)
# What decoding a broken or truncated file raises; PIL's truncated-image guard stays on.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@attrs.define
class ImageNetOptions:
    """``size`` is the paper's 256 (shorter side, then the centre ``size`` x ``size``)."""

    root: str = attrs.field(validator=v.min_len(1))
    layout: str = attrs.field(default="auto", validator=v.in_(("auto", "folders", "devkit")))
    train_dir: str = "train"
    val_dir: str = "val"
    size: int = attrs.field(default=256, validator=v.gt(0))
    per_class_limit: int = attrs.field(default=0, validator=v.ge(0))


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode fully (so truncation shows now) and convert grey, CMYK, palette, RGBA to RGB."""
    with Image.open(path) as img:
        img.load()
        img = eight_bit(img)  # a 16-bit PNG: scaled, not clipped to white
        return img.convert("RGB") if img.mode != "RGB" else img.copy()


# Resized images more than this many times the crop's area are resampled in the crop's region only.
ELONGATED = 16


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (PIL bilinear, antialiased when shrinking), then the centre square.

    Rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)`` exactly (long side
    truncated, crop offset rounded), so the two give the same pixels.
    """
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    if nw * nh > ELONGATED * size * size:
        # A very long, thin image (2 x 3000 pixels becomes 256 x 384,000): resample only the
        # source region the crop keeps, at the same scale, instead of the whole resized image.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a contiguous ``uint8 [3, H, W]`` tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def preprocess(path: str | os.PathLike, size: int = 256) -> torch.Tensor:
    return to_tensor(resize_center_crop(load_rgb(path), size))


class ImageFiles(Dataset):
    """Image paths and labels held in numpy arrays: no per-item Python objects for data-loader
    workers to copy, and paths stored as bytes relative to their common folder (about 40 MB
    for ImageNet's 1.28 M training files, where a list of str would take several times that)."""

    def __init__(self, paths: list[str], labels: list[int], size: int) -> None:
        self.base = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
        cut = len(self.base) + 1 if self.base else 0
        self.relative = np.array([os.fsencode(p[cut:]) for p in paths], dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.relative)

    def path(self, index: int) -> str:
        return os.path.join(self.base, os.fsdecode(bytes(self.relative[index])))

    sample_name = path  # how reports name an unreadable sample

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """The sample, or the decode error that makes it unreadable (``convnet pack`` reports it
        with the file name)."""
        return preprocess(self.path(index), self.size), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            return self.read(index)
        except DECODE_ERRORS:
            return None


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and _is_image(e.name))


def _class_dirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _scan_classes(
    folder: Path, class_to_idx: dict[str, int], limit: int, allow_empty: bool = True
) -> tuple[list[str], list[int]]:
    """Image paths and labels of ``folder``'s class folders. ``allow_empty = False`` (training)
    refuses a class folder without images: it would be a class the network never sees."""
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for name in _class_dirs(folder):
        if name not in class_to_idx:
            raise DataError(f"{folder / name}: class folder not in the training classes; {LAYOUT_HELP}")
        files = _images_in(folder / name)
        if not files:
            empty.append(name)
        if limit:
            files = files[:limit]
        paths += files
        labels += [class_to_idx[name]] * len(files)
    if empty and paths and not allow_empty:
        shown = ", ".join(empty[:3]) + (f" (and {len(empty) - 3} more)" if len(empty) > 3 else "")
        raise DataError(
            f"{folder}: class folder(s) without images ({', '.join(EXTENSIONS)}): {shown}; "
            "each would be a class no training image shows: add images or remove the folder"
        )
    return paths, labels


def _require_dir(path: Path) -> None:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise DataError(f"{path}: {what}; {LAYOUT_HELP}")


def read_meta(root: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """torchvision's ``meta.bin``: (wnid -> class names, the 50,000 validation wnids in file order)."""
    meta = root / META_FILE
    if not meta.exists() and (root / DEVKIT_ARCHIVE).exists():
        from torchvision.datasets.imagenet import parse_devkit_archive

        try:
            parse_devkit_archive(str(root))
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise DataError(f"{root / DEVKIT_ARCHIVE}: cannot parse the devkit archive ({exc})") from None
    try:
        wnid_to_classes, val_wnids = torch.load(meta, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{meta}: missing; {LAYOUT_HELP}") from None
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise DataError(f"{meta}: not a torchvision ImageNet meta file ({type(exc).__name__}: {exc})") from None
    if not isinstance(wnid_to_classes, dict) or not isinstance(val_wnids, (list, tuple)):
        raise DataError(f"{meta}: expected (dict wnid -> class names, list of validation wnids)")
    return wnid_to_classes, list(val_wnids)


def detect_layout(root: Path) -> str:
    return "devkit" if (root / META_FILE).exists() or (root / DEVKIT_ARCHIVE).exists() else "folders"


def build_imagenet(options: ImageNetOptions, ctx: DataContext) -> DatasetSplits:
    root = Path(options.root).expanduser()
    _require_dir(root)
    layout = detect_layout(root) if options.layout == "auto" else options.layout
    train_root, val_root = root / options.train_dir, root / options.val_dir
    _require_dir(train_root)
    _require_dir(val_root)
    wnids = _class_dirs(train_root)
    if not wnids:
        raise DataError(f"{train_root}: no class folders; {LAYOUT_HELP}")
    class_to_idx = {name: i for i, name in enumerate(wnids)}
    names = list(wnids)
    size = options.size

    def read_file(path: Path) -> torch.Tensor:  # the validation transform
        return preprocess(path, size)

    words = synset_words(root)
    if ctx.purpose == "predict":  # classes and the transform only: no scan of 1.3 M files
        if words is None and layout == "devkit":
            wnid_to_classes, _ = read_meta(root)
            names = [f"{w} {wnid_to_classes[w][0]}" if w in wnid_to_classes else w for w in wnids]
        empty = ImageFiles([], [], size)
        return DatasetSplits(
            empty, empty, len(wnids), class_names(wnids, words) if words else names, "imagenet", read_file=read_file
        )
    train_paths, train_labels = _scan_classes(train_root, class_to_idx, options.per_class_limit, allow_empty=False)
    if layout == "devkit":
        wnid_to_classes, val_wnids = read_meta(root)
        names = [f"{w} {wnid_to_classes[w][0]}" if w in wnid_to_classes else w for w in wnids]
        flat = _images_in(val_root)
        if flat:
            val_paths, val_labels = _flat_val(val_root, flat, val_wnids, class_to_idx, root)
        else:
            val_paths, val_labels = _scan_classes(val_root, class_to_idx, 0)
    else:
        val_paths, val_labels = _scan_classes(val_root, class_to_idx, 0)
    if not train_paths:
        raise DataError(f"{train_root}: no images ({', '.join(EXTENSIONS)}); {LAYOUT_HELP}")
    if not val_paths and layout == "folders" and _images_in(val_root):
        why = (
            "and neither is there"
            if detect_layout(root) == "folders"
            else 'but layout = "folders" was chosen: use "auto" or "devkit"'
        )
        raise DataError(
            f"{val_root}: holds images but no class folders (the devkit's flat layout): their labels "
            f"come from the devkit, {root / META_FILE} or {root / DEVKIT_ARCHIVE}, {why}; {LAYOUT_HELP}"
        )
    if not val_paths:
        raise DataError(f"{val_root}: no images ({', '.join(EXTENSIONS)}); {LAYOUT_HELP}")
    if words:
        names = class_names(wnids, words)
    return DatasetSplits(
        ImageFiles(train_paths, train_labels, size),
        ImageFiles(val_paths, val_labels, size),
        len(wnids),
        names,
        "imagenet",
        read_file=read_file,
    )


SYNSET_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")


def synset_words(root: Path) -> dict[str, str] | None:
    """wnid -> words from ``LOC_synset_mapping.txt`` (Kaggle) or ``synset_words.txt`` (Caffe's
    devkit copy), lines ``n01440764 tench, Tinca tinca``, looked for in ``root`` and the three
    folders above it (Kaggle's root is ``ILSVRC/Data/CLS-LOC`` below the mapping file)."""
    for folder in [root, *list(root.resolve().parents)[:3]]:
        for name in SYNSET_FILES:
            path = folder / name
            if not path.is_file():
                continue
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}: cannot read the synset words ({exc})") from None
            words = {}
            for line in lines:
                wnid, _, text = line.strip().partition(" ")
                if wnid and text.strip():
                    words[wnid] = text.strip()
            return words
    return None


def class_names(wnids: list[str], words: dict[str, str]) -> list[str]:
    """The first synonym of each class ("tench"); a name two classes share gets its wnid
    ("crane (n02012849)"). A folder without words keeps its own name."""
    short = [words[w].split(",")[0].strip() if w in words else w for w in wnids]
    counts: dict[str, int] = {}
    for name in short:
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} ({w})" if counts[name] > 1 and name != w else name for name, w in zip(short, wnids)]


def _flat_val(
    val_root: Path, files: list[str], val_wnids: list[str], class_to_idx: dict[str, int], root: Path
) -> tuple[list[str], list[int]]:
    """Flat ``ILSVRC2012_val_<n>.JPEG`` files; the n-th (1-based) has wnid ``val_wnids[n - 1]``."""
    paths, labels = [], []
    for path in files:
        stem = Path(path).stem
        try:
            n = int(stem.rsplit("_", 1)[-1])
            if n < 1:
                raise IndexError(n)
            wnid = val_wnids[n - 1]
        except (ValueError, IndexError):
            raise DataError(
                f"{path}: a flat val/ folder needs files named ILSVRC2012_val_<n>.JPEG with n in "
                f"1..{len(val_wnids)} (the devkit's ground truth, {root / META_FILE})"
            ) from None
        if wnid not in class_to_idx:
            raise DataError(f"{path}: its class {wnid} has no folder in {root}/train")
        paths.append(path)
        labels.append(class_to_idx[wnid])
    return paths, labels
