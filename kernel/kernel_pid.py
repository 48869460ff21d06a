"""A run directory's record of its kernel process (kernel.pid, kernel.host): written by the kernel, read to tell
whether a run's kernel is alive.

Of what `trainbus runs` reads runs with, only `write_kernel_pid`, which the kernel calls, writes into a run directory.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

KERNEL_LOG = "kernel.log"  # the kernel's log, open while it runs
KERNEL_PID = "kernel.pid"  # the kernel's process id, written as the run directory is made (0600)
KERNEL_HOST = "kernel.host"  # the host it runs on (socket.gethostname()), written just before it


def write_kernel_pid(run_dir: Path) -> None:
    """Record this process as the run's kernel (owner-only; replaced whole when a run is continued)."""
    # The host first, in kernel.host: a reader elsewhere (a runs directory on a shared filesystem, a connection.json
    # read in place) must not take another machine's pid for one of its own. kernel.pid stays the bare pid.
    for name, text in ((KERNEL_HOST, socket.gethostname()), (KERNEL_PID, str(os.getpid()))):
        path = Path(run_dir) / name
        temporary = path.with_name(f".{name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.write(fd, f"{text}\n".encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)


def kernel_elsewhere(run_dir: Path) -> bool:
    """The run's kernel.host names another machine than this one."""
    try:
        return (Path(run_dir) / KERNEL_HOST).read_text().strip() not in ("", socket.gethostname())
    except OSError:  # none: a run from before kernel.host, taken as this host's
        return False


def kernel_process(run_dir: Path) -> tuple[int | None, bool | None]:
    """(pid, alive) of the run's kernel per its kernel.pid; (None, None) when there is no readable one.

    A process with that pid that started after the file was written is someone else (the pid was reused). A
    kernel of another host (a runs directory on a shared filesystem) is (None, None) too: its pid means nothing
    here, and the journal's heartbeats tell instead.
    """
    path = Path(run_dir) / KERNEL_PID
    try:
        text, written = path.read_text(), path.stat().st_mtime
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None, None
    if kernel_elsewhere(run_dir):
        return None, None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.create_time() > written + 1.0:
            return pid, False
    except psutil.NoSuchProcess:
        return pid, False
    except psutil.AccessDenied:
        pass  # it exists; whose it is cannot be told: alive
    return pid, not another_runs_kernel(pid, run_dir)


def another_runs_kernel(pid: int, run_dir: Path) -> bool:
    """The process keeps another run directory's kernel.log open: the run's kernel.pid came with a copy of that
    directory (`cp -r` of a live run), whose kernel is alive, but not this run's. One with no kernel.log open (the
    moments before it opens it, a process it cannot read) may be this run's."""
    import psutil

    try:
        logs = {Path(f.path) for f in psutil.Process(pid).open_files() if Path(f.path).name == KERNEL_LOG}
    except psutil.Error:
        return False
    return bool(logs) and Path(run_dir).resolve() / KERNEL_LOG not in logs
