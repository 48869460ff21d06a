"""Shared fixtures: test plugins importable by child processes, run directories under tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests compare final weights bit for bit across processes (resume, kill -9 of a plugin, against a run in this
# process). With two intra-op threads, about one soak run in twenty differed at the 1e-5 level whether or not
# anything was killed; one thread each. Set before torch is imported; kernel and plugin processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(name, size_bytes) -> a fresh tmpfs of that size under tmp_path, for a real ENOSPC;
    unmounted at teardown; the test is skipped where mounting is not allowed (needs CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(name: str, size: int) -> Path:
        mount_point = tmp_path / name
        mount_point.mkdir()
        pages = -(-size // 4096)
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096}", "tmpfs", str(mount_point)],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip() or proc.returncode}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:  # lazily: a process of a failed test may still hold a file open there
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)
