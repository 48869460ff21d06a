"""A long run's journal on disk with and without compaction, and what compacting it costs the bus thread.

    .venv/bin/python scripts/bench/journal_compaction.py                     # 10^6 events, ~1 min on 2 cores
    .venv/bin/python scripts/bench/journal_compaction.py --events 10000000   # 10^7, ~10 min

The events are tests/test_journal_segments.py's fast-forwarded mix (`simulated_records`: per step a
start_training_batch and an end_training_batch with its loss, a heartbeat every ~3,800 events, an end_epoch every
10,000 steps), appended in 72-event flushes to a fresh Journal with the default 8 MiB segments. Then:
- bytes on disk whole: what a run keeps with `journal_compact = false`, or with no checkpoint saved;
- the journal reopened and every closed segment offered for compaction, as the bus offers them once every durable
  plugin acked them and a checkpoint was saved after them: bytes on disk after, the worker's wall time, and the bus
  thread's time in compact_through (nothing due; handing segments over);
- the result read back: events kept, damage lines from read_journal (none expected), and `runs plot`'s read
  (History.from_journal) over it, timed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the fast-forwarded mix the journal's tests use, not a copy of it

from test_journal_segments import simulated_records  # noqa: E402
from trainbus.kernel.journal import Journal  # noqa: E402
from trainbus.plugins._history import History  # noqa: E402
from trainbus.proto import JOURNAL_NAME  # noqa: E402
from trainbus.proto.journal_format import read_journal  # noqa: E402


def on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="how many events to fast-forward")
    parser.add_argument("--dir", type=Path, default=None, help="where the journal is written (default: $TMPDIR)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="journal-compaction-", dir=args.dir))
    try:
        started = time.perf_counter()
        journal = Journal(work / JOURNAL_NAME)
        for first_seq, batch in simulated_records(args.events):
            journal.append(batch, first_seq)
        journal.close()
        append_s = time.perf_counter() - started
        whole = on_disk(work)

        journal = Journal(work / JOURNAL_NAME)
        segments = journal.segments
        idle = []
        for _ in range(10_000):  # nothing due: what every heartbeat of a run without a checkpoint costs
            t = time.perf_counter()
            journal.compact_through(0)
            idle.append(time.perf_counter() - t)
        handing, started, cpu = [], time.perf_counter(), time.process_time()
        for _ in range(100_000):
            t = time.perf_counter()
            journal.compact_through(journal.last_seq)
            handing.append(time.perf_counter() - t)
            if all(s.compacted for s in journal.segments):
                break
            time.sleep(0.005)
        worker_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
        dropped = journal.compacted_events
        journal.close()
        compacted = on_disk(work)
        active = (work / JOURNAL_NAME).stat().st_size

        damage: list[str] = []
        started = time.perf_counter()
        kept = sum(1 for _ in read_journal(work, damage))
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        history = History.from_journal(work, every_n_steps=10)
        plot_s = time.perf_counter() - started

        print(f"{args.events:,} events fast-forwarded in {append_s:.1f} s; {len(segments)} closed segments of 8 MiB "
              f"(raw) + the active file")
        print(f"on disk whole:      {whole / 2**20:9.1f} MiB  ({whole / args.events:.1f} bytes/event)")
        print(f"on disk compacted:  {compacted / 2**20:9.1f} MiB  ({compacted / args.events:.2f} bytes/event, "
              f"{whole / max(compacted, 1):.0f}x less), of which the active file (never compacted, not gzipped) "
              f"{active / 2**20:.1f} MiB")
        print(f"events kept: {kept:,} of {args.events:,} ({dropped:,} dropped); read_journal damage lines: "
              f"{len(damage)}")
        print(f"compaction: {worker_s:.1f} s wall for {len(segments)} segments "
              f"({1000 * worker_s / max(len(segments), 1):.0f} ms each, on the journal's worker thread; the process's "
              f"CPU meanwhile {1000 * cpu_s / max(len(segments), 1):.0f} ms a segment)")
        print(f"bus thread, compact_through: nothing due p50 {1e6 * percentile(idle, 0.5):.2f} us, max "
              f"{1e6 * max(idle):.1f} us; handing segments over ({len(handing)} calls) p50 "
              f"{1e6 * percentile(handing, 0.5):.1f} us, p99 {1e6 * percentile(handing, 0.99):.1f} us, max "
              f"{1e6 * max(handing):.0f} us")
        print(f"read back: read_journal {read_s:.2f} s; runs plot's read (History.from_journal) {plot_s:.2f} s, "
              f"{len(history.step_losses)} loss points up to step {history.last_step:,}")
        return 0 if not damage else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
