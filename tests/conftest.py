"""Shared fixtures: test plugins importable by child processes, run directories under tmp."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


@pytest.fixture(autouse=True)
def _tests_on_child_path(monkeypatch):
    """Plugin processes import fixture plugins (fixture_plugins:Recorder) from the tests folder."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def trainbus_cmd() -> list[str]:
    """The installed console script, next to the interpreter running the tests."""
    return [str(Path(sys.executable).parent / "trainbus")]


@pytest.fixture
def kernels():
    """Kernel subprocesses (tests/kernel_process.KernelProcess) a test started; killed at teardown if it failed halfway."""
    started: list = []
    yield started
    for kernel in started:
        kernel.kill()
