"""The journal's active file closed into gzip segments beside it (`events.<first>-<last>.gz`): its records cut into
pieces of about segment_bytes, each compressed and written whole before it takes its name, and the seq the emptied
active file goes on from recorded beside it."""

from __future__ import annotations

import bisect
import gzip
import logging
import os
from array import array
from pathlib import Path
from typing import Iterator

from trainbus.proto.journal_format import Segment, next_seq_path, segment_name

from .durable_writes import replace_file

log = logging.getLogger("trainbus.kernel")

COMPRESS_LEVEL = 1  # level 6 gains a sixth in size for four times the time


def write_segments(path: Path, read_fd: int, offsets: array, size: int, first_seq: int,
                   segment_bytes: int) -> Iterator[Segment]:
    """Each closed segment as it is written from the active file at `path` (read through `read_fd`; its records
    start at `offsets`, the first numbered `first_seq`, and end at `size`): fsynced under a hidden name, then
    renamed. OSError from the disk ends it; what it yielded so far is on disk."""
    for start, stop in _pieces(offsets, size, segment_bytes):
        first, last = first_seq + start, first_seq + stop - 1
        segment = Segment(first, last, path.parent / segment_name(path, first, last))
        begin, end = offsets[start], offsets[stop] if stop < len(offsets) else size
        # the directory is fsynced once, by the caller, before the active file is emptied
        replace_file(segment.path, gzip.compress(os.pread(read_fd, end - begin, begin), COMPRESS_LEVEL, mtime=0),
                     sync_dir=False)
        yield segment


def record_next_seq(path: Path, next_seq: int) -> None:
    """The emptied active file's first seq, in a file beside it: the newest segment is then the only other
    record of where the journal goes on, and one lost (a bad copy, a hand freeing space) would have a continued
    run number new events with its seqs. Not kept (a full disk), the newest segment is the one record left."""
    marker = next_seq_path(path)
    try:
        replace_file(marker, b"%d\n" % next_seq)
    except OSError as exc:
        log.warning("journal %s: could not record the seq it goes on from in %s (%s)", path, marker.name,
                    exc.strerror)


def _pieces(offsets: array, size: int, segment_bytes: int) -> list[tuple[int, int]]:
    """The active file's records as (start, stop) index ranges of about segment_bytes each: the last append
    crosses the size a little, and that little goes with the piece before it, not into a segment of its own."""
    pieces, start = [], 0
    while start < len(offsets):
        stop = bisect.bisect_left(offsets, offsets[start] + segment_bytes, start + 1)
        pieces.append((start, stop))
        start = stop
    if len(pieces) >= 2 and size - offsets[pieces[-1][0]] < segment_bytes // 2:
        pieces[-2:] = [(pieces[-2][0], pieces[-1][1])]
    return pieces
