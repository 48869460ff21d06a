"""Snapshot buffer files: where they go, what they are named, who holds them, and removing those whose kernel is gone.

A kernel's two buffers are files named trainbus-<kernel pid>-<run id>-slot<i> (kernel/snapshot.py makes and maps
them, or kernel/_prepare_buffers.py for it). Memory in /dev/shm is given back only when its file is removed, and a
kernel ended by SIGKILL or the OOM killer removes nothing: the next kernel removes what such kernels left in its
buffer directories, and the daemon does when one of its runs dies. Torch-free: the daemon imports it.

A buffer is removed only when all of these say its kernel is gone:
- the file is a regular file of this user's (another user's is theirs; the sticky /dev/shm refuses it anyway);
- no process that started before the file was last written runs under the pid in its name (a pid the system
  handed to a newer process is not the kernel's: psutil's start time against the file's mtime);
- nobody holds a lock on the file: a kernel holds a shared POSIX lock (lockf) on each buffer for as long as it has
  the buffer, so a live kernel whose pid means nothing here (another pid namespace sharing /dev/shm: containers
  run with --ipc=host) keeps its buffers. POSIX locks, not flock: a process's children do not inherit them, so the
  DataLoader workers a killed kernel forked, which notice it gone only within seconds, hold nothing. The price: a
  process loses its lock when it closes any of its descriptors of the file, so the kernel opens a buffer once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
from pathlib import Path

from .pids import started_by

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
BUFFER_GLOB = "trainbus-*-slot*"


def buffer_name(run_id: str) -> str:
    """The stem of this kernel's buffer files; the kernel's pid in it says whose a buffer is."""
    return f"trainbus-{os.getpid()}-{run_id}"


def snapshot_directories(run_dir: Path, chosen: str = "") -> list[Path]:
    """Where buffers may go, in order: the user's choice alone; else /dev/shm, then the run directory."""
    return [Path(chosen)] if chosen else [SHM_DIR, Path(run_dir)]


def hold(fd: int) -> None:
    """Mark a buffer file (open for reading and writing) as in use for as long as this process keeps `fd`, and
    every other descriptor it has of the file, open."""
    fcntl.lockf(fd, fcntl.LOCK_SH)


def open_held(path: Path) -> int:
    """Open a buffer another process made and hold it (hold); FileNotFoundError when the file under that name is
    no longer the one opened (removed as stale in the moment between, by a kernel that took this one for gone)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        hold(fd)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(f"{path} was removed as it was opened")
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_stale_buffers(directory: Path) -> list[Path]:
    """Remove the buffers in `directory` whose kernel is gone (see the module's docstring); the ones removed."""
    removed, freed = [], 0
    for path in sorted(Path(directory).glob(BUFFER_GLOB)):
        nbytes = _remove_if_stale(path)
        if nbytes is not None:
            removed.append(path)
            freed += nbytes
    if removed:
        log.info("removed %d snapshot buffer(s) in %s (%.0f MB) left by kernels that are gone: %s", len(removed),
                 directory, freed / 1e6, ", ".join(p.name for p in removed))
    return removed


def _remove_if_stale(path: Path) -> int | None:
    """Remove one buffer if its kernel is gone; its size when it was removed, else None."""
    pid = path.name.split("-")[1]
    try:
        info = os.lstat(path)
    except OSError:
        return None
    if not pid.isdigit() or not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        return None
    if started_by(int(pid), info.st_mtime):
        return None
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.lstat(path).st_ino != os.fstat(fd).st_ino:
            return None  # replaced since it was looked at: the new file is judged next time
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN, errno.ENOENT):  # locked: a live kernel's, whatever its pid
            log.warning("could not remove the stale snapshot buffer %s: %s", path, exc.strerror or exc)
        return None
    finally:
        os.close(fd)
    return info.st_size


def remove_dead_runs_buffers(run_dir: Path) -> list[Path]:
    """What a run's kernel, gone, left in the buffer directories its config.json names (the daemon, when a run of
    its dies: its memory in /dev/shm is given back now, not at the next kernel's start)."""
    try:
        chosen = json.loads((Path(run_dir) / "config.json").read_text()).get("snapshot_dir") or ""
    except (OSError, ValueError, AttributeError):
        chosen = ""
    directories = snapshot_directories(run_dir, chosen if isinstance(chosen, str) else "")
    return [path for directory in directories if directory.is_dir() for path in remove_stale_buffers(directory)]
