"""Bytes live here: encode and decode every envelope and control message, with limits and type checks."""

from __future__ import annotations

import math
import zlib
from typing import Any

import msgpack

from .events import COUNTED_BATCH_EVENTS
from .messages import (CONTROL_SCHEMAS, DELIVERY_CLASSES, LOG_LEVELS, PEER_NAME_MAX_CHARS, PROTOCOL_VERSION,
                       REPLY_TYPES, Default, Event)
from .text import cut_utf8

# Limits on what a peer may make us allocate. A hostile or garbled message fails fast with
# ProtocolError instead of costing memory; sockets also cap whole messages (MAX_MESSAGE_BYTES).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a replay batch is the largest message (REPLAY_BATCH_MAX_BYTES)
# One event, less than any message: it must fit alone in a replay_batch (a ~40-byte head around it) and in a burst,
# both bounded by MAX_MESSAGE_BYTES, or a client is dropped at that batch and asks for it again, forever.
MAX_EVENT_BYTES = MAX_MESSAGE_BYTES - 1024
# One control message to the kernel, at most: its ROUTER's MAXMSGSIZE (PROTOCOL.md §3, §9). libzmq drops the
# connection of a larger one, which never arrives to be cut to the kernel's [limits], counted or refused.
CONTROL_MAX_MESSAGE_BYTES = 256 * 1024
MAX_STR_BYTES = 1024 * 1024
MAX_BIN_BYTES = 1024 * 1024
MAX_ARRAY_LEN = 100_000
MAX_MAP_LEN = 10_000
MAX_DEPTH = 1024  # nested arrays and maps msgpack's decoder takes (its stack); deeper raises StackError
# Arrays and maps in one control message a peer sends, at most (decode_control's max_containers, as the kernel reads
# its peers). Each is a Python object the collector tracks, and msgpack builds them with the GIL held: 240 KB of empty
# arrays (under the control socket's MAXMSGSIZE) took ~33 ms to decode, and a flood of them left a run's heartbeats
# 143 s apart. A control message has a few lists of names; an attach_plugin's settings a few more.
MAX_CONTROL_CONTAINERS = 1024
N_COUNTS = len(COUNTED_BATCH_EVENTS)  # the envelope's `n`
# A metric's step and epoch are counts, stored as int64 by what reads them: TensorBoard's Event.step refuses a larger
# one (ValueError, raised in the visualization plugin's handler).
STEP_MAX = 2**63 - 1


def _reject_ext(code: int, data: bytes) -> Any:
    """max_ext_len=0 still lets a zero-length ext (e.g. c7 00 01) through as an ExtType: refuse it too."""
    raise ValueError(f"msgpack ext type {code} is not allowed")


UNPACK_LIMITS = dict(
    raw=False,
    strict_map_key=True,  # map keys must be str or bytes: no tuple/int keys smuggled in
    max_str_len=MAX_STR_BYTES,
    max_bin_len=MAX_BIN_BYTES,
    max_array_len=MAX_ARRAY_LEN,
    max_map_len=MAX_MAP_LEN,
    max_ext_len=0,  # no ext types, ever
    ext_hook=_reject_ext,
    use_list=True,
)


# msgpack's integers: a larger one cannot be packed (a flag, a setting or a hyperparameter of Python's unbounded ints)
MSGPACK_INT_MIN, MSGPACK_INT_MAX = -2**63, 2**64 - 1


def fits_msgpack(value: int) -> bool:
    """Whether msgpack can say this integer."""
    return MSGPACK_INT_MIN <= value <= MSGPACK_INT_MAX


class ProtocolError(ValueError):
    """A message that is not valid protocol v1: garbled bytes, a wrong type, a missing field."""


def pack(obj: Any, packer: msgpack.Packer | None = None) -> bytes:
    """msgpack-encode plain data; the one place our bytes are produced. `packer` (new_packer()): one kept by a
    thread that encodes many messages, the bus's; packb builds a Packer per call (1.5 -> 0.75 us an event)."""
    try:
        if packer is None:
            return msgpack.packb(obj, use_bin_type=True, datetime=False, default=_plain)
        return packer.pack(obj)  # a failed pack leaves the Packer's buffer empty: it can be used again
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode {type(obj).__name__}: {exc}") from exc


def new_packer() -> msgpack.Packer:
    """A Packer producing pack()'s bytes, for one thread's use (a Packer is not thread-safe)."""
    return msgpack.Packer(use_bin_type=True, datetime=False, default=_plain)


def _plain(obj: Any) -> Any:
    """Numbers from numpy or torch (anything with .tolist()) go out as plain msgpack values."""
    tolist = getattr(obj, "tolist", None)
    if tolist is None:
        raise TypeError(f"cannot serialize {type(obj).__name__}")
    return tolist()


class _TooManyContainers(Exception):
    pass


def unpack(raw: bytes, max_containers: int | None = None) -> Any:
    """msgpack-decode one message under the limits, and with at most `max_containers` arrays and maps if given (the
    decoding stops at the next one); anything wrong raises ProtocolError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    hooks: dict[str, Any] = {}
    if max_containers is not None:
        built = [0]

        def counted(container: Any) -> Any:
            built[0] += 1
            if built[0] > max_containers:
                raise _TooManyContainers
            return container
        hooks = {"list_hook": counted, "object_hook": counted}
    try:
        return msgpack.unpackb(raw, **UNPACK_LIMITS, **hooks)
    except _TooManyContainers:
        raise ProtocolError(f"undecodable message: more than {max_containers:,} arrays and maps") from None
    except msgpack.StackError:  # says nothing itself: its empty text read "not msgpack", sending authors to their bytes
        raise ProtocolError(f"undecodable message: nested deeper than {MAX_DEPTH:,} arrays and maps") from None
    except Exception as exc:  # msgpack raises several unrelated types; all mean "garbled"
        why = str(exc) or "not msgpack"  # msgpack's FormatError (a reserved byte, 0xc1) says nothing itself
        raise ProtocolError(f"undecodable message: {exc.__class__.__name__}: {why}") from exc


# -- events -------------------------------------------------------------------------------------

def event_to_map(event: Event) -> dict[str, Any]:
    m = {
        "v": event.v,
        "seq": event.seq,
        "run": event.run,
        "type": event.type,
        "ts": event.ts,
        "step": event.step,
        "epoch": event.epoch,
        "data": event.data,
    }
    if event.n is not None:
        m["n"] = event.n
    return m


def event_from_map(m: Any) -> Event:
    # Every plugin decodes every event it is sent, twice a training step on a small model: what msgpack produces
    # for a well-formed envelope is checked by exact type (msgpack makes no subclasses; bool is not int here), and
    # built with Event.fast. Anything else takes the checking path below, which names what is wrong (4.0 -> 0.8 us).
    if type(m) is dict:
        v, seq, run, type_, ts = m.get("v"), m.get("seq"), m.get("run"), m.get("type"), m.get("ts")
        step, epoch, data, n = m.get("step"), m.get("epoch"), m.get("data"), m.get("n")
        if (type(v) is int and v == PROTOCOL_VERSION and type(seq) is int and seq >= 1 and type(run) is str
                and type(type_) is str and type(ts) is float and type(step) is int and type(epoch) is int
                and type(data) is dict and (n is None or (type(n) is list and len(n) == N_COUNTS and type(n[0]) is int
                                                          and type(n[1]) is int and type(n[2]) is int
                                                          and type(n[3]) is int))):
            return Event.fast(seq, run, type_, ts, step, epoch, data, n)
    return _checked_event_from_map(m)


def _checked_event_from_map(m: Any) -> Event:
    if not isinstance(m, dict):
        raise ProtocolError(f"event envelope must be a map, got {type(m).__name__}")
    _check_version(m)
    seq = _field(m, "seq", int, "event")
    if seq < 1:
        raise ProtocolError(f"event seq must be >= 1, got {seq}")
    data = _field(m, "data", dict, "event")
    n = m.get("n")
    if n is not None and not (isinstance(n, list) and len(n) == N_COUNTS and all(_is_type(c, int) for c in n)):
        raise ProtocolError(f"event field 'n' must be a list of {N_COUNTS} integers, got {n!r:.80}")
    return Event(
        seq=seq,
        run=_field(m, "run", str, "event"),
        type=_field(m, "type", str, "event"),
        ts=float(_field(m, "ts", float, "event")),
        step=_field(m, "step", int, "event"),
        epoch=_field(m, "epoch", int, "event"),
        data=data,
        v=m["v"],
        n=n,
    )


def encode_event(event: Event, check: bool = True, packer: msgpack.Packer | None = None) -> bytes:
    """The envelope's bytes; ProtocolError when a peer could not decode them (int map keys, over-long values) or
    they are over MAX_EVENT_BYTES. check=False leaves out that decode, for data known to be plain numbers (the
    loop's per-step events); the size is checked always."""
    raw = pack(event_to_map(event), packer)
    if len(raw) > MAX_EVENT_BYTES:
        raise ProtocolError(f"event of {len(raw):,} bytes exceeds {MAX_EVENT_BYTES:,} (MAX_EVENT_BYTES)")
    if check:
        unpack(raw)
    return raw


def decode_event(raw: bytes) -> Event:
    return event_from_map(unpack(raw))


def encode_burst(records: list[bytes]) -> bytes:
    """A burst (PROTOCOL.md §4): envelopes as encoded, in seq order, spliced into one msgpack array as they are, then
    zlib (level 1: ~6x smaller for per-batch events at ~0.1 ms per 40 KB, once for every subscriber)."""
    return zlib.compress(msgpack.Packer().pack_array_header(len(records)) + b"".join(records), 1)


def decode_burst(raw: bytes) -> list[Event]:
    """A burst's events; ProtocolError when it or any envelope in it is not as specified. What it inflates to is
    bounded like any message (MAX_MESSAGE_BYTES): a small frame cannot make us allocate gigabytes."""
    if isinstance(raw, (bytes, bytearray, memoryview)) and len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}")
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(raw, MAX_MESSAGE_BYTES)
    except (zlib.error, TypeError, ValueError) as exc:
        raise ProtocolError(f"a burst must be zlib data: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise ProtocolError(f"a burst inflates past {MAX_MESSAGE_BYTES} bytes or is cut short")
    events = unpack(body)
    if type(events) is not list:
        raise ProtocolError(f"a burst must be an array of envelopes, got {type(events).__name__}")
    return [event_from_map(e) for e in events]


# -- control messages ---------------------------------------------------------------------------

def control(type_: str, **fields: Any) -> dict[str, Any]:
    """Build a control message and check it against its schema (so a bad one fails at the sender)."""
    return check_control({"v": PROTOCOL_VERSION, "type": type_, **fields})


def encode_control(message: dict[str, Any]) -> bytes:
    return pack(check_control(message))


# The free text of the replies a plugin sends (a log's text, a metric's name, a stop's or checkpoint's reason)
_TEXT_FIELDS = ("text", "name", "reason")
# What those may take of one control message together: the rest of a reply (its type, numbers, a seq, a short path)
# is well under the room left
CONTROL_TEXT_MAX_BYTES = CONTROL_MAX_MESSAGE_BYTES - 4096


def fit_control(message: dict[str, Any]) -> dict[str, Any]:
    """`message`, its free text cut (text.cut_utf8, saying how much) where the whole would not fit in one control
    message to the kernel: past CONTROL_MAX_MESSAGE_BYTES it is not cut there but lost with the sender's connection."""
    fields = [name for name in _TEXT_FIELDS if type(message.get(name)) is str]
    if sum(len(message[name]) for name in fields) * 4 <= CONTROL_TEXT_MAX_BYTES:  # 4 bytes a character at most
        return message
    sizes = {name: len(message[name].encode("utf-8", "surrogatepass")) for name in fields}
    over = sum(sizes.values()) - CONTROL_TEXT_MAX_BYTES
    if over <= 0:
        return message
    fitted = dict(message)
    for name in sorted(fields, key=sizes.get, reverse=True):  # the longest first: usually the one cut
        if over <= 0:
            break
        fitted[name] = cut_utf8(message[name], max(0, sizes[name] - over))
        over -= sizes[name] - len(fitted[name].encode("utf-8", "surrogatepass"))
    return fitted


def encode_replay_batch(count: int, records: bytes, done: bool, compacted: bool = False) -> bytes:
    """A replay_batch whose `count` events are journal records spliced in as stored: the same bytes as
    packing their decoded maps, without decoding and re-encoding each one. `compacted` is sent only when true: a
    batch without it is byte for byte what clients before it were sent."""
    packer = msgpack.Packer(use_bin_type=True, datetime=False)
    flag = (packer.pack("compacted"), packer.pack(True)) if compacted else ()
    head = b"".join((packer.pack_map_header(4 + len(flag) // 2), packer.pack("v"), packer.pack(PROTOCOL_VERSION),
                     packer.pack("type"), packer.pack("replay_batch"), packer.pack("done"), packer.pack(done),
                     *flag, packer.pack("events"), packer.pack_array_header(count)))
    return head + records


def decode_control(raw: bytes, max_containers: int | None = None) -> dict[str, Any]:
    """Decode and check a control message; a replay_batch's events come back as Event objects. `max_containers`:
    what a peer's message may hold (MAX_CONTROL_CONTAINERS, as the kernel decodes them); None for the kernel's own
    (a replay_batch holds an array of maps)."""
    m = unpack(raw, max_containers)
    if type(m) is dict and m.get("type") == "replay_batch" and type(m.get("events")) is list:
        # Each event checked once, as it becomes an Event (check_control would check it, then we would again).
        events = [event_from_map(e) for e in m["events"]]
        message = check_control(dict(m, events=[]))
        message["events"] = events
        return message
    return check_control(m)


def check_control(m: Any) -> dict[str, Any]:
    """Validate a control message map; return it with only the schema's fields (unknown ones dropped)."""
    if not isinstance(m, dict):
        raise ProtocolError(f"control message must be a map, got {type(m).__name__}")
    _check_version(m)
    kind = _field(m, "type", str, "control")
    schema = CONTROL_SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(f"unknown control message type {kind!r}")
    out: dict[str, Any] = {"v": m["v"], "type": kind}
    for name, expected in schema.items():
        if isinstance(expected, Default):
            default = list(expected.value) if isinstance(expected.value, tuple) else expected.value
            out[name] = _field(m, name, expected.type, kind) if name in m else default
        else:
            out[name] = _field(m, name, expected, kind)
    _check_values(out)
    return out


def _check_values(m: dict[str, Any]) -> None:
    kind = m["type"]
    if kind == "hello" and m["delivery"] not in DELIVERY_CLASSES:
        raise ProtocolError(f"hello.delivery must be one of {DELIVERY_CLASSES}, got {m['delivery']!r}")
    if kind == "hello" and not 1 <= len(m["name"]) <= PEER_NAME_MAX_CHARS:
        raise ProtocolError(f"hello.name must be 1 to {PEER_NAME_MAX_CHARS} characters, got {len(m['name']):,}")
    if kind == "hello" and not REPLY_TYPES.issuperset(m["replies"]):
        unknown = sorted(set(m["replies"]) - REPLY_TYPES)
        raise ProtocolError(f"hello.replies may hold only {sorted(REPLY_TYPES)}, got {unknown}")
    if kind == "log" and m["level"] not in LOG_LEVELS:
        raise ProtocolError(f"log.level must be one of {LOG_LEVELS}, got {m['level']!r}")
    if kind == "metric":
        _check_metric(m)
    if kind == "checkpoint_saved":  # counts and a byte size, shown by `runs show` and the summary as sent
        for field in ("step", "epoch", "size"):
            if not 0 <= m[field] <= STEP_MAX:
                raise ProtocolError(f"checkpoint_saved.{field} must be 0 to 2**63-1, got {m[field]}")
    if kind in ("ack", "replay"):
        field = "seq" if kind == "ack" else "from_seq"
        if m[field] < 0:
            raise ProtocolError(f"{kind}.{field} must be >= 0, got {m[field]}")
    if kind == "replay_batch":
        for e in m["events"]:
            event_from_map(e)


def _check_metric(m: dict[str, Any]) -> None:
    if not math.isfinite(m["value"]):
        raise ProtocolError(f"metric.value must be finite, got {m['value']!r}")
    if not m["name"]:
        raise ProtocolError("metric.name must not be empty: name what the value measures")
    for field in ("step", "epoch"):
        if m[field] is not None and not 0 <= m[field] <= STEP_MAX:
            raise ProtocolError(f"metric.{field} must be nil or 0 to 2**63-1, got {m[field]}")


# -- field checks -------------------------------------------------------------------------------

def _check_version(m: dict) -> None:
    v = m.get("v")
    if not _is_type(v, int):
        if b"v" in m:  # a sender whose msgpack writes str as bin (old msgpack, raw bytes in other languages)
            raise ProtocolError("map keys must be msgpack str, not bin (got b'v'): encode keys and text as str")
        raise ProtocolError(f"missing or non-integer protocol version 'v': {v!r}")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {v} is not supported (this side speaks {PROTOCOL_VERSION})")


def _field(m: dict, name: str, expected: Any, where: str) -> Any:
    if name not in m:
        raise ProtocolError(f"{where}: missing field {name!r}")
    value = m[name]
    if not _is_type(value, expected):
        raise ProtocolError(f"{where}.{name}: expected {_type_name(expected)}, got {_value_type_name(value)}")
    return value


def _is_type(value: Any, expected: Any) -> bool:
    if isinstance(expected, tuple):
        return any(_is_type(value, t) for t in expected)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == list[str]:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, expected)


# A type as msgpack, and PROTOCOL.md §7, name it: the reader of "expected str, got bin" writes Go or JavaScript, where
# a nil slice or an undefined goes out as nil and a []byte as bin; Python's NoneType, bytes and dict meant nothing there
_MSGPACK_NAMES = {type(None): "nil", bytes: "bin", dict: "map", list: "list", bool: "bool", int: "int", float: "float",
                  str: "str"}


def _msgpack_name(type_: Any) -> str:
    return _MSGPACK_NAMES.get(type_) or getattr(type_, "__name__", str(type_))


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " or ".join(_type_name(t) for t in expected)
    if expected == list[str]:  # its __name__ is "list": "expected list, got list" named no problem
        return "list of str"
    return _msgpack_name(expected)


def _value_type_name(value: Any) -> str:
    if isinstance(value, list):  # name what in it is wrong, so the sender sees which element to fix
        odd = sorted({_msgpack_name(type(x)) for x in value if not isinstance(x, str)})
        return f"list holding {' and '.join(odd)}" if odd else "list"
    return _msgpack_name(type(value))
