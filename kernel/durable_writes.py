"""Bytes written so that a crash leaves them whole or absent: every byte written, the file fsynced, and its
directory fsynced once a rename has put it in place (the journal's rotations, compactions and kept backlogs)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_file(path: Path, blob: bytes) -> None:
    """`blob` as the whole of `path` (0600 when it is made), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC, 0o600)
    try:
        write_all(fd, blob, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, blob: bytes, sync_dir: bool = True) -> None:
    """`blob` as the whole of `path`, or `path` as it was: written and fsynced under a hidden name (`.NAME`), renamed
    into place, and the directory fsynced (sync_dir False: the caller fsyncs it once, after several). OSError: the
    hidden file is removed (where it can be) and the error raised."""
    hidden = path.with_name(f".{path.name}")
    try:
        write_file(hidden, blob)
        os.rename(hidden, path)
    except OSError:
        with contextlib.suppress(OSError):
            hidden.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, blob: bytes, offset: int) -> None:
    """Every byte of `blob` at `offset`: pwrite may write fewer than it was given."""
    view = memoryview(blob)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
