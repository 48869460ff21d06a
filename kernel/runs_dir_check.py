"""Whether run directories can be made under runs_dir, and by this user alone."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .config import ConfigError
from .private_dirs import others_can_write


def loop_of_links(path: str | Path) -> bool:
    """`path`, or a folder on the way to it, is a symbolic link that leads back to itself (ELOOP): os.path.exists
    says no such path, and pathlib's resolve() raises RuntimeError."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


LOOP_OF_LINKS = "is a loop of symbolic links (each leads to the next, and the last back): name a directory"


def check_runs_dir(runs_dir: str) -> None:
    """ConfigError unless run directories can be made under runs_dir. Tried for real (a directory made and removed
    in its nearest existing folder): mode bits do not stop root, a read-only mount or a file in the path does."""
    if loop_of_links(runs_dir):
        raise ConfigError(f"runs_dir {runs_dir} {LOOP_OF_LINKS}")
    path = Path(runs_dir).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    fix = "pick a writable place with --runs-dir or [run] runs_dir"
    if not existing.is_dir():
        raise ConfigError(f"runs_dir {runs_dir}: {existing} is a file, not a directory; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trainbus-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"runs_dir {runs_dir}: cannot create directories in {existing} "
                          f"({exc.strerror or exc}); {fix}") from None
    check_runs_dir_private(path, runs_dir)


def check_runs_dir_private(path: Path, runs_dir: str) -> None:
    """ConfigError when users other than this one could change the runs directory (kernel/private_dirs.py)."""
    why = others_can_write(path)
    if why:
        raise ConfigError(f"runs_dir {runs_dir}: {why}")
