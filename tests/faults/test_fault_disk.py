"""Unwritable and full run folders: a clear error before training, and no checkpoint lost.

Real file systems: a read-only tmpfs and a tiny tmpfs are mounted when the tests run as root
(root ignores permission bits, so a chmod-ed folder would not stop it); otherwise a chmod 555
folder. The "needs more room than the disk has" case also runs without root: a recipe whose
checkpoint would take terabytes is refused before a single weight is allocated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from faultkit import TINY, model_bytes

import convnet.core as cn
from convnet.core import checkpoint as ckpt
from convnet.core import plugins
from convnet.core.cli import main
from convnet.core.errors import CheckpointError
from convnet.core.hookspecs import hookimpl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mount_tmpfs(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "convnet-test", str(where)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def tmpfs(tmp_path: Path):
    """mount(options) -> a fresh tmpfs folder, unmounted afterwards (skips if it cannot mount)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        if not _mount_tmpfs(where, options):
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the chmod and huge-model cases cover the rest")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("convnet: error: ") and "Traceback" not in err, err
    return err


def test_read_only_run_folder_fails_before_training(tmp_path: Path, tmpfs, capsys, ledger) -> None:
    if os.geteuid() == 0:
        folder = tmpfs("ro,size=1m")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    out = folder / "run"
    assert main(["run", str(TINY), "--out", str(out), "--quiet"]) == 1
    err = _one_error(capsys)
    assert str(out) in err and "not writable" in err
    assert not out.exists()
    ledger.record("unwritable run folder", "refused before training, one line naming the folder")


def test_run_folder_under_a_file_fails_before_training(tmp_path: Path, capsys, ledger) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    assert main(["run", str(TINY), "--out", str(out), "--quiet"]) == 1
    assert "not writable" in _one_error(capsys)
    ledger.record("run folder path through a file", "refused before training, one line naming the folder")


def test_checkpoint_bigger_than_the_disk_fails_before_allocating(tmp_path: Path, capsys, ledger) -> None:
    """~10^12 weights: it would need terabytes; refused on the meta-device size, nothing allocated."""
    huge = [
        "--set",
        "model.layers[8].out=10000000000",
        "--set",
        'model.layers[8].towers="cross"',
        "--set",
        "model.num_classes=10000000000",
        "--set",
        "data.dataset.train_size=16",
    ]
    code = main(["run", str(TINY), *huge, "--out", str(tmp_path / "run"), "--quiet"])
    err = _one_error(capsys)
    assert code == 1 and "MiB free, a checkpoint needs about" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    ledger.record("checkpoint larger than the free disk (real disk, huge model)", "refused before allocating")


def test_tiny_disk_fails_before_training(tmpfs, capsys, ledger) -> None:
    folder = tmpfs("size=256k")
    out = folder / "run"
    assert main(["run", str(TINY), "--out", str(out), "--quiet"]) == 1
    err = _one_error(capsys)
    assert str(out) in err and "MiB free, a checkpoint needs about" in err
    assert not (out / "metrics.jsonl").exists()
    ledger.record("disk full before the run (256 KiB tmpfs)", "refused before training")


class _FillDiskAfter:
    """Fill the run folder's file system right after step ``k`` (before its checkpoint)."""

    def __init__(self, k: int, filler: Path) -> None:
        self.k, self.filler = k, filler

    @hookimpl
    def convnet_step_end(self, run, step, metrics) -> None:
        if step == self.k:
            # Unbuffered: a partial last write must not sit in a buffer that close() then fails to flush.
            with open(self.filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass


def test_disk_filling_up_mid_run_loses_nothing(tmpfs, tmp_path: Path, ledger) -> None:
    folder = tmpfs("size=2m")
    out = folder / "run"
    sets = ["train.checkpoint_every=1"]
    pm, regs = plugins.create_manager()
    pm.register(_FillDiskAfter(6, folder / "filler"))
    recipe = cn.load_recipe(TINY, sets, regs)
    with pytest.raises(CheckpointError) as info:
        cn.Run(recipe, out=out, registries=regs, pm=pm).train()
    message = str(info.value)
    last = out / "checkpoints" / "last.safetensors"
    assert (
        message.startswith(str(last)) and "No space left" in message and "previous checkpoint is unchanged" in message
    )
    assert ckpt.state_of(ckpt.load(last)[1], last)["step"] == 5
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    (folder / "filler").unlink()  # the user frees space and resumes
    cn.train(cn.load_recipe(TINY, sets, regs), out=out, resume=last)
    ref = tmp_path / "ref"
    cn.train(cn.load_recipe(TINY, sets, regs), out=ref)
    assert model_bytes(last) == model_bytes(ref / "checkpoints" / "last.safetensors")
    ledger.record(
        "disk full mid-run (2 MiB tmpfs filled at step 6)",
        "one-line error, step-5 checkpoint intact, resume gave the uninterrupted weights",
    )
