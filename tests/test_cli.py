"""The command line: each subcommand's output and exit code (0 ok, 2 bad recipe/command line, 1 other)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import convnet.core as cn
from convnet.core.cli import main
from convnet.core.recipe import bundled_names, recipe_from_text

TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
CONVNET = Path(sys.executable).parent / "convnet"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnet: error: ") and "Traceback" not in err, err
    return lines[0]


def test_recipes_lists_every_bundled_recipe(capsys) -> None:
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == bundled_names() and "alexnet-digits" in names
    assert any(
        line.startswith("alexnet-digits") and "digits" in line[len("alexnet-digits") :] for line in out.splitlines()
    )


def test_show_prints_the_resolved_recipe(capsys, registries) -> None:
    code, out, _ = run_cli(capsys, "show", "alexnet-digits", "--set", "train.epochs=7")
    assert code == 0
    shown = recipe_from_text(out, registries)
    assert shown.train.epochs == 7 and shown.name == "alexnet-digits"
    assert shown == cn.load_recipe("alexnet-digits", ["train.epochs=7"], registries)
    raw = tomllib.loads(out)
    assert raw["model"]["layers"][2]["name"] == "lrn" and "k" in raw["model"]["layers"][2]  # defaults filled in


def test_show_of_a_bad_recipe_exits_2_naming_the_path(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace("out = 8\nkernel = 3", 'out = "eight"\nkernel = 3', 1), encoding="utf-8")
    code, out, err = run_cli(capsys, "show", str(bad))
    assert code == 2 and not out
    line = one_error_line(err)
    assert str(bad) in line and "model.layers[0].out" in line and "'eight'" in line
    code, _, err = run_cli(capsys, "show", str(TINY), "--set", "data.batch_size=-3")
    assert code == 2 and "data.batch_size" in one_error_line(err)
    code, _, err = run_cli(capsys, "show", "alexnet-digit")
    assert code == 2 and "did you mean 'alexnet-digits'?" in one_error_line(err)
    code, _, err = run_cli(capsys, "show", str(tmp_path / "nowhere.toml"))
    assert code == 2 and "no such recipe file" in one_error_line(err)


def test_summary_text_and_json(capsys, registries) -> None:
    code, out, _ = run_cli(capsys, "summary", "alexnet-digits", "--json")
    assert code == 0
    info = json.loads(out)
    model = cn.build_model(cn.load_recipe("alexnet-digits", registries=registries), "meta", registries)
    assert info["params"] == sum(p.numel() for p in model.parameters()) == sum(r["params"] for r in info["layers"])
    assert [r["id"] for r in info["layers"]][:4] == ["conv1", "relu1", "lrn1", "pool1"]
    assert info["layers"][-1]["out_shape"] == [10] and info["towers"] == 2
    assert {"conv3", "fc6"} <= set(info["exchange_layers"])
    code, out, _ = run_cli(capsys, "summary", "alexnet-digits")
    assert code == 0 and "conv1" in out and "total" in out and f"{info['params']:,}" in out


def test_plugins_json_lists_every_kind(capsys) -> None:
    code, out, _ = run_cli(capsys, "--strict", "plugins", "--json")
    assert code == 0
    listing = json.loads(out)
    kinds = {row["kind"] for row in listing["components"]}
    assert kinds == {"layer", "augmenter", "strategy", "evaluator", "dataset", "optimizer", "schedule", "lrn"}
    assert listing["problems"] == []
    assert {"kind": "dataset", "name": "digits"}.items() <= next(
        r for r in listing["components"] if r["name"] == "digits"
    ).items()


def test_run_trains_and_reports(capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "run", str(TINY), "--set", "train.max_steps=5", "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    assert "tiny: validation top1 error" in out and "after 5 steps" in out and f"run folder: {tmp_path}" in out
    for name in ("recipe.toml", "metrics.jsonl", "eval.json", "checkpoints/last.safetensors"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert {"kind", "step", "epoch", "loss", "lr"} <= records[0].keys()
    assert any(r["kind"] == "eval" and "top1_error" in r for r in records)
    saved = cn.load_recipe(tmp_path / "recipe.toml")
    assert saved == cn.load_recipe(TINY, ["train.max_steps=5"])


def test_bad_command_lines_exit_2(capsys) -> None:
    for argv in (["frobnicate"], ["run"], ["show"], ["summary", "alexnet-digits", "--jsn"], []):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "usage:" in err, argv


def test_version_names_convnet_and_torch(capsys) -> None:
    from importlib.metadata import version

    import torch

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"convnet {version('convnet')} (torch {torch.__version__})"


def test_run_with_a_bad_recipe_exits_2_before_anything(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "run", str(TINY), "--set", "train.on_nonfinite=ignore", "--out", str(tmp_path / "r"))
    assert code == 2 and "train.on_nonfinite" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_the_installed_programs(tmp_path: Path) -> None:
    """The console script and ``python -m convnet.core`` as a user starts them: no traceback, exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ninput = [3, 8]\n", encoding="utf-8")
    for program in ([str(CONVNET)], [sys.executable, "-m", "convnet.core"]):
        proc = subprocess.run([*program, "show", str(bad)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and not proc.stdout
        assert str(bad) in one_error_line(proc.stderr)


def test_progress_lines_depend_on_the_terminal(capsys, tmp_path: Path, monkeypatch) -> None:
    """Not a TTY: one line per epoch, no bar. --quiet: nothing. A real pseudo-terminal: a tqdm bar."""
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    args = ["run", str(TINY), "--set", "train.max_steps=8"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines()] == ["epoch 1/3", "epoch 2/3"] and "\r" not in err
    assert main([*args, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w", buffering=1) as terminal:
        monkeypatch.setattr("sys.stderr", terminal)
        assert terminal.isatty()
        assert main([*args, "--out", str(tmp_path / "tty")]) == 0
        monkeypatch.undo()
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert "\r" in shown and "8/8" in shown and "step" in shown and "epoch 2/3" in shown


class _RecordedWrites(io.RawIOBase):
    """The bytes of each write the interpreter's stderr stream makes, as a pipe would get them."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.writes.append(bytes(data))
        return len(data)


def test_an_error_of_several_lines_reaches_stderr_in_one_write(monkeypatch) -> None:
    """Under torchrun every rank's stderr shares one pipe: a message written in two pieces can
    have another rank's line land between them (it did, inside the printed resume command)."""
    from convnet.core import cli

    def interrupted(args) -> int:
        raise cn.ConvnetError("interrupted at step 3; checkpoint saved to c.safetensors\nresume with: convnet run r")

    raw = _RecordedWrites()
    monkeypatch.setitem(cli.COMMANDS, "recipes", interrupted)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BufferedWriter(raw), line_buffering=True))
    assert main(["recipes"]) == 1
    message = b"convnet: error: interrupted at step 3; checkpoint saved to c.safetensors\nresume with: convnet run r\n"
    assert message in raw.writes, raw.writes


@pytest.mark.parametrize("buffered", [True, False])
@pytest.mark.parametrize("command", [["plugins"], ["show", "alexnet-digits"]])
def test_a_reader_that_leaves_early_ends_the_command_quietly(command, buffered: bool) -> None:
    """`convnet plugins | head -1`: the pipe's reader is gone before the output is written
    (block-buffered, the write happens at the end; with PYTHONUNBUFFERED, at the first print)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([str(CONVNET), *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


class _HookWithABrokenPipe:
    @cn.hookimpl
    def convnet_step_end(self, run, step) -> None:
        raise BrokenPipeError(32, "the metrics server went away")


def test_a_broken_pipe_that_is_not_stdout_is_not_silenced(tmp_path: Path, capsys) -> None:
    """Only stdout's reader leaving ends a command quietly; a plugin's broken socket is an error."""
    from convnet.core import plugins

    pm = plugins.manager()
    pm.register(_HookWithABrokenPipe(), name="broken_pipe_hook")
    try:
        tiny = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
        with pytest.raises(BrokenPipeError, match="the metrics server went away"):
            main(["run", str(tiny), "--set", "train.max_steps=2", "--out", str(tmp_path / "r"), "--quiet"])
    finally:
        pm.unregister(name="broken_pipe_hook")
