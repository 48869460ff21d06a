"""The run journal: an append-only file of msgpack event maps, the durable record replay serves from."""

from __future__ import annotations

import os
import time
from array import array
from pathlib import Path
from typing import Any

import msgpack

from trainbus.proto import Event
from trainbus.proto.codec import UNPACK_LIMITS
from trainbus.proto.journal_format import iter_records, read_journal


# fsync policy: every append reaches the OS page cache at once (so a kernel crash, even SIGKILL,
# loses nothing), and the file is fsynced at most once per FSYNC_INTERVAL_S and when closed, so a
# power loss costs at most that window. Measured in scripts/bench/journal_cost.py.
FSYNC_INTERVAL_S = 1.0


class Journal:
    """Appends encoded events in seq order and reads ranges of them back by seq."""

    def __init__(self, path: Path, fsync_interval_s: float = FSYNC_INTERVAL_S):
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self._offsets = array("q")  # byte offset of seq i+1 (plus one trailing end offset)
        self._first_seq = 1
        size = 0
        if self.path.exists():
            for offset, end, record in iter_records(self.path):
                if not self._offsets:
                    self._first_seq = record["seq"]
                self._offsets.append(offset)
                size = end
        self._file = open(self.path, "ab")
        if self._file.tell() != size:
            self._file.truncate(size)  # drop a torn tail left by a crash
            self._file.seek(size)
        self._last_fsync = time.monotonic()

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._offsets) - 1

    def append(self, records: list[bytes], first_seq: int) -> None:
        """Append already-encoded events; first_seq must continue the journal without a gap."""
        if first_seq != self.last_seq + 1:
            raise ValueError(f"journal gap: expected seq {self.last_seq + 1}, got {first_seq}")
        offset = self._file.tell()
        for raw in records:
            self._offsets.append(offset)
            offset += len(raw)
        self._file.write(b"".join(records))
        self._file.flush()
        now = time.monotonic()
        if now - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._file.fileno())
            self._last_fsync = now

    def read_range(self, from_seq: int, max_events: int, max_bytes: int) -> list[dict[str, Any]]:
        """Event maps from from_seq on: at most max_events, and max_bytes unless one event is larger."""
        index = max(from_seq, self._first_seq) - self._first_seq
        count = len(self._offsets)
        if index >= count:
            return []
        end_of = lambda i: self._offsets[i + 1] if i + 1 < count else self._file.tell()  # noqa: E731
        stop = index + 1  # exclusive; always at least one event so a replay makes progress
        while stop < min(count, index + max_events) and end_of(stop) - self._offsets[index] <= max_bytes:
            stop += 1
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            blob = f.read(end_of(stop - 1) - self._offsets[index])
        unpacker = msgpack.Unpacker(**UNPACK_LIMITS)
        unpacker.feed(blob)
        return list(unpacker)

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def read_events(path: Path) -> list[Event]:
    """Every event of a journal (file or run directory), decoded; what `trainbus runs` and the tests read."""
    return list(read_journal(path))
