"""Run folders: a fresh one per run, never another run's files replaced, one writer at a time.

- ``fresh_folder`` creates ``runs/<recipe>/<time>`` exclusively (``-2``, ``-3`` ... when the
  name is taken), so runs started in the same second, by any number of processes, never share.
- ``claim`` refuses a fresh run into a folder that already holds a run (``--resume`` continues
  it, ``--overwrite`` replaces it, saying what it replaces, once the new run has been built)
  and takes the folder's lock.
- ``FolderLock`` is an ``fcntl`` lock on ``<folder>/.lock``: the kernel releases it when its
  process ends, however it ends (SIGKILL included), so it never goes stale; the file holds the
  holder's pid for the message a second writer gets.
- ``run.json`` records who made the run: the command, start time, convnet's version and, per
  component the recipe uses, the distribution and version that supplied it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata as md
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from convnet.core.errors import ConvnetError, RecipeError
from convnet.core.registry import Registries

if TYPE_CHECKING:
    from convnet.core.strategy import Strategy

# What a run writes; a folder holding any of these holds a run.
# Every unreadable sample of a run, one line each: "when<TAB>split<TAB>name".
SKIPPED_FILE = "skipped.txt"
RUN_FILES = (
    "recipe.toml",
    "run.json",
    "metrics.jsonl",
    "eval.json",
    "checkpoints",
    "plots",
    "index.html",
    SKIPPED_FILE,
    "evals",
)
# What a run (recipe.toml, run.json: written before its first step) or `convnet eval` writes
# first: without one, the names above are the user's own (--overwrite leaves them).
RUN_MARKERS = ("recipe.toml", "run.json", "eval.json")
LOCK_NAME = ".lock"
# The other top-level entries a run made (an evaluator's figures, a plugin's folder), one name a
# line: they are the run's too, replaced by an --overwrite and counted as a run's files.
OUTPUTS_NAME = ".outputs"


def default_folder(recipe_name: str, prefix: str = "") -> Path:
    """Where a command writes when not told: ``runs/<recipe name>/<prefix><time>`` (not created)."""
    return Path("runs") / (recipe_name or "recipe") / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def fresh_folder(parent: Path, stamp: str | None = None) -> Path:
    """Create and return a new folder ``parent/<stamp>`` (a suffix when the name is taken)."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConvnetError(f"{parent}: no free run folder name for {stamp} after 10,000 tries")


def run_files(folder: Path) -> list[Path]:
    """The files and folders of a run in ``folder`` (empty when it holds none). A folder of a
    run's (``checkpoints``, ``plots``, ``evals``) counts only when it holds something: a start
    that failed after the write probe made ``checkpoints/`` left no run behind."""
    found = []
    for name in dict.fromkeys([*RUN_FILES, *_noted_outputs(folder)]):
        path = folder / name
        if path.is_dir():
            if any(not child.name.startswith(".") for child in path.iterdir()):
                found.append(path)
        elif path.exists():
            found.append(path)
    return found


def _noted_outputs(folder: Path) -> list[str]:
    try:
        text = (folder / OUTPUTS_NAME).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    return [n for n in text.splitlines() if n and "/" not in n and not n.startswith(".")]


class FolderLock:
    """An exclusive lock on a folder for the life of this object's process (or ``release``).

    ``what`` names the folder in the message a second writer gets (a run folder, a pack).
    """

    def __init__(self, folder: Path, what: str = "run folder") -> None:
        self.path = folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConvnetError(
                f"{self.path.parent}: another convnet process (pid {holder}) is writing this "
                f"{self.what}; wait for it to end, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the folder's bytes do not depend on who last wrote it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@attrs.define
class Claim:
    """A run folder made this run's: its lock, and the other run's files that ``--overwrite``
    replaces. They are removed by ``replace_overwritten`` once the new run has been built, so
    a start that fails on its recipe or data loses nothing."""

    lock: FolderLock
    overwritten: list[Path]
    # What the folder held besides the run (kept by --overwrite): not noted as the run's outputs.
    others: frozenset[str] = frozenset()

    def overwritten_bytes(self) -> int:
        """The space removing them frees (what the new run's checkpoints may count on)."""
        total = 0
        for path in self.overwritten:
            for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
                try:
                    if item.is_file() and not item.is_symlink():
                        total += item.stat().st_size
                except OSError:
                    pass
        return total

    def replace_overwritten(self) -> None:
        for path in self.overwritten:
            print(f"convnet: --overwrite: replacing {path}", file=sys.stderr)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if self.overwritten:
            (self.lock.path.parent / OUTPUTS_NAME).unlink(missing_ok=True)
        self.overwritten = []

    @contextlib.contextmanager
    def noting_outputs(self) -> Iterator[None]:
        """Note in ``.outputs`` the top-level entries (beyond ``RUN_FILES``) that appear while the
        block runs: wrapped around plugin code (a hook, the evaluators), so that a file a user
        puts in the folder meanwhile is not taken for the run's."""
        before = self.names()
        try:
            yield
        finally:
            self.note_since(before)

    def names(self) -> set[str]:
        """The folder's top-level entries now (hidden ones left out)."""
        try:
            return {p.name for p in self.lock.path.parent.iterdir() if not p.name.startswith(".")}
        except OSError:
            return set()

    def note_since(self, before: set[str]) -> None:
        """Note the entries that were not there at ``before`` (``names()`` then)."""
        folder = self.lock.path.parent
        made = self.names() - before - {*RUN_FILES, *self.others, *(p.name for p in self.overwritten)}
        noted = _noted_outputs(folder)
        names = [*noted, *sorted(made - set(noted))]
        if names != noted:
            try:
                tmp = folder / f"{OUTPUTS_NAME}.tmp"
                tmp.write_text("".join(f"{n}\n" for n in names), encoding="utf-8", errors="surrogateescape")
                os.replace(tmp, folder / OUTPUTS_NAME)
            except OSError:
                pass  # a full disk: the run goes on; only --overwrite's list is shorter


def claim(folder: Path, resume: bool, overwrite: bool, checkpoint: Path | None = None) -> Claim:
    """Make ``folder`` this run's: lock it, and refuse to start afresh over another run's files,
    or to resume ``checkpoint`` into a folder holding a run it does not belong to.

    With ``overwrite`` the other run's files are listed in the claim, to be replaced later.
    """
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{folder}: --out is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConvnetError(f"{folder}: run folder is not writable (cannot create it: {exc.strerror or exc})") from None
    lock = FolderLock(folder)
    try:
        lock.acquire()
    except OSError as exc:
        if isinstance(exc, ConvnetError):
            raise
        raise ConvnetError(f"{folder}: run folder is not writable: {exc.strerror or exc}") from None
    existing = run_files(folder)
    if existing and not any(p.name in RUN_MARKERS for p in existing):
        lock.release()
        names = ", ".join(p.name for p in existing)
        raise RecipeError(
            f"{folder}: holds {names}, which a run writes, but no run or evaluation of convnet's (no "
            f"{' or '.join(RUN_MARKERS)}); nothing there is replaced: choose another --out, or move them away"
        )
    try:
        foreign = bool(existing) and resume and checkpoint is not None and not _belongs(checkpoint, folder)
    except ConvnetError:
        lock.release()
        raise
    if existing and (not resume or foreign):
        if not overwrite:
            lock.release()
            names = ", ".join(p.name for p in existing)
            if foreign:
                assert checkpoint is not None
                raise RecipeError(
                    f"{folder}: holds another run ({names}) than the one {checkpoint} was saved by; "
                    f"resume into that run's folder ({checkpoint.parent.parent}) or an empty one, "
                    "or add --overwrite (which replaces those files)"
                )
            last = folder / "checkpoints" / "last.safetensors"
            how = f"--resume {last}" if last.exists() else "--resume CHECKPOINT"
            raise RecipeError(
                f"{folder}: already holds a run ({names}); continue it with {how}, "
                "or start afresh with --overwrite (which replaces those files)"
            )
        return Claim(lock, existing, _others(folder, existing))
    return Claim(lock, [], _others(folder, existing))


def _others(folder: Path, run: list[Path]) -> frozenset[str]:
    return frozenset(p.name for p in folder.iterdir() if not p.name.startswith(".")) - {p.name for p in run}


def resumed_folder(checkpoint: Path) -> Path | None:
    """Where ``--resume CHECKPOINT`` without ``--out`` continues: the run folder the checkpoint
    was saved in (``DIR/checkpoints/NAME``, DIR holding a run); None for a file kept elsewhere
    (a copy, converted weights), which starts a fresh folder."""
    checkpoint = Path(os.path.abspath(checkpoint))  # `--resume last.safetensors` from inside checkpoints/
    folder = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (folder / "recipe.toml").is_file() and run_files(folder):
        return folder
    return None


def remove_if_unused(folder: Path) -> None:
    """Remove ``folder``, made for a run that failed to start, if it holds nothing of a run:
    its lock file and an empty ``checkpoints/`` (anything else, the folder stays)."""
    if run_files(folder):
        return
    try:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        if (folder / "checkpoints").is_dir():
            (folder / "checkpoints").rmdir()
        folder.rmdir()
    except OSError:
        pass


def _belongs(checkpoint: Path, folder: Path) -> bool:
    """Whether resuming ``checkpoint`` into ``folder`` continues the run already there: the
    checkpoint lies in the folder, or (a copy of it elsewhere) it holds the recipe the folder's
    run last wrote."""
    from convnet.core import checkpoint as ckpt

    if checkpoint.resolve().is_relative_to(folder.resolve()):
        return True
    try:
        recorded = (folder / "recipe.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return ckpt.read_metadata(checkpoint).get("convnet.recipe") == recorded


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON, written to a temp file and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def components_used(recipe: Any, registries: Registries) -> list[dict[str, str]]:
    """Per component of the recipe: kind, name, plugin and "distribution version" (no repeats)."""
    from convnet.core.recipe import iter_components

    seen: set[tuple[str, str]] = set()
    rows = []
    for _, comp in iter_components(recipe):
        key = (comp.kind, comp.name)
        if key in seen or comp.name not in registries[comp.kind]:
            continue
        seen.add(key)
        entry = registries[comp.kind].get(comp.name)
        rows.append({"kind": comp.kind, "name": comp.name, "plugin": entry.plugin, "distribution": entry.distribution})
    return rows


def convnet_version() -> str:
    try:
        return md.version("convnet")
    except md.PackageNotFoundError:
        return "unknown"


def write_run_json(folder: Path, recipe: Any, registries: Registries, command: str) -> dict[str, Any]:
    """``run.json``: what made this run (rewritten by a resume, which keeps ``started``)."""
    import torch

    path = folder / "run.json"
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        started = json.loads(path.read_text(encoding="utf-8")).get("started", started)
    except (OSError, ValueError):
        pass
    info = {
        "command": command,
        "started": started,
        "convnet_version": convnet_version(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "components": components_used(recipe, registries),
    }
    write_json(path, info)
    return info


def provenance_hint(components: list[tuple[str, str]], sources: list[Path]) -> str | None:
    """For components missing here: which distribution supplied each, from a run folder's
    ``run.json`` or a checkpoint's metadata among ``sources``, and how to install it; None
    unless every one of them is found."""
    from convnet.core import checkpoint

    found: dict[tuple[str, str], dict[str, str]] = {}
    for source in sources:
        rows: list[dict[str, str]] = []
        try:
            if source.suffix == ".safetensors":
                rows = json.loads(checkpoint.read_metadata(source).get("convnet.components", "[]"))
            else:
                folder = source if source.is_dir() else source.parent
                rows = json.loads((folder / "run.json").read_text(encoding="utf-8")).get("components", [])
        except (OSError, ValueError, ConvnetError):
            continue
        for row in rows:
            key = (row.get("kind"), row.get("name"))
            if key in components and key not in found:
                found[key] = row  # type: ignore[index]
    if not components or len(found) < len(set(components)):
        return None
    by_source: dict[tuple[str, str], list[str]] = {}
    for kind, name in dict.fromkeys(components):
        row = found[(kind, name)]
        by_source.setdefault((str(row.get("distribution", "")), str(row.get("plugin"))), []).append(f"{kind} {name!r}")
    hints = []
    for (distribution, plugin), names in by_source.items():
        dist, _, version = distribution.partition(" ")
        pin = f"=={version}" if version else ""
        what = names[0] if len(names) == 1 else "components " + ", ".join(names)
        hints.append(
            f"{what} came from the distribution {dist} {version} (plugin {plugin!r}), "
            f"which is not installed here: pip install '{dist}{pin}'"
        )
    return "; ".join(hints)


def report_skipped(strategy: Strategy, folder: Path | None, when: str, split: str, names: list[str]) -> int:
    """The unreadable samples of all processes, counted; this process's named on stderr (the
    first few) and in ``folder/skipped.txt`` (all) by the main process."""
    import torch

    count = int(strategy.all_reduce_sum(torch.tensor([float(len(names))])).item())
    if count and strategy.is_main and folder is not None:
        shown = ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
        shown = shown or "all in other processes' shares, not named here"
        listed = folder / SKIPPED_FILE
        # A file name that is not UTF-8 reaches Python as surrogate escapes: written as its bytes.
        with listed.open("a", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(f"{when}\t{split}\t{name}\n" for name in names)
        print(f"{when}: skipped {count} unreadable {split} sample(s): {shown}; all listed in {listed}", file=sys.stderr)
    return count
