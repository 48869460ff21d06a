"""The daemon's directory, RUNS_DIR/.daemon, as the daemon and its clients find it: its files and each run's output.

Owner-only: the control socket inside is reachable by whoever can enter it, and daemon.log and the output files hold
what users ran and what their code prints. The daemon (kernel/daemon.py) writes a run's output file; the runs
listing and `runs delete` read or remove it whether or not a daemon serves. DaemonError, which making the directory
raises, is the error of every part of the daemon (kernel/daemon*.py, kernel/placement.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from .private_dirs import make_dirs, others_can_write

DAEMON_DIR = ".daemon"
PID_FILE = "daemon.pid"
LOG_FILE = "daemon.log"
REMOTE_FILE = "remote.json"  # the TCP endpoint and the server's public key, for `--remote` clients
ENDPOINT_FILE = "endpoint"  # the control socket's ipc endpoint (in DAEMON_DIR unless that path is too long)
OUTPUT_DIR = "output"  # one file per job: its process's stdout and stderr
OUTPUT_TAIL_BYTES = 2000  # of a job that failed before its run had a directory, what the listing shows
CONTROL_MAX_BYTES = 64 * 1024  # the largest request the daemon's control endpoints take


class DaemonError(Exception):
    """The daemon cannot do what was asked (one line, naming the fix)."""


def daemon_dir(runs_dir: Path) -> Path:
    return Path(runs_dir).resolve() / DAEMON_DIR


def make_daemon_dir(runs_dir: Path) -> Path:
    path = daemon_dir(runs_dir)
    make_dirs(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)  # the control socket inside is reachable by whoever can enter this directory
    why = others_can_write(path)  # a .daemon another user made first is theirs: its socket, its pid file
    if why:
        raise DaemonError(f"cannot serve {path.parent}: {why}")
    (path / OUTPUT_DIR).mkdir(mode=0o700, exist_ok=True)
    return path


def output_file(runs_dir: Path, run_id: str) -> Path:
    """Where the daemon writes the output (stdout and stderr) of the process it starts for run_id."""
    return daemon_dir(runs_dir) / OUTPUT_DIR / f"{run_id}.log"


def private_append_fd(path: Path) -> int:
    """`path` opened for appending, owner-only whatever the umask (one an older trainbus made 0644 is made 0600 too):
    daemon.log and the runs' output files hold what users ran and what their code prints."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.fchmod(fd, 0o600)
    return fd


def open_output(path: Path):
    """A run's output file, for appending, owner-only as daemon.log is."""
    return open(private_append_fd(path), "ab")


def output_tail(runs_dir: Path, job_id: str) -> str:
    """The line of a job's output that says how it ended: its last `error:` line, else its last line."""
    path = output_file(runs_dir, job_id)
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - OUTPUT_TAIL_BYTES))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return f"no output ({path})"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].strip()


def unwatched_tail(runs_dir: Path, job_id: str) -> str | None:
    """A started job's output_tail when no daemon lives to settle it (its process ended meanwhile); None while one
    does."""
    from .daemon_client import daemon_lives

    return None if daemon_lives(runs_dir) else output_tail(runs_dir, job_id)
