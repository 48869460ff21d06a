"""Closed journal segments kept decompressed for replays: each one's records with where every record starts, least
recently used out first, within a bound in bytes."""

from __future__ import annotations

from array import array

import msgpack

from trainbus.proto.codec import UNPACK_LIMITS
from trainbus.proto.journal_format import Segment, open_segment

# Closed segments kept decompressed for replays: a resumed run's durable plugins all catch up from seq 1 and soon
# each reads a segment of its own, asking in turn; a cache smaller than their number decompressed a segment at every
# batch (2 kept, 3 plugins: ~20 ms of the kernel's control thread per 512 events instead of ~1). Up to this many
# bytes (seven of the default 8 MiB segments: the five built-in durable plugins and some), at least two segments.
CACHED_SEGMENTS_BYTES = 64 * 2**20
CACHED_SEGMENTS_MIN = 2


class SegmentCache:
    """Decompressed closed segments by first seq, oldest use first: (records, offsets, seqs of a compacted one)."""

    def __init__(self) -> None:
        self._segments: dict[int, tuple[bytes, array, array | None]] = {}
        self.bytes = 0  # what they hold, records and offsets

    def get(self, segment: Segment) -> tuple[bytes, array, array | None]:
        """A closed segment's records, their offsets and, compacted, their seqs, from the cache or the disk."""
        if segment.first in self._segments:
            self._segments[segment.first] = self._segments.pop(segment.first)  # the most recently used goes last
            return self._segments[segment.first]
        f, compacted = open_segment(segment)  # compacted by the worker since it was listed: its compacted file
        with f:
            blob = f.read()
        offsets, seqs = _offsets_in(blob, compacted)
        size = _size(blob, offsets, seqs)
        while len(self._segments) >= CACHED_SEGMENTS_MIN and self.bytes + size > CACHED_SEGMENTS_BYTES:
            self.drop(next(iter(self._segments)))  # the least recently used
        self._segments[segment.first] = blob, offsets, seqs
        self.bytes += size
        return blob, offsets, seqs

    def drop(self, first: int) -> None:
        """The segment that begins at `first` out of the cache, if it is there."""
        if first not in self._segments:
            return
        blob, offsets, seqs = self._segments.pop(first)
        self.bytes -= _size(blob, offsets, seqs)

    def clear(self) -> None:
        self._segments.clear()
        self.bytes = 0


def _offsets_in(blob: bytes, compacted: bool = False) -> tuple[array, array | None]:
    """Where each of a closed segment's records starts (all whole and valid: it was written from whole ones), and,
    compacted, each one's seq (a full segment's are its first seq on, one a record)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(blob), 1), **UNPACK_LIMITS)
    unpacker.feed(blob)
    offsets, seqs = array("q"), array("q") if compacted else None
    while (offset := unpacker.tell()) < len(blob):
        offsets.append(offset)
        if seqs is None:
            unpacker.skip()
        else:
            seqs.append(next(unpacker)["seq"])
    return offsets, seqs


def _size(blob: bytes, offsets: array, seqs: array | None) -> int:
    """What a cached segment holds: its records, their offsets and, compacted, their seqs (as many as offsets)."""
    return len(blob) + offsets.itemsize * len(offsets) * (1 if seqs is None else 2)
