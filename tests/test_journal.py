"""The run journal: plain msgpack anyone can read, equal to what subscribers got, and whole after a crash.

A crash can leave a journal cut at any byte, or followed by garbage; reopening it must keep every whole
record before that point, drop the rest, and go on appending with the next seq.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import msgpack
import pytest

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.journal import Journal, decode_records, read_events
from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import iter_records as read_records
from trainbus.kernel.session import run_training
from trainbus.proto import PROTOCOL_VERSION, events as ev, pack

from helpers import recorded, seeded_rng

TESTS_DIR = Path(__file__).resolve().parent
ENVELOPE_KEYS = {"v", "seq", "run", "type", "ts", "step", "epoch", "data", "n"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real run with a durable subscriber writing down every envelope it received, and a best-effort one."""
    tmp = tmp_path_factory.mktemp("journal")
    pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), pythonpath]))
    try:
        cfg = RunConfig(epochs=2, seed=0, device="cpu", runs_dir=str(tmp / "runs"), hyperparameters={"batch_size": 64},
                        plugins=[PluginConfig("envelopes", "fixture_plugins:EnvelopeRecorder", {"path": str(tmp / "env.jsonl")}),
                                 PluginConfig("live", "fixture_plugins:LiveRecorder", {"path": str(tmp / "live.txt")})])
        result = run_training(cfg)
    finally:
        if pythonpath is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = pythonpath
    assert result.status == "completed" and result.undrained == {}
    return result, tmp


def plain_records(path: Path) -> list[dict]:
    """The journal read with nothing of ours: msgpack's own Unpacker over the file."""
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False))


def records_of(path: Path) -> list[dict]:
    return [item[-1] for item in read_records(path)]


def envelope(seq: int, type_: str = "metric", run: str = "r") -> dict:
    return {"v": PROTOCOL_VERSION, "seq": seq, "run": run, "type": type_, "ts": 1.5, "step": seq, "epoch": 1,
            "data": {"name": "x", "value": seq / 3}}


def test_a_finished_journal_is_plain_msgpack_and_equals_what_the_subscriber_received(finished_run):
    result, tmp = finished_run
    records = plain_records(Path(result.run_dir) / JOURNAL_NAME)

    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # gap-free from 1
    assert all(set(r) == ENVELOPE_KEYS and r["run"] == result.run_id for r in records)
    assert records == records_of(Path(result.run_dir) / JOURNAL_NAME)
    counts = dict.fromkeys(ev.COUNTED_BATCH_EVENTS, 0)  # n: the per-batch events numbered so far, this one included
    for r in records:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
        assert r["n"] == [counts[t] for t in ev.COUNTED_BATCH_EVENTS], r
    assert all(counts[t] for t in ev.COUNTED_BATCH_EVENTS)
    final = next(r["seq"] for r in records if r["type"] == "end_training_session")

    # the durable subscriber got every envelope up to the end, byte for byte the journal's (through JSON)
    received = [json.loads(line) for line in (tmp / "env.jsonl").read_text().splitlines()]
    assert received == [json.loads(json.dumps(r)) for r in records[:final]]

    # the best-effort one got a subset, each seq with the journal's type
    live = recorded(tmp / "live.txt")
    assert live and live[-1] == (final, "end_training_session")
    assert all(records[seq - 1]["type"] == type_ for seq, type_ in live)
    assert [seq for seq, _ in live] == sorted({seq for seq, _ in live})


def check_reopens_as_prefix(path: Path, original: list[dict], ends: list[int]) -> None:
    """Open a damaged journal: whole records before the damage stay, the rest goes, appends continue."""
    size = path.stat().st_size
    whole = sum(1 for end in ends if end <= size)  # records wholly inside the surviving bytes
    kept = ends[whole - 1] if whole else 0

    journal = Journal(path)
    assert journal.last_seq == whole
    assert records_of(path) == original[:whole]
    assert path.stat().st_size == kept  # the torn tail or garbage is cut off
    if whole:
        assert decode_records(journal.read_range(1, 10_000, 1 << 30)[1]) == original[:whole]
    extra = pack(envelope(whole + 1))
    journal.append([extra], whole + 1)
    journal.close()

    reopened = Journal(path)
    assert reopened.last_seq == whole + 1
    assert records_of(path) == original[:whole] + [envelope(whole + 1)]
    assert decode_records(reopened.read_range(whole + 1, 10, 1 << 20)[1]) == [envelope(whole + 1)]
    assert path.stat().st_size == kept + len(extra)
    reopened.close()


def journal_bytes(finished_run) -> tuple[bytes, list[dict], list[int]]:
    """The finished run's journal, its records, and the end offset of each record."""
    result, _ = finished_run
    raw = (Path(result.run_dir) / JOURNAL_NAME).read_bytes()
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    records, ends = [], []
    for record in unpacker:
        records.append(record)
        ends.append(unpacker.tell())
    assert ends[-1] == len(raw)
    return raw, records, ends


def test_a_journal_cut_at_any_byte_reopens_with_the_whole_records_before_the_cut(finished_run, tmp_path):
    raw, records, ends = journal_bytes(finished_run)
    rng, seed = seeded_rng()
    cuts = {0, 1, len(raw) - 1, len(raw), ends[0], ends[0] + 1, ends[len(ends) // 2] - 1}
    cuts |= set(rng.sample(range(len(raw)), 50))
    for cut in sorted(cuts):
        path = tmp_path / f"cut-{cut}"
        path.write_bytes(raw[:cut])
        try:
            check_reopens_as_prefix(path, records, ends)
        except AssertionError as exc:
            raise AssertionError(f"journal cut at byte {cut} of {len(raw)} (seed {seed}): {exc}") from exc


GARBAGE = {
    "random bytes": lambda rng: rng.randbytes(200),
    "a byte msgpack never uses": lambda rng: b"\xc1" + rng.randbytes(20),
    "a plain integer": lambda rng: pack(7),
    "a map that is no envelope": lambda rng: pack({"seq": "x", "hello": 1}),
    "an envelope of another version": lambda rng: pack({**envelope(10**6), "v": 99}),
    "an ext type": lambda rng: b"\xd4\x01\x00",
    "a string claiming 4 GiB": lambda rng: b"\xdb\xff\xff\xff\xff" + rng.randbytes(10),
    "half a record": lambda rng: pack(envelope(10**6))[:25],
    "zeros (a preallocated tail)": lambda rng: bytes(4096),
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_after_the_last_record_is_dropped_and_appends_continue(finished_run, tmp_path, kind):
    raw, records, ends = journal_bytes(finished_run)
    path = tmp_path / "garbled"
    path.write_bytes(raw + GARBAGE[kind](random.Random(kind)))
    # zeros are valid msgpack (positive fixint 0): each is a non-map "record", so the read stops there too
    check_reopens_as_prefix(path, records, ends)


def test_garbage_in_the_middle_ends_the_journal_there(finished_run, tmp_path):
    raw, records, ends = journal_bytes(finished_run)
    middle = len(ends) // 2
    path = tmp_path / "garbled"
    path.write_bytes(raw[:ends[middle - 1]] + b"\xc1garbage" + raw[ends[middle - 1]:])
    journal = Journal(path)
    assert journal.last_seq == middle and records_of(path) == records[:middle]
    journal.close()


def test_an_empty_or_missing_journal_starts_at_seq_1(tmp_path):
    for path in (tmp_path / "missing", tmp_path / "empty"):
        if path.name == "empty":
            path.write_bytes(b"")
        journal = Journal(path)
        assert journal.last_seq == 0 and journal.read_range(1, 10, 1 << 20) == (0, b"")
        with pytest.raises(ValueError, match="journal gap"):
            journal.append([pack(envelope(2))], 2)
        journal.append([pack(envelope(1)), pack(envelope(2))], 1)
        journal.close()
        assert [e.seq for e in read_events(path)] == [1, 2]


def test_a_journal_larger_than_msgpacks_default_buffer_reopens(tmp_path):
    """msgpack.Unpacker.feed refuses more than 100 MiB at once: reading must stream, or a long run cannot resume."""
    path = tmp_path / JOURNAL_NAME
    unrotated = 2**40  # an active file this large: a journal from before segments, or one whose disk refused them
    journal = Journal(path, segment_bytes=unrotated)
    padding = "x" * (1000 * 1000)  # under the 1 MiB string limit
    batch = [pack({**envelope(seq), "data": {"padding": padding}}) for seq in range(1, 111)]
    journal.append(batch, 1)
    journal.close()
    assert path.stat().st_size > 100 * 1024 * 1024

    reopened = Journal(path, segment_bytes=unrotated)
    assert reopened.last_seq == 110
    assert decode_records(reopened.read_range(110, 1, 1)[1])[0]["seq"] == 110
    reopened.append([pack(envelope(111))], 111)
    reopened.close()
