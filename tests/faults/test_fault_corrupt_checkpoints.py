"""Corrupt checkpoints handed to ``convnet run --resume``: one line naming the file, never a pickle load.

Hypothesis picks the damage: a cut at any length, zero bytes, random bytes, a single flipped
bit anywhere (header, metadata or weights: the checksum catches what safetensors cannot), a
valid checkpoint of another recipe, and pickles (plain and torch.save zips) whose payload
would leave a marker file if anything unpickled them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from faultkit import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convnet.core as cn
from convnet.core.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, bytes]:
    good = tmp_path_factory.mktemp("good")
    cn.train(cn.load_recipe(TINY, ["train.max_steps=3"]), out=good)
    other = tmp_path_factory.mktemp("other")
    cn.train(
        cn.load_recipe(
            TINY, ["train.max_steps=1", "model.layers[5].name=relu", "model.layers[8].out=4", "model.layers[4].out=16"]
        ),
        out=other,
    )
    return {
        "good": (good / "checkpoints" / "last.safetensors").read_bytes(),
        "other": (other / "checkpoints" / "last.safetensors").read_bytes(),
    }


class _Touch:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("zero bytes")),
    st.tuples(st.just("random bytes"), st.binary(min_size=1, max_size=5000)),
    st.tuples(st.just("one flipped bit"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("another recipe's checkpoint")),
    st.tuples(st.just("pickle"), st.integers(0, 5)),
    st.tuples(st.just("torch.save zip")),
)


@settings(
    max_examples=settings.default.max_examples,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(how=damage)
def test_corrupt_checkpoint_is_one_line_and_nothing_unpickled(
    checkpoints, tmp_path_factory, capsys, ledger, how
) -> None:
    tmp = tmp_path_factory.mktemp("corrupt")
    bad, marker = tmp / "last.safetensors", tmp / "UNPICKLED"
    blob = checkpoints["good"]
    kind = how[0]
    if kind == "cut":
        bad.write_bytes(blob[: int(len(blob) * how[1])])
    elif kind == "zero bytes":
        bad.write_bytes(b"")
    elif kind == "random bytes":
        bad.write_bytes(how[1])
    elif kind == "one flipped bit":
        flipped = bytearray(blob)
        flipped[int(len(blob) * how[1])] ^= 1 << how[2]
        bad.write_bytes(bytes(flipped))
    elif kind == "another recipe's checkpoint":
        bad.write_bytes(checkpoints["other"])
    elif kind == "pickle":
        bad.write_bytes(pickle.dumps({"state_dict": _Touch(str(marker))}, protocol=how[1]))
    else:
        torch.save({"payload": _Touch(str(marker))}, bad)
    code = main(
        ["run", str(TINY), "--set", "train.max_steps=4", "--out", str(tmp / "run"), "--quiet", "--resume", str(bad)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(f"convnet: error: {bad}: "), (how, err)
    assert not marker.exists()
    assert not (tmp / "run" / "metrics.jsonl").exists()  # refused before a single step
    ledger.record(f"corrupt checkpoint: {kind}", "refused with one line naming the file; nothing unpickled")
