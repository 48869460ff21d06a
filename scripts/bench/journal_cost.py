"""What the journal costs per event, and what publishing costs with 1, 4, 16 and 64 subscriber processes.

    .venv/bin/python scripts/bench/journal_cost.py            # ~1.5 min on 2 cores
    .venv/bin/python scripts/bench/journal_cost.py --dir /some/other/disk --subscribers 0,1,4,16,64

Part 1, the journal. Bytes per event come from a real run's journal (digits MLP, 2 epochs, no plugins).
Those very records are then appended to a fresh Journal in the run directory's file system (runs/ by
default), under three fsync policies, interleaved over repetitions:
- default: the kernel's policy (flush to the OS on every append, fsync at most once per FSYNC_INTERVAL_S);
- fsync every append (fsync_interval_s=0);
- no fsync (fsync_interval_s=inf; only close() fsyncs).
and two batch sizes: 1 event per append (the worst case, a flush of one event) and 72 (one 20 ms flush
of a tiny-MLP run: 36 steps x 2 events), each in a tight loop (per event, per append call p50/p99/max);
then at a tiny-MLP pace (72 events every 20 ms for 3 s), where the fsync policy's real cost shows:
fsyncs made, append latency, and the share of the bus thread's time spent appending.

Part 2, fan-out. A started trainbus Bus with k SUB processes (scripts/bench/_subscriber.py: counts and
unpacks; each a real process), for k in 0, 1, 4, 16, 64:
- burst: publish() N events in a tight loop on this thread: publish() us/call, the bus's flush rate
  (journaled and sent), the rate at which every subscriber got its copy, the total deliveries/s, and
  the worst subscriber's received fraction (PUB drops at the high-water mark);
- paced: a real tiny-MLP training step (torch, 1 thread, a fixed batch) with two publish() calls per
  step, as the loop does; per-step time with the bus and k subscribers vs the same step with no bus
  (alternated, same window), the time spent inside publish(), and the subscribers' CPU per step.
Before each fan-out repetition the bench waits (bounded) until other processes are quiet, and says how
much CPU they took during the measurements (/proc/stat minus ours and our subscribers').
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import msgpack
import psutil
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import (
    DATA,
    FINAL,
    MARK,
    REPO,
    CpuWatch,
    Subscribers,
    batch_data,
    filesystem_of,
    machine_line,
    median,
    quiet_note,
    table,
    wait_quiet,
)
from trainbus.kernel.bus import FLUSH_INTERVAL_S, Bus
from trainbus.kernel.publishers import EVENTS_HWM
from trainbus.kernel.config import RunConfig
from trainbus.kernel.journal import FSYNC_INTERVAL_S, Journal
from trainbus.kernel.run_bus import close_bus, open_bus, wait_ready
from trainbus.kernel.session import run_training
from trainbus.proto import JOURNAL_NAME
from trainbus.proto import events as ev


# -- part 1: the journal --------------------------------------------------------------------------

def real_records(workdir: Path) -> tuple[list[bytes], dict[str, list[int]]]:
    """The encoded records of a short real run, and their sizes by event type."""
    result = run_training(RunConfig(epochs=2, runs_dir=str(workdir / "runs"), device="cpu", plugins=[]))
    if result.status != "completed":
        raise RuntimeError(f"reference run failed: {result.error}")
    blob = (Path(result.run_dir) / JOURNAL_NAME).read_bytes()
    unpacker = msgpack.Unpacker(raw=False)  # the journal is a plain concatenation of msgpack maps
    unpacker.feed(blob)
    records, sizes, offset = [], {}, 0
    for record in unpacker:
        end = unpacker.tell()
        records.append(blob[offset:end])
        sizes.setdefault(record["type"], []).append(end - offset)
        offset = end
    return records, sizes


POLICIES = [(f"default (fsync <= 1 per {FSYNC_INTERVAL_S:g} s)", FSYNC_INTERVAL_S),
            ("fsync every append", 0.0),
            ("no fsync", float("inf"))]


def journal_bench(args, workdir: Path, records: list[bytes]) -> None:
    jdir = workdir / "journal-bench"
    jdir.mkdir()
    os.fsync = _counting_fsync  # nothing else runs in part 1; restored below
    try:
        tight = _journal_tight(args, jdir, records)
        paced = _journal_paced(args, jdir, records)
    finally:
        os.fsync = _counting_fsync.__defaults__[0]
    rows = []
    for (name, batch), rs in tight.items():
        per_event = median([r[0] for r in rs])
        rows.append([name, batch, f"{per_event * 1e6:.2f}", f"{1 / per_event:,.0f}",
                     f"{median([r[1] for r in rs]) * 1e6:.1f}", f"{median([r[2] for r in rs]) * 1e6:.0f}",
                     f"{max(r[3] for r in rs) * 1e3:.2f}", f"{median([r[4] for r in rs]):.0f}"])
    rows.sort(key=lambda r: (r[1], r[0]))
    print(table(["policy", "events/append", "us/event", "events/s", "append p50 us", "append p99 us",
                 "append max ms", "bytes/event"], rows,
                f"Journal.append, tight loop, {args.journal_events:,} real records per measurement "
                f"(fsync every append: at most {args.max_fsync_appends} appends), on {filesystem_of(jdir)}, "
                f"median of {args.reps} interleaved reps"))
    print()
    rows = []
    for name, (calls, fsyncs, wall, n) in paced.items():
        calls = sorted(calls)
        rows.append([name, len(calls), fsyncs, f"{sum(calls) / n * 1e6:.2f}", f"{calls[len(calls) // 2] * 1e6:.0f}",
                     f"{calls[int(len(calls) * 0.99)] * 1e6:.0f}", f"{calls[-1] * 1e3:.2f}",
                     f"{sum(calls) / wall * 100:.2f} %"])
    print(table(["policy", "appends", "fsyncs", "us/event", "append p50 us", "append p99 us", "append max ms",
                 "bus-thread time"], rows,
                f"Journal.append at a tiny-MLP pace: {args.paced_batch} events every {FLUSH_INTERVAL_S * 1e3:.0f} ms "
                f"for {args.paced_s:g} s (the bus's flush of 2 events per ~550 us step); bus-thread time = "
                f"share of wall time spent in append"))
    print()


def _append_timed(journal: Journal, records: list[bytes], k: int, batch: int, calls: list[float]) -> tuple[int, int]:
    """Append the next `batch` records (cycling through them), its wall time added to calls; (next k, records
    appended)."""
    chunk = records[k:k + batch]
    t = time.perf_counter()
    journal.append(chunk, journal.last_seq + 1)
    calls.append(time.perf_counter() - t)
    return (k + batch if k + 2 * batch <= len(records) else 0), len(chunk)


def _journal_tight(args, jdir: Path, records: list[bytes]) -> dict:
    results: dict[tuple, list] = {}
    for rep in range(args.reps):
        for batch in (1, 72):
            for name, interval in POLICIES[rep % 3:] + POLICIES[:rep % 3]:
                path = jdir / f"tight-{rep}-{batch}-{interval}"
                journal = Journal(path, fsync_interval_s=interval)
                calls, n, k = [], 0, 0
                while n < args.journal_events:
                    k, appended = _append_timed(journal, records, k, batch, calls)
                    n += appended
                    if interval == 0.0 and len(calls) >= args.max_fsync_appends:
                        break
                size = path.stat().st_size
                journal.close()
                path.unlink()
                calls.sort()
                results.setdefault((name, batch), []).append(
                    (sum(calls) / n, calls[len(calls) // 2], calls[int(len(calls) * 0.99)], calls[-1], size / n))
    return results


def _journal_paced(args, jdir: Path, records: list[bytes]) -> dict:
    out = {}
    batch = args.paced_batch
    for name, interval in POLICIES:
        path = jdir / f"paced-{interval}"
        journal = Journal(path, fsync_interval_s=interval)
        calls, n, k = [], 0, 0
        fsyncs0 = _fsyncs
        start = time.perf_counter()
        next_at = start
        while time.perf_counter() - start < args.paced_s:
            next_at += FLUSH_INTERVAL_S
            k, appended = _append_timed(journal, records, k, batch, calls)
            n += appended
            time.sleep(max(0.0, next_at - time.perf_counter()))
        wall = time.perf_counter() - start
        out[name] = (calls, _fsyncs - fsyncs0, wall, n)
        journal.close()
        path.unlink()
    return out


_fsyncs = 0


def _fsync_count() -> int:
    return _fsyncs


def _counting_fsync(fd, _real=os.fsync):
    global _fsyncs
    _fsyncs += 1
    _real(fd)


# -- part 2: fan-out ------------------------------------------------------------------------------

class TinyStep:
    """One tiny-MLP optimizer step on a fixed batch, the work of the trainbus loop's step without the loader."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = torch.rand(32, 64)
        self.y = torch.randint(0, 10, (32,))

    def __call__(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = nn.functional.cross_entropy(out, self.y)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            (out.argmax(dim=1) == self.y).float().mean().item()
        return loss.item()


def paced(step: TinyStep, bus: Bus | None, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds per publish() call) for `steps` steps with two publishes each."""
    in_publish = 0.0
    total = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        if bus is not None:
            t = time.perf_counter()
            bus.publish(ev.START_TRAINING_BATCH, i, 1, {"batch_index": i % 45})
            in_publish += time.perf_counter() - t
        loss = step()
        if bus is not None:
            t = time.perf_counter()
            bus.publish(DATA, i, 1, {"batch_index": i % 45, "loss": loss, "training_loss_total": total,
                                     "training_batch_count": i % 45 + 1})
            in_publish += time.perf_counter() - t
        total += loss
    return (time.perf_counter() - t0) / steps, in_publish / (2 * steps) if bus is not None else 0.0


def fanout_bench(args, workdir: Path) -> None:
    torch.set_num_threads(1)
    step = TinyStep()
    for _ in range(200):  # warm-up
        step()
    rows = []
    foreign: list[float] = []
    started = time.monotonic()
    for k in [int(x) for x in args.subscribers.split(",")]:
        run_dir = workdir / f"fanout-{k}"
        run_dir.mkdir()
        bus, _, sockets = open_bus(f"bench-fanout-{k}", run_dir, [])
        bus.start()
        subs = Subscribers(k, bus.events_endpoint, workdir) if k else None
        if subs:
            subs.wait_ready(lambda: time.sleep(0.02))  # the bus heartbeats every 0.1 s until wait_ready
        wait_ready(bus, 0)
        procs = [psutil.Process(p.pid) for p in subs.procs] if subs else []
        sub_cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in procs)
        burst, pace = [], []
        mark = 0

        def marker(rep):
            bus.publish(MARK, 0, 1, {"rep": rep})

        for rep in range(args.reps):
            if time.monotonic() - started < args.retry_budget_s:
                wait_quiet(args.quiet_cores, args.quiet_wait_s, pids=[p.pid for p in subs.procs] if subs else [])
            watch = CpuWatch([p.pid for p in subs.procs] if subs else [])
            # burst
            c0 = bus.counters["events"]
            t0 = time.monotonic()
            for i in range(args.burst):
                bus.publish(DATA, i, 1, batch_data(i))
            t1 = time.monotonic()
            while bus.counters["events"] - c0 < args.burst:
                time.sleep(0.0005)
            t_flushed = time.monotonic()
            got = None
            if subs:
                marker(mark)
                got = subs.wait_rep(mark, lambda m=mark: marker(m), timeout_s=120)
                mark += 1
            flushed = args.burst / (t_flushed - t0)
            if got:
                t_last = max(r[3] for r in got.values())
                counts = [r[0] for r in got.values()]
                per_sub = median([r[0] / (r[3] - t0) for r in got.values() if r[0]])
                total_rate = sum(counts) / (t_last - t0)
                burst.append(((t1 - t0) / args.burst, flushed, per_sub, total_rate, min(counts) / args.burst))
            else:
                burst.append(((t1 - t0) / args.burst, flushed, None, None, None))
            # paced, alternating with the same step without any bus
            cpu0 = sub_cpu()
            with_bus, in_pub = paced(step, bus, args.steps)
            cpu1 = sub_cpu()
            without, _ = paced(step, None, args.steps)
            got = None
            if subs:
                bus.flush_now()
                marker(mark)
                got = subs.wait_rep(mark, lambda m=mark: marker(m), timeout_s=120)
                mark += 1
            foreign.append(watch.stop())
            pace.append((with_bus, without, in_pub, (cpu1 - cpu0) / args.steps,
                         min(r[0] for r in got.values()) / args.steps if got else None))
        if subs:
            subs.finish(lambda: bus.publish(FINAL, 0, 1, {}))
        close_bus(bus, run_dir, sockets)

        def b(i):
            return median([x[i] for x in burst])

        def p(i):
            return median([x[i] for x in pace])

        overhead = median([w / wo - 1 for w, wo, *_ in pace])
        rows.append([k, f"{b(0) * 1e6:.2f}", f"{b(1):,.0f}",
                     f"{b(2):,.0f}" if k else "-", f"{b(3):,.0f}" if k else "-",
                     f"{min(x[4] for x in burst) * 100:.1f} %" if k else "-",
                     f"{p(1) * 1e6:.0f}", f"{p(0) * 1e6:.0f}", f"{overhead * 100:+.1f} %", f"{p(2) * 1e6:.2f}",
                     f"{p(3) * 1e6:.0f}" if k else "-",
                     f"{min(x[4] for x in pace) * 100:.1f} %" if k else "-"])
        print(f"  {k} subscribers done", flush=True)
    print()
    print(table(["subs", "burst publish() us/call", "bus flushed ev/s", "ev/s per sub", "deliveries/s",
                 "burst received (worst)", "step us no bus", "step us bus+subs", "step overhead",
                 "paced publish() us/call", "subs CPU us/step", "paced received (worst)"], rows,
                f"fan-out: a started Bus with k SUB processes; burst = {args.burst:,} publish() in a tight loop; "
                f"paced = {args.steps:,} tiny-MLP steps x 2 events; median of {args.reps} reps; "
                f"SNDHWM=RCVHWM={EVENTS_HWM:,}, flush every {FLUSH_INTERVAL_S * 1e3:.0f} ms"))
    print("  " + quiet_note(foreign, args.quiet_cores))
    print()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default=str(REPO / "runs"),
                   help="where the journal goes (default: runs/, the run dir's disk)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--journal-events", type=int, default=20_000, help="events per tight-loop journal measurement")
    p.add_argument("--paced-s", type=float, default=3.0, help="seconds per paced journal measurement")
    p.add_argument("--paced-batch", type=int, default=72, help="events per append in the paced measurement")
    p.add_argument("--max-fsync-appends", type=int, default=400, help="cap on appends under fsync-every-append")
    p.add_argument("--subscribers", default="0,1,4,16,64")
    p.add_argument("--burst", type=int, default=20_000, help="events per burst (kept under the HWM)")
    p.add_argument("--steps", type=int, default=1000, help="tiny-MLP steps per paced measurement")
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="before each fan-out repetition, wait until other processes use at most this many cores")
    p.add_argument("--quiet-wait-s", type=float, default=10.0, help="... but at most this long")
    p.add_argument("--retry-budget-s", type=float, default=60.0, help="no more waiting after this many seconds")
    p.add_argument("--skip-journal", action="store_true")
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    args = p.parse_args()

    workdir = Path(args.dir).resolve() / f"bench-journal-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True)
    torch.set_num_threads(1)
    print(machine_line())
    print(f"work dir {workdir} on {filesystem_of(workdir)}", flush=True)
    started = time.monotonic()
    try:
        if not args.skip_journal:
            records, sizes = real_records(workdir)
            rows = [[t, len(s), f"{sum(s) / len(s):.0f}"] for t, s in sorted(sizes.items(), key=lambda x: -len(x[1]))]
            total = sum(len(r) for r in records)
            rows.append(["all", len(records), f"{total / len(records):.0f}"])
            print(table(["event type", "count", "bytes/event"], rows,
                        "journal bytes per event: a real run (digits MLP, 2 epochs, no plugins)"))
            print()
            journal_bench(args, workdir, records)
        if not args.skip_fanout:
            fanout_bench(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
