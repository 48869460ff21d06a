"""Journal compaction (PROTOCOL.md §13): closed segments every durable plugin acked and a saved checkpoint covers
keep their lifecycle, metric, log, plugin and kernel events and every 100th step's end_training_batch; every reader
reads them with no loss said, a replay from one says `compacted`, and a crash mid-compaction loses nothing kept."""

from __future__ import annotations

import io
import logging
import shutil
import time
from pathlib import Path

import psutil
import pytest
import zmq
from rich.console import Console

from test_journal_segments import fast_forward, simulated_records
from helpers import PLUGIN_START_S, assert_same_weights, run_config
from kernel_process import cli
from test_peers_limits import hello, read_until_replay_asked, reader, served_bus
from trainbus.kernel.checkpointing import Checkpointer
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.run_details import run_details
from trainbus.kernel.runs_view import print_show
from trainbus.kernel.session import run_training
from trainbus.plugins._history import History
from trainbus.plugins.visualization import plot_run
from trainbus.kernel.journal import Journal, decode_records
from trainbus.kernel.control_reading import LOCAL
from trainbus.proto import JOURNAL_NAME, control, decode_control, encode_control, encode_replay_batch, event_to_map
from trainbus.proto import events as ev
from trainbus.proto.journal_format import (COMPACTION_KEEP_EVERY_STEPS, closed_segments, journal_head, journal_tail,
                                           kept_by_compaction, last_event_of, read_journal, stream_journal)
from trainbus.sdk.replay import events_to_take, skip_lost

PACED = "fixture_targets:paced_digits"  # the digits demo with a sleep per step: same weights, known pace
COUNT = 60_000
SEGMENT_BYTES = 256 * 1024  # ~1,700 events a segment: tens of segments


def compact(journal: Journal, through: int, timeout_s: float = 60.0) -> list:
    """Offer the journal's worker everything through `through` until every segment ending there is compacted."""
    for _ in range(int(timeout_s / 0.01)):
        journal.compact_through(through)
        if all(s.compacted for s in journal.segments if s.last <= through):
            return journal.segments
        time.sleep(0.01)
    left = [s.path.name for s in journal.segments if s.last <= through and not s.compacted]
    raise AssertionError(f"{len(left)} segments through {through} not compacted within {timeout_s:g} s: {left[:3]}")


def originals(count: int) -> dict[int, dict]:
    return {m["seq"]: m for _, batch in simulated_records(count) for m in decode_records(b"".join(batch))}


def expected_after(segments: list, every: dict[int, dict]) -> list[int]:
    """The seqs a journal keeps once these segments are compacted: within each compacted one its first and last and
    what kept_by_compaction keeps; everything else."""
    kept = []
    for seq, record in every.items():
        home = next((s for s in segments if s.first <= seq <= s.last), None)
        if home is None or not home.compacted or seq in (home.first, home.last) or kept_by_compaction(record):
            kept.append(seq)
    return kept


def test_compacted_segments_keep_all_but_the_per_batch_events_and_no_reader_says_a_loss(tmp_path):
    fast_forward(tmp_path, COUNT, SEGMENT_BYTES)
    before = sum(p.stat().st_size for p in tmp_path.iterdir())
    journal = Journal(tmp_path / JOURNAL_NAME, segment_bytes=SEGMENT_BYTES)
    through = journal.segments[-3].last  # the newest two stay whole
    segments = compact(journal, through)
    assert journal.compacted_events > COUNT // 2
    for segment in segments:  # each keeps its last: a continued run reads the `n` it goes on from there
        count, blob = journal.read_range(segment.last, 1, 2**20)
        assert count == 1 and decode_records(blob)[0]["seq"] == segment.last
    journal.close()
    assert [s.compacted for s in segments] == [s.last <= through for s in segments]
    assert all(p.name.endswith(".compacted.gz") for p in tmp_path.glob("events.*.gz") if int(
        p.name.split(".")[1].split("-")[1]) <= through)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < before / 5

    every = originals(COUNT)
    kept = expected_after(segments, every)
    for read in (lambda d: [e.seq for e in read_journal(tmp_path, d)],
                 lambda d: [m["seq"] for m in stream_journal(tmp_path, d)]):
        damage: list[str] = []
        assert read(damage) == kept and damage == []  # rising, and exactly what the rule keeps: no loss said
    batch_steps = {every[s]["step"] for s in kept if every[s]["type"] == ev.END_TRAINING_BATCH and s <= through}
    assert batch_steps and all(step % COMPACTION_KEEP_EVERY_STEPS == 0 or any(
        every[s]["step"] == step and s in (g.first, g.last) for g in segments for s in (g.first, g.last))
        for step in batch_steps)
    assert journal_head(tmp_path)[0].seq == 1 and len(journal_head(tmp_path)) > 10
    assert journal_tail(tmp_path)[-1].seq == COUNT
    assert last_event_of(tmp_path, ev.END_EPOCH).type == ev.END_EPOCH

    journal = Journal(tmp_path / JOURNAL_NAME)  # reopened: nothing missing, and the next seq where it was
    assert journal.missing == [] and journal.last_seq == COUNT and journal.first_seq == 1
    journal.close()

    details = run_details(tmp_path)  # runs show: no damage, and one line saying how much was compacted
    assert details["journal_damage"] == []
    assert details["journal_compacted"] == {"segments": len(segments), "compacted": len(segments) - 2,
                                            "through_seq": through}
    shown = io.StringIO()
    print_show(Console(file=shown, width=300), details)
    assert f"journal     {len(segments) - 2} of {len(segments)} closed segments compacted: up to seq {through:,}" \
        in shown.getvalue()


def test_the_journal_compacts_nothing_past_the_bound_nor_when_told_not_to(tmp_path):
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    journal = Journal(tmp_path / JOURNAL_NAME, compact=False)
    for _ in range(20):
        journal.compact_through(journal.last_seq)
        time.sleep(0.01)
    assert not any(s.compacted for s in journal.segments)
    journal.close()
    journal = Journal(tmp_path / JOURNAL_NAME)
    bound = journal.segments[2].last - 1  # inside the third: the first two only
    segments = compact(journal, bound)
    time.sleep(0.2)
    journal.compact_through(bound)
    assert [s.compacted for s in journal.segments] == [True, True] + [False] * (len(segments) - 2)
    journal.close()


def test_the_bound_is_the_lowest_durable_ack_and_before_the_newest_saved_checkpoint(tmp_path):
    """Dispatcher.compactable_through, on the real peer table and checkpointer: nothing without a saved checkpoint (a
    failed one is none); then the lower of its seq - 1 and the lowest ack of the durable plugins that may return."""
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    journal = Journal(tmp_path / JOURNAL_NAME)
    bus, credentials, peers, dispatcher = served_bus(journal, tmp_path)
    dispatcher.checkpointer = Checkpointer(None, peers, 0, 0, [tmp_path / "checkpoints"])  # its buffers: not used
    try:
        now = time.monotonic()
        assert dispatcher.compactable_through(now) == 0  # no checkpoint saved: the journal stays whole
        persister = peers.welcome(LOCAL + b"p", hello("checkpoint", 9, credentials.attach_token(),
                                                      capabilities=["checkpoint"]), now)
        peers.ack(persister, journal.written_seq, journal.written_seq)
        for seq, verdict in [(12_000, control("checkpoint_saved", seq=12_000, step=1, epoch=1, sha256="0" * 64,
                                              size=1, path=str(tmp_path / "checkpoints" / "a.pt"))),
                             (15_000, control("checkpoint_failed", seq=15_000, reason="disk full"))]:
            dispatcher.checkpointer.numbered(seq, {"slot": seq % 2})
            dispatcher.handle(LOCAL + b"p", encode_control(verdict))
        assert dispatcher.compactable_through(now) == 11_999  # the failed one at 15,000 covers nothing
        dispatcher.checkpointer.numbered(15_500, {"slot": 1})
        dispatcher.handle(LOCAL + b"p", encode_control(control(
            "checkpoint_saved", seq=15_500, step=2, epoch=1, sha256="0" * 64, size=1,
            path=str(tmp_path / "checkpoints" / "b.pt"))))
        assert dispatcher.compactable_through(now) == 15_499  # the persister acked all: the checkpoint alone
        peers.supervisor.still_starting.append("late")
        assert dispatcher.compactable_through(now) == 0  # a plugin not yet said hello may be durable, from seq 1
        peers.supervisor.still_starting.clear()
        slow = peers.welcome(LOCAL + b"a", hello("slow", 1, credentials.attach_token()), now)
        fast = peers.welcome(LOCAL + b"b", hello("fast", 2, credentials.attach_token()), now)
        peers.welcome(LOCAL + b"c", hello("monitor", 3, credentials.attach_token(), delivery="best_effort"), now)
        assert dispatcher.compactable_through(now) == 0  # neither has acked
        peers.ack(fast, 19_000, journal.written_seq)
        peers.ack(slow, 4_000, journal.written_seq)
        assert dispatcher.compactable_through(now) == 4_000
        peers.ack(slow, 18_000, journal.written_seq)
        assert dispatcher.compactable_through(now) == 15_499
        compact(journal, dispatcher.compactable_through(now))
        assert all(s.compacted == (s.last <= 15_499) for s in journal.segments)
    finally:
        bus.ctx.destroy(linger=0)
        journal.close()


def test_a_crash_between_the_rename_and_the_removal_keeps_the_compacted_file(tmp_path, caplog):
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    full = closed_segments(tmp_path / JOURNAL_NAME)
    saved = tmp_path.parent / f"{tmp_path.name}-saved"
    saved.mkdir()
    for segment in full[:2]:
        shutil.copy(segment.path, saved / segment.path.name)
    journal = Journal(tmp_path / JOURNAL_NAME)
    compact(journal, full[1].last)
    journal.close()
    compacted = closed_segments(tmp_path / JOURNAL_NAME)[:2]
    expected = [e.seq for e in read_journal(tmp_path)]
    for segment in full[:2]:  # the full ones back beside their compacted files: the crash came before the removal
        shutil.copy(saved / segment.path.name, segment.path)
    compacted[1].path.write_bytes(compacted[1].path.read_bytes()[:100])  # and one compacted file cut short
    assert [e.seq for e in read_journal(tmp_path)][:5] == expected[:5]  # readers take the compacted one meanwhile
    with caplog.at_level(logging.WARNING, "trainbus.kernel"):
        journal = Journal(tmp_path / JOURNAL_NAME)
    assert not full[0].path.exists() and compacted[0].path.exists()  # whole: the work is finished
    assert full[1].path.exists() and not compacted[1].path.exists()  # cut short: the full one stays
    assert journal.missing == []
    journal.close()
    damage: list[str] = []
    seqs = [e.seq for e in read_journal(tmp_path, damage)]
    assert damage == [] and seqs == sorted(set(expected) | set(range(full[1].first, full[1].last + 1)))
    assert "a compaction cut short" in caplog.text


def test_a_segment_that_cannot_be_compacted_is_left_as_it_was_and_said(tmp_path, caplog):
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    segments = closed_segments(tmp_path / JOURNAL_NAME)
    garbled = segments[1].path.read_bytes()
    garbled = garbled[:len(garbled) // 2] + bytes(64) + garbled[len(garbled) // 2 + 64:]
    segments[1].path.write_bytes(garbled)
    journal = Journal(tmp_path / JOURNAL_NAME)
    with caplog.at_level(logging.WARNING, "trainbus.kernel"):
        for _ in range(1000):
            journal.compact_through(segments[2].last)
            if journal.segments[0].compacted and journal.segments[2].compacted and "could not compact" in caplog.text:
                break
            time.sleep(0.01)
    assert [s.compacted for s in journal.segments[:3]] == [True, False, True]
    journal.close()
    assert segments[1].path.read_bytes() == garbled
    assert f"could not compact {segments[1].path.name}" in caplog.text


def test_a_replay_from_a_compacted_segment_says_so_and_the_sdk_takes_its_jumps_for_no_loss(tmp_path, capsys):
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    journal = Journal(tmp_path / JOURNAL_NAME)
    segments = compact(journal, journal.segments[1].last)
    bus, credentials, peers, dispatcher = served_bus(journal, tmp_path)
    ctx = zmq.Context()
    try:
        dealer = reader(ctx, bus, credentials)
        batches, asked = [], 5
        while asked < segments[2].first + 10:
            dealer.send(encode_control(control("replay", from_seq=asked)))
            read_until_replay_asked(bus, peers)
            dispatcher.serve_replays(time.monotonic() + len(batches) + 1.0)
            while True:
                assert dealer.poll(10_000)
                message = decode_control(dealer.recv())
                if message["type"] == "replay_batch":
                    break
            batches.append(message)
            asked = message["events"][-1].seq + 1
    finally:
        ctx.destroy(linger=0)
        bus.ctx.destroy(linger=0)
        journal.close()
    assert all(b["compacted"] for b in batches[:-1]) and not batches[-1]["compacted"]  # the last: a full segment
    assert batches[0]["events"][0].seq > 5  # seq 5 was a batch event: the batch begins past it
    next_seq, taken = 5, []
    for batch in batches:
        for event in events_to_take(batch, next_seq, "[reader]"):
            taken.append(event.seq)
            next_seq = event.seq + 1
    assert "lost" not in capsys.readouterr().err
    assert taken == [s for s in expected_after(segments, originals(20_000)) if 5 <= s < next_seq]
    assert decode_control(encode_replay_batch(0, b"", True))["compacted"] is False  # no flag sent: as before it
    plain = dict(batches[0], compacted=False)  # a client that ignores the flag takes the jump for a loss, and says so
    skip_lost(plain, 5, "[reader]")
    assert "are lost from the run's journal" in capsys.readouterr().err


@pytest.mark.timeout(4 * PLUGIN_START_S)  # three runs starting plugins (torch, starved when busy), and runs plot
def test_a_real_run_in_tiny_segments_is_compacted_plots_and_resumes_exactly(tmp_path):
    """The checkpoint plugin (a persister, durable) and metrics_log (durable) on a paced digits run in ~2 KB
    segments: segments behind the saved checkpoints are compacted while it trains, `trainbus runs plot` draws the
    result, and the run continued for one more epoch ends with the weights of a run never interrupted."""
    plugins = [resolve_plugin("checkpoint", {}), resolve_plugin("metrics_log", {})]
    settings = dict(target=PACED, seed=3, journal_segment_mb=0.002, checkpoint_every_n_steps=10,
                    ready_timeout_s=PLUGIN_START_S, drain_timeout_s=60, step_sleep_s=0.05)
    first = run_training(run_config(tmp_path / "runs", plugins, epochs=2, **settings))
    assert first.status == "completed" and not first.undrained, (first.error, first.undrained)
    run_dir = Path(first.run_dir)
    compacted = [s for s in closed_segments(run_dir / JOURNAL_NAME) if s.compacted]
    assert compacted, sorted(p.name for p in run_dir.glob("events*"))
    saved = [e for e in read_journal(run_dir) if e.type == ev.CHECKPOINT_SAVED]
    assert all(s.last < max(e.data["seq"] for e in saved) for s in compacted)  # none past the newest checkpoint
    damage: list[str] = []
    events = list(read_journal(run_dir, damage))
    seqs = [e.seq for e in events]
    assert damage == [] and seqs == sorted(set(seqs)) and seqs[-1] == events[-1].seq
    inside = [e for e in events if any(s.first < e.seq < s.last for s in compacted)]  # a segment keeps its ends
    assert all(kept_by_compaction(event_to_map(e)) for e in inside)
    assert len(inside) < sum(s.last - s.first - 1 for s in compacted) / 2

    plotted = cli("runs", "plot", run_dir.name, "--runs-dir", str(tmp_path / "runs"), "--out",
                  str(tmp_path / "plots"), timeout=PLUGIN_START_S)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plots" / "loss.png").is_file() and "missing" not in plotted.stderr

    resumed = run_training(run_config(tmp_path / "runs", plugins, epochs=3, resume=str(run_dir), **settings),
                           run_id=run_dir.name, continue_run=True)
    assert resumed.status == "completed" and not resumed.undrained, (resumed.error, resumed.undrained)
    for log in (run_dir / "plugins").glob("*.log"):  # they replayed the compacted journal from seq 1: no loss said
        assert "lost from the run's journal" not in log.read_text(), log
    # unpaced: the pacing only gave the first run time to compact while it trained; weights are the same without
    reference = run_training(run_config(tmp_path / "reference", plugins, epochs=3, **{**settings, "step_sleep_s": 0}))
    assert reference.status == "completed", reference.error
    assert_same_weights(resumed.run_dir, reference.run_dir)


def test_runs_plot_of_a_long_compacted_run_has_every_point_of_the_whole_ones(tmp_path):
    """400,000 events, ~200,000 steps: the plots' record thins its curve to a point every 80 steps or more, each a
    step compaction keeps (COMPACTION_KEEP_EVERY_STEPS), so the compacted journal's curve holds all of the whole
    journal's points, the same losses, and its epochs are the same rows."""
    count = 400_000
    fast_forward(tmp_path / "whole", count, SEGMENT_BYTES)
    whole = History.from_journal(tmp_path / "whole", every_n_steps=10)
    assert whole.every_n_steps * whole.step_thinning == 80  # a long run's spacing: 10 * 2**3 at this count
    shutil.copytree(tmp_path / "whole", tmp_path / "compacted")
    journal = Journal(tmp_path / "compacted" / JOURNAL_NAME)
    compact(journal, journal.segments[-1].last)
    journal.close()
    compacted = History.from_journal(tmp_path / "compacted", every_n_steps=10)
    assert set(whole.step_losses) <= set(compacted.step_losses)
    assert len(compacted.step_losses) <= 2 * len(whole.step_losses)
    assert compacted.epochs == whole.epochs and compacted.last_step == whole.last_step


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ten_million_events_compacted_keep_a_few_mb_flat_memory_and_a_whole_plot_and_continuation(tmp_path):
    """Acceptance (issue #15) under compaction: 10^7 fast-forwarded events, every closed segment compacted as a run
    with a checkpoint and acked plugins has them; ~6 minutes on a busy 2-core box."""
    count = 10_000_000
    fast_forward(tmp_path, count, 8 * 2**20)
    whole = sum(p.stat().st_size for p in tmp_path.iterdir())
    rss_before = psutil.Process().memory_info().rss
    journal = Journal(tmp_path / JOURNAL_NAME)
    compact(journal, journal.segments[-1].last, timeout_s=900)
    growth = psutil.Process().memory_info().rss - rss_before
    journal.close()
    journal = Journal(tmp_path / JOURNAL_NAME)  # as a continued run opens it: whole, going on after the last seq
    assert (journal.first_seq, journal.last_seq, journal.missing) == (1, count, [])
    journal.close()
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk < whole / 20 and on_disk < 16 * 2**20, f"{on_disk / 2**20:.1f} MiB of {whole / 2**20:.0f}"
    assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"  # a segment at a time, not the journal
    damage: list[str] = []
    seqs = [m["seq"] for m in stream_journal(tmp_path, damage)]
    assert damage == [] and seqs[0] == 1 and seqs[-1] == count and seqs == sorted(seqs)
    assert {p.name for p in plot_run(tmp_path, tmp_path / "plots")} >= {"loss.png"}


def test_a_segment_read_for_a_replay_then_compacted_is_served_compacted_and_leaves_the_cache(tmp_path):
    """A replay reads a full segment (kept decompressed for the next batches), the worker compacts it: the next batch
    from it comes from the compacted file, says so, and the full segment's records no longer take the cache's room."""
    fast_forward(tmp_path, 20_000, SEGMENT_BYTES)
    journal = Journal(tmp_path / JOURNAL_NAME)
    first = journal.segments[0]
    before = journal.read_batch(first.first + 2, 512, 4 * 2**20)
    assert not before.compacted and before.count == 512 and before.last == first.first + 513
    cached = journal._cache.bytes
    compact(journal, first.last)
    after = journal.read_batch(first.first + 2, 512, 4 * 2**20)
    assert after.compacted and after.last <= first.last
    assert [m["seq"] for m in decode_records(after.records)] == [
        s for s in expected_after(journal.segments, originals(20_000)) if first.first + 2 <= s <= after.last]
    assert journal._cache.bytes < cached / 5  # the compacted file's few records, not the full segment's
    journal.close()
