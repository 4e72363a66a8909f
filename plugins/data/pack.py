"""``convnet pack``: a recipe's dataset, preprocessed once, written as WebDataset tar shards.

Layout of ``DIR`` (docs/data.md has the details)::

    packed.json                  written last: its presence means the pack is complete
    pack-plan.json               the settings a resumed pack must match
    bad_files.txt                the unreadable images, one ``path<TAB>reason`` a line
    .lock                        the writer's lock (``FolderLock``): one pack at a time
    train/shard-000000.tar       key.jpg (or key.npy) + key.cls per sample, ustar, mtime 0
    train/shard-000000.json      that shard's manifest: its done-marker, sha256, samples, bad files
    train/index.npy              one record per sample (shard, offset, size, label, crc32, source)
    val/...

Shard k of a split holds the source samples ``[k * shard_size, (k + 1) * shard_size)`` minus
the unreadable ones, so a resumed pack rewrites exactly the shards that have no manifest and
its output is byte for byte that of an uninterrupted pack. A shard is written to a hidden
temp file, fsynced and ``os.replace``d; its manifest follows the same way. Any failure (a
full disk, Ctrl-C) removes the temp file: what is on disk is always whole shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convnet.core import ConvnetError, DataError, FolderLock, RecipeError, Registries, build_dataset, schema
from convnet.plugins.data.imagenet import DECODE_ERRORS

FORMAT_VERSION = 1
MANIFEST = "packed.json"
PLAN = "pack-plan.json"
REPORT = "bad_files.txt"
SPLITS = ("train", "val")
INDEX_FILE = "index.npy"
# One record per sample; 28 bytes, so ImageNet's 1.28 M training samples take 36 MB.
INDEX_DTYPE = np.dtype(
    [("shard", "<u4"), ("offset", "<u4"), ("size", "<u4"), ("label", "<i4"), ("crc32", "<u4"), ("source", "<i8")]
)
SHARD_LIMIT = 2**32 - 1  # offsets are uint32: a shard must stay under 4 GiB
BLOCK = tarfile.BLOCKSIZE
CHUNK = 16  # samples per data-loader batch: the progress bar's step
SUBSAMPLING = {"4:2:0": 2, "4:4:4": 0}


@attrs.frozen
class PackSettings:
    """What determines the bytes of a pack; a resumed pack must use the same."""

    format: str = attrs.field(default="jpeg", validator=attrs.validators.in_(("jpeg", "raw")))
    quality: int = attrs.field(default=95, validator=[attrs.validators.ge(1), attrs.validators.le(100)])
    subsampling: str = attrs.field(default="4:2:0", validator=attrs.validators.in_(tuple(SUBSAMPLING)))
    shard_size: int = attrs.field(default=1000, validator=attrs.validators.ge(1))

    @property
    def extension(self) -> str:
        return "jpg" if self.format == "jpeg" else "npy"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sample_key(source: int) -> str:
    """The WebDataset key of a sample: its index in the source split (no dots, sorts in order)."""
    return f"{source:09d}"


def shown(bad: str) -> str:
    """A ``path<TAB>reason`` line for the console: ``path: reason``, a file name that is not
    UTF-8 (surrogate escapes in Python) shown with its bytes escaped instead of failing to print."""
    text = bad.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\t", ": ", 1)


def encode(image: torch.Tensor, settings: PackSettings) -> bytes:
    """``uint8 [C, H, W]`` -> JPEG bytes, or any tensor -> ``.npy`` bytes (bitwise lossless)."""
    if settings.format == "raw":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image.numpy()), allow_pickle=False)
        return buf.getvalue()
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise DataError(
            f"--format jpeg needs uint8 [1 or 3, H, W] images, got {image.dtype} {list(image.shape)}; "
            "use --format raw for other data"
        )
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if image.shape[0] == 1 else array)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=settings.quality, subsampling=SUBSAMPLING[settings.subsampling])
    return buf.getvalue()


class Encoder(Dataset):
    """Reads and encodes source samples in data-loader workers.

    Returns ``(source, label, payload, bad)``: ``payload`` is None for an unreadable sample and
    ``bad`` names it (the file and why, where the dataset can say: ``path(i)`` and ``read(i)``).
    """

    def __init__(self, base: Dataset, settings: PackSettings) -> None:
        self.base, self.settings = base, settings

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _name(self, index: int) -> str:
        path = getattr(self.base, "path", None)
        return str(path(index)) if callable(path) else f"sample {index}"

    def __getitem__(self, index: int) -> tuple[int, int, bytes | None, str | None]:
        read = getattr(self.base, "read", None)
        reason = "unreadable"
        if callable(read):
            try:
                sample = read(index)
            except DECODE_ERRORS as exc:
                sample, reason = None, f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\t", " ")
        else:
            sample = self.base[index]
        if sample is None:
            return index, -1, None, f"{self._name(index)}\t{reason}"
        image, label = sample
        return index, int(label), encode(torch.as_tensor(image), self.settings), None


def _collate(items: list) -> list:
    return items


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ShardWriter:
    """One tar shard, written to a hidden temp file and renamed into place by ``close``.

    Members are plain ustar entries with fixed metadata (mtime 0, mode 0644, no owner), so the
    same samples always give the same bytes; their data offsets go into the index.
    """

    def __init__(self, path: Path, k: int, settings: PackSettings) -> None:
        self.path, self.k, self.settings = path, k, settings
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (open across add() calls; closed by finish/abort)
        self.sha = hashlib.sha256()
        self.offset = 0
        self.samples: list[list[int]] = []
        self.bad: list[str] = []

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def _member(self, name: str, payload: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        start = self.offset
        self._write(payload)
        self._write(b"\0" * (-len(payload) % BLOCK))
        return start

    def add(self, source: int, label: int, payload: bytes) -> None:
        key = sample_key(source)
        start = self._member(f"{key}.{self.settings.extension}", payload)
        if start + len(payload) > SHARD_LIMIT:
            raise RecipeError(f"{self.path}: a shard would exceed 4 GiB; use a smaller --shard-size")
        self._member(f"{key}.cls", str(label).encode())
        self.samples.append([source, start, len(payload), label, zlib.crc32(payload)])

    def close(self) -> dict[str, Any]:
        self._write(b"\0" * (2 * BLOCK))  # the end-of-archive marker
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        manifest = {
            "shard": self.path.name,
            "bytes": self.offset,
            "sha256": self.sha.hexdigest(),
            "samples": self.samples,
            "bad": self.bad,
        }
        write_atomically(self.path.with_suffix(".json"), json.dumps(manifest).encode())
        return manifest

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def shard_done(folder: Path, k: int) -> bool:
    """A shard counts as written when its manifest exists and the tar has the recorded size."""
    tar = folder / shard_name(k)
    try:
        manifest = json.loads(tar.with_suffix(".json").read_text(encoding="utf-8"))
        return tar.stat().st_size == manifest["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_temp_files(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _plan(
    recipe: schema.Recipe, settings: PackSettings, sizes: dict[str, int], classes: list[str] | None, num_classes: int
) -> dict[str, Any]:
    options = recipe.data.dataset.options
    plan = {
        "version": FORMAT_VERSION,
        **_relevant(attrs.asdict(settings)),
        "dataset": {
            "name": recipe.data.dataset.name,
            "options": attrs.asdict(options) if attrs.has(type(options)) else repr(options),
        },
        "sizes": sizes,
        "num_classes": num_classes,
        "classes": classes,
    }
    return json.loads(json.dumps(plan))  # as it reads back from the file (tuples become lists)


def _relevant(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that shape the bytes: a raw pack has no JPEG quality or subsampling (plans
    written before this held them, and are read the same way)."""
    if settings.get("format") == "raw":
        return {k: v for k, v in settings.items() if k not in ("quality", "subsampling")}
    return settings


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / PLAN
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if isinstance(old, dict):
            old = _relevant(old)
        if old != plan and not any((out / split).glob("shard-*.json") for split in SPLITS):
            # A pack that stopped before its first shard (its first sample could not be encoded,
            # say) holds nothing these settings could disagree with.
            write_atomically(path, json.dumps(plan, indent=1).encode())
        elif old != plan:
            diff = sorted(k for k in set(plan) | set(old or {}) if (old or {}).get(k) != plan.get(k))
            raise RecipeError(
                f"{out}: holds a pack made with other settings ({', '.join(diff)}); "
                "use another --out or delete that folder"
            )
    else:
        write_atomically(path, json.dumps(plan, indent=1).encode())


def _check_encodable(datasets: dict[str, Dataset], settings: PackSettings, tries: int = 16) -> None:
    """Encode the first readable sample of each split here, before any plan or shard is written:
    data the format cannot hold (``--format jpeg`` of float images) fails in one line, not in a
    data-loader worker's traceback."""
    for split in SPLITS:
        encoder = Encoder(datasets[split], settings)
        for index in range(min(tries, len(encoder))):
            if encoder[index][2] is not None:
                break


def _pending(sizes: dict[str, int], out: Path, shard_size: int) -> list[tuple[str, int, range]]:
    """(split, shard number, source indices) of every shard not written yet, in order."""
    todo = []
    for split in SPLITS:
        folder = out / split
        for k in range((sizes[split] + shard_size - 1) // shard_size):
            if not shard_done(folder, k):
                todo.append((split, k, range(k * shard_size, min((k + 1) * shard_size, sizes[split]))))
    return todo


def _encoded(
    datasets: dict[str, Dataset], todo: list[tuple[str, int, range]], settings: PackSettings, workers: int
) -> Iterator[tuple[str, int, list]]:
    """(split, shard, encoded chunk) in order, read and encoded by ``workers`` processes."""
    for split in SPLITS:
        jobs = [(k, idx) for s, k, idx in todo if s == split]
        if not jobs:
            continue
        chunks = [(k, idx[i : i + CHUNK]) for k, idx in jobs for i in range(0, len(idx), CHUNK)]
        loader = DataLoader(
            Encoder(datasets[split], settings),
            batch_sampler=[c for _, c in chunks],
            num_workers=workers,
            collate_fn=_collate,
        )
        for (k, _), items in zip(chunks, loader):
            yield split, k, items


def shard_rows(k: int, samples: list[list[int]]) -> np.ndarray:
    """Shard ``k``'s index records from its manifest's ``[source, offset, size, label, crc32]``
    rows: 28 bytes a sample, where the decoded JSON lists take ~400 (so a split's manifests are
    read one at a time, and only these are kept)."""
    rows = np.zeros(len(samples), dtype=INDEX_DTYPE)
    if samples:
        source, offset, size, label, crc = (np.asarray(column) for column in zip(*samples))
        rows["shard"], rows["offset"], rows["size"] = k, offset, size
        rows["label"], rows["crc32"], rows["source"] = label, crc, source
    return rows


def write_index(folder: Path, shards: list[np.ndarray]) -> tuple[int, str]:
    """Write ``folder``'s index from each shard's ``shard_rows``; return its number of records and
    its sha256 (the manifest keeps it: the labels are read from the index alone, so ``verify``
    checks the index too)."""
    index = np.concatenate(shards) if shards else np.zeros(0, dtype=INDEX_DTYPE)
    buf = io.BytesIO()
    np.save(buf, index, allow_pickle=False)
    write_atomically(folder / INDEX_FILE, buf.getvalue())
    return len(index), hashlib.sha256(buf.getvalue()).hexdigest()


@attrs.define
class PackResult:
    out: Path
    samples: dict[str, int]
    shards: dict[str, int]
    written: int
    bad: list[str]


def pack(
    recipe: schema.Recipe,
    registries: Registries,
    out: str | Path,
    settings: PackSettings,
    workers: int = 0,
    progress: bool = True,
) -> PackResult:
    """Pack (or finish packing) the recipe's dataset into ``out``; see the module docstring."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvnetError(f"{out}: --out is a file, not a folder")
    splits = build_dataset(recipe, registries)
    datasets = {"train": splits.train, "val": splits.val}
    sizes = {s: len(datasets[s]) for s in SPLITS}  # type: ignore[arg-type]
    plan = _plan(recipe, settings, sizes, splits.classes, splits.num_classes)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # not a re-run's matter: nothing was written
        raise ConvnetError(f"{out}: cannot create the pack's folder ({exc.strerror or exc})") from None
    lock = FolderLock(out, what="pack")
    try:
        # Two packs into one folder would write the same temp files and remove each other's.
        lock.acquire()
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            _remove_temp_files(out / split)
        _remove_temp_files(out)
        _check_encodable(datasets, settings)
        _check_plan(out, plan)
        todo = _pending(sizes, out, settings.shard_size)
        if todo:
            (out / MANIFEST).unlink(missing_ok=True)  # readers must not open a pack being rewritten
        total = sum(sizes.values())
        writer: ShardWriter | None = None
        with tqdm(
            total=total,
            initial=total - sum(len(t[2]) for t in todo),
            unit="img",
            desc="pack",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            try:
                for split, k, items in _encoded(datasets, todo, settings, min(workers, os.cpu_count() or 1)):
                    if writer is None or (writer.path.parent.name, writer.k) != (split, k):
                        if writer is not None:
                            writer.close()
                        writer = ShardWriter(out / split / shard_name(k), k, settings)
                    for source, label, payload, bad in items:
                        if payload is None:
                            writer.bad.append(bad)
                            if progress:  # the command lists them all at the end as well
                                bar.write(f"unreadable, skipped: {shown(bad)}")
                        else:
                            writer.add(source, label, payload)
                    bar.update(len(items))
                if writer is not None:
                    writer.close()
                    writer = None
            except BaseException:
                # Ctrl-C may land after a new ShardWriter opened its temp file but before the name
                # `writer` holds it: remove every temp file (this process alone writes, under the lock).
                for split in SPLITS:
                    _remove_temp_files(out / split)
                raise
            finally:
                if writer is not None:
                    writer.abort()
        return _finish(out, plan, sizes, settings, len(todo))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise ConvnetError(
            f"{out}: cannot write the pack ({exc.strerror or exc}{where}); the shards finished "
            "so far are whole: re-run the same command to continue"
        ) from None
    finally:
        lock.release()


def _finish(out: Path, plan: dict[str, Any], sizes: dict[str, int], settings: PackSettings, written: int) -> PackResult:
    samples, shards, bad, splits_info = {}, {}, [], {}
    for split in SPLITS:
        folder = out / split
        count = (sizes[split] + settings.shard_size - 1) // settings.shard_size
        rows, names, sizes_, digests, split_bad = [], [], [], [], []
        for k in range(count):  # one manifest in memory at a time (1,282 of them for ImageNet's train)
            m = json.loads((folder / shard_name(k)).with_suffix(".json").read_text(encoding="utf-8"))
            rows.append(shard_rows(k, m["samples"]))
            names.append(m["shard"])
            sizes_.append(m["bytes"])
            digests.append(m["sha256"])
            split_bad += m["bad"]
        samples[split], index_sha256 = write_index(folder, rows)
        shards[split] = count
        bad += split_bad
        splits_info[split] = {
            "samples": samples[split],
            "shards": names,
            "bytes": sizes_,
            "sha256": digests,
            "index_sha256": index_sha256,
            "skipped": len(split_bad),
        }
        if not samples[split]:
            raise DataError(f"{out / split}: no readable sample in the {split} split; nothing to train on")
    # A file name that is not UTF-8 reaches Python as surrogate escapes: written back as its bytes.
    write_atomically(out / REPORT, "".join(b + "\n" for b in bad).encode("utf-8", "surrogateescape"))
    manifest = {**plan, "index_dtype": INDEX_DTYPE.descr, "splits": splits_info}
    write_atomically(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(out)
    return PackResult(out, samples, shards, written, bad)
