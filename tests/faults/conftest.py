"""The faults suite: real processes, real files, real signals; a ledger of what was injected.

Every test records each fault it injects in the session's ledger (``ledger.record``); the
terminal summary prints the table the issue asks for: fault, times injected, what happened,
data lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faultkit import KILL_SETS, Ledger, convnet_run, model_bytes

_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return _LEDGER


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every fault test is slow (real processes, signals and disks): CI's quick envs leave them to py311."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _LEDGER.outcomes:
        terminalreporter.section("faults injected")
        for row in _LEDGER.table():
            terminalreporter.write_line(row)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict[str, bytes]:
    """Final weights of the kill recipe run straight through, in a process like the others."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = convnet_run(out, *KILL_SETS)
    _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return model_bytes(out / "checkpoints" / "last.safetensors")
