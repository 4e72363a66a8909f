"""docs/plugins.md is executed: its plugin (one component of every kind, hooks, state, a command)
is written out from the page's code blocks, installed with pip, and its recipe trained.

Also: every hook of core/hookspecs.py and every registry kind has a section on the page (as
datasette tests its plugin docs), and the built-in plugins import only ``convnet.core``'s
public names.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import convnet.core as cn
from convnet.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "plugins.md"
BLOCK = re.compile(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", re.S)


def doc_files() -> dict[str, str]:
    """``# file: NAME`` blocks of the page, concatenated per file in page order."""
    files: dict[str, str] = {}
    for name, body in BLOCK.findall(DOC.read_text(encoding="utf-8")):
        files[name] = files.get(name, "") + body + "\n"
    return files


def test_every_hook_and_kind_has_a_section() -> None:
    text = DOC.read_text(encoding="utf-8")
    hooks = [name for name in dir(hookspecs) if name.startswith("convnet_")]
    assert len(hooks) >= 11
    for hook in hooks:
        assert f"### {hook}\n" in text, f"docs/plugins.md has no section for hook {hook}"
    for kind in cn.KINDS:
        assert f"### {kind}\n" in text, f"docs/plugins.md has no section for registry kind {kind}"


def test_builtin_plugins_import_only_public_core_names() -> None:
    public = set(cn.__all__)
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("convnet.core"):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert node.module == "convnet.core", f"{where} imports the internal module {node.module}"
                for alias in node.names:
                    assert alias.name in public, f"{where} imports {alias.name}, not in convnet.core.__all__"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("convnet.core."), f"{path}:{node.lineno} imports {alias.name}"


@pytest.fixture(scope="module")
def kinds_plugin(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The page's plugin built and installed with pip into a folder; (folder with kinds.toml, env)."""
    src = tmp_path_factory.mktemp("convnet-kinds")
    files = doc_files()
    assert {"pyproject.toml", "convnet_kinds/__init__.py", "kinds.toml"} <= set(files)
    for name, body in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(body, encoding="utf-8")
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    return src, env


def convnet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convnet.core", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow  # pip-installs the documented plugin, then trains
def test_the_documented_plugin_trains_with_every_kind(kinds_plugin, tmp_path) -> None:
    src, env = kinds_plugin
    listing = convnet(env, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    info = json.loads(listing.stdout)
    mine = {(c["kind"], c["name"]) for c in info["components"] if c["distribution"] == "convnet-kinds 0.1.0"}
    assert {k for k, _ in mine} == set(cn.KINDS), mine
    plugin = next(p for p in info["plugins"] if p["name"] == "kinds")
    assert plugin["commands"] == ["kinds-hello"]
    assert {"convnet_step_end", "convnet_save_state", "convnet_load_state", "convnet_train_end"} <= set(plugin["hooks"])

    shown = convnet(env, "plugins", "layer", "scaled-tanh")
    assert shown.returncode == 0 and "scale: float = 1.7159" in shown.stdout, shown.stdout
    hello = convnet(env, "kinds-hello", "--who", "tests")
    assert hello.returncode == 0 and hello.stdout.strip() == "hello from convnet-kinds, tests"

    out = tmp_path / "run"
    done = convnet(env, "run", str(src / "kinds.toml"), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 and all(0.5 <= r["mean_confidence"] <= 1.0 for r in evals)
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # linear-decay ran per step
    assert evals[-1]["top1_error"] < 0.5  # stripes are easy: it learned
    assert (out / "kinds.txt").read_text().startswith("steps seen 16 ")
    used = {(c["kind"], c["name"]): c["distribution"] for c in json.loads((out / "run.json").read_text())["components"]}
    assert used[("layer", "scaled-tanh")] == used[("strategy", "pinned-cpu")] == "convnet-kinds 0.1.0"


@pytest.mark.slow  # pip-installs the documented plugin, then trains
def test_the_documented_plugin_state_survives_a_resume(kinds_plugin, tmp_path) -> None:
    src, env = kinds_plugin
    recipe = str(src / "kinds.toml")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert convnet(env, "run", recipe, "--out", str(straight), "--quiet").returncode == 0
    first = convnet(env, "run", recipe, "--set", "train.max_steps=5", "--out", str(split), "--quiet")
    assert first.returncode == 0, first.stderr
    second = convnet(
        env, "run", recipe, "--out", str(split), "--quiet", "--resume", str(split / "checkpoints" / "last.safetensors")
    )
    assert second.returncode == 0, second.stderr
    assert (split / "kinds.txt").read_text() == (straight / "kinds.txt").read_text()
    a = load_file(str(straight / "checkpoints" / "last.safetensors"))
    b = load_file(str(split / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and "plugin/kinds/loss_sum" in a
    for key in a:  # the global generators (rng/numpy, rng/python) included: seeded per run
        assert a[key].equal(b[key]), key
