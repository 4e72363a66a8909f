"""CI's matrix is real: .ci/run fails when a Python is missing under CI, and the `min` env's
constraints are exactly pyproject's lower bounds."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]


def test_ci_run_fails_under_ci_when_a_python_is_missing(tmp_path) -> None:
    # No pyenv versions and a PATH with the system's tools only: 3.12 and 3.13 cannot be found.
    empty_pyenv = tmp_path / "pyenv"
    (empty_pyenv / "versions").mkdir(parents=True)
    env = dict(os.environ, CI="true", PYENV_ROOT=str(empty_pyenv), PATH="/usr/bin:/bin", HOME=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: Python 3.12 3.13 not found" in proc.stderr
    assert "tox" not in proc.stdout  # it stopped before installing or running anything


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [
        *project["dependencies"],
        *project["optional-dependencies"]["test"],
        *project["optional-dependencies"]["tensorboard"],
    ]
    bounds = {}
    for text in reqs:
        req = Requirement(text)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject: {text!r} needs one lower bound (>=) for the min env"
        bounds[req.name.lower()] = lower[0]
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "min-constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_min_constraints_pin_every_requirement_at_its_lower_bound() -> None:
    bounds, pins = _lower_bounds(), _pins()
    assert set(pins) == set(bounds)
    wrong = {name: (bounds[name], pins[name]) for name in bounds if Version(bounds[name]) != Version(pins[name])}
    assert not wrong, f"pyproject lower bound vs .ci/min-constraints.txt pin: {wrong}"
