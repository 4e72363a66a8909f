"""The third-party plugin examples/convnet-swish, installed for real, used like a built-in.

tox installs it into the test venv (commands_pre). When it is not installed (a bare
``pytest`` in a fresh venv) the session installs it with ``pip install --target`` into a
temporary folder put on the path: its entry point is then found exactly as in site-packages.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convnet.core as cn
from convnet.core import plugins
from convnet.core.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "fixtures" / "recipes" / "tiny.toml"
SWISH = ["model.layers[1].name=swish", "model.layers[5].name=swish", "model.layers[5].beta=2.0"]


@pytest.fixture(scope="module")
def swish_path(tmp_path_factory) -> str | None:
    """None when convnet-swish is installed in this environment, else a folder holding it."""
    try:
        md.distribution("convnet-swish")
        return None
    except md.PackageNotFoundError:
        pass
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("src") / "convnet-swish"
    import shutil

    shutil.copytree(ROOT / "examples" / "convnet-swish", build, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(build)],
                   check=True)
    return str(target)


@pytest.fixture
def swish(swish_path, monkeypatch):
    """Fresh plugin manager and registries that see convnet-swish."""
    if swish_path:
        monkeypatch.syspath_prepend(swish_path)
    plugins.reset()
    yield plugins.create_manager()
    plugins.reset()


def _env(swish_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if swish_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [swish_path, env.get("PYTHONPATH")]))
    return env


def test_swish_is_registered_with_its_distribution(swish) -> None:
    _, regs = swish
    entry = regs.layer.get("swish")
    assert entry.plugin == "swish" and entry.distribution.startswith("convnet-swish ")
    assert entry.options.__module__ == "convnet_swish"
    assert not regs.problems


def test_a_recipe_using_swish_trains(swish, tmp_path: Path) -> None:
    pm, regs = swish
    recipe = cn.load_recipe(TINY, [*SWISH, "train.max_steps=4"], regs)
    assert recipe.model.layers[5].options.beta == 2.0
    run = cn.Run(recipe, out=tmp_path, registries=regs, pm=pm)
    summary = run.train()
    assert summary["step"] == 4
    kinds = [type(m).__name__ for m in run.parts.network.layers.values()]
    assert kinds.count("Swish") == 2 and "ReLU" not in kinds and "Tanh" not in kinds
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(run.parts.network.layers["swish2"](x), x * torch.sigmoid(2.0 * x))


def test_convnet_plugins_lists_swish_with_its_distribution(swish_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "convnet.core", "plugins", "--json"], capture_output=True,
                          text=True, env=_env(swish_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["components"]
    swish = [r for r in rows if r["name"] == "swish"]
    assert swish == [{"kind": "layer", "name": "swish", "description": "swish activation x * sigmoid(beta x)",
                      "plugin": "swish", "distribution": "convnet-swish 0.1.0"}]
    assert {r["distribution"].split()[0] for r in rows} >= {"convnet", "convnet-swish"}


def test_convnet_run_with_swish_from_the_command_line(swish_path, tmp_path: Path) -> None:
    sets = [a for s in [*SWISH, "train.max_steps=2"] for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "convnet.core", "run", str(TINY), *sets, "--out", str(tmp_path),
                           "--quiet"], capture_output=True, text=True, env=_env(swish_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "after 2 steps" in proc.stdout and f"run folder: {tmp_path}" in proc.stdout
    assert 'name = "swish"' in (tmp_path / "recipe.toml").read_text()


def test_plugins_text_listing(capsys) -> None:
    assert cli_main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "layer:" in out and "dataset:" in out
    assert any(line.split()[0] == "conv" and "[layers from convnet " in line for line in out.splitlines()
               if line.startswith("  "))
