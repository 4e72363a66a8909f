"""The ``packed`` dataset: what ``convnet pack`` wrote, read by sample index.

Sample ``i`` of a split is record ``i`` of ``<root>/<split>/index.npy`` (shard, byte offset,
size, label, crc32, source index), read with one ``pread`` from its shard and checked
against its crc32, then decoded. The index is memory-mapped, read-only: the pages a process
touches are shared with the page cache and every other process mapping the file, so the
main process and each data-loader worker hold it once between them, whatever their number
(pickling the dataset, as a spawned worker does, sends the folder name and maps it again).

Decoding (``decode``): ``auto`` is ``torchvision.io.decode_jpeg``, measured 1.3x faster
than PIL on these 256x256 JPEGs (both are libjpeg-turbo and give the same pixels; torchvision
skips PIL's image object and the HWC -> CHW copy); torchvision 0.29 deprecated its image IO
for TorchCodec, so where ``decode_jpeg`` is gone ``auto`` falls back to PIL. PIL's draft mode cannot help: it only
scales by 1/2, 1/4, 1/8 while decoding, and the stored images are already the size the
network crops from. ``decode_batch(indices, device="cuda")`` decodes a batch with nvJPEG
on a GPU. Raw (``.npy``) samples are a view of the bytes read: bitwise what was packed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from attrs import validators as v
from torch.utils.data import Dataset

from convnet.core import DataContext, DataError, DatasetSplits
from convnet.plugins.data.pack import FORMAT_VERSION, INDEX_FILE, MANIFEST, SPLITS, sample_key

OPEN_SHARDS = 64  # file descriptors each process keeps open (ImageNet has ~1,300 shards)


@attrs.define
class PackedOptions:
    """``verify`` re-hashes every shard (sha256) when the dataset is built: it reads the whole
    pack once. Without it each sample is still checked against its crc32 when read."""

    root: str = attrs.field(validator=v.min_len(1))
    decode: str = attrs.field(default="auto", validator=v.in_(("auto", "torchvision", "pil")))
    verify: bool = False


def _decode_pil(data: bytearray) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _decode_torchvision(data: bytearray) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 warns on every call that TorchCodec supersedes it
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)


def _torchvision_decodes() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_npy(data: bytearray) -> torch.Tensor:
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise ValueError("not a C-ordered plain array")
    return torch.from_numpy(np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=f.tell()).reshape(shape))


class PackedSplit(Dataset):
    """One split of a pack: ``split[i] -> (image, label)`` in the order of the source split."""

    def __init__(self, folder: Path, shards: Sequence[str], fmt: str, decode: str = "auto") -> None:
        self.folder, self.shards, self.format, self.decode = Path(folder), list(shards), fmt, decode
        self._open_index()

    def _open_index(self) -> None:
        path = self.folder / INDEX_FILE
        try:
            self.index = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the pack's index ({exc}); re-run `convnet pack`") from None
        self._records = self.index.view(np.ndarray)  # the same mapped pages, without memmap's Python __getitem__
        self._files: dict[int, int] = {}
        self._pid = os.getpid()
        if self.format == "raw":
            self._decoder = _decode_npy
        elif self.decode == "pil" or (self.decode == "auto" and not _torchvision_decodes()):
            self._decoder = _decode_pil
        else:
            self._decoder = _decode_torchvision

    def __getstate__(self) -> dict[str, Any]:
        """Only the folder and settings travel to a spawned worker; it maps the index itself."""
        return {"folder": self.folder, "shards": self.shards, "format": self.format, "decode": self.decode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.shards, self.format, self.decode = (
            state["folder"],
            state["shards"],
            state["format"],
            state["decode"],
        )
        self._open_index()

    def __len__(self) -> int:
        return len(self.index)

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_files", {}).values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are the parent's
            self._files, self._pid = {}, os.getpid()
        fd = self._files.pop(shard, None)
        if fd is None:
            if len(self._files) >= OPEN_SHARDS:
                os.close(self._files.pop(next(iter(self._files))))
            try:
                fd = os.open(self.folder / self.shards[shard], os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.folder / self.shards[shard]}: cannot open the shard ({exc.strerror})") from None
        self._files[shard] = fd  # most recently used last
        return fd

    def _read(self, index: int) -> tuple[bytearray, int, int]:
        """(stored bytes, label, shard) of sample ``index``, the bytes checked against the index."""
        shard, offset, size, label, crc, source = self._records[index].item()
        data = bytearray(size)
        got = os.preadv(self._fd(shard), [data], offset)
        if got != size or zlib.crc32(data) != crc:
            raise DataError(
                f"{self.folder / self.shards[shard]}: corrupt shard (sample {index}, member "
                f"{sample_key(source)}, bytes {offset}-{offset + size}: "
                f"{'truncated' if got != size else 'crc32 mismatch'}); re-run `convnet pack` into a "
                "new folder or restore the shard"
            )
        return data, label, shard

    def payload(self, index: int) -> bytearray:
        """The stored bytes of sample ``index`` (a JPEG or an .npy file)."""
        return self._read(index)[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, label, shard = self._read(index)
        try:
            image = self._decoder(data)
        except (RuntimeError, ValueError, OSError, SyntaxError) as exc:
            raise DataError(f"{self.folder / self.shards[shard]}: sample {index} does not decode ({exc})") from None
        return image, label

    def labels(self) -> np.ndarray:
        return self.index["label"]

    def decode_batch(
        self, indices: Sequence[int], device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, C, H, W]`` uint8 images on ``device`` and their labels: on a CUDA device the
        JPEGs are decoded there, in one batched nvJPEG call."""
        device = torch.device(device)
        labels = torch.as_tensor(np.asarray(self.index["label"][list(indices)]), dtype=torch.long)
        if self.format == "jpeg" and device.type == "cuda":
            from torchvision.io import ImageReadMode, decode_jpeg

            data = [torch.frombuffer(self.payload(i), dtype=torch.uint8) for i in indices]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg(data, mode=ImageReadMode.UNCHANGED, device=device)
            return torch.stack(images), labels.to(device)
        return torch.stack([self[i][0] for i in indices]).to(device), labels.to(device)


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        hint = (
            " (an unfinished pack: re-run the same `convnet pack` to complete it)"
            if (root / "pack-plan.json").exists()
            else ""
        )
        raise DataError(f"{path}: missing{hint}; make a pack with `convnet pack RECIPE --out {root}`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a pack manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: pack format version {manifest.get('version') if isinstance(manifest, dict) else '?'}"
            f", this convnet reads version {FORMAT_VERSION}; re-run `convnet pack`"
        )
    missing = [k for k in ("format", "splits", "num_classes") if k not in manifest]
    if missing or manifest["format"] not in ("jpeg", "raw"):
        raise DataError(
            f"{path}: not a complete pack manifest (missing {', '.join(missing) or 'a known format'}); "
            "re-run `convnet pack`"
        )
    return manifest


def check_shards(folder: Path, info: dict[str, Any], verify: bool) -> None:
    """Every shard present with its recorded size (and, with ``verify``, its sha256)."""
    for name, size, digest in zip(info["shards"], info["bytes"], info["sha256"]):
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise DataError(f"{path}: shard missing ({exc.strerror}); re-run `convnet pack` to rewrite it") from None
        if actual != size:
            raise DataError(
                f"{path}: corrupt shard ({actual} bytes, the manifest says {size}); "
                "re-run `convnet pack` into a new folder or restore the shard"
            )
        if verify:
            _check_sha256(path, digest, "shard")


def check_index(path: Path, digest: str | None) -> None:
    """The index's sha256 against the manifest's: the labels are read from the index alone."""
    if digest is not None:
        _check_sha256(path, digest, "index")


def _check_sha256(path: Path, digest: str, what: str) -> None:
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError as exc:
        raise DataError(f"{path}: {what} missing ({exc.strerror}); re-run `convnet pack`") from None
    if sha.hexdigest() != digest:
        raise DataError(
            f"{path}: corrupt {what} (sha256 {sha.hexdigest()[:12]}..., the manifest says {digest[:12]}...); "
            f"re-run `convnet pack` into a new folder or restore the {what}"
        )


def _read_file(manifest: dict[str, Any]) -> Callable[[Path], torch.Tensor] | None:
    """For ``convnet predict``: a user's image file as the packed images were made from theirs,
    where the pack's source was the ``imagenet`` folder dataset (shorter side to ``size``, centre
    crop); other sources have no image files to mirror."""
    source = manifest.get("dataset")
    options = source.get("options") if isinstance(source, dict) else None
    if not (isinstance(options, dict) and source.get("name") == "imagenet" and isinstance(options.get("size"), int)):
        return None
    from convnet.plugins.data.imagenet import preprocess

    size = options["size"]
    return lambda path: preprocess(path, size)


def build_packed(options: PackedOptions, ctx: DataContext) -> DatasetSplits:
    root = Path(options.root).expanduser()
    manifest = read_manifest(root)
    splits = {}
    for split in SPLITS:
        try:
            info = manifest["splits"][split]
            info = {k: info[k] for k in ("shards", "bytes", "sha256", "samples")} | {
                "index_sha256": info.get("index_sha256")  # absent from packs made before it was recorded
            }
        except (KeyError, TypeError):
            raise DataError(
                f"{root / MANIFEST}: no complete entry for the {split} split; re-run `convnet pack`"
            ) from None
        check_shards(root / split, info, options.verify)
        if options.verify:
            check_index(root / split / INDEX_FILE, info["index_sha256"])
        splits[split] = PackedSplit(root / split, info["shards"], manifest["format"], options.decode)
        if len(splits[split]) != info["samples"]:
            raise DataError(
                f"{root / split / INDEX_FILE}: {len(splits[split])} samples, the manifest says "
                f"{info['samples']}; re-run `convnet pack`"
            )
    classes = manifest.get("classes")
    return DatasetSplits(
        splits["train"], splits["val"], int(manifest["num_classes"]), classes, "packed", read_file=_read_file(manifest)
    )
