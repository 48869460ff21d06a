"""A journal's closed segments compacted (PROTOCOL.md §13): a worker thread rewrites each segment it is handed
into `events.<first>-<last>.compacted.gz`, keeping what `kept_by_compaction` keeps, and a crash between its
rename and the full segment's removal is finished at the next open.

The Journal owns one Compactor and decides what is due (`Journal.compact_through`, from the bus's bound); the
worker touches only files, and hands its results back for the bus thread to take in.
"""

from __future__ import annotations

import collections
import gzip
import logging
import os
import queue
import threading
from pathlib import Path

import msgpack

from trainbus.proto.codec import UNPACK_LIMITS
from trainbus.proto.journal_format import SEGMENT_ERRORS, Segment, compacted_path, kept_by_compaction, segment_files

from .durable_writes import replace_file

log = logging.getLogger("trainbus.kernel")

# Segments waiting for the worker: it takes one at a time (0.15-0.4 s an 8 MiB segment on this busy 2-core box,
# docs/benchmarks.md); what does not fit is offered again at the next compact_through, so the bus thread never
# waits on a full queue.
COMPACT_QUEUE = 4
COMPACT_JOIN_S = 10.0  # stop() waits this long for a compaction under way, then leaves it (both files stay whole)


class Compactor:
    """The worker thread, started with the first segment offered; its results wait in `done` for the bus thread:
    (the full segment, its compacted one or None when it could not be compacted, records dropped)."""

    def __init__(self, journal: Path, compress_level: int):
        self.journal = journal
        self.compress_level = compress_level
        self._todo: queue.Queue[Segment | None] = queue.Queue(COMPACT_QUEUE)
        self.done: collections.deque[tuple[Segment, Segment | None, int]] = collections.deque()
        self._thread: threading.Thread | None = None

    def offer(self, segment: Segment) -> bool:
        """Queue a segment; False when the queue is full (offer it again later). Never waits."""
        try:
            self._todo.put_nowait(segment)
        except queue.Full:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="trainbus-compaction", daemon=True)
            self._thread.start()
        return True

    def stop(self) -> None:
        """Drop what has not begun (left whole, offered again by the next kernel), and wait for the one under way."""
        if self._thread is None:
            return
        try:
            while True:
                self._todo.get_nowait()
        except queue.Empty:
            pass
        self._todo.put(None)
        self._thread.join(COMPACT_JOIN_S)
        self._thread = None

    def _work(self) -> None:
        while (segment := self._todo.get()) is not None:
            self.done.append((segment, *self.compact(segment)))

    def compact(self, segment: Segment) -> tuple[Segment | None, int]:
        """Rewrite one closed segment with only the records compaction keeps: to a hidden file, fsynced, renamed to
        its compacted name, the directory fsynced, then the full one removed. (its compacted Segment, records
        dropped); (None, 0) when it could not (said in kernel.log), the full segment left as it was."""
        target = compacted_path(segment)
        try:
            with open(segment.path, "rb") as f:
                kept, dropped = kept_records(gzip.decompress(f.read()))
            replace_file(target, gzip.compress(kept, self.compress_level, mtime=0))
        except (*SEGMENT_ERRORS, ValueError, msgpack.UnpackException) as exc:
            log.warning("journal %s: could not compact %s (%s: %s); it is kept whole", self.journal,
                        segment.path.name, type(exc).__name__, exc)
            return None, 0
        try:  # readers take the compacted file of a range that has both; a kernel reopening removes the full one
            os.unlink(segment.path)
        except OSError as exc:
            log.warning("journal %s: compacted %s but could not remove it (%s)", self.journal, segment.path.name,
                        exc.strerror)
        return Segment(segment.first, segment.last, target, True), dropped


def kept_records(blob: bytes) -> tuple[bytes, int]:
    """A closed segment's records that compaction keeps, as stored: its first and last (so its name's seq range
    holds, and a continued run finds the last event's counts), and those kept_by_compaction keeps; and how many
    were dropped."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(blob), 1), **UNPACK_LIMITS)
    unpacker.feed(blob)
    kept, dropped, start = [], 0, 0
    for record in unpacker:
        end = unpacker.tell()
        if start == 0 or end == len(blob) or kept_by_compaction(record):
            kept.append(blob[start:end])
        else:
            dropped += 1
        start = end
    return b"".join(kept), dropped


def finish_compactions(active: Path) -> None:
    """A range left both full and compacted (a crash between the rename and the removal) keeps its compacted file,
    which was whole before it was renamed into place and was made under the policy (so the events it lacks were
    meant to go): the full one is removed, as the compaction would have. One that does not read whole is removed
    instead, and the full one kept: nothing compaction keeps is lost."""
    files = segment_files(active)
    for full, compacted in zip(files, files[1:]):
        if (full.first, full.last) != (compacted.first, compacted.last) or full.compacted or not compacted.compacted:
            continue
        try:
            with open(compacted.path, "rb") as f:
                gzip.decompress(f.read())
            gone = full
        except SEGMENT_ERRORS:
            gone = compacted
        gone.path.unlink()
        log.warning("journal %s: %s and %s held the same events (a compaction cut short); %s is removed", active,
                    full.path.name, compacted.path.name, gone.path.name)
