"""Reading the run journal file: concatenated msgpack envelopes; a torn or garbled tail ends the read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import msgpack

from .codec import MAX_MESSAGE_BYTES, UNPACK_LIMITS, ProtocolError, event_from_map
from .messages import JOURNAL_NAME, Event


def iter_records(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(offset, end offset, event map) for every whole, valid record, streamed: any size, never read whole."""
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, max_buffer_size=2 * MAX_MESSAGE_BYTES, **UNPACK_LIMITS)
        while True:
            offset = unpacker.tell()
            try:
                record = next(unpacker)
                event_from_map(record)
            except StopIteration:
                return  # end of file, or a torn last record (the unpacker waits for bytes that never come)
            except (ProtocolError, ValueError, msgpack.UnpackException):
                return  # garbage after a crash: everything before it stands
            yield offset, unpacker.tell(), record


def read_journal(path: str | Path) -> Iterator[Event]:
    """Every whole event of a journal, in order; `path` is the journal file or its run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / JOURNAL_NAME
    for _, _, record in iter_records(path):
        yield event_from_map(record)
