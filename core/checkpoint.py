"""Checkpoints: one safetensors file, written atomically; never pickle.

Tensors: ``model/<name>`` (canonical names), ``optimizer/<param name>/<buffer>``, and RNG
states under ``rng/``. Metadata (strings): ``convnet.format``, ``convnet.recipe`` (the
resolved recipe as TOML) and ``convnet.state`` (JSON: step, epoch, position in the epoch,
optimizer hyper-parameters, schedule state, python and numpy RNG scalars).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from convnet.core.errors import CheckpointError

FORMAT = "convnet-checkpoint-1"


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    tensors["rng/python"] = torch.tensor(py_state, dtype=torch.int64)
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py_version, py_gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_gauss = meta["python"]
    random.setstate((py_version, tuple(int(x) for x in tensors["rng/python"].tolist()), py_gauss))


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: temp file in the same folder, fsync, os.replace, fsync the folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc.strerror or exc} ({exc.filename})") from None
    # No copies beyond the device-to-host one: safetensors streams the tensors to the file.
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"convnet.format": FORMAT, **metadata}
    metadata["convnet.sha256"] = digest(tensors, metadata)
    _write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over the metadata and the tensors' names, dtypes, shapes and bytes: safetensors
    has no checksum, so a flipped bit (a step count, a weight) would otherwise load silently."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "convnet.sha256"):
        h.update(f"{key}={metadata[key]}|".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def copy(src: Path, dst: Path) -> None:
    """Copy a checkpoint (last -> best) as atomically as ``save`` writes one."""
    _write_atomic(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def usual_mode(path: str) -> None:
    """Give a file written through ``mkstemp`` (0600; safetensors writes 0600 too) the mode
    ``open`` would (0666 less the umask): it is read by a web server, a colleague, a job on
    another account, as any other file."""
    os.chmod(path, 0o666 & ~_UMASK)


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """``write(temp path)`` in the target's folder, fsync it, then ``os.replace`` it into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc.strerror or exc}") from None
    try:
        write(tmp)
        usual_mode(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
            kept = "the previous checkpoint is unchanged" if path.exists() else "no checkpoint was written"
            reason = getattr(exc, "strerror", None) or exc
            raise CheckpointError(f"{path}: cannot write checkpoint ({reason}); {kept}") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    # temp files of writers that were killed mid-write: never a checkpoint, only litter
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass


def _sniff(path: Path, head: bytes) -> str | None:
    if not head:
        return "the file is empty (0 bytes)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "it looks like a Python pickle (convnet never unpickles; checkpoints are safetensors)"
    if head[:2] == b"PK":
        return "it looks like a torch.save zip archive, which holds pickles (convnet never unpickles)"
    if len(head) < 8:
        return f"the file is too short ({len(head)} bytes) to be safetensors"
    n = int.from_bytes(head[:8], "little")
    size = path.stat().st_size
    if n <= 0 or n > size - 8:
        return f"its header claims {n} bytes but the file has {size} (truncated or not safetensors)"
    return None


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a convnet checkpoint, or raise one ``CheckpointError`` naming the file and the fault."""
    path = Path(path)
    if not path.exists():
        last = path.with_name("last.safetensors")
        if path.name == "best.safetensors" and last.is_file():  # a run stopped before any epoch's evaluation
            raise CheckpointError(
                f"{path}: no such checkpoint file; best.safetensors is written once an epoch has been "
                f"evaluated, and this run has only {last}"
            )
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    problem = _sniff(path, head)
    if problem:
        raise CheckpointError(f"{path}: not a usable checkpoint: {problem}")
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt): {exc}") from None
    if metadata.get("convnet.format") != FORMAT:
        found = metadata.get("convnet.format")
        what = f"format {found!r}" if found else "no convnet metadata"
        raise CheckpointError(f"{path}: a safetensors file but not a convnet checkpoint ({what}; expected {FORMAT})")
    expected = metadata.get("convnet.sha256")
    if expected is not None and digest(tensors, metadata) != expected:
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its tensors do not match the checksum written with them "
            "(a damaged disk or an incomplete copy)"
        )
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """A checkpoint's metadata strings without reading its tensors (no checksum check)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from None


def state_of(metadata: dict[str, str], path: Path | str) -> dict[str, Any]:
    try:
        return json.loads(metadata["convnet.state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata 'convnet.state' is missing or corrupt ({exc})") from None


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}


def check_compatible(path: Path | str, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Name the first tensor that is missing, unexpected or of another shape."""
    for name, tensor in expected.items():
        if name not in found:
            raise CheckpointError(f"{path}: checkpoint has no tensor {name!r} (another recipe's checkpoint?)")
        if tuple(found[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(found[name].shape)} in the checkpoint "
                f"but {list(tensor.shape)} in this recipe's model (another recipe's checkpoint?)"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}: checkpoint has tensor {extra[0]!r} that this recipe's model lacks (another recipe's checkpoint?)"
        )
