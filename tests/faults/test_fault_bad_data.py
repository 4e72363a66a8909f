"""Bad image files in an ImageNet-layout folder: the run completes, skips and counts them, memory bounded.

Real JPEGs written with PIL; the broken ones are a truncated JPEG, a zero-byte file, text with
a .jpg name, and a JPEG whose header claims 20000x20000 pixels (1.2 GB if decoded); a 1x1
image is valid and is used. ``convnet run`` runs as a real process, and its peak resident
memory (from the kernel) shows the big header was never decoded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from faultkit import CONVNET, env
from PIL import Image

import convnet.plugins.data.imagenet  # noqa: F401  (the dataset under test; an import error must fail)
from convnet.core import data as cdata

RECIPE = """
seed = 1
parallel = {{ strategy = "single", device = "cpu" }}
[model]
input = [3, 16, 16]
num_classes = 2
layers = [
    {{ name = "conv", out = 4, kernel = 3 }},
    {{ name = "relu" }},
    {{ name = "flatten" }},
    {{ name = "fc", out = 2 }},
]
[data]
batch_size = 4
[data.dataset]
name = "imagenet"
root = "{root}"
size = 16
[train]
epochs = 1
log_every = 1
optimizer = {{ name = "sgd", lr = 0.0001 }}
"""


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _huge_header(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 frame header is edited to claim width x height."""
    blob = bytearray(_jpeg((8, 8), 0))
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    blob[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(blob)


BAD = {
    "truncated.jpg": lambda: _jpeg((40, 30), 9)[:200],
    "zero.jpg": lambda: b"",
    "notes.jpg": lambda: b"these are my notes, not an image\n" * 20,
    "huge-header.jpg": lambda: _huge_header(20000, 20000),
}


def test_bad_images_are_skipped_counted_and_memory_stays_bounded(tmp_path: Path, ledger) -> None:
    root = tmp_path / "imagenet"
    for split, per_class in (("train", 6), ("val", 2)):
        for c, name in enumerate(("n01", "n02")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{i}.jpg").write_bytes(_jpeg((40 + i, 30), 100 * c + i))
    train_a = root / "train" / "n01"
    (train_a / "one-pixel.jpg").write_bytes(_jpeg((1, 1), 5))
    for name, make in BAD.items():
        (train_a / name).write_bytes(make())
    (root / "val" / "n02" / "truncated.jpg").write_bytes(BAD["truncated.jpg"]())
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):  # the header really claims it
        Image.open(train_a / "huge-header.jpg")
    # 6 + 1 + 4 + 6 = 17 training files: 4 full batches of 4 (the last file is in no batch this epoch)
    recipe = tmp_path / "bad-data.toml"
    recipe.write_text(RECIPE.format(root=root), encoding="utf-8")
    out = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            [*CONVNET, "run", str(recipe), "--out", str(out), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env(),
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident memory (KiB)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_mib = usage.ru_maxrss / 1024
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r["kind"] == "eval")
    order = cdata.train_batches(17, 4, 1, 0)
    files = sorted(str(p) for p in (root / "train" / "n01").iterdir()) + sorted(
        str(p) for p in (root / "train" / "n02").iterdir()
    )
    visited_bad = sum(1 for b in order for i in b if Path(files[i]).name in BAD)
    assert epoch["skipped_samples"] == visited_bad >= 3
    assert f"skipped {visited_bad} unreadable training sample(s)" in stderr
    assert sum(1 for r in records if r["kind"] == "train") == 4
    assert peak_mib < 1600, f"peak RSS {peak_mib:.0f} MiB: was the 20000x20000 header decoded?"
    ledger.record(
        "bad image files (truncated, 0 bytes, text .jpg, 20000x20000 header; 1x1 kept)",
        f"run completed, {visited_bad} skipped and counted, peak RSS {peak_mib:.0f} MiB",
    )
