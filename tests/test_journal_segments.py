"""The journal's closed segments: a long run fast-forwarded through the Journal class stays small on disk and in
memory, and every reader (replay, runs list/show/plot, a continued run) sees it whole and exact."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import psutil
import pytest

from helpers import PLUGIN_START_S, run_config
from trainbus.kernel.journal import SEGMENT_BYTES, Journal, decode_records
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.run_details import run_details
from trainbus.kernel.run_overview import run_overview
from trainbus.kernel.session import run_training
from trainbus.plugins._history import CURVE_POINTS_MAX, PROGRESS_EVERY_EVENTS, History
from trainbus.plugins.visualization import VisualizationPlugin, plot_run
from trainbus.sdk.harness import Harness
from trainbus.proto import JOURNAL_NAME, Event, event_to_map, events as ev, pack
from trainbus.proto.journal_format import closed_segments, journal_head, journal_tail, last_event_of, read_journal, \
    stream_journal

TINY = f"{Path(__file__).parent / 'specs.py'}:tiny"
RUN_ID = "20261201-000000-5e9a11"
BATCH_EVENTS = 72  # the bus's flush at a tiny-MLP pace (docs/benchmarks.md, journal cost)
STEPS_PER_EPOCH = 10_000


def simulated_records(count: int):
    """`count` encoded events, in batches, as a long run journals them: per step a start_training_batch and an
    end_training_batch with its loss, a heartbeat every second (~3,800 events), an end_epoch every 10,000 steps."""
    rng, ts, step, batch = random.Random(0), 1.8e9, 0, []
    for seq in range(1, count + 1):
        ts += 0.00026
        epoch = step // STEPS_PER_EPOCH
        if seq == 1:
            event = Event(seq, RUN_ID, ev.START_TRAINING_SESSION, ts, 0, 0, {"epochs": 1000, "hyperparameters": {}})
        elif seq % 3800 == 0:
            event = Event(seq, RUN_ID, ev.HEARTBEAT, ts, step, epoch, {"held_back": 0})
        elif seq % 2:
            step += 1
            event = Event(seq, RUN_ID, ev.START_TRAINING_BATCH, ts, step, epoch, {"batch_index": step})
        elif step % STEPS_PER_EPOCH == 0:
            event = Event(seq, RUN_ID, ev.END_EPOCH, ts, step, epoch, {"training_loss": rng.random(),
                                                                     "validation_loss": rng.random(), "lr": 0.001})
        else:
            loss = rng.random()
            event = Event(seq, RUN_ID, ev.END_TRAINING_BATCH, ts, step, epoch,
                          {"batch_index": step, "batch_size": 64, "loss": loss, "training_loss_total": loss * step,
                           "training_batch_count": step % STEPS_PER_EPOCH})
        batch.append(pack(event_to_map(event)))
        if len(batch) == BATCH_EVENTS or seq == count:
            yield seq - len(batch) + 1, batch
            batch = []


def fast_forward(run_dir: Path, count: int, segment_bytes: int) -> tuple[int, dict[int, bytes]]:
    """Append `count` simulated events to a fresh journal; (RSS growth in bytes, the records of a few seqs)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(run_dir / JOURNAL_NAME, segment_bytes=segment_bytes)
    probes = {1, 2, count // 2, count - 1, count}
    kept, rss_before = {}, psutil.Process().memory_info().rss
    for first_seq, batch in simulated_records(count):
        assert journal.append(batch, first_seq) == len(batch)
        kept.update((s, batch[s - first_seq]) for s in probes if first_seq <= s < first_seq + len(batch))
    growth = psutil.Process().memory_info().rss - rss_before
    assert journal.close() is None
    return growth, kept


def check_whole(run_dir: Path, count: int, kept: dict[int, bytes]) -> None:
    """Replay from near the start, middle and end returns exactly the stored bytes; the readers see every seq."""
    journal = Journal(run_dir / JOURNAL_NAME)
    assert (journal.first_seq, journal.last_seq) == (1, count)
    for seq, raw in kept.items():
        got, blob = journal.read_range(seq, 512, 4 * 2**20)
        assert blob[:len(raw)] == raw and decode_records(blob)[0]["seq"] == seq
        assert [m["seq"] for m in decode_records(blob)] == list(range(seq, seq + got)) and got >= min(2, count - seq)
    journal.close()
    assert journal_head(run_dir / JOURNAL_NAME)[0].seq == 1
    assert journal_tail(run_dir / JOURNAL_NAME)[-1].seq == count
    assert last_event_of(run_dir / JOURNAL_NAME, ev.END_EPOCH).type == ev.END_EPOCH


def test_a_journal_in_tiny_segments_is_compressed_and_read_whole(tmp_path):
    count = 100_000
    growth, kept = fast_forward(tmp_path, count, segment_bytes=256 * 1024)
    segments = closed_segments(tmp_path / JOURNAL_NAME)
    assert len(segments) > 10 and segments[0].first == 1
    assert all(a.last + 1 == b.first for a, b in zip(segments, segments[1:]))
    assert gzip.decompress(segments[0].path.read_bytes())[:len(kept[1])] == kept[1]  # plain gzip: zcat reads it
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk / count < 60, f"{on_disk / count:.1f} bytes/event"  # ~150 raw
    check_whole(tmp_path, count, kept)
    assert [m["seq"] for m in stream_journal(tmp_path / JOURNAL_NAME)] == list(range(1, count + 1))
    assert sum(1 for _ in read_journal(tmp_path)) == count


def test_a_damaged_or_missing_segment_loses_only_its_own_events_and_is_named(tmp_path):
    count = 20_000
    fast_forward(tmp_path, count, segment_bytes=64 * 1024)
    segments = closed_segments(tmp_path / JOURNAL_NAME)
    assert len(segments) >= 5
    garbled, gone = segments[1], segments[3]
    garbled.path.write_bytes(garbled.path.read_bytes()[:1000])  # cut short, as a full disk or a bad copy leaves it
    gone.path.unlink()
    for read in (lambda d: [e.seq for e in read_journal(tmp_path, d)], lambda d: [m["seq"] for m in
                                                                                 stream_journal(tmp_path, d)]):
        damage: list[str] = []
        seqs = read(damage)
        lost = set(range(gone.first, gone.last + 1)) | {s for s in range(garbled.first, garbled.last + 1)
                                                       if s not in seqs}
        assert seqs == [s for s in range(1, count + 1) if s not in lost]  # all the rest, in order
        assert seqs[-1] == count
        assert any(line.startswith(f"segment {garbled.path.name} is unreadable after seq ") for line in damage), damage
        assert f"events {gone.first}-{gone.last} are missing from the journal before " in " ".join(damage), damage
    details = run_details(tmp_path)
    assert details["journal_damage"] and details["last_seq"] == count


def test_a_replay_from_events_a_damaged_journal_lost_begins_where_the_journal_goes_on(tmp_path):
    count = 20_000
    fast_forward(tmp_path, count, segment_bytes=64 * 1024)
    segments = closed_segments(tmp_path / JOURNAL_NAME)
    garbled, gone = segments[1], segments[3]
    garbled.path.write_bytes(garbled.path.read_bytes()[:1000])
    gone.path.unlink()
    journal = Journal(tmp_path / JOURNAL_NAME)
    try:
        assert len(journal.missing) == 1 and journal.missing[0].startswith(f"events {gone.first}-{gone.last} are ")
        for lost, next_whole in ((garbled.first, segments[2].first), (gone.first + 1, segments[4].first)):
            got, blob = journal.read_range(lost, 512, 4 * 2**20)
            assert got and [m["seq"] for m in decode_records(blob)][0] == next_whole
        assert journal.read_range(5, 3, 2**20)[0] == 3  # what is whole is served as ever
    finally:
        journal.close()


def test_losing_the_newest_segment_after_a_rotation_reuses_no_seq(tmp_path):
    """The active file empty after a rotation and the newest segment then lost (a bad copy, a hand freeing space):
    the journal reopened goes on after the lost events' seqs, and says they are lost. It went on from the older
    segment's last seq, numbering new events with the lost ones' seqs: a durable plugin that had acked them skipped
    the new events as seen, and no reader could tell that anything was missing."""
    journal = Journal(tmp_path / JOURNAL_NAME, segment_bytes=64 * 1024)
    for first_seq, batch in simulated_records(20_000):
        journal.append(batch, first_seq)
        if len(closed_segments(tmp_path / JOURNAL_NAME)) >= 3 and not (tmp_path / JOURNAL_NAME).stat().st_size:
            break  # a rotation has just emptied the active file
    last = journal.last_seq
    journal.close()
    gone = closed_segments(tmp_path / JOURNAL_NAME)[-1]
    assert gone.last == last
    gone.path.unlink()
    damage: list[str] = []
    assert [e.seq for e in read_journal(tmp_path, damage)][-1] == gone.first - 1
    assert damage == [f"events {gone.first}-{last} are missing from the journal (no segment holds them)"], damage
    assert run_details(tmp_path)["journal_damage"] == damage
    journal = Journal(tmp_path / JOURNAL_NAME)
    try:
        assert journal.last_seq == last and journal.missing == damage
        heartbeat = pack(event_to_map(Event(last + 1, RUN_ID, ev.HEARTBEAT, 1.9e9, 0, 0, {})))
        assert journal.append([heartbeat], last + 1) == 1
        got, blob = journal.read_range(gone.first, 5, 2**20)  # a replay from within the loss: what comes after it
        assert [m["seq"] for m in decode_records(blob)] == [last + 1]
    finally:
        journal.close()
    assert [e.seq for e in read_journal(tmp_path)][-2:] == [gone.first - 1, last + 1]


def test_a_crash_between_compressing_and_emptying_the_active_file_loses_and_doubles_nothing(tmp_path):
    count = 5_000
    fast_forward(tmp_path, count, segment_bytes=64 * 1024)
    active, last = tmp_path / JOURNAL_NAME, closed_segments(tmp_path / JOURNAL_NAME)[-1]
    # The segment renamed in, the file not yet emptied: its records are in both, followed by the newer ones.
    active.write_bytes(gzip.decompress(last.path.read_bytes()) + active.read_bytes())
    (tmp_path / f".{JOURNAL_NAME}.new").write_bytes(b"")
    assert [e.seq for e in read_journal(tmp_path)] == list(range(1, count + 1))
    assert journal_tail(active, 2**30)[0].seq == 1
    journal = Journal(active)
    assert journal.last_seq == count and not list(tmp_path.glob(".*"))
    assert decode_records(journal.read_range(last.first, 1, 1)[1])[0]["seq"] == last.first
    assert decode_records(journal.read_range(count, 1, 1)[1])[0]["seq"] == count
    journal.close()


def test_an_active_file_from_before_segments_is_closed_into_several(tmp_path):
    count = 20_000
    fast_forward(tmp_path, count, segment_bytes=2**40)
    assert not closed_segments(tmp_path / JOURNAL_NAME)
    journal = Journal(tmp_path / JOURNAL_NAME, segment_bytes=256 * 1024)
    journal.append([pack(event_to_map(Event(count + 1, RUN_ID, ev.HEARTBEAT, 1.9e9, 0, 0, {})))], count + 1)
    segments = closed_segments(tmp_path / JOURNAL_NAME)
    assert len(segments) > 5 and all(s.path.stat().st_size < 256 * 1024 for s in segments)
    assert (tmp_path / JOURNAL_NAME).stat().st_size == 0 and journal.last_seq == count + 1
    assert decode_records(journal.read_range(count // 2, 1, 1)[1])[0]["seq"] == count // 2
    journal.close()
    assert [e.seq for e in read_journal(tmp_path)] == list(range(1, count + 2))


@pytest.mark.timeout(3 * PLUGIN_START_S)  # three runs, each starting a checkpoint plugin (torch, starved when busy)
def test_a_continued_run_goes_on_after_the_last_seq_of_a_journal_in_segments(tmp_path):
    checkpoint = [resolve_plugin("checkpoint", {})]  # a continued run starts from its newest checkpoint
    # compaction off: this is about the segments, and every seq is read back (test_journal_compaction.py has it on)
    first = run_training(run_config(tmp_path, checkpoint, epochs=1, target=TINY, journal_segment_mb=0.002,
                                    journal_compact=False, ready_timeout_s=PLUGIN_START_S))
    assert first.status == "completed", first.error
    journal = Path(first.run_dir) / JOURNAL_NAME
    before = [e.seq for e in read_journal(journal)]
    assert len(closed_segments(journal)) >= 2 and before == list(range(1, len(before) + 1))
    resumed = run_training(run_config(tmp_path, checkpoint, epochs=2, target=TINY, journal_segment_mb=0.002,
                                      journal_compact=False, resume=first.run_dir, ready_timeout_s=PLUGIN_START_S),
                           run_id=Path(first.run_dir).name, continue_run=True)
    assert resumed.status == "completed", resumed.error
    events = list(read_journal(journal))
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and len(events) > len(before)
    assert [e.type for e in events].count(ev.START_TRAINING_SESSION) == 2
    counts = dict.fromkeys(ev.COUNTED_BATCH_EVENTS, 0)  # `n` goes on from the last segment's last event
    for e in events:
        counts[e.type] = counts.get(e.type, 0) + 1
        assert e.n == [counts[t] for t in ev.COUNTED_BATCH_EVENTS], e
    assert run_overview(Path(first.run_dir))["status"] == "completed"
    assert len(run_details(Path(first.run_dir))["sessions"]) == 2
    assert {p.name for p in plot_run(Path(first.run_dir), tmp_path / "plots")} >= {"loss.png"}
    # a segment lost meanwhile: the next session's durable plugin goes on past the loss (it waited for it for ever)
    closed_segments(journal)[1].path.unlink()
    again = run_training(run_config(tmp_path, checkpoint, epochs=3, target=TINY, journal_segment_mb=0.002,
                                    journal_compact=False, resume=first.run_dir, drain_timeout_s=30,
                                    ready_timeout_s=PLUGIN_START_S),
                         run_id=Path(first.run_dir).name, continue_run=True)
    assert again.status == "completed" and not again.undrained, (again.error, again.undrained)
    assert "are lost from the run's journal: going on without them" in (
        Path(first.run_dir) / "plugins" / "checkpoint.log").read_text()


def test_a_long_runs_plot_record_keeps_a_bounded_evenly_spaced_curve_of_the_whole_run(tmp_path):
    """The plots' record of a long run (the visualization plugin's memory, what each redraw and `runs plot` draw):
    300,000 events are ~150,000 steps, 15,000 per-step points at every_n_steps 10, thinned to at most
    CURVE_POINTS_MAX, evenly spaced from the first steps to the last. A continued run's truncation keeps the spacing."""
    count = 300_000
    fast_forward(tmp_path, count, segment_bytes=256 * 1024)
    history = History.from_journal(tmp_path, every_n_steps=10)
    steps = [step for step, _ in history.step_losses]
    assert CURVE_POINTS_MAX // 2 <= len(steps) <= CURVE_POINTS_MAX, len(steps)
    spacing = steps[1] - steps[0]
    assert spacing % 10 == 0 and all(evenly_spaced(a, b, spacing) for a, b in zip(steps, steps[1:]))
    assert steps[0] <= spacing and history.last_step - steps[-1] < 2 * spacing, (steps[:2], steps[-1])
    # continued from a checkpoint at a third of the run: the points after it go, and new ones come at the same spacing
    resumed_at = history.last_step // 3
    seq, ts = history.last_seq, 2e9
    history.update(Event(seq + 1, RUN_ID, ev.START_TRAINING_SESSION, ts, resumed_at, 0, {"epochs": 1000}))
    history.update(Event(seq + 2, RUN_ID, ev.LOAD_CHECKPOINT, ts, resumed_at, 0, {"epoch": 0}))
    for i, step in enumerate(range(resumed_at + 1, resumed_at + 50 * spacing)):
        history.update(Event(seq + 3 + i, RUN_ID, ev.END_TRAINING_BATCH, ts, step, 0, {"loss": 0.5}))
    steps = [step for step, _ in history.step_losses]
    assert all(evenly_spaced(a, b, spacing) for a, b in zip(steps, steps[1:])) and steps[-1] > resumed_at + 40 * spacing


def evenly_spaced(step: int, next_step: int, spacing: int) -> bool:
    """The next point is `spacing` on, or twice that where the step between is an epoch's last (simulated_records
    journals end_epoch there, no loss)."""
    return next_step - step == spacing or (next_step - step == 2 * spacing and (step + spacing) % STEPS_PER_EPOCH == 0)


def test_a_plugin_restarted_late_in_a_long_run_says_it_is_working_while_it_rebuilds_from_the_journal(tmp_path):
    """A restarted visualization plugin reads the run's journal (and its TensorBoard files) in one handler: 10^6
    events took 19 s, so in a run of days it passed handler_timeout_s (60 s) and was killed as hung, at every
    restart. It says still_working (the hook the SDK's runner binds) every PROGRESS_EVERY_EVENTS events and records."""
    count = 100_000
    fast_forward(tmp_path, count, segment_bytes=1024 * 1024)
    last = journal_tail(tmp_path / JOURNAL_NAME)[-1]
    for instance in ("first", "restarted"):  # the restarted one reads the first one's TensorBoard file too
        calls = []
        plugin = VisualizationPlugin({"plots": False, "every_n_steps": 1})
        plugin.bind_sender(lambda message: None, progress=lambda: calls.append(1))
        Harness(plugin, run_id=RUN_ID, run_dir=str(tmp_path))
        plugin.handle(Event(last.seq + 1, RUN_ID, ev.HEARTBEAT, last.ts, last.step, last.epoch, {}))
        plugin.teardown()
        summaries = 0 if instance == "first" else count // 2  # a loss a step, about half the events
        assert len(calls) >= (count + summaries) // PROGRESS_EVERY_EVENTS - 2, (instance, len(calls))
    calls = []
    History().backfill(tmp_path, before_seq=count, progress=calls.append)  # the e-mail plugin's (and runs plot's)
    assert len(calls) >= (count - 1) // PROGRESS_EVERY_EVENTS


def test_monitor_readings_of_a_long_run_are_thinned_alike_and_their_series_bounded():
    """A monitor's readings every 5 s for three days (~52,000) keep at most CURVE_POINTS_MAX points, the first
    and recent ones among them; a plugin inventing metric names cannot grow the record past READING_SERIES_MAX."""
    from trainbus.plugins._history import READING_SERIES_MAX
    history, ts = History(), 1.8e9
    history.update(Event(1, RUN_ID, ev.START_TRAINING_SESSION, ts, 0, 0, {"epochs": 1}))
    readings = 3 * 24 * 3600 // 5
    for i in range(readings):
        history.update(Event(2 + i, RUN_ID, ev.METRIC, ts + 5 * i, i, 0,
                             {"plugin": "cpu", "name": "cpu/process_percent", "value": float(i)}))
    points = history.readings["cpu/process_percent"]
    assert CURVE_POINTS_MAX // 2 <= len(points) <= CURVE_POINTS_MAX and points[0][1] == 0.0
    assert points[-1][1] > readings - 2 * readings / len(points)
    seq = history.last_seq
    for i in range(2 * READING_SERIES_MAX):
        history.update(Event(seq + 1 + i, RUN_ID, ev.METRIC, ts, 0, 0, {"plugin": "p", "name": f"made_up_{i}",
                                                                         "value": 1.0}))
    assert len(history.readings) == READING_SERIES_MAX


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ten_million_events_fit_in_a_gigabyte_with_flat_memory_and_read_back_exactly(tmp_path):
    """Acceptance (issue #15): 10^7 events under the default policy; ~5 minutes on a busy 2-core box."""
    count = 10_000_000
    growth, kept = fast_forward(tmp_path, count, SEGMENT_BYTES)
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= 2**30, f"{on_disk / 2**20:.0f} MiB"
    # Measured 11.5 MiB (docs/benchmarks.md): the active file's offsets, a segment being compressed, the allocator's
    # pools. A dense index of every seq alone would be 80 MB.
    assert growth < 48 * 2**20, f"RSS grew {growth / 2**20:.0f} MiB"
    check_whole(tmp_path, count, kept)
    assert {p.name for p in plot_run(tmp_path, tmp_path / "plots")} >= {"loss.png"}


def with_stderr_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """The command with a pty as its stderr (stdout a pipe); its exit code and what it wrote on the terminal."""
    import os
    import select
    import subprocess

    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal,
                                env={**os.environ, "TERM": "xterm", "COLUMNS": "150"})
        os.close(terminal)
        said = b""
        while select.select([controller], [], [], 120)[0]:  # until the command (the pty's only writer) is gone
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: no writer left
                break
            if not chunk:
                break
            said += chunk
        proc.communicate(timeout=120)
    finally:
        os.close(controller)
    return proc.returncode, said.decode(errors="replace")


def test_runs_show_and_plot_of_a_long_journal_say_on_a_terminal_how_far_their_read_got(tmp_path):
    """A run of days (10^7 events) took `runs show` half a minute and `runs plot` minutes, saying nothing meanwhile;
    and runs plot gave up after 300 s with a traceback. On a terminal a line now says how far the read got."""
    import re
    import subprocess

    from conftest import trainbus_cmd
    from trainbus.kernel.cli_common import LONG_JOURNAL_EVENTS

    count = LONG_JOURNAL_EVENTS + 100_000  # runs show's line moves every 65,536 records: twice, time to draw
    fast_forward(tmp_path / "runs" / RUN_ID, count, segment_bytes=4 * 2**20)
    (tmp_path / "runs" / RUN_ID / "config.json").write_text("{}\n")
    for command, what in (("show", f"run {RUN_ID}"), ("plot", f"plotting run {RUN_ID}")):
        args = [*trainbus_cmd(), "runs", command, RUN_ID, "--runs-dir", str(tmp_path / "runs")]
        code, said = with_stderr_on_a_terminal(args)
        assert code == 0, said
        assert re.search(rf"{what}: reading its journal, \d+ % \([\d,]+ of {count:,} events\)", said), said[-500:]
        if command == "show":  # off a terminal: no such line (runs plot's goes through the same helper)
            quiet = subprocess.run(args, capture_output=True, text=True, timeout=120)
            assert quiet.returncode == 0 and "reading its journal" not in quiet.stderr, quiet.stderr
