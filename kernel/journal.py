"""The run journal: an append-only file of msgpack event maps, the durable record replay serves from.

An append is all or nothing. A write that fails (ENOSPC, EDQUOT, EIO) is cut back to the last whole
record and its records wait in memory, up to `backlog_max_bytes`, to be written by the next append;
the caller publishes only what is written. Once space returns the file is complete and gap-free.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from array import array
from pathlib import Path
from typing import Any

import msgpack

from trainbus.proto import Event
from trainbus.proto.codec import UNPACK_LIMITS
from trainbus.proto.journal_format import iter_records, read_journal

log = logging.getLogger("trainbus.kernel")

# fsync policy: every append reaches the OS page cache at once (so a kernel crash, even SIGKILL,
# loses nothing), and the file is fsynced at most once per FSYNC_INTERVAL_S and when closed, so a
# power loss costs at most that window. Measured in scripts/bench/journal_cost.py.
FSYNC_INTERVAL_S = 1.0
# Events held in memory while the disk refuses writes; past this the run stops cleanly ([run] journal_backlog_mb).
BACKLOG_MAX_BYTES = 64 * 1024 * 1024
RETRY_INTERVAL_S = 0.2  # a refused write is tried again this often, not at every flush


class JournalInUse(OSError):
    """Another process (a kernel still running this run) holds the journal."""


class Journal:
    """Appends encoded events in seq order and reads ranges of them back by seq.

    The open journal is locked (flock): a second kernel on the same run is refused, not interleaved.
    """

    def __init__(self, path: Path, fsync_interval_s: float = FSYNC_INTERVAL_S,
                 backlog_max_bytes: int = BACKLOG_MAX_BYTES):
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.backlog_max_bytes = backlog_max_bytes
        self._offsets = array("q")  # byte offset of each written seq, from _first_seq on
        self._first_seq = 1
        self._size = 0  # end of the last whole record
        if self.path.exists():
            for offset, end, record in iter_records(self.path):
                if not self._offsets:
                    self._first_seq = record["seq"]
                self._offsets.append(offset)
                self._size = end
        flags = getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalInUse(f"{self.path} is held by another process: the run is still going") from None
        os.ftruncate(self._fd, self._size)  # drop a torn tail left by a crash
        self._read_fd = os.open(self.path, os.O_RDONLY | flags)
        self._backlog: list[bytes] = []  # numbered records the disk has not taken yet
        self.backlog_bytes = 0
        self.error: OSError | None = None  # why the backlog is not empty
        self._retry_at = 0.0  # after a failed write, the next try waits until then
        self.failed_writes = 0
        self._last_fsync = time.monotonic()

    @property
    def last_seq(self) -> int:
        """The last seq numbered: written, or waiting in the backlog."""
        return self._first_seq + len(self._offsets) + len(self._backlog) - 1

    @property
    def first_seq(self) -> int:
        return self._first_seq

    @property
    def written_seq(self) -> int:
        return self._first_seq + len(self._offsets) - 1

    @property
    def overflowing(self) -> bool:
        return self.backlog_bytes > self.backlog_max_bytes

    def overflow_message(self) -> str:
        return (f"the disk holding {self.path} refuses writes ({self.error.strerror if self.error else 'error'}) and "
                f"{self.backlog_bytes / 2**20:.1f} MiB of events are waiting (limit [run] journal_backlog_mb = "
                f"{self.backlog_max_bytes / 2**20:.4g}): free space there, or move [run] runs_dir to another disk")

    def append(self, records: list[bytes], first_seq: int) -> int:
        """Queue already-encoded events behind the backlog and write all of it, or none of it.

        Returns how many records (oldest first, backlog included) reached the file with this call.
        """
        if first_seq != self.last_seq + 1:
            raise ValueError(f"journal gap: expected seq {self.last_seq + 1}, got {first_seq}")
        self._backlog.extend(records)
        self.backlog_bytes += sum(map(len, records))
        now = time.monotonic()
        if not self._backlog or now < self._retry_at:
            return 0
        blob = b"".join(self._backlog)
        try:
            _write_all(self._fd, blob, self._size)
        except OSError as exc:
            if self.error is None:
                log.warning("journal %s: %s; holding events in memory (at most %g MiB) and retrying", self.path,
                            exc.strerror, self.backlog_max_bytes / 2**20)
            self.error, self._retry_at = exc, now + RETRY_INTERVAL_S
            self.failed_writes += 1
            try:
                os.ftruncate(self._fd, self._size)  # a torn record never stays in the file
            except OSError:
                pass  # ftruncate to a smaller size frees space and does not fail for want of it
            return 0
        offset = self._size
        for raw in self._backlog:
            self._offsets.append(offset)
            offset += len(raw)
        written, self._size = len(self._backlog), offset
        if self.error is not None:
            log.warning("journal %s: writable again; %d held events written", self.path, written)
        self._backlog, self.backlog_bytes, self.error = [], 0, None
        self._maybe_fsync()
        return written

    def _maybe_fsync(self) -> None:
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            try:
                os.fsync(self._fd)
            except OSError as exc:  # EIO on writeback: the next fsync (or close) tries again
                self.error = exc
            self._last_fsync = now

    def read_range(self, from_seq: int, max_events: int, max_bytes: int) -> tuple[int, bytes]:
        """(count, bytes as stored) of written records from from_seq on: at most max_events, and max_bytes
        unless one record alone is larger."""
        index = max(from_seq, self._first_seq) - self._first_seq
        count = len(self._offsets)
        if index >= count:
            return 0, b""
        end_of = lambda i: self._offsets[i + 1] if i + 1 < count else self._size  # noqa: E731
        stop = index + 1  # exclusive; always at least one event so a replay makes progress
        while stop < min(count, index + max_events) and end_of(stop) - self._offsets[index] <= max_bytes:
            stop += 1
        start = self._offsets[index]
        return stop - index, os.pread(self._read_fd, end_of(stop - 1) - start, start)

    def close(self) -> OSError | None:
        """Write what the backlog holds if the disk takes it, fsync, close; the last error, if any."""
        if self._fd < 0:
            return self.error
        if self._backlog:
            self.append([], self.last_seq + 1)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = self.error or exc
        os.close(self._fd)
        os.close(self._read_fd)
        self._fd = -1
        return self.error


def _write_all(fd: int, blob: bytes, offset: int) -> None:
    view = memoryview(blob)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def decode_records(blob: bytes) -> list[dict[str, Any]]:
    """Journal bytes as event maps (tests and tools; replay sends the bytes as they are)."""
    unpacker = msgpack.Unpacker(**UNPACK_LIMITS)
    unpacker.feed(blob)
    return list(unpacker)


def read_events(path: Path) -> list[Event]:
    """Every event of a journal (file or run directory), decoded; what `trainbus runs` and the tests read."""
    return list(read_journal(path))
