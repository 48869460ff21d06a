"""Files that survive a crash: atomic replace with fsync, hashing while writing, an append-only manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from trainbus.proto.checkpoint_format import read_manifest, sha256_of  # noqa: F401  (re-exported for the plugin)

TEMP_PREFIX = ".tmp-"  # .tmp-<name>-<pid>: removed at setup when that process is gone


class _HashingWriter:
    """A file for torch.save that hashes the bytes on their way out: no second pass over the file."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:  # torch re-raises it as a RuntimeError; keep the errno
            self.error = exc
            raise
        self.sha256.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.file.flush()


def write_atomically(state: Any, path: Path) -> tuple[str, int]:
    """torch.save to a temp file, fsync, rename over path, fsync the directory; (sha256, size)."""
    import torch  # here, not at the top: the e-mail plugin shares this module and needs no torch
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    created = False
    try:
        with open(temporary, "wb") as f:
            created = True
            writer = _HashingWriter(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
            size = os.fstat(f.fileno()).st_size
        # the hash covers what went through write(); should that ever differ from the file, hash the file
        sha256 = writer.sha256.hexdigest() if writer.size == size else sha256_of(temporary)
        os.replace(temporary, path)
        created = False
        fsync_directory(path.parent)
        return sha256, size
    finally:
        if created:
            temporary.unlink(missing_ok=True)


def replace_with_link(target: Path, link: Path) -> None:
    """Make `link` name the same file as `target`, atomically (a copy where hard links are refused)."""
    temporary = link.with_name(f"{TEMP_PREFIX}{link.name}-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    try:
        try:
            os.link(target, temporary)
        except OSError:  # EPERM / EOPNOTSUPP on filesystems without hard links
            shutil.copyfile(target, temporary)
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temporary, link)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(link.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new name in `directory` survive a power loss, not just a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temp files left by a writer that died; leave those of a live process (a shared dirpath)."""
    for path in directory.glob(f"{TEMP_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def append_manifest(path: Path, entry: dict[str, Any]) -> None:
    """Append one line and fsync it; a torn last line is ended first so this one stays whole."""
    new = not path.exists()
    with open(path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        torn = False
        if end > 0:
            f.seek(end - 1)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")  # "a": always at the end
        f.flush()
        os.fsync(f.fileno())
    if new:
        fsync_directory(path.parent)
