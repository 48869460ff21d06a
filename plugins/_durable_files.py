"""Files that survive a crash: atomic replace with fsync, hashing while writing, an append-only manifest."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from trainbus.proto.checkpoint_format import read_manifest, sha256_of  # noqa: F401  (re-exported for the plugin)

TEMP_PREFIX = ".tmp-"  # .tmp-<name>-<pid>: removed at setup when that process is gone


BLOCK = 4096  # direct I/O moves whole blocks from block-aligned memory: 4 KiB suits every common disk
STAGING_BYTES = 4 << 20  # small enough that hashing reads what was just copied from cache


class DirectWriter:
    """The file object torch.save writes to: bytes go to disk around the page cache, hashed on the way.

    Why (scripts/bench/checkpoint_stall.py): a buffered write of an 805 MB checkpoint costs the
    persister 1.4-2.7 CPU-seconds, the kernel finding and filling 200,000 fresh page-cache pages,
    on the cores and memory bus that training uses. With O_DIRECT the disk reads the bytes itself:
    what is left is one copy into a reused, aligned staging buffer and the sha256 of that buffer
    while it is still in cache. Where the file system refuses direct I/O (tmpfs before Linux 6.6,
    some network and FUSE file systems) the same writer writes through the page cache.
    """

    def __init__(self, fd: int, progress: Callable[[], None] | None = None):
        self.fd = fd
        self.progress = progress  # called after each staging buffer reaches the disk
        self.sha256 = hashlib.sha256()
        self.size = 0  # bytes torch.save handed us
        self.error: OSError | None = None  # torch re-raises a write's OSError as a RuntimeError; keep the errno
        self.direct = _set_direct(fd, True)
        self._staging = mmap.mmap(-1, STAGING_BYTES)  # page-aligned, as direct I/O needs
        self._view = memoryview(self._staging)
        self._fill = 0
        self._padded = False  # a direct write went past the data: finish() cuts the file back

    def write(self, data) -> int:
        source = memoryview(data).cast("B")
        done, n = 0, source.nbytes
        while done < n:
            k = min(n - done, STAGING_BYTES - self._fill)
            self._view[self._fill: self._fill + k] = source[done: done + k]
            self._fill += k
            done += k
            if self._fill == STAGING_BYTES:
                try:
                    self._drain()
                except OSError as exc:
                    self.error = exc
                    raise
        self.size += n
        return n

    def flush(self) -> None:
        pass  # torch.save calls it; whole blocks are written as they fill, the tail by finish()

    def finish(self) -> None:
        """Write what is staged and give the file its exact length (a direct write ends on a block)."""
        if self._fill:
            self._drain()
        if self._padded:
            os.ftruncate(self.fd, self.size)
        self._view.release()
        self._staging.close()

    def _drain(self) -> None:
        chunk = self._view[: self._fill]
        self.sha256.update(chunk)
        end = self._fill
        if self.direct:
            end = -(-self._fill // BLOCK) * BLOCK  # the last block padded; finish() cuts it off
            if end > self._fill:
                self._view[self._fill: end] = bytes(end - self._fill)
                self._padded = True
        written = 0
        while written < end:
            try:
                written += os.write(self.fd, self._view[written:end])
            except OSError as exc:
                # A short direct write leaves the file off its block grid, and some file systems
                # take O_DIRECT at open but refuse the write (EINVAL): go on through the page cache,
                # which also gives the true error (ENOSPC, EDQUOT) where there is one.
                if not self.direct or exc.errno != errno.EINVAL:
                    raise
                self.direct = _set_direct(self.fd, False)
                end = self._fill
        self._fill = 0
        if self.progress is not None:
            self.progress()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for fd; whether it is on now."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:  # not Linux
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:  # EINVAL: this file system has no direct I/O
        return False
    return on


def write_atomically(state: Any, path: Path, before_replace: Callable[[], None] | None = None,
                     progress: Callable[[], None] | None = None) -> tuple[str, int]:
    """torch.save to a temp file, fsync, (before_replace), rename over path, fsync the directory; (sha256, size).
    progress, if given, is called every few MB written.

    torch.save runs without its per-record CRC-32 (torch.load does not need it; `unzip -t` would
    complain): the sha256 kept in the manifest covers every byte, and the CRC cost another ~0.5
    CPU-seconds per 805 MB.
    """
    import torch  # here, not at the top: the e-mail plugin shares this module and needs no torch
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        writer = DirectWriter(fd, progress)
        with _without_crc32():
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
        writer.finish()
        os.fsync(fd)
        size = os.fstat(fd).st_size
        # the hash covers what went through write(); should that ever differ from the file, hash the file
        sha256 = writer.sha256.hexdigest() if writer.size == size else sha256_of(temporary)
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return sha256, size


def _without_crc32():
    try:
        from torch.utils.serialization import config
    except ImportError:  # a torch without the option: it computes the CRC, nothing else changes
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


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


def rewrite_manifest(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the manifest with these entries, atomically (temp, fsync, rename, fsync of the directory): a reader
    sees the old file or the new one, and a crash leaves one of them."""
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            f.write(b"".join(json.dumps(entry).encode() + b"\n" for entry in entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
