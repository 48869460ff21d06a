"""The codec: encode and decode are inverses, and decoding anything raises nothing but ProtocolError."""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from trainbus.proto import (
    CONTROL_SCHEMAS,
    MAX_MESSAGE_BYTES,
    Event,
    ProtocolError,
    control,
    decode_burst,
    decode_control,
    decode_event,
    encode_burst,
    encode_control,
    encode_event,
    event_to_map,
    events as ev,
    pack,
    unpack,
)
from trainbus.proto.codec import MAX_ARRAY_LEN, MAX_BIN_BYTES, MAX_MAP_LEN, MAX_STR_BYTES, new_packer
from trainbus.proto.messages import KERNEL_TO_PLUGIN, PLUGIN_TO_KERNEL

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EVENT = Event(seq=7, run="run-1", type=ev.END_EPOCH, ts=1_700_000_000.25, step=120, epoch=2,
              data={"training_loss": 0.5, "validation_loss": None, "training_metrics": {"accuracy": 0.9},
                    "stop_reasons": ["a", "b"], "blob": b"\x00\xff", "stopped_early": False})
HEARTBEAT = Event(seq=1, run="run-1", type=ev.HEARTBEAT, ts=1_700_000_000.0, step=0, epoch=0,
                  data={"interval_s": 1.0})

# One or more valid messages of every control type; test_examples_cover_every_schema keeps this complete.
VALID_CONTROL: dict[str, list[dict]] = {
    "hello": [dict(name="metrics_log", pid=4242, subscriptions=[""], replies=["stop", "metric"], delivery="durable",
                   votes=[], capabilities=[], secret=""),
              dict(name="x", pid=1, subscriptions=["heartbeat", "end_epoch"], replies=[], delivery="best_effort",
                   votes=["end_epoch"], capabilities=["checkpoint"], secret="ab" * 32)],
    "heartbeat": [{}],
    "ack": [dict(seq=0), dict(seq=2**63)],
    "replay": [dict(from_seq=1), dict(from_seq=0)],
    "bye": [dict(reason="done")],
    "stop": [dict(reason="validation loss went up 3 epochs in a row", id=""), dict(reason="from the terminal", id="c-1")],
    "metric": [dict(name="grad_norm", value=1.5, step=10, epoch=None), dict(name="n", value=3, step=None, epoch=None),
               dict(name="val/f1", value=0.5, step=45, epoch=1)],
    "log": [dict(level=level, text="héllo") for level in ("debug", "info", "warning", "error")],
    "checkpoint_now": [dict(reason="best so far", id=""), dict(reason="now", id="c-2")],
    "checkpoint_saved": [dict(seq=40, path="/runs/r/checkpoints/epoch001.pt", step=45, epoch=1, sha256="ab" * 32,
                              size=123456)],
    "checkpoint_failed": [dict(seq=41, reason="No space left on device (errno 28)")],
    "snapshot": [{}],
    "attach_plugin": [dict(name="metrics_log", settings={"every_n_steps": 5}, from_start=False, id=""),
                      dict(name="email", settings={}, from_start=True, id="c-3")],
    "detach_plugin": [dict(name="metrics_log", id="c-4")],
    "command_result": [dict(id="c-3", ok=True, text="started email in run r (pid 4242, from seq 1)"),
                       dict(id="", ok=False, text="unknown plugin 'x'; installed: console, metrics_log")],
    "run_state": [dict(seq=0, state={}),
                  dict(seq=7, state={"run": {"id": "run-1", "epochs": 2}, "series": {"loss": {"value": 0.5}}})],
    "welcome": [dict(run="run-1", heartbeat_interval_s=1.0, resume_from=1, session_seq=1, role="", farewell=False),
                dict(run="r", heartbeat_interval_s=2, resume_from=99, session_seq=40, role="monitor", farewell=True)],
    "farewell": [{}],
    "replay_batch": [dict(events=[event_to_map(HEARTBEAT), event_to_map(EVENT)], done=True, compacted=True),
                     dict(events=[], done=False, compacted=False)],
    "refused": [dict(reason="hello as 'metrics_log' refused: wrong secret", welcome_lost=True, code="hello_secret"),
                dict(reason="x: stop is not among the replies its hello declared", welcome_lost=False, code="")],
}
CONTROL_EXAMPLES = [(kind, fields) for kind, examples in VALID_CONTROL.items() for fields in examples]


def _expected_decoded(kind: str, fields: dict) -> dict:
    """What decode_control returns: the same map, except replay_batch events arrive as Event objects."""
    expected = {"v": 1, "type": kind, **fields}
    if kind == "replay_batch":
        expected["events"] = [Event(**e) for e in fields["events"]]
    return expected


# -- (a) round trips ----------------------------------------------------------------------------

def test_examples_cover_every_schema():
    assert set(VALID_CONTROL) == set(CONTROL_SCHEMAS) == PLUGIN_TO_KERNEL | KERNEL_TO_PLUGIN
    for kind, fields in CONTROL_EXAMPLES:
        assert set(fields) == set(CONTROL_SCHEMAS[kind]), f"VALID_CONTROL[{kind!r}] is out of date with its schema"


def test_event_round_trip():
    assert decode_event(encode_event(EVENT)) == EVENT
    assert decode_event(encode_event(HEARTBEAT)) == HEARTBEAT


def test_a_burst_is_its_envelopes_as_one_array_and_decodes_to_its_events():
    records = [encode_event(EVENT), encode_event(HEARTBEAT)]
    burst = encode_burst(records)
    # the records spliced in as they are, zlib'd
    assert zlib.decompress(burst) == msgpack.packb([unpack(r) for r in records], use_bin_type=True)
    assert decode_burst(burst) == [EVENT, HEARTBEAT]
    assert decode_burst(encode_burst([])) == []
    with pytest.raises(ProtocolError, match="array of envelopes"):
        decode_burst(zlib.compress(encode_event(EVENT)))  # one envelope alone is not a burst
    with pytest.raises(ProtocolError, match="zlib"):
        decode_burst(encode_event(EVENT))  # nor is it uncompressed
    with pytest.raises(ProtocolError):
        decode_burst(encode_burst([records[0], pack({"v": 1, "seq": 0})]))  # a garbled envelope in it
    with pytest.raises(ProtocolError, match="cut short"):
        decode_burst(burst[:-4])
    bomb = zlib.compress(bytes(MAX_MESSAGE_BYTES + 1), 9)  # 16 KiB that would inflate past the cap
    assert len(bomb) < 20_000
    with pytest.raises(ProtocolError, match="inflates past"):
        decode_burst(bomb)


def test_the_bus_cuts_a_flush_into_bursts_under_the_cap_keeping_every_record_in_order():
    from trainbus.kernel.publishers import bursts_of
    values = [bytes([i]) * (10 + i) for i in range(40)]
    records = [msgpack.packb(v) for v in values]
    for cap in (1, 25, 100, 10_000):
        bursts = [zlib.decompress(b) for b in bursts_of(records, max_bytes=cap)]
        assert [v for b in bursts for v in msgpack.unpackb(b)] == values, cap
        for b in bursts:
            held = [msgpack.packb(v) for v in msgpack.unpackb(b)]
            assert len(held) == 1 or sum(map(len, held)) <= cap, (cap, list(map(len, held)))
    assert len(bursts_of(records, max_bytes=10_000)) == 1 and bursts_of([]) == []


@pytest.mark.parametrize(("kind", "fields"), CONTROL_EXAMPLES, ids=[k for k, _ in CONTROL_EXAMPLES])
def test_control_round_trip(kind, fields):
    message = control(kind, **fields)
    assert decode_control(encode_control(message)) == _expected_decoded(kind, fields)


def test_unknown_control_fields_are_dropped_and_missing_ones_rejected():
    raw = pack({"v": 1, "type": "stop", "reason": "r", "added_in_v1_1": [1, 2]})
    assert decode_control(raw) == {"v": 1, "type": "stop", "reason": "r", "id": ""}  # id: optional, added in v1
    with pytest.raises(ProtocolError, match="missing field 'reason'"):
        decode_control(pack({"v": 1, "type": "stop"}))


def test_bin_map_keys_are_named_as_the_problem():
    """A sender whose msgpack writes text as bin (raw bytes keys): dropped, saying so, not 'missing version'."""
    raw = msgpack.packb({b"v": 1, b"type": b"metric", b"name": b"x", b"value": 1.0}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="map keys must be msgpack str, not bin"):
        decode_control(raw)
    with pytest.raises(ProtocolError, match="map keys must be msgpack str, not bin"):
        decode_event(raw)


def test_a_list_field_holding_a_non_str_names_the_element_type_not_list_for_list():
    """kernel.log said `hello.subscriptions: expected list, got list` for `subscriptions: [1]`: no hint that the
    elements must be str. An implementer in another language reads this line to find what to fix."""
    hello = dict(v=1, type="hello", name="x", pid=1, subscriptions=[1], replies=[], delivery="durable")
    with pytest.raises(ProtocolError, match=r"^hello\.subscriptions: expected list of str, got list holding int$"):
        decode_control(pack(hello))
    # msgpack's names, as PROTOCOL.md §7 says the types, not Python's: a Go or JavaScript author whose nil slice or
    # undefined went out as nil read `got NoneType`, and one whose []byte went out as bin `got bytes`
    with pytest.raises(ProtocolError, match=r"^hello\.votes: expected list of str, got nil$"):
        decode_control(pack(dict(hello, subscriptions=[""], votes=None)))
    with pytest.raises(ProtocolError, match=r"^hello\.name: expected str, got bin$"):
        decode_control(pack(dict(hello, subscriptions=[""], name=b"x")))
    with pytest.raises(ProtocolError, match=r"^hello\.subscriptions: expected list of str, got list holding bin and "
                                            r"nil$"):
        decode_control(pack(dict(hello, subscriptions=[b"x", None])))
    with pytest.raises(ProtocolError, match=r"^metric\.step: expected int or nil, got str$"):
        decode_control(pack(dict(v=1, type="metric", name="m", value=1.0, step="3")))
    with pytest.raises(ProtocolError, match=r"^attach_plugin\.settings: expected map, got list$"):
        decode_control(pack(dict(v=1, type="attach_plugin", name="cpu", settings=[])))


def test_control_rejects_bad_values_at_the_sender():
    for kind, fields in [("hello", dict(VALID_CONTROL["hello"][0], delivery="sometimes")),
                         ("hello", dict(VALID_CONTROL["hello"][0], replies=["stop", "bogus"])),
                         ("log", dict(level="fatal", text="x")),
                         ("metric", dict(name="m", value=math.nan, step=None)),
                         ("metric", dict(name="m", value=math.inf, step=None)),
                         ("metric", dict(name="m", value=1.0, step=-1)),
                         ("metric", dict(name="m", value=1.0, step=2**63)),
                         ("metric", dict(name="m", value=1.0, step=None, epoch=-1)),
                         ("metric", dict(name="m", value=1.0, step=1, epoch=2**64 - 1)),
                         ("metric", dict(name="", value=1.0, step=1)),
                         *(("checkpoint_saved", dict(dict(seq=3, path="c.pt", step=1, epoch=1, sha256="ab", size=1),
                                                     **{field: bad})) for field in ("step", "epoch", "size")
                           for bad in (-1, 2**63)),
                         ("ack", dict(seq=-1)),
                         ("replay", dict(from_seq=-5)),
                         ("replay_batch", dict(events=[{"v": 1}], done=True))]:
        with pytest.raises(ProtocolError):
            control(kind, **fields)


def test_a_broken_constraint_is_said_naming_the_field_as_sent():
    """PROTOCOL.md §11: a broken Constraint is logged as one line naming the field, its constraint and the value
    found. A replay with from_seq -1 was logged as "replay seq must be >= 0": no field of a replay is `seq`."""
    for kind, fields, said in [("replay", dict(from_seq=-1), "replay.from_seq must be >= 0, got -1"),
                               ("ack", dict(seq=-2), "ack.seq must be >= 0, got -2")]:
        with pytest.raises(ProtocolError) as raised:
            decode_control(pack({"v": 1, "type": kind, **fields}))
        assert str(raised.value) == said


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text()
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
events_strategy = st.builds(
    Event,
    seq=st.integers(1, 2**63),
    run=st.text(max_size=20),
    type=st.sampled_from(sorted(ev.ALL_EVENTS)) | st.text(max_size=20),
    ts=st.floats(allow_nan=False),
    step=st.integers(-(2**63), 2**63),
    epoch=st.integers(-(2**63), 2**63),
    data=st.dictionaries(st.text(max_size=8), json_like, max_size=5),
)


@FUZZ
@given(events_strategy)
def test_any_event_round_trips(event):
    assert decode_event(encode_event(event)) == event


# -- (b) nothing but ProtocolError escapes decoding -----------------------------------------------

def _decodes_or_protocol_error(raw: bytes) -> None:
    """Each decoder either succeeds or raises ProtocolError; any other exception fails the test."""
    for decode in (decode_event, decode_control, decode_burst, unpack):
        try:
            decode(raw)
        except ProtocolError:
            pass


VALID_ENCODINGS = [encode_event(EVENT), encode_event(HEARTBEAT), encode_burst([encode_event(EVENT)])] + [
    encode_control(control(kind, **fields)) for kind, fields in CONTROL_EXAMPLES]


@st.composite
def mutated_encodings(draw) -> bytes:
    """Valid messages truncated, extended or with bytes overwritten: reaches far deeper than pure noise."""
    raw = bytearray(draw(st.sampled_from(VALID_ENCODINGS)))
    for _ in range(draw(st.integers(1, 4))):
        if raw and draw(st.booleans()):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        else:
            raw[draw(st.integers(0, len(raw))):draw(st.integers(0, len(raw)))] = draw(st.binary(max_size=8))
    return bytes(raw)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_error(raw):
    _decodes_or_protocol_error(raw)


@FUZZ
@given(mutated_encodings())
def test_mutated_messages_raise_only_protocol_error(raw):
    _decodes_or_protocol_error(raw)


any_msgpack = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)


@FUZZ
@given(any_msgpack)
def test_random_structures_raise_only_protocol_error(obj):
    _decodes_or_protocol_error(msgpack.packb(obj, use_bin_type=True))


VALID_MAPS = [event_to_map(EVENT)] + [{"v": 1, "type": kind, **fields} for kind, fields in CONTROL_EXAMPLES]


@st.composite
def right_keys_wrong_values(draw) -> dict:
    """A valid envelope or control map with some of its fields (v and type included) replaced at random."""
    base = dict(draw(st.sampled_from(VALID_MAPS)))
    for key in draw(st.lists(st.sampled_from(sorted(base)), min_size=1, max_size=len(base), unique=True)):
        base[key] = draw(any_msgpack)
    return base


@FUZZ
@given(right_keys_wrong_values())
def test_wrong_typed_fields_raise_only_protocol_error(m):
    raw = msgpack.packb(m, use_bin_type=True)
    _decodes_or_protocol_error(raw)
    try:
        decoded = decode_control(raw)
    except ProtocolError:
        return
    # whatever got through has exactly its schema's fields
    assert set(decoded) == {"v", "type"} | set(CONTROL_SCHEMAS[decoded["type"]])


# -- (c) limits and strictness ----------------------------------------------------------------------

def _envelope(**changes) -> dict:
    return dict(event_to_map(EVENT), **changes)


LIMIT_CASES = {
    "string over MAX_STR_BYTES": msgpack.packb(
        {"v": 1, "type": "log", "level": "info", "text": "x" * (MAX_STR_BYTES + 1)}),
    "binary over MAX_BIN_BYTES": msgpack.packb(_envelope(data={"blob": b"x" * (MAX_BIN_BYTES + 1)})),
    "array over MAX_ARRAY_LEN": msgpack.packb(
        {"v": 1, "type": "replay_batch", "events": [None] * (MAX_ARRAY_LEN + 1), "done": True}),
    "map over MAX_MAP_LEN": msgpack.packb(_envelope(data={str(i): i for i in range(MAX_MAP_LEN + 1)})),
    "ext type": msgpack.packb(_envelope(data={"when": msgpack.ExtType(1, b"abcd")})),
    "zero-length ext type": msgpack.packb(_envelope(data={"when": msgpack.ExtType(1, b"")})),
    "map with int keys": msgpack.packb(_envelope(data={1: "one"})),
    "bool where int expected (seq=True)": msgpack.packb(_envelope(seq=True)),
    "v=2": msgpack.packb(_envelope(v=2)),
    "bool version (v=True)": msgpack.packb(_envelope(v=True)),
    "bool step": msgpack.packb(_envelope(step=False)),
    "data not a map": msgpack.packb(_envelope(data=[1])),
    "v missing": msgpack.packb({k: v for k, v in event_to_map(EVENT).items() if k != "v"}),
    "seq 0": msgpack.packb(_envelope(seq=0)),
    "trailing bytes": encode_event(EVENT) + b"\xc0",
    "invalid utf-8": msgpack.packb(_envelope(run=b"\xff\xfe"), use_bin_type=False),
    "not a map": msgpack.packb([1, 2, 3]),
}


def test_a_fast_built_event_is_the_same_frozen_event():
    fast = Event.fast(EVENT.seq, EVENT.run, EVENT.type, EVENT.ts, EVENT.step, EVENT.epoch, EVENT.data)
    assert fast == EVENT and repr(fast) == repr(EVENT) and replace(fast, seq=9) == replace(EVENT, seq=9)
    with pytest.raises(FrozenInstanceError):
        fast.seq = 2
    assert decode_event(encode_event(EVENT)) == EVENT


def test_a_kept_packer_makes_pack_s_bytes_and_survives_what_it_cannot_encode():
    packer = new_packer()
    with pytest.raises(ProtocolError):
        encode_event(replace(EVENT, data={"odd": object()}), packer=packer)
    assert encode_event(EVENT, packer=packer) == encode_event(EVENT)


def test_an_integer_ts_is_read_as_a_float_like_any_other():
    """Another implementation may send a whole-second ts as an int: it is not refused, and reads as a float."""
    event = decode_event(msgpack.packb(_envelope(ts=1700000000)))
    assert event.ts == 1700000000.0 and type(event.ts) is float
    assert event == replace(EVENT, ts=1700000000.0)


@pytest.mark.parametrize("case", sorted(LIMIT_CASES))
def test_event_limits(case):
    with pytest.raises(ProtocolError):
        decode_event(LIMIT_CASES[case])


@pytest.mark.parametrize("raw", [
    msgpack.packb({"v": 1, "type": "launch_missiles"}),
    msgpack.packb({"v": 2, "type": "heartbeat"}),
    msgpack.packb({"v": True, "type": "heartbeat"}),
    msgpack.packb({"v": 1, "type": "ack", "seq": True}),
    msgpack.packb({"v": 1, "type": "ack", "seq": 1.0}),
    msgpack.packb({"v": 1, "type": "metric", "name": "m", "value": False, "step": None}),
    msgpack.packb({"v": 1, "type": "hello", "name": "x", "pid": 1, "subscriptions": [1], "replies": [],
                   "delivery": "durable"}),
    msgpack.packb({"v": 1, "type": "replay_batch", "events": [{"v": 1, "seq": 1}], "done": True}),
    msgpack.packb({"v": 1, "type": "replay_batch", "events": [], "done": 1}),
    msgpack.packb({"v": 1, 7: "heartbeat"}),
], ids=["unknown type", "v=2", "v=True", "ack seq=True", "ack seq float", "metric value bool",
        "hello subscriptions not str", "replay_batch bad event", "done not bool", "int key"])
def test_control_limits(raw):
    with pytest.raises(ProtocolError):
        decode_control(raw)


def test_message_over_max_message_bytes():
    # Every field is within its own limit; only the whole message is too big.
    chunk = "x" * (MAX_STR_BYTES - 64)
    raw = msgpack.packb(_envelope(data={str(i): chunk for i in range(MAX_MESSAGE_BYTES // len(chunk) + 1)}))
    assert len(raw) > MAX_MESSAGE_BYTES
    for decode in (decode_event, decode_control, decode_burst, unpack):
        with pytest.raises(ProtocolError, match="exceeds"):
            decode(raw)


def test_non_bytes_input_is_a_protocol_error():
    for decode in (decode_event, decode_control, decode_burst, unpack):
        with pytest.raises(ProtocolError):
            decode("not bytes")  # type: ignore[arg-type]


def test_unencodable_values_are_a_protocol_error():
    with pytest.raises(ProtocolError):
        pack({"x": object()})
    with pytest.raises(ProtocolError):
        pack(2**64)  # beyond msgpack's integers
    with pytest.raises(ProtocolError):
        encode_event(Event(seq=1, run="r", type=ev.METRIC, ts=0.0, step=0, epoch=0, data={"x": {1, 2}}))


# -- (d) numbers from numpy ------------------------------------------------------------------------

def test_numpy_scalars_pack_as_plain_numbers():
    data = {"f32": np.float32(0.5), "f64": np.float64(0.25), "i64": np.int64(-3), "u8": np.uint8(200),
            "flag": np.bool_(True), "vector": np.arange(3, dtype=np.int32)}
    decoded = unpack(pack(data))
    assert decoded == {"f32": 0.5, "f64": 0.25, "i64": -3, "u8": 200, "flag": True, "vector": [0, 1, 2]}
    assert type(decoded["i64"]) is int and type(decoded["flag"]) is bool and type(decoded["f32"]) is float
    event = Event(seq=1, run="r", type=ev.END_TRAINING_BATCH, ts=1.0, step=np.int64(4), epoch=1,
                  data={"loss": np.float32(2.0)})
    assert decode_event(encode_event(event)) == Event(seq=1, run="r", type=ev.END_TRAINING_BATCH, ts=1.0,
                                                      step=4, epoch=1, data={"loss": 2.0})


# -- the spec keeps up with the code ----------------------------------------------------------------

def test_protocol_md_names_every_event_control_type_and_field():
    spec = (Path(__file__).resolve().parents[1] / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
    names = set(ev.ALL_EVENTS) | set(CONTROL_SCHEMAS)
    names |= {field for schema in CONTROL_SCHEMAS.values() for field in schema}
    names |= set(event_to_map(EVENT))
    missing = sorted(name for name in names if f"`{name}`" not in spec)
    assert not missing, f"proto/PROTOCOL.md does not document: {missing}"


def test_the_conformance_table_names_each_statement_once_and_only_tests_that_exist():
    """PROTOCOL.md's appendix: unique statement ids, and every test it cites is a test function in that file."""
    tests_dir = Path(__file__).resolve().parent
    spec = (tests_dir.parent / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
    rows = [line.split("|") for line in spec.splitlines() if re.match(r"\| C\d+ \|", line)]
    ids = [cells[1].strip() for cells in rows]
    assert len(rows) > 90 and len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    missing = []
    for cells in rows:
        for path, function in re.findall(r"(tests/[\w/]+\.py)::(\w+)", cells[-2]):
            source = tests_dir.parent / path
            if not source.is_file() or f"def {function}(" not in source.read_text(encoding="utf-8"):
                missing.append(f"{cells[1].strip()}: {path}::{function}")
    assert not missing, missing


@pytest.mark.parametrize("seconds, text", [(None, "-"), (0.0404, "40 ms"), (0.9996, "1.0 s"), (12.34, "12.3 s"),
                                           (59.96, "1m 00s"), (245, "4m 05s"), (7620, "2h 07m")])
def test_a_duration_reads_as_people_say_it(seconds, text):
    """The console's epoch time, runs list/show and the dashboard's ETA: the demo's 40 ms epochs said "0.0 s"."""
    from trainbus.proto.text import duration_text

    assert duration_text(seconds) == text


def test_an_event_encode_event_accepts_fits_in_a_replay_batch_a_client_accepts():
    # PROTOCOL.md §3 tells clients MAXMSGSIZE 16 MiB: an event that encodes must reach them by replay too, alone in a
    # batch, else a client drops the connection at every batch and asks for the same one again, forever.
    from trainbus.proto.codec import encode_replay_batch
    chunk = "x" * (MAX_STR_BYTES - 64)
    data = {f"k{i}": chunk for i in range(MAX_MESSAGE_BYTES // (len(chunk) + 16))}
    data["pad"] = "y" * 1000  # its length header (str 16) keeps its size as the pad shrinks below
    fill = 1000 + MAX_MESSAGE_BYTES - len(pack(event_to_map(replace(EVENT, data=data))))
    for shave in (0, 8, 40):  # the envelope at or just under 16 MiB, the largest a decoder takes
        data["pad"] = "y" * (fill - shave)
        assert len(pack(event_to_map(replace(EVENT, data=data)))) == MAX_MESSAGE_BYTES - shave
        try:
            raw = encode_event(replace(EVENT, data=data))
        except ProtocolError:
            continue  # refused at the sender: fine
        batch = len(encode_replay_batch(1, raw, True))
        assert batch <= MAX_MESSAGE_BYTES, f"an event of {len(raw)} bytes makes a replay batch of {batch}"


def test_a_message_nested_deeper_than_the_decoder_takes_says_so_not_that_it_is_not_msgpack():
    """msgpack's decoder takes 1,024 nested arrays and maps (PROTOCOL.md §9); one deeper raised StackError, whose
    empty text kernel.log's line filled with `not msgpack`: an author in another language looked for bad bytes."""
    assert decode_control(msgpack.packb({"v": 1, "type": "heartbeat", "x": _nested(1022)}))["type"] == "heartbeat"
    for decode in (decode_event, decode_control, unpack):
        with pytest.raises(ProtocolError, match=r"nested deeper than 1,024 arrays and maps"):
            decode(msgpack.packb({"v": 1, "type": "heartbeat", "x": _nested(1024)}))


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value
