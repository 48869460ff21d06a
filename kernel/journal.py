"""The run journal: an append-only file of msgpack event maps, the durable record replay serves from.

An append is all or nothing. A write that fails (ENOSPC, EDQUOT, EIO) is cut back to the last whole
record and its records wait in memory, up to `backlog_max_bytes`, to be written by the next append;
the caller publishes only what is written. Once space returns the file is complete and gap-free. What the disk still
refuses as the journal closes is kept in the temporary directory, and rejoins it when it opens (kept_events.py).

The active file rotates: once it holds `segment_bytes` it is compressed whole into a closed segment beside it
(`events.<first>-<last>.gz`, rotation.py) and starts again empty, so the disk holds ~1/6 of the raw bytes and the
offset index, which covers the active file only, stays bounded (PROTOCOL.md, the journal). A replay from a closed
segment reads it decompressed, kept for the next batches (segment_cache.py).

Closed segments are compacted once nothing can need their per-batch events again (`compact_through`, PROTOCOL.md
§13): a worker thread (kernel/compaction.py) rewrites each into `events.<first>-<last>.compacted.gz`, holding only
what `kept_by_compaction` keeps, so a run of days costs its disk the events a person reads, not every batch's.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import time
from array import array
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from trainbus.proto import Event
from trainbus.proto.codec import UNPACK_LIMITS
from trainbus.proto.journal_format import (SEGMENT_ERRORS, Segment, closed_segments, iter_records, read_journal,
                                           recorded_next_seq)

from .compaction import Compactor, finish_compactions
from .durable_writes import CLOEXEC, fsync_dir, write_all
from .kept_events import keep, kept_to_rejoin
from .rotation import COMPRESS_LEVEL, record_next_seq, write_segments
from .segment_cache import SegmentCache


log = logging.getLogger("trainbus.kernel")

# fsync policy: every append reaches the OS page cache at once (so a kernel crash, even SIGKILL,
# loses nothing), and the file is fsynced at most once per FSYNC_INTERVAL_S and when closed, so a
# power loss costs at most that window. Measured in scripts/bench/journal_cost.py.
FSYNC_INTERVAL_S = 1.0
# Events held in memory while the disk refuses writes; past this the run stops cleanly ([run] journal_backlog_mb).
BACKLOG_MAX_BYTES = 64 * 1024 * 1024
RETRY_INTERVAL_S = 0.2  # a refused write is tried again this often, not at every flush
# The active file is closed into a gzip segment at this size ([run] journal_segment_mb). Measured on a real run's
# records (docs/benchmarks.md, journal segments): level 1 compresses ~6x at ~200 MB/s, so a rotation costs the
# bus thread ~40 ms once per ~55,000 events, and a replay from a closed segment decompresses 8 MiB (~20 ms).
SEGMENT_BYTES = 8 * 2**20


class ReplayRead(NamedTuple):
    """A replay's read (read_batch): `count` records as stored, from seq `first` to seq `last`. `compacted`: the seqs
    between from_seq and `last` that are not among them were compacted away, not lost (PROTOCOL.md §12)."""
    first: int
    count: int
    records: bytes
    last: int
    compacted: bool = False


class JournalInUse(OSError):
    """Another process (a kernel still running this run) holds the journal."""


class Journal:
    """Appends encoded events in seq order and reads ranges of them back by seq.

    The open journal is locked (flock): a second kernel on the same run is refused, not interleaved.
    """

    def __init__(self, path: Path, fsync_interval_s: float = FSYNC_INTERVAL_S,
                 backlog_max_bytes: int = BACKLOG_MAX_BYTES, segment_bytes: int = SEGMENT_BYTES,
                 compact: bool = True):
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self.backlog_max_bytes = backlog_max_bytes
        self.segment_bytes = segment_bytes
        self._fd = _open_locked(self.path, os.O_WRONLY | os.O_CREAT)
        for leftover in self.path.parent.glob(f".{self.path.name}.*"):
            leftover.unlink()  # a rotation or compaction cut short by a crash: the full files still hold the records
        finish_compactions(self.path)
        self._segments = closed_segments(self.path)
        self._segment_firsts = [s.first for s in self._segments]
        self._cache = SegmentCache()  # closed segments decompressed for replays
        self._lost: set[Path] = set()  # segments found unreadable (said once each)
        self.missing: list[str] = []  # stretches of seqs no segment holds (a segment deleted or never copied)
        for before, after in zip([Segment(0, 0, self.path), *self._segments], self._segments):
            if after.first != before.last + 1:  # replays skip what it held
                self.missing.append(f"events {before.last + 1}-{after.first - 1} are missing from the journal "
                                    f"(no segment holds them before {after.path.name}); they cannot be replayed")
                log.error("journal: %s", self.missing[-1])
        self._offsets = array("q")  # byte offset of each written seq of the active file, from _first_seq on
        segments_end = self._segments[-1].last if self._segments else 0
        # of the active file: past the newest segment's, or the lost newest segment's (never numbered again)
        self._first_seq = max(segments_end + 1, recorded_next_seq(self.path))
        self._size = 0  # end of the last whole record
        self._rotate_at = segment_bytes  # the active file's size that closes it into segments
        for offset, end, record in iter_records(self.path):
            if record["seq"] <= segments_end:
                continue  # compressed, and the crash came before the file was emptied: a segment holds these
            if not self._offsets:
                self._first_seq = record["seq"]
            self._offsets.append(offset)
            self._size = end
        if self._first_seq > segments_end + 1:  # as the readers say it (proto/journal_format.py)
            where = f"before {self.path.name}" if self._offsets else "(no segment holds them)"
            self.missing.append(f"events {segments_end + 1}-{self._first_seq - 1} are missing from the journal "
                                f"{where}")
            log.error("journal: %s", self.missing[-1])
        unread = os.fstat(self._fd).st_size - self._size
        if unread:  # a record torn by a crash, or a bad byte that makes every record after it unreadable
            self._set_aside(unread)
        os.ftruncate(self._fd, self._size)
        self._rejoin_kept()
        self._read_fd = os.open(self.path, os.O_RDONLY | CLOEXEC)
        self._backlog: list[bytes] = []  # numbered records the disk has not taken yet
        self.backlog_bytes = 0
        self.error: OSError | None = None  # why the backlog is not empty
        self.refused_at: float | None = None  # when (monotonic) the disk last refused a write
        self._retry_at = 0.0  # after a failed write, the next try waits until then
        self.failed_writes = 0
        self.kept_elsewhere: Path | None = None  # where the events the disk refused to the end went instead
        self._last_fsync = time.monotonic()
        self.compact = compact
        self._compact_next = 0  # index in _segments of the oldest segment not yet offered for compaction
        self._compactor = Compactor(self.path, COMPRESS_LEVEL)
        self.compacted_events = 0  # records this process's compactions dropped

    def _set_aside(self, unread: int) -> None:
        """Keep the active file's bytes past its last whole record in a file beside it before they are cut: a torn
        last record is a few bytes, but one bad byte mid-file would otherwise take every event after it with it."""
        after = self._first_seq + len(self._offsets) - 1
        stem = f"{self.path.name}.unreadable-after-{after}-{time.strftime('%Y%m%d-%H%M%S')}"
        kept = next(p for n in range(1000) if not (p := self.path.with_name(stem + (f"-{n}" if n else ""))).exists())
        with open(self.path, "rb") as source, open(kept, "xb") as copy:
            source.seek(self._size)
            while chunk := source.read(1 << 20):
                copy.write(chunk)
            copy.flush()
            os.fsync(copy.fileno())
        line = (f"{self.path.name}: the {unread} bytes after event {after} are not whole records (torn by a crash, "
                f"or damaged) and are kept in {kept.name}; the run's journal goes on from event {after + 1}")
        self.missing.append(line)
        log.error("journal: %s", line)

    def _rejoin_kept(self) -> None:
        """Events an earlier kernel of this run kept in the temporary directory as it closed (its disk refused
        them: kept_events.keep) are appended back when the journal opens again, so a continued run goes on after
        them, not over their seqs."""
        next_seq = self._first_seq + len(self._offsets)
        found = kept_to_rejoin(self.path, next_seq)
        if found is None:
            return
        kept, blob, offsets = found
        try:
            write_all(self._fd, blob, self._size)
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self._size)
            raise
        self._offsets.extend(self._size + offset for offset in offsets)
        self._size += len(blob)
        kept.unlink()
        log.warning("journal %s: events %d-%d, kept in %s when the disk refused them, are back in the journal",
                    self.path, next_seq, next_seq + len(offsets) - 1, kept)

    @property
    def last_seq(self) -> int:
        """The last seq numbered: written, or waiting in the backlog."""
        return self._first_seq + len(self._offsets) + len(self._backlog) - 1

    @property
    def first_seq(self) -> int:
        return self._segments[0].first if self._segments else self._first_seq

    @property
    def segments(self) -> list[Segment]:
        """The closed segments, oldest first, as the bus thread sees them (compactions it has taken in)."""
        return list(self._segments)

    @property
    def written_seq(self) -> int:
        return self._first_seq + len(self._offsets) - 1

    @property
    def overflowing(self) -> bool:
        return self.backlog_bytes > self.backlog_max_bytes

    def overflow_message(self) -> str:
        return (f"the disk holding {self.path} refuses writes ({self.error.strerror if self.error else 'error'}) and "
                f"{self.backlog_bytes / 2**20:.4g} MiB of events are waiting (limit [run] journal_backlog_mb = "
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
            write_all(self._fd, blob, self._size)
        except OSError as exc:
            if self.error is None:
                log.warning("journal %s: %s; holding events in memory (at most %.4g MiB) and retrying", self.path,
                            exc.strerror, self.backlog_max_bytes / 2**20)
            self.error, self.refused_at, self._retry_at = exc, now, now + RETRY_INTERVAL_S
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
        if self._size >= self._rotate_at:
            self._rotate()
        return written

    def _rotate(self) -> None:
        """Compress the active file into closed segments of about segment_bytes each (a file that grew larger, from
        before segments or while the disk refused them, gives several) and start it again empty. Each step is whole
        before the next: every segment is fsynced under a hidden name and renamed, then a new, locked, empty file
        is renamed over the active one. A crash in between leaves records in both, which reopening resolves."""
        closed: list[Segment] = []
        fresh, fd = self.path.parent / f".{self.path.name}.new", -1
        try:
            for segment in write_segments(self.path, self._read_fd, self._offsets, self._size, self._first_seq,
                                          self.segment_bytes):
                closed.append(segment)
            fd = _open_locked(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            fsync_dir(self.path.parent)  # the segments are on disk before the active file is emptied
            os.rename(fresh, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:  # the disk: the active file goes on growing, and tries again a segment later
            log.warning("journal %s: could not close a segment (%s); the active file grows meanwhile", self.path,
                        exc.strerror)
            for path in [s.path for s in closed] + list(self.path.parent.glob(f".{self.path.name}.*")):
                path.unlink(missing_ok=True)  # the active file still holds every record: one copy only
            if fd >= 0:
                os.close(fd)
            self._rotate_at = self._size + self.segment_bytes
            return
        os.close(self._fd)
        os.close(self._read_fd)
        self._fd, self._read_fd = fd, os.open(self.path, os.O_RDONLY | CLOEXEC)
        self._segments.extend(closed)
        self._segment_firsts.extend(s.first for s in closed)
        self._offsets, self._first_seq, self._size = array("q"), self.written_seq + 1, 0
        self._rotate_at = self.segment_bytes
        self._last_fsync = time.monotonic()
        record_next_seq(self.path, self._first_seq)

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
        unless one record alone is larger. A range starting in a closed segment ends with that segment."""
        read = self.read_batch(from_seq, max_events, max_bytes)
        return read.count, read.records

    def read_batch(self, from_seq: int, max_events: int, max_bytes: int) -> ReplayRead:
        """read_range's records, with the seqs they begin at (later than from_seq where records were lost) and end at,
        and whether the seqs they skip were compacted away (a compacted segment's records jump) rather than lost."""
        self._apply_compactions()
        from_seq, lost = max(from_seq, self.first_seq), False
        while from_seq < self._first_seq:
            at = bisect.bisect_right(self._segment_firsts, from_seq) - 1
            segment = self._segments[at]
            blob, offsets, seqs = b"", array("q"), None
            if from_seq <= segment.last and segment.path not in self._lost:
                try:  # one found unreadable is not read again at every replay into it
                    blob, offsets, seqs = self._cache.get(segment)
                except SEGMENT_ERRORS as exc:
                    self._say_lost(segment, f"unreadable ({type(exc).__name__}: {exc})")
            index = from_seq - segment.first if seqs is None else bisect.bisect_left(seqs, from_seq)
            start, end, count = _span(offsets, len(blob), index, max_events, max_bytes)
            if count and seqs is not None:
                # A segment lost on the way here is said as loss (compacted false): the reader's log names the loss
                # with the compacted seqs in it, rather than a compacted flag hiding it.
                return ReplayRead(from_seq, count, blob[start:end], seqs[index + count - 1], not lost)
            if count:
                return ReplayRead(from_seq, count, blob[start:end], from_seq + count - 1)
            # Lost to damage (a segment missing, garbled or cut short): the records after the loss are served, and
            # a reader sees where they begin (PROTOCOL.md §12: a batch may begin after the seq it asked for).
            lost = lost or seqs is None
            from_seq = self._segments[at + 1].first if at + 1 < len(self._segments) else self._first_seq
        start, end, count = _span(self._offsets, self._size, from_seq - self._first_seq, max_events, max_bytes)
        return ReplayRead(from_seq, count, os.pread(self._read_fd, end - start, start) if count else b"",
                          from_seq + count - 1)

    def _say_lost(self, segment: Segment, why: str) -> None:
        if segment.path not in self._lost:  # once per segment: replays of many plugins come back to it
            self._lost.add(segment.path)
            log.error("journal segment %s is %s: its events (%d-%d) cannot be replayed", segment.path, why,
                      segment.first, segment.last)

    # -- compaction -------------------------------------------------------------------------------

    def compact_through(self, seq: int) -> None:
        """Hand the worker the closed segments whose events are all at or before `seq` (the bus's bound: acked by
        every durable plugin, and before the newest checkpoint a persister saved), oldest first. Called by the bus
        thread about once a second: a comparison or two when no segment is due, and never a wait."""
        self._apply_compactions()
        if not self.compact:
            return
        while self._compact_next < len(self._segments):
            segment = self._segments[self._compact_next]
            if segment.last > seq:
                return
            if not segment.compacted and segment.path not in self._lost and not self._compactor.offer(segment):
                return  # the worker's queue is full: offered again at the next call
            self._compact_next += 1

    def _apply_compactions(self) -> None:
        """The worker's results, taken into the bus thread's list of segments (which only this thread reads)."""
        while self._compactor.done:
            full, compacted, dropped = self._compactor.done.popleft()
            if compacted is None:
                continue
            at = bisect.bisect_left(self._segment_firsts, full.first)
            if at < len(self._segments) and self._segments[at].first == full.first:
                self._segments[at] = compacted
            self._cache.drop(full.first)  # its full records, in memory for nothing now
            self.compacted_events += dropped

    def close(self) -> OSError | None:
        """Write what the backlog holds if the disk takes it, fsync, close; the last error, if any."""
        if self._fd < 0:
            return self.error
        self._compactor.stop()
        self._apply_compactions()
        if self._backlog:
            self._retry_at = 0.0  # the last chance: tried now, whenever the last refusal was
            self.append([], self.last_seq + 1)
        if self._backlog:
            self.kept_elsewhere = keep(self.path, self.written_seq + 1, self.last_seq, self._backlog)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = self.error or exc
        os.close(self._fd)
        os.close(self._read_fd)
        self._fd = -1
        self._cache.clear()
        return self.error

    def held_message(self) -> str:
        """What became of the events the disk refused to the end: where they are and how they rejoin the journal."""
        first, last = self.written_seq + 1, self.last_seq
        held = (f"the run's last {last - first + 1} events (seq {first}-{last}) could not be journaled "
                f"({self.error.strerror if self.error else 'error'})")
        if self.kept_elsewhere is None:
            return f"{held}: free space on the disk holding {self.path}"
        return (f"{held}; they are in {self.kept_elsewhere}: once the disk has space, `trainbus runs resume` puts them "
                f"back in the journal, or append them by hand: cat {self.kept_elsewhere} >> {self.path}")


def check_free(path: Path) -> None:
    """JournalInUse when another process holds the journal; nothing else is done to it (a Journal opened for
    this would already cut and set aside its unreadable tail, before the run's log is there to say so)."""
    try:
        os.close(_open_locked(path, os.O_RDONLY))
    except FileNotFoundError:
        pass


def _open_locked(path: Path, flags: int) -> int:
    """The journal file opened and locked (flock) for this process; JournalInUse when another holds it."""
    fd = os.open(path, flags | CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalInUse(f"{path} is held by another process: the run is still going") from None
    return fd


def _span(offsets: array, size: int, index: int, max_events: int, max_bytes: int) -> tuple[int, int, int]:
    """(start, end, count) of the records from index on, within max_events and max_bytes (at least one)."""
    count = len(offsets)
    if index >= count:
        return 0, 0, 0
    end_of = lambda i: offsets[i + 1] if i + 1 < count else size  # noqa: E731
    stop = index + 1  # exclusive; always at least one event so a replay makes progress
    while stop < min(count, index + max_events) and end_of(stop) - offsets[index] <= max_bytes:
        stop += 1
    return offsets[index], end_of(stop - 1), stop - index


def decode_records(blob: bytes) -> list[dict[str, Any]]:
    """Journal bytes as event maps (tests and tools; replay sends the bytes as they are)."""
    unpacker = msgpack.Unpacker(**UNPACK_LIMITS)
    unpacker.feed(blob)
    return list(unpacker)


def read_events(path: Path) -> list[Event]:
    """Every event of a journal (file or run directory), decoded; what `trainbus runs` and the tests read."""
    return list(read_journal(path))
