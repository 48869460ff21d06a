"""Directories only their owner can change: who else could write to the runs directory (or the key directory, or one
above either) could swap a run's files, the daemon's queue, or the keys that are let in.

The runs directory holds the run registry, whose queue the daemon starts as its owner's processes, and every run
directory, whose config.json names the code a resume runs. A user who can add, remove or rename entries there (a
runs directory made under umask 000 or 002, a shared folder) can replace the registry with one queueing their own
code, or a run with one of theirs. So the runs directory must be its owner's (or root's) and writable by nobody
else, and so must each directory above it, unless sticky (/tmp): there others cannot move what is ours. A group
that is the owner's own (a user private group: its name the user's, no other member) counts as the owner. The key
directory (kernel/keys.py) likewise: who could rename it could put one of theirs in its place, their key in control/.
Our own directories in the temp dir (proto.kept_files.own_temp_dir, process_scratch_dir) are owner-only for the
same reason.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import shutil
import stat
import tempfile
import time
from pathlib import Path

from trainbus.proto.kept_files import own_temp_dir

DIRECTORY_MODE = 0o755  # at most: the umask takes away more, never adds write for others
SCRATCH_LOCK = ".lock"  # in a process_scratch_dir: flocked by its process while it runs
SCRATCH_UNLOCKED_MAX_AGE_S = 3600.0  # a scratch directory with no lock file this old is no one's being made

_held: dict[Path, int] = {}  # this process's scratch directories: their locks' descriptors


def make_dirs(path: Path) -> None:
    """mkdir -p `path`, each directory made here DIRECTORY_MODE at most (Path.mkdir's parents are 0777 less the
    umask: under umask 000, writable by all)."""
    path = Path(path).absolute()
    for directory in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            os.mkdir(directory, DIRECTORY_MODE)
        except FileExistsError:
            pass


RUNS_STAKE = "they could replace the run registry (the daemon's queue) or a run's files"


def others_can_write(path: Path, stake: str = RUNS_STAKE) -> str | None:
    """Why users other than this one (and root) could change the entries of directory `path`, where it exists, or
    of a directory above it; None when none can. The text names the directory, its mode and owner, what others
    could do there (`stake`), and the fix."""
    path = Path(path).absolute()
    for directory in (path, *path.parents):
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            continue
        above = directory != path
        if info.st_uid not in (0, os.geteuid()) and not above:
            return _why(directory, info, f"owned by uid {info.st_uid}", f"chown {os.geteuid()} {directory}", stake)
        # Above it, a group's write is the group's trust: a project's shared folder on a cluster (2775, setgid) is
        # where runs go, and refusing it would refuse the usual layout; anyone's (o+w) is no one's trust.
        writable = info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and not above
                                                   and not _own_group(info.st_gid))
        if writable and not (above and info.st_mode & stat.S_ISVTX):
            shared = info.st_mode & stat.S_ISVTX  # /tmp itself: a folder of one's own in it is the fix
            return _why(directory, info, "writable by other users",
                        f"use a directory of your own in it, e.g. {directory / 'runs'}" if shared else
                        f"chmod go-w {directory}" + (" (or chmod +t)" if above else ""), stake)
    return None


def others_can_write_file(path: Path) -> str | None:
    """Why a file of ours others could write or have made (it, or a link to it, not this user's or root's; or it is
    writable by group or others); None when it is missing or ours alone."""
    try:
        link, info = os.lstat(path), os.stat(path)
    except FileNotFoundError:
        return None
    if {link.st_uid, info.st_uid} - {0, os.geteuid()} or info.st_mode & 0o022:
        return (f"{path} is not a file of this user's alone (mode {stat.S_IMODE(info.st_mode):o}, owner uid "
                f"{info.st_uid}): another user could have made or changed it; fix: move it away, after checking it")
    return None


def write_private(path: Path, text: str) -> None:
    """`text` as the file `path`, owner-only (0600) whatever the umask and from its first byte, replaced whole: a
    temporary file beside it, made 0600, renamed over it. Jupyter writes its connection files so: what tells a client
    where to connect is no one else's to read."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # one a crash left keeps its own mode through O_TRUNC: made anew
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def process_scratch_dir(name: str, temp: str | None = None) -> Path:
    """A fresh directory for this process alone in own_temp_dir(`name`, `temp`), held (an flock on its
    SCRATCH_LOCK) until remove_scratch_dir or the process's end. A process killed with SIGKILL cannot remove its
    own: those no process holds any more are removed here first, so they never pile up. A lock, not a pid, says who
    is alive: a pid is reused, and another pid namespace (a container sharing the temp dir) has its own."""
    parent = own_temp_dir(name, temp=temp)
    for entry in parent.iterdir():
        _remove_if_abandoned(entry)
    while True:
        path = Path(tempfile.mkdtemp(prefix="", dir=parent))  # 8 characters: socket paths are short
        held = os.open(path / SCRATCH_LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(held, fcntl.LOCK_EX)
        if os.fstat(held).st_nlink:  # not swept by another process between its making and our lock
            _held[path] = held
            return path
        os.close(held)


def remove_scratch_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    held = _held.pop(Path(path), None)
    if held is not None:
        os.close(held)


def _remove_if_abandoned(entry: Path) -> None:
    try:
        lock = os.open(entry / SCRATCH_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # being made this instant, or its maker was killed in that instant: gone once old
        try:
            if time.time() - os.lstat(entry).st_mtime > SCRATCH_UNLOCKED_MAX_AGE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass
        return
    except OSError:  # not a directory of ours, or not readable: not ours to judge
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its process is running
        os.close(lock)
        return
    shutil.rmtree(entry, ignore_errors=True)  # under our lock: its maker, locking it now, sees it gone (st_nlink 0)
    os.close(lock)


def _why(directory: Path, info: os.stat_result, what: str, fix: str, stake: str) -> str:
    return f"{directory} is {what} (mode {stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}): {stake}; fix: {fix}"


def _own_group(gid: int) -> bool:
    """The user's private group: named as the user, with no other member (the norm where the umask is 002)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getegid() and group.gr_name == user and set(group.gr_mem) <= {user}
