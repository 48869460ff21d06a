"""Reading the run journal: concatenated msgpack envelopes; a torn or garbled tail ends the read.

A journal is its closed segments (`events.<first>-<last>.gz`, gzip, oldest first) then the active file
(`events`); every reader here takes the active file's path (or the run directory) and reads them all, in seq
order. A compacted segment (`events.<first>-<last>.compacted.gz`) holds only the events compaction keeps
(`kept_by_compaction`): its seqs rise with jumps, which no reader takes for loss. Read whole, streamed
(read_journal, stream_journal), or in bounded pieces from either end (journal_head, journal_tail, last_event_of):
a journal of many GB costs a reader of its ends no more than one of a few KB.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NamedTuple

import msgpack

from . import events as ev
from .codec import MAX_MESSAGE_BYTES, UNPACK_LIMITS, ProtocolError, event_from_map, event_to_map, pack
from .messages import JOURNAL_NAME, Event

HEAD_BYTES = 256 * 1024  # where start_training_session is: after the plugins' hellos (heartbeats at 100 ms)
TAIL_BYTES = 1024 * 1024  # where a run without a summary is now: thousands of events
EPOCH_SCAN_BYTES = 16 * 1024 * 1024  # how far back a running run's last end_epoch is looked for, bytes only
_TYPE_KEY_REACH = 4096  # how far a record's "type" key may be from its start: after v, seq and the run id
_RECORD_WINDOW = 1024 * 1024  # the bytes decoded from where a record found by its bytes starts
DAMAGE_LOOK_BYTES = 1024  # the journal's last few records, read on their own: are there events past a bad byte?

SEGMENT_SUFFIX = ".gz"
COMPACTED_SUFFIX = ".compacted" + SEGMENT_SUFFIX
NEXT_SEQ_SUFFIX = ".next-seq"
SEGMENT_ERRORS = (OSError, EOFError, zlib.error)  # a segment unreadable, cut short or garbled: what it held is lost

# How a reader of a whole journal in another process (`runs plot`'s) tells how far it got: `progress: SEQ` lines on
# its stderr.
READ_PROGRESS = "progress: "

# Nearly all of a long journal: the per-batch events and heartbeats.
FREQUENT_TYPES = ev.BATCH_EVENTS | {ev.HEARTBEAT}
# Compaction keeps the end_training_batch of every this many steps. 80, not a round 100: the plots' record of a run
# (plugins/_history.py) keeps a loss point every every_n_steps (10 by default) steps, twice as far apart each time
# it passes CURVE_POINTS_MAX, so a long run's curve has points every 10 * 2**k steps; from 80 on every such point is
# a multiple of 80, kept, and `runs plot` of a compacted run draws every point it would have drawn of the whole one.
COMPACTION_KEEP_EVERY_STEPS = 80


def kept_by_compaction(record: dict[str, Any]) -> bool:
    """Whether compaction keeps this event map: every event but the frequent kinds (per-batch events, heartbeats:
    what a finished stretch of a run no longer needs), and the end_training_batch of every
    COMPACTION_KEEP_EVERY_STEPS-th step. A compacted segment also keeps its first and last record (Journal)."""
    type_ = record.get("type")
    if type_ not in FREQUENT_TYPES:
        return True
    return type_ == ev.END_TRAINING_BATCH and record.get("step", 1) % COMPACTION_KEEP_EVERY_STEPS == 0

# Every record is pack(event_to_map(event)): a map of the same keys in the same order, with "n" (the counts) or
# without it. msgpack writes a map as a header that holds only its number of entries, then each key and value, so
# every record begins with one of two headers and then the same bytes: the first key, packed. Those mark where a
# record may start when reading from the middle of a journal. They can also stand inside a record (a string "v"
# in its data), so a reader that finds them checks that whole, valid events follow.
_ENVELOPES = [pack(event_to_map(Event(seq=1, run="", type="", ts=0.0, step=0, epoch=0, n=n))) for n in (None, [0])]
_FIRST_KEY = pack(next(iter(event_to_map(Event(seq=1, run="", type="", ts=0.0, step=0, epoch=0)))))
_HEADERS = {envelope.split(_FIRST_KEY, 1)[0] for envelope in _ENVELOPES}  # one byte each: 8 or 9 entries
assert all(len(h) == 1 for h in _HEADERS), _HEADERS


def _record_start(data: bytes, begin: int = 0, end: int | None = None, last: bool = False) -> int:
    """Where in data[begin:end] a record may start (its header, then the first key), the first one or the last;
    -1 when none."""
    end = len(data) if end is None else end
    at = data.rfind(_FIRST_KEY, begin + 1, end + 1) if last else data.find(_FIRST_KEY, begin + 1, end + 1)
    while at != -1:
        if data[at - 1:at] in _HEADERS:
            return at - 1
        at = data.rfind(_FIRST_KEY, begin + 1, at) if last else data.find(_FIRST_KEY, at + 1, end + 1)
    return -1


# -- the journal's files -------------------------------------------------------------------------

class Segment(NamedTuple):
    """A closed segment: the gzip of the consecutive records first..last, named for them; compacted, of those of
    them compaction kept (first and last among them), in order."""
    first: int
    last: int
    path: Path
    compacted: bool = False


def segment_name(active: str | Path, first: int, last: int, compacted: bool = False) -> str:
    """A closed segment's file name: zero-padded so that names sort in seq order (`ls`, `zcat events.*.gz`)."""
    return f"{Path(active).name}.{first:012d}-{last:012d}{COMPACTED_SUFFIX if compacted else SEGMENT_SUFFIX}"


def segment_files(active: str | Path) -> list[Segment]:
    """Every closed segment file beside the active file, oldest first: a range compacted while it was listed (or
    by a kernel that crashed before removing the full one) is there twice, full and compacted."""
    active = Path(active)
    pattern = re.compile(re.escape(active.name) + r"\.(\d+)-(\d+)(\.compacted)?" + re.escape(SEGMENT_SUFFIX))
    try:
        names = os.listdir(active.parent)
    except OSError:
        return []
    found = (pattern.fullmatch(name) for name in names)
    return sorted((Segment(int(m[1]), int(m[2]), active.parent / m[0], bool(m[3])) for m in found if m),
                  key=lambda s: (s.first, s.last, s.compacted))  # of a range there twice, the full one first


def closed_segments(active: str | Path) -> list[Segment]:
    """The journal's closed segments beside its active file, oldest first, one a range: of a range there twice the
    compacted file, which is whole (renamed into place once written and fsynced) while the full one is on its way
    out (a reader that opened it first reads it whole all the same)."""
    chosen: dict[tuple[int, int], Segment] = {}
    for segment in segment_files(active):
        chosen[segment.first, segment.last] = segment  # the compacted one comes after the full one
    return list(chosen.values())


def open_segment(segment: Segment) -> tuple[IO[bytes], bool]:
    """A closed segment opened for reading (gzip), and whether it is compacted: a full one listed and then compacted
    before it was opened is read from its compacted file."""
    try:
        return gzip.open(segment.path, "rb"), segment.compacted
    except FileNotFoundError:
        if segment.compacted:
            raise
        return gzip.open(compacted_path(segment), "rb"), True


def compacted_path(segment: Segment) -> Path:
    """Where a full segment's compacted file goes: its name, `.compacted` before `.gz`."""
    return segment.path.with_name(segment.path.name[:-len(SEGMENT_SUFFIX)] + COMPACTED_SUFFIX)


def next_seq_path(active: str | Path) -> Path:
    """Where a rotation records the seq the emptied active file starts at (`events.next-seq`)."""
    return Path(active).with_name(Path(active).name + NEXT_SEQ_SUFFIX)


def recorded_next_seq(active: str | Path) -> int:
    """The seq the active file began at as its last rotation recorded it, 0 when none is (or it is garbled): a
    lower bound of the journal's next seq that still holds when the newest segment is lost, so a continued run
    numbers no new event with a lost one's seq and readers can tell the loss."""
    try:
        with open(next_seq_path(active), "rb") as f:
            text = f.read(32)
    except OSError:
        return 0
    return int(text) if re.fullmatch(rb"\d{1,18}\n?", text) else 0


def _active_path(path: str | Path) -> Path:
    path = Path(path)
    return path / JOURNAL_NAME if path.is_dir() else path


def _open_journal(path: str | Path) -> tuple[IO[bytes] | None, list[Segment]]:
    """The active file, opened, and the closed segments before it. The active file is opened first: a rotation
    after that closes it into a segment listed here too (its records are then read twice and skipped once), never
    one that neither holds."""
    active = _active_path(path)
    try:
        f = open(active, "rb")
    except OSError:
        f = None
    return f, closed_segments(active)


def _chained(path: str | Path, records: Callable[[IO[bytes], list[int], bool], Iterator[Any]],
             damage: list[str] | None = None, seq_of: Callable[[Any], int] = itemgetter("seq")) -> Iterator[Any]:
    """`records` (maps, or what `seq_of` reads a seq from) of each closed segment, then of the active file, skipping
    seqs already read (records(file, bad offsets, compacted): a compacted file's seqs jump). A segment that
    cannot be read (garbled, cut short) or is missing loses only its own events: the read goes on past it, and
    `damage` (when given) gets a line for each such loss, naming the file and the seqs. A bad record in the active
    file ends the read there (`records` notes its offset): the events past it are named too."""
    active, segments = _open_journal(path)
    last = 0

    def fresh(file_records: Iterator[dict[str, Any]], name: str, compacted: bool = False) -> Iterator[dict[str, Any]]:
        """Those past the last seq read; a jump past it is damage, but within a compacted file (its first record is
        its first seq: a jump into it is damage still). A loop, not a filter's call a record: a reader of a run of
        days goes through 10^7 of them (runs show, runs plot)."""
        nonlocal last
        within = False
        for r in file_records:
            seq = seq_of(r)
            if seq <= last:
                continue
            if seq > last + 1 and damage is not None and not within:
                damage.append(f"events {last + 1}-{seq - 1} are missing from the journal before {name}")
            last, within = seq, compacted
            yield r

    try:
        for segment in segments:
            try:
                f, compacted = open_segment(segment)
                with f:
                    yield from fresh(records(f, [], compacted), segment.path.name, compacted)
            except SEGMENT_ERRORS as exc:
                if damage is not None:
                    damage.append(f"segment {segment.path.name} is unreadable after seq {last} "
                                  f"({type(exc).__name__}: {exc})")
        if active is not None:
            bad: list[int] = []
            yield from fresh(records(active, bad, False), Path(active.name).name)
            if bad and damage is not None:  # not a torn end (that waits for bytes): does a whole event follow?
                ends_at = max((e.seq for e in _events_near_end(path)), default=last)
                if ends_at > last:
                    damage.append(f"the journal cannot be read past event {last}: events {last + 1}-{ends_at} "
                                  f"follow a damaged record (`trainbus run --resume` keeps their bytes beside "
                                  f"the journal)")
        # Read last: a rotation meanwhile records the first seq of a file emptied after this read's copy of it.
        if damage is not None and (recorded := recorded_next_seq(_active_path(path))) > last + 1:
            damage.append(f"events {last + 1}-{recorded - 1} are missing from the journal (no segment holds them)")
    finally:
        if active is not None:
            active.close()


# -- streaming the whole journal -----------------------------------------------------------------

def _valid_records(unpacker: msgpack.Unpacker, checked: Callable[[Any], Any],
                   bad: list[int] | None = None) -> Iterator[tuple[int, int, Any]]:
    """(offset, end offset, checked(map)) of the unpacker's records that `checked` accepts (it raises on any other),
    up to the first it does not (whose offset goes to `bad`)."""
    while True:
        offset = unpacker.tell()
        try:
            record = checked(next(unpacker))
        except StopIteration:
            return  # end of file, or a torn last record (the unpacker waits for bytes that never come)
        except (ProtocolError, ValueError, msgpack.UnpackException):
            if bad is not None:
                bad.append(offset)
            return  # garbage after a crash: everything before it stands
        yield offset, unpacker.tell(), record


def _file_unpacker(f) -> msgpack.Unpacker:
    """A journal file's unpacker, under the codec's limits, with room for two of the largest messages."""
    return msgpack.Unpacker(f, max_buffer_size=2 * MAX_MESSAGE_BYTES, **UNPACK_LIMITS)


def iter_records(path: str | Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(offset, end offset, event map) for every whole, valid record of one file (the active file, say), streamed:
    any size, never read whole."""
    with open(path, "rb") as f:
        yield from _valid_records(_file_unpacker(f), _checked_map)


def read_journal(path: str | Path, damage: list[str] | None = None) -> Iterator[Event]:
    """Every whole event of a journal, closed segments and active file, in order; `path` is the active file or
    its run directory. `damage`: where a line goes for each stretch of events lost (_chained). Each record is
    decoded once, its check and its Event in one (event_from_map)."""
    events = lambda f, bad, _: (e for _, _, e in _valid_records(_file_unpacker(f), event_from_map, bad))  # noqa: E731
    yield from _chained(path, events, damage, seq_of=attrgetter("seq"))


def _checked_map(r: Any) -> dict[str, Any]:
    """The map, once event_from_map accepts it."""
    event_from_map(r)
    return r


def _checked_quickly(r: Any) -> dict[str, Any]:
    """_checked_map, but the frequent kinds get a check of their envelope's types inline: a fifth of the cost of
    decoding every record to an Event."""
    if not (type(r) is dict and r.get("type") in FREQUENT_TYPES and type(r.get("seq")) is int
            and type(r.get("step")) is int and type(r.get("epoch")) is int and type(r.get("data")) is dict
            and type(r.get("ts")) is float and type(r.get("run")) is str and "v" in r):
        event_from_map(r)
    return r


def _consecutive(unpacker: msgpack.Unpacker, bad: list[int] | None = None,
                 jumps: bool = False) -> Iterator[dict[str, Any]]:
    """The unpacker's whole, valid event maps, gap-free by seq (`jumps`, of a compacted segment: rising), up to the
    first torn, garbled or out-of-order one (a garbled one's offset goes to `bad`)."""
    previous = None
    for _, _, r in _valid_records(unpacker, _checked_quickly, bad):
        if previous is not None and (r["seq"] <= previous if jumps else r["seq"] != previous + 1):
            return
        previous = r["seq"]
        yield r


def as_event(r: dict[str, Any]) -> Event:
    """A map the readers here passed, as an Event (already checked: not checked again)."""
    return Event(seq=r["seq"], run=r["run"], type=r["type"], ts=float(r["ts"]), step=r["step"], epoch=r["epoch"],
                 data=r["data"], v=r["v"])


def stream_journal(path: str | Path, damage: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every whole event map of a journal, streamed, in seq order and gap-free within each file; the frequent kinds
    checked quickly. `damage`: as read_journal's."""
    yield from _chained(path, lambda f, bad, compacted: _consecutive(_file_unpacker(f), bad, compacted), damage)


# -- reading the ends of a journal ---------------------------------------------------------------

def _parse(data: bytes, jumps: bool = False) -> Iterator[Event]:
    """The whole, valid, consecutive events at the start of `data` (`jumps`: bytes of a compacted segment among
    them, rising events)."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **UNPACK_LIMITS)
    unpacker.feed(data)
    return (as_event(r) for r in _consecutive(unpacker, jumps=jumps))


def _first_seq(data: bytes) -> int | None:
    """The seq of the record `data` starts with, if it starts with a whole one."""
    return next((e.seq for e in _parse(data[:_RECORD_WINDOW])), None)


def _read_end(path: str | Path, max_bytes: int) -> tuple[int, bytes, bool] | None:
    """(where they start: 0 at a record's start, the bytes, whether a compacted segment's are among them: their seqs
    jump) of the journal's last max_bytes, reaching into the closed segments when the active file holds less; None
    when it cannot be read."""
    active, segments = _open_journal(path)
    if active is None:
        return None
    try:
        with active:
            size = os.fstat(active.fileno()).st_size
            start = max(0, size - max_bytes)
            active.seek(start)
            data = active.read(size - start)
        before = _first_seq(data) if start == 0 and data else None
        jumps = False
        for segment in reversed(segments):  # newest first, those before the active file's first record
            if start > 0 or len(data) >= max_bytes:
                break
            if before is not None and segment.last >= before:
                continue  # rotated after the active file was opened: its records are in `data` already
            f, compacted = open_segment(segment)
            with f:
                older = f.read()
            jumps = jumps or compacted
            start = max(0, len(older) - (max_bytes - len(data)))
            data = older[start:] + data
            before = segment.first
        return start, data, jumps
    except SEGMENT_ERRORS:
        return None


def journal_head(path: str | Path, max_bytes: int = HEAD_BYTES) -> list[Event]:
    """The events in the journal's first max_bytes."""
    return list(_parse(*_head_bytes(path, max_bytes)))


def journal_first(path: str | Path) -> Event | None:
    """The journal's first event (None for none): one record parsed, not a head's thousands."""
    return next(_parse(*_head_bytes(path, HEAD_BYTES)), None)


def _head_bytes(path: str | Path, max_bytes: int) -> tuple[bytes, bool]:
    """The journal's first max_bytes, and whether a compacted segment's are among them."""
    active, segments = _open_journal(path)
    pieces, size, jumps = [], 0, False
    try:
        for segment in segments:
            if size >= max_bytes:
                break
            f, compacted = open_segment(segment)
            with f:
                pieces.append(f.read(max_bytes - size))
            size, jumps = size + len(pieces[-1]), jumps or compacted
        if active is not None and size < max_bytes:
            pieces.append(active.read(max_bytes - size))
    except SEGMENT_ERRORS:
        pass  # what was read stands
    finally:
        if active is not None:
            active.close()
    return b"".join(pieces), jumps


def journal_tail(path: str | Path, max_bytes: int = TAIL_BYTES) -> list[Event]:
    """The events in the journal's last max_bytes, found without reading what comes before them."""
    end = _read_end(path, max_bytes)
    if end is None:
        return []
    start, data, jumps = end
    if start == 0:
        return list(_parse(data, jumps))
    at, single = _record_start(data), []
    while at != -1:
        events = list(_parse(data[at:], jumps))
        if len(events) >= 2:  # a false start inside a record does not go on as consecutive, valid events
            return events
        single = single or events
        at = _record_start(data, at + 1)
    return single


def _events_near_end(path: str | Path, max_bytes: int = DAMAGE_LOOK_BYTES) -> list[Event]:
    """The whole events in the journal's last max_bytes, read from each place a record may start: a bad byte among
    them hides none of those after it (journal_tail's read from the first start stops at it)."""
    end = _read_end(path, max_bytes)
    if end is None:
        return []
    _, data, jumps = end
    found, at = [], 0 if data[:1] in _HEADERS else _record_start(data)
    while at != -1:
        found.extend(_parse(data[at:], jumps))
        at = _record_start(data, at + 1)
    return found


def last_event_of(path: str | Path, type_: str, max_bytes: int = EPOCH_SCAN_BYTES) -> Event | None:
    """The journal's last event of one type within its last max_bytes, found by its bytes (no decoding)."""
    marker = pack("type") + pack(type_)  # the "type" key and its value, as every envelope holds them
    end = _read_end(path, max_bytes)
    if end is None:
        return None
    _, data, jumps = end
    before = len(data)
    while (hit := data.rfind(marker, 0, before)) != -1:
        begin = _record_start(data, max(0, hit - _TYPE_KEY_REACH), hit, last=True)
        if begin != -1:
            event = next(_parse(data[begin:begin + _RECORD_WINDOW], jumps), None)
            if event is not None and event.type == type_:
                return event
        before = hit
    return None
