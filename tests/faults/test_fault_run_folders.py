"""A run never writes over another run: real processes started together, re-runs into a used
folder, a second writer while the first lives (and after it is SIGKILLed), eval into a run folder."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

from faultkit import CONVNET, TINY, convnet_run, env, last_step


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_runs_started_together_get_distinct_folders(tmp_path, ledger) -> None:
    procs = [
        subprocess.Popen(
            [*CONVNET, "run", str(TINY), "--set", "train.max_steps=2", "--quiet"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    folders = [
        line.split("run folder: ", 1)[1]
        for out, _ in outs
        for line in out.splitlines()
        if line.startswith("run folder: ")
    ]
    assert len(folders) == 4 and len(set(folders)) == 4, folders
    for folder in folders:
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        assert sum('"kind": "train"' in line for line in lines) == 2, lines  # its own steps only, once each
    ledger.record("4 runs started at once, default folders", "4 distinct folders, each with only its own metrics")


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, ledger) -> None:
    out = tmp_path / "run"
    first = convnet_run(out, "train.max_steps=2")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    before = _digest(out)
    again = convnet_run(out, "train.max_steps=3")
    _, err = again.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, err
    assert f"{out}: already holds a run (recipe.toml, run.json, metrics.jsonl" in lines[0]
    assert f"--resume {out / 'checkpoints' / 'last.safetensors'}" in lines[0] and "--overwrite" in lines[0]
    assert _digest(out) == before  # not a byte changed
    ledger.record("fresh run into a folder holding a run", "refused in one line naming --resume / --overwrite")
    failing = convnet_run(out, "data.batch_size=100000", overwrite=True)
    _, err = failing.communicate(timeout=600)
    assert failing.returncode == 2 and "data.batch_size" in err and "replacing" not in err, err
    assert _digest(out) == before  # the old run is replaced only once the new one could be built
    ledger.record("--overwrite with a recipe error found while building", "refused; the old run untouched")
    over = subprocess.run(
        [*CONVNET, "run", str(TINY), "--set", "train.max_steps=3", "--out", str(out), "--quiet", "--overwrite"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert over.returncode == 0, over.stderr
    assert f"convnet: --overwrite: replacing {out / 'metrics.jsonl'}" in over.stderr
    assert last_step(out / "metrics.jsonl") == 3
    ledger.record("the same with --overwrite", "replaced, each replaced file named on stderr")


def test_resuming_into_a_folder_of_another_run_is_refused(tmp_path, ledger) -> None:
    """--resume continues the checkpoint's own run: into a folder holding a different run it is
    refused, and nothing there changes; a copy of the checkpoint still resumes into its own run."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    for out, seed in ((mine, 1), (other, 2)):
        first = convnet_run(out, "train.max_steps=2", f"seed={seed}")
        assert first.wait(timeout=600) == 0, first.stderr.read()
    checkpoint = mine / "checkpoints" / "last.safetensors"
    before = _digest(other)
    into_other = convnet_run(other, "train.max_steps=4", "seed=1", resume=checkpoint)
    _, err = into_other.communicate(timeout=600)
    lines = err.strip().splitlines()
    assert into_other.returncode == 2 and len(lines) == 1, err
    assert (
        f"{other}: holds another run (recipe.toml" in lines[0] and f"than the one {checkpoint} was saved by" in lines[0]
    )
    assert f"({mine})" in lines[0] and "--overwrite" in lines[0]
    assert _digest(other) == before
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    own = convnet_run(mine, "train.max_steps=4", "seed=1", resume=copy)
    assert own.wait(timeout=600) == 0, own.stderr.read()
    assert last_step(mine / "metrics.jsonl") == 4
    ledger.record(
        "--resume into a folder holding another run", "refused in one line naming the checkpoint's own folder"
    )


def test_a_start_that_fails_before_training_leaves_no_run_behind(tmp_path, ledger) -> None:
    """A recipe error found while building the components (after the folder was claimed and its
    write probe made checkpoints/) must not make the folder refuse the corrected command."""
    out = tmp_path / "run"
    bad = convnet_run(out, "data.batch_size=100000")
    _, err = bad.communicate(timeout=600)
    assert bad.returncode == 2 and "data.batch_size" in err, err
    fixed = convnet_run(out, "train.max_steps=2")
    assert fixed.wait(timeout=600) == 0, fixed.stderr.read()
    assert last_step(out / "metrics.jsonl") == 2
    ledger.record("a start refused by a recipe error, then the corrected command", "the corrected run started")
    default = subprocess.run(
        [*CONVNET, "run", str(TINY), "--set", "data.batch_size=100000", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert default.returncode == 2 and "data.batch_size" in default.stderr, default.stderr
    runs = tmp_path / "runs"
    assert sorted(runs.rglob("*")) == [runs / "tiny"]  # runs/<recipe>/<time>, made for it, is gone again
    ledger.record("the same without --out", "the fresh folder made for it removed again")


def test_a_second_writer_is_refused_while_the_first_lives_and_accepted_after_sigkill(tmp_path, ledger) -> None:
    out = tmp_path / "run"
    first = convnet_run(out, "train.epochs=1000", "train.checkpoint_every=1")
    try:
        deadline = time.monotonic() + 300
        while last_step(out / "metrics.jsonl") < 2 or not (out / "checkpoints" / "last.safetensors").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        resume = ["--resume", str(out / "checkpoints" / "last.safetensors")]
        second = subprocess.run(
            [
                *CONVNET,
                "run",
                str(TINY),
                "--set",
                "train.epochs=1000",
                "--set",
                "train.checkpoint_every=1",
                "--out",
                str(out),
                "--quiet",
                *resume,
            ],
            capture_output=True,
            text=True,
            env=env(),
            timeout=600,
        )
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip() == (
            f"convnet: error: {out}: another convnet process (pid {first.pid}) is "
            "writing this run folder; wait for it to end, or choose another --out"
        )
        ledger.record("second writer (--resume) while the first runs", "refused, naming the first's pid")
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    after = subprocess.run(
        [
            *CONVNET,
            "run",
            str(TINY),
            "--set",
            "train.epochs=1000",
            "--set",
            "train.max_steps=3",
            "--set",
            "train.checkpoint_every=1",
            "--out",
            str(out),
            "--quiet",
            "--resume",
            str(out / "checkpoints" / "last.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert after.returncode == 0, after.stderr
    ledger.record("resume after the first writer was SIGKILLed", "accepted: the kernel released the lock")


def test_eval_into_a_run_folder_never_replaces_the_runs_files(tmp_path, ledger) -> None:
    out = tmp_path / "run"
    assert convnet_run(out, "train.max_steps=2").wait(timeout=600) == 0
    before = _digest(out)
    proc = subprocess.run(
        [*CONVNET, "eval", str(TINY), "--checkpoint", str(out / "checkpoints" / "last.safetensors"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    after = _digest(out)
    assert {k: v for k, v in after.items() if k in before} == before  # every file of the run untouched
    added = sorted(k for k in after if k not in before)
    assert added and all(k.startswith("evals/") for k in added) and any(k.endswith("/eval.json") for k in added)
    ledger.record("convnet eval --out RUN_FOLDER", "wrote into evals/<time>/, the run's files untouched")
