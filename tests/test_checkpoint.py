"""Checkpoints: what they hold, and corrupt files that fail in one clear line.

Killing a process while it writes one: tests/faults/test_fault_kill_while_saving.py.

Nothing here unpickles: the pickle cases carry a payload that would create a marker file if
anything ever unpickled them, and the tests check the marker never appears.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import convnet.core as cn
from convnet.core import checkpoint as ckpt
from convnet.core.cli import main as cli_main
from convnet.core.errors import CheckpointError
from convnet.core.recipe import recipe_from_text

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A real checkpoint of the tiny recipe after 2 steps."""
    out = tmp_path_factory.mktemp("good")
    cn.train(cn.load_recipe(TINY, ["train.max_steps=2"]), out=out)
    return out / "checkpoints" / "last.safetensors"


class _Touch:
    """Unpickling this creates ``marker``: proof that something unpickled user data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _resume_error(bad: Path, tmp: Path, capsys) -> str:
    """`convnet run --resume BAD` through the real CLI: exit 1 and the one error line."""
    code = cli_main(
        ["run", str(TINY), "--set", "train.max_steps=3", "--out", str(tmp / "run"), "--resume", str(bad), "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("convnet: error: ") and str(bad) in err
    return err


def test_load_reads_back_what_save_wrote(tmp_path: Path) -> None:
    tensors = {"model/w": torch.arange(12.0).reshape(3, 4), "rng/x": torch.tensor([1, 2], dtype=torch.int64)}
    path = tmp_path / "sub" / "c.safetensors"
    ckpt.save(path, tensors, {"convnet.state": '{"step": 4}'})
    back, meta = ckpt.load(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert ckpt.state_of(meta, path) == {"step": 4} and meta["convnet.format"] == ckpt.FORMAT
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]  # no temp file left


def test_a_folder_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("", encoding="utf-8")
    target = tmp_path / "afile" / "x.safetensors"  # `convnet convert --out afile/x.safetensors`
    with pytest.raises(
        CheckpointError, match=rf"^{target}: cannot write checkpoint: File exists \({tmp_path / 'afile'}\)$"
    ):
        ckpt.save(target, {"a": torch.zeros(1)}, {})


def test_a_missing_best_beside_a_last_says_when_best_is_written(tmp_path: Path) -> None:
    ckpt.save(tmp_path / "last.safetensors", {"a": torch.zeros(1)}, {})
    with pytest.raises(
        CheckpointError,
        match=r"best\.safetensors is written once an epoch has been evaluated, and this run has only .*last\.safe",
    ):
        ckpt.load(tmp_path / "best.safetensors")
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint file$"):
        ckpt.load(tmp_path / "nope.safetensors")


def test_files_written_atomically_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """mkstemp makes 0600 files: a checkpoint or a report page must be readable as any other file."""
    from convnet.core.report import write_index

    mask = os.umask(0o022)
    os.umask(mask)
    ckpt.save(tmp_path / "c.safetensors", {"a": torch.zeros(1)}, {})
    write_index(tmp_path, [])
    for name in ("c.safetensors", "index.html"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_checkpoint_holds_model_optimizer_rng_and_recipe(good: Path) -> None:
    tensors, meta = ckpt.load(good)
    state = ckpt.state_of(meta, good)
    assert state["step"] == 2 and {"optimizer_groups", "schedule", "rng"} <= state.keys()
    assert any(k.startswith("model/") for k in tensors) and any(k.startswith("optimizer/") for k in tensors)
    assert cn.load_recipe(TINY, ["train.max_steps=2"]) == recipe_from_text(meta["convnet.recipe"])


@settings(max_examples=15)
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_checkpoint_is_one_clear_error(good: Path, tmp_path_factory, fraction: float) -> None:
    blob = good.read_bytes()
    bad = tmp_path_factory.mktemp("trunc") / "last.safetensors"
    bad.write_bytes(blob[: int(len(blob) * fraction)])
    with pytest.raises(CheckpointError) as info:
        ckpt.load(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and "\n" not in message
    assert any(w in message for w in ("truncated", "empty", "too short")), message


@settings(max_examples=15)
@given(junk=st.binary(max_size=4096))
def test_random_bytes_are_one_clear_error(tmp_path_factory, junk: bytes) -> None:
    bad = tmp_path_factory.mktemp("rand") / "last.safetensors"
    bad.write_bytes(junk)
    with pytest.raises(CheckpointError, match=f"^{bad}: "):
        ckpt.load(bad)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickles_are_refused_and_never_unpickled(tmp_path: Path, capsys, protocol: int) -> None:
    marker = tmp_path / "UNPICKLED"
    bad = tmp_path / "last.safetensors"
    bad.write_bytes(pickle.dumps({"model": _Touch(marker)}, protocol=protocol))
    err = _resume_error(bad, tmp_path, capsys)
    if protocol >= 2:
        assert "pickle" in err
    assert not marker.exists()


def test_torch_save_zip_is_refused_and_never_unpickled(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "UNPICKLED"
    bad = tmp_path / "last.safetensors"
    torch.save({"w": torch.zeros(2), "payload": _Touch(marker)}, bad)
    assert "pickle" in _resume_error(bad, tmp_path, capsys)
    assert not marker.exists()


def test_each_corruption_is_one_line_through_the_cli(good: Path, tmp_path: Path, capsys) -> None:
    cases = {
        "zero.safetensors": (b"", "empty"),
        "short.safetensors": (good.read_bytes()[:5], "too short"),
        "cut.safetensors": (good.read_bytes()[:-100], "truncated"),
        "noise.safetensors": (os.urandom(3000), ""),
    }
    for name, (blob, words) in cases.items():
        bad = tmp_path / name
        bad.write_bytes(blob)
        assert words in _resume_error(bad, tmp_path, capsys)
    assert "no such checkpoint" in _resume_error(tmp_path / "missing.safetensors", tmp_path, capsys)
    assert "folder" in _resume_error(tmp_path, tmp_path, capsys)


def test_safetensors_that_is_not_a_convnet_checkpoint(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(bad))
    assert "not a convnet checkpoint" in _resume_error(bad, tmp_path, capsys)


def test_checkpoint_of_another_recipe(tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    cn.train(cn.load_recipe(TINY, ["train.max_steps=1", "model.layers[0].out=6"]), out=other)
    err = _resume_error(other / "checkpoints" / "last.safetensors", tmp_path, capsys)
    assert "layers.conv1" in err and "another recipe" in err
    deeper = tmp_path / "deeper.toml"
    deeper.write_text(
        TINY.read_text().replace(
            'name = "flatten"', 'name = "flatten"\n\n[[model.layers]]\nname = "fc"\nid = "extra"\nout = 32'
        ),
        encoding="utf-8",
    )
    cn.train(cn.load_recipe(deeper, ["train.max_steps=1"]), out=tmp_path / "deeper")
    err = _resume_error(tmp_path / "deeper" / "checkpoints" / "last.safetensors", tmp_path, capsys)
    assert "another recipe" in err


def test_a_flipped_bit_in_weights_or_metadata_is_caught_by_the_checksum(good: Path, tmp_path: Path, capsys) -> None:
    blob = good.read_bytes()
    flipped = bytearray(blob)
    flipped[-7] ^= 0x10  # inside the last tensor's bytes: safetensors alone would load it
    at = blob.index(b'\\"step\\": 2')  # the JSON state inside the header's metadata
    edited = blob[:at] + b'\\"step\\": 7' + blob[at + len(b'\\"step\\": 2') :]
    for name, data in (("weights.safetensors", bytes(flipped)), ("state.safetensors", edited)):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"^{bad}: corrupt checkpoint: .*checksum"):
            ckpt.load(bad)
        assert "checksum" in _resume_error(bad, tmp_path, capsys)
