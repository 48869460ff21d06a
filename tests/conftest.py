"""Shared fixtures: test plugins importable by child processes, run directories under tmp."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

# Tests compare final weights bit for bit across processes (resume, kill -9 of a plugin, against a run in this
# process). With two intra-op threads, about one soak run in twenty differed at the 1e-5 level whether or not
# anything was killed; one thread each. Set before torch is imported; kernel and plugin processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def pytest_configure(config):
    """trainbus's own modules byte-compiled once, before the workers start: under PYTHONDONTWRITEBYTECODE (set where
    this suite runs) no process left a .pyc behind, so each of the suite's thousands of processes (plugins, kernels
    the daemon starts, forked commands) compiled what it imported from source: ~0.04 s of CPU for a plugin's, 0.1 s
    for `trainbus.kernel.cli`'s, 0.25 s for a kernel's. Python reads a .pyc whatever that variable says; a stale one
    (a source edited since) is compiled again in memory, as before."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has done it
        return
    import compileall

    for package in ("proto", "kernel", "sdk", "plugins", "tests"):
        compileall.compile_dir(REPO / package, quiet=2)


@pytest.fixture(autouse=True)
def _tests_on_child_path(monkeypatch):
    """Plugin processes import fixture plugins (fixture_plugins:Recorder) from the tests folder."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))


@contextlib.contextmanager
def child_path_with_tests() -> Iterator[None]:
    """What _tests_on_child_path does for a test, for a module-scoped fixture (which runs outside any one test)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(TESTS_DIR))
        yield


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    d = tmp_path / "runs"
    d.mkdir()
    return d


def sigint_as_from_a_terminal() -> None:
    """preexec_fn of a child a test sends Ctrl-C (SIGINT) to: Python's KeyboardInterrupt in it, as a terminal's
    command has. The suite run in the background (nohup, `cmd &`, some CI) ignores SIGINT, and its children would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
            # mode 0755, as a disk of one's own: a tmpfs's root is 1777 (writable by all), which no runs dir may be
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * 4096},mode=0755", "tmpfs",
                                   str(mount_point)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {proc.stderr.strip() or proc.returncode}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:  # lazily: a process of a failed test may still hold a file open there
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def trainbus(*args: str, check: bool = True, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """`trainbus ARGS` in a child process (forked with torch loaded: kernel_process.cli), its output captured;
    check: exit 0 or fail with its output."""
    from kernel_process import cli

    done = cli(*args, timeout=timeout_s)
    if check:
        assert done.returncode == 0, f"trainbus {' '.join(args)}: rc {done.returncode}\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture
def daemons():
    """A list the test appends each runs directory it started a daemon for; each is stopped at the end (the runs
    it started are the test's to end). `start_daemon` appends for you."""
    served: list[Path] = []
    yield served
    for runs in served:
        trainbus("daemon", "stop", "--runs-dir", str(runs), check=False)


def start_daemon(daemons: list[Path], runs: Path, *extra: str) -> int:
    """`trainbus daemon start` for runs (stopped at the test's end); the daemon's pid."""
    from trainbus.kernel.daemon_files import PID_FILE, daemon_dir

    done = trainbus("daemon", "start", "--runs-dir", str(runs), *extra)
    assert "serves" in done.stdout, done.stdout
    daemons.append(runs)
    return int((daemon_dir(runs) / PID_FILE).read_text())


@pytest.fixture
def bus_with():
    """bus_with(run_dir, plugins) -> a started Bus supervising `plugins`, as kernel/session.py opens one; closed at
    the end (its plugins stopped), whatever the test left running."""
    from trainbus.kernel.session import close_bus, open_bus  # here: it imports torch, after OMP_NUM_THREADS is set

    opened: list = []

    def start(run_dir: Path, plugins: list):
        run_dir.mkdir(parents=True, exist_ok=True)
        bus, _, sockets = open_bus("bus-" + secrets.token_hex(3), run_dir, plugins)
        opened.append((bus, run_dir, sockets))
        bus.start()
        return bus

    yield start
    for bus, run_dir, sockets in opened:
        for child in list(bus.supervisor.children.values()):  # a test that failed may leave one running
            if child.proc is not None and child.proc.poll() is None:
                os.killpg(child.proc.pid, signal.SIGKILL)
        close_bus(bus, run_dir, sockets, plugin_exit_timeout_s=1.0)
