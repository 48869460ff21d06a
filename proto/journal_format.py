"""Reading the run journal file: concatenated msgpack envelopes; a torn or garbled tail ends the read.

Read whole, streamed (iter_records, read_journal, stream_journal), or in bounded pieces from either end
(journal_head, journal_tail, last_event_of): a journal of many GB costs a reader of its ends no more than one
of a few KB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from . import events as ev
from .codec import MAX_MESSAGE_BYTES, UNPACK_LIMITS, ProtocolError, event_from_map, event_to_map, pack
from .messages import JOURNAL_NAME, Event

HEAD_BYTES = 256 * 1024  # where start_training_session is: after the plugins' hellos (heartbeats at 100 ms)
TAIL_BYTES = 1024 * 1024  # where a run without a summary is now: thousands of events
EPOCH_SCAN_BYTES = 16 * 1024 * 1024  # how far back a running run's last end_epoch is looked for, bytes only
_TYPE_KEY_REACH = 4096  # how far a record's "type" key may be from its start: after v, seq and the run id
_RECORD_WINDOW = 1024 * 1024  # the bytes decoded from where a record found by its bytes starts

# Nearly all of a long journal: the per-batch events and heartbeats.
FREQUENT_TYPES = ev.BATCH_EVENTS | {ev.HEARTBEAT}

# Every record is pack(event_to_map(event)): a map of the same keys in the same order. msgpack writes a map as
# a header that holds only its number of entries, then each key and value, so every record begins with the same
# bytes: that header and the first key, packed. They mark where a record may start when reading from the middle
# of a journal. They can also stand inside a record (a string "v" in its data), so a reader that finds them
# checks that whole, valid events follow.
_ENVELOPE = event_to_map(Event(seq=1, run="", type="", ts=0.0, step=0, epoch=0))
_FIRST_KEY = pack(next(iter(_ENVELOPE)))
_RECORD_START = pack(_ENVELOPE).split(_FIRST_KEY, 1)[0] + _FIRST_KEY


# -- streaming the whole journal -----------------------------------------------------------------

def _valid_records(unpacker: msgpack.Unpacker,
                   check: Callable[[Any], Any]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(offset, end offset, map) of the unpacker's records that `check` accepts, up to the first it does not."""
    while True:
        offset = unpacker.tell()
        try:
            record = next(unpacker)
            check(record)
        except StopIteration:
            return  # end of file, or a torn last record (the unpacker waits for bytes that never come)
        except (ProtocolError, ValueError, msgpack.UnpackException):
            return  # garbage after a crash: everything before it stands
        yield offset, unpacker.tell(), record


def _file_unpacker(f) -> msgpack.Unpacker:
    """A journal file's unpacker, under the codec's limits, with room for two of the largest messages."""
    return msgpack.Unpacker(f, max_buffer_size=2 * MAX_MESSAGE_BYTES, **UNPACK_LIMITS)


def iter_records(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(offset, end offset, event map) for every whole, valid record, streamed: any size, never read whole."""
    with open(path, "rb") as f:
        yield from _valid_records(_file_unpacker(f), event_from_map)


def read_journal(path: str | Path) -> Iterator[Event]:
    """Every whole event of a journal, in order; `path` is the journal file or its run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / JOURNAL_NAME
    for _, _, record in iter_records(path):
        yield event_from_map(record)


def _check_quickly(r: Any) -> None:
    """event_from_map's check, but the frequent kinds get a check of their envelope's types inline: a fifth of
    the cost of decoding every record to an Event."""
    if not (type(r) is dict and r.get("type") in FREQUENT_TYPES and type(r.get("seq")) is int
            and type(r.get("step")) is int and type(r.get("epoch")) is int and type(r.get("data")) is dict
            and type(r.get("ts")) is float and type(r.get("run")) is str and "v" in r):
        event_from_map(r)


def _consecutive(unpacker: msgpack.Unpacker) -> Iterator[dict[str, Any]]:
    """The unpacker's whole, valid event maps, gap-free by seq, up to the first torn, garbled or out-of-order one."""
    previous = None
    for _, _, r in _valid_records(unpacker, _check_quickly):
        if previous is not None and r["seq"] != previous + 1:
            return
        previous = r["seq"]
        yield r


def as_event(r: dict[str, Any]) -> Event:
    """A map the readers here passed, as an Event (already checked: not checked again)."""
    return Event(seq=r["seq"], run=r["run"], type=r["type"], ts=float(r["ts"]), step=r["step"], epoch=r["epoch"],
                 data=r["data"], v=r["v"])


def stream_journal(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every whole event map of a journal, streamed and gap-free by seq; the frequent kinds checked quickly."""
    with open(path, "rb") as f:
        yield from _consecutive(_file_unpacker(f))


# -- reading the ends of a journal ---------------------------------------------------------------

def _parse(data: bytes) -> Iterator[Event]:
    """The whole, valid, consecutive events at the start of `data`."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **UNPACK_LIMITS)
    unpacker.feed(data)
    return (as_event(r) for r in _consecutive(unpacker))


def _read_end(path: str | Path, max_bytes: int) -> tuple[int, bytes] | None:
    """(where they start, the bytes) of the file's last max_bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - max_bytes)
            f.seek(start)
            return start, f.read(size - start)
    except OSError:
        return None


def journal_head(path: str | Path, max_bytes: int = HEAD_BYTES) -> list[Event]:
    """The events in the journal's first max_bytes."""
    try:
        with open(path, "rb") as f:
            return list(_parse(f.read(max_bytes)))
    except OSError:
        return []


def journal_tail(path: str | Path, max_bytes: int = TAIL_BYTES) -> list[Event]:
    """The events in the journal's last max_bytes, found without reading what comes before them."""
    end = _read_end(path, max_bytes)
    if end is None:
        return []
    start, data = end
    if start == 0:
        return list(_parse(data))
    at, single = data.find(_RECORD_START), []
    while at != -1:
        events = list(_parse(data[at:]))
        if len(events) >= 2:  # a false start inside a record does not go on as consecutive, valid events
            return events
        single = single or events
        at = data.find(_RECORD_START, at + 1)
    return single


def last_event_of(path: str | Path, type_: str, max_bytes: int = EPOCH_SCAN_BYTES) -> Event | None:
    """The journal's last event of one type within its last max_bytes, found by its bytes (no decoding)."""
    marker = pack("type") + pack(type_)  # the "type" key and its value, as every envelope holds them
    end = _read_end(path, max_bytes)
    if end is None:
        return None
    _, data = end
    before = len(data)
    while (hit := data.rfind(marker, 0, before)) != -1:
        begin = data.rfind(_RECORD_START, max(0, hit - _TYPE_KEY_REACH), hit)
        if begin != -1:
            event = next(_parse(data[begin:begin + _RECORD_WINDOW]), None)
            if event is not None and event.type == type_:
                return event
        before = hit
    return None
