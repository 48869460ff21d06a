"""The run journal: plain msgpack anyone can read, equal to what subscribers got, and whole after a crash.

A crash can leave a journal cut at any byte, or followed by garbage; reopening it must keep every whole
record before that point, drop the rest, and go on appending with the next seq. A kernel killed mid-run loses
nothing it published (every append reaches the OS before its events go out); the file is fsynced at most once a
second, and at close.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.journal import FSYNC_INTERVAL_S, Journal, decode_records, read_events
from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import iter_records as read_records
from trainbus.kernel.session import run_training
from trainbus.proto import PROTOCOL_VERSION, events as ev, pack

from helpers import recorded, seeded_rng
from kernel_process import KernelProcess, wait_until
from test_trust import LIMITS, config, short_runs, wait_sockets  # noqa: F401

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
    damaged = path.read_bytes()

    journal = Journal(path)
    assert journal.last_seq == whole
    assert records_of(path) == original[:whole]
    assert path.stat().st_size == kept  # the torn tail or garbage is cut off, and kept beside it
    set_aside = list(path.parent.glob(f"{path.name}.unreadable-after-{whole}-*"))
    assert [p.read_bytes() for p in set_aside] == ([damaged[kept:]] if size > kept else [])
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


def test_garbage_in_the_middle_ends_the_journal_there_and_what_follows_is_kept_beside_it(finished_run, tmp_path):
    """One bad byte makes every record after it unreadable: the journal goes on from there (a resumed run appends),
    and the bytes it cut are kept in a file beside it, said in one line (a resume announces it): they were cut
    without a word, half a run's events with them."""
    raw, records, ends = journal_bytes(finished_run)
    middle = len(ends) // 2
    path = tmp_path / "garbled"
    path.write_bytes(raw[:ends[middle - 1]] + b"\xc1garbage" + raw[ends[middle - 1]:])
    journal = Journal(path)
    assert journal.last_seq == middle and records_of(path) == records[:middle]
    journal.close()
    [kept] = tmp_path.glob(f"garbled.unreadable-after-{middle}-*")
    assert kept.read_bytes() == b"\xc1garbage" + raw[ends[middle - 1]:]  # the events after the byte, all of them
    assert decode_records(kept.read_bytes()[len(b"\xc1garbage"):]) == records[middle:]
    assert journal.missing == [f"garbled: the {len(kept.read_bytes())} bytes after event {middle} are not whole "
                               f"records (torn by a crash, or damaged) and are kept in {kept.name}; the run's "
                               f"journal goes on from event {middle + 1}"]


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


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync of this process, as (time.monotonic() when called, inode of the file), the real fsync still
    done: watching the journal, not standing in for the disk."""
    calls: list[tuple[float, int]] = []
    real_fsync = os.fsync

    def watched(fd):
        calls.append((time.monotonic(), os.fstat(fd).st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched)
    return calls


def test_what_an_append_wrote_is_in_the_file_for_every_reader_before_any_fsync(tmp_path, fsyncs):
    """[C82] An append reaches the OS at once, not a buffer of ours: as soon as it returns, a reader of the file
    (another open file, as a replay after a crash would be) has every record it wrote, with no fsync yet."""
    path = tmp_path / JOURNAL_NAME
    journal = Journal(path)
    records = [pack(envelope(seq)) for seq in range(1, 4)]
    assert journal.append(records[:1], 1) == 1
    assert path.read_bytes() == records[0]
    assert journal.append(records[1:], 2) == 2
    assert path.read_bytes() == b"".join(records)
    assert fsyncs == []  # the OS has it: a crashed process loses nothing, though a power loss may (C83)
    journal.close()


def test_a_sigkilled_kernel_loses_nothing_it_published(short_runs, tmp_path, kernels):  # noqa: F811
    """[C82] Every append reaches the OS before its events are published: a kernel killed with SIGKILL mid-run (no
    handler, no flush at exit) leaves a journal holding every event a subscriber received, byte for byte.

    A real kernel in its own process, a raw pyzmq subscriber on its events socket; the kill comes right after an
    event arrived, with training going on (events published every few ms)."""
    kernel = KernelProcess(config(short_runs, epochs=1, step_sleep_s=0.01), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(f"ipc://{kernel.run_dir / 'events.sock'}")
    received: dict[int, bytes] = {}

    def receive(timeout_ms: int) -> dict | None:
        if not sub.poll(timeout_ms):
            return None
        _, raw = sub.recv_multipart()
        event = msgpack.unpackb(raw, **LIMITS)
        received[event["seq"]] = raw
        return event

    try:
        wait_until(lambda: (e := receive(100)) and e["type"] == "end_training_batch" and e["step"] >= 10, 120,
                   "step 10 of training")
        kernel.kill()  # SIGKILL, reaped
        while receive(500):  # what was on its way when it died
            pass
    finally:
        ctx.destroy(linger=0)

    data = (kernel.run_dir / JOURNAL_NAME).read_bytes()
    journaled = {r["seq"]: data[start:end] for start, end, r in read_records(kernel.run_dir / JOURNAL_NAME)}
    assert sorted(journaled) == list(range(1, len(journaled) + 1))
    lost = sorted(set(received) - set(journaled))
    assert not lost, f"published, then lost with the kernel: seqs {lost[:10]} (journal ends at {len(journaled)})"
    assert all(received[seq] == journaled[seq] for seq in received), "a journaled record differs from what was sent"


def test_the_journal_is_fsynced_at_most_once_a_second_while_appending_and_when_closed(tmp_path, fsyncs):
    """[C83] fsync costs the disk at most once per FSYNC_INTERVAL_S (1 s) however often events come, and keeps the
    window: an append a second or more after the last fsync does one (checked at each append); close does one.

    Real time, appends every 20 ms until two fsyncs came and half a second more. The journal reads its clock a few
    bytecodes before it fsyncs and the watcher as the fsync begins: a loaded box delays appends, which only lengthens
    the gaps seen (50 ms are allowed for those bytecodes), and an append that began a second after the last fsync was
    seen began at least a second after the journal's own stamp of it."""
    assert FSYNC_INTERVAL_S == 1.0  # the spec's 1 s (§13)
    path = tmp_path / JOURNAL_NAME
    opened = time.monotonic()
    journal = Journal(path)
    since = time.monotonic()  # no later than the journal's own start of the window
    inode = path.stat().st_ino
    of_journal = lambda: [t for t, ino in fsyncs if ino == inode]  # noqa: E731
    appends, seq, enough_at = [], 0, None  # (when an append began, the journal's fsyncs during it)
    while enough_at is None or time.monotonic() < enough_at:
        seq += 1
        before, count = time.monotonic(), len(of_journal())
        assert journal.append([pack(envelope(seq))], seq) == 1
        appends.append((before, of_journal()[count:]))
        if enough_at is None and len(of_journal()) >= 2:
            enough_at = time.monotonic() + 0.5
        assert time.monotonic() - opened < 20, "no two fsyncs in 20 s of appends"
        time.sleep(0.02)
    appending = of_journal()

    gaps = [b - a for a, b in zip([opened, *appending], appending)]
    assert min(gaps) >= FSYNC_INTERVAL_S - 0.05, f"fsyncs {gaps} s apart, closer than {FSYNC_INTERVAL_S} s"
    last = since
    for before, fsynced in appends:
        if before - last >= FSYNC_INTERVAL_S:
            assert fsynced, f"an append {before - last:.2f} s after the last fsync did none"
        last = fsynced[-1] if fsynced else last
    assert journal.close() is None
    assert len(of_journal()) == len(appending) + 1, "close fsyncs the journal once"
