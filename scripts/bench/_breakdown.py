"""Part 3 of bus_overhead.py: where the tiny MLP's overhead goes (its docstring says what each row is)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import psutil
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import DATA, FINAL, Subscribers, batch_data, median, quiet_note, table
from _runs import Measurer, bare_run, output_to, run_mean, trainbus_run
from trainbus.kernel.bus import Bus
from trainbus.kernel.config_file import load_config
from trainbus.kernel.loop import Loop
from trainbus.kernel.run_bus import close_bus, open_bus, wait_drained, wait_ready
from trainbus.kernel.spec import build_spec
from trainbus.kernel.supervisor import PluginSpec
from trainbus.kernel.target import DEFAULT_TARGET
from trainbus.kernel.training_state import seed_everything
from trainbus.proto import events as ev


class _NullPublisher:
    """The Loop's publisher interface doing nothing but stamping end_training_batch like the others."""

    def __init__(self):
        self.stamps: dict[int, list[float]] = {}

    def publish(self, type_, step, epoch, data):
        if type_ == ev.END_TRAINING_BATCH:
            self.stamps.setdefault(epoch, []).append(time.time())

    def take_replies(self):
        return []

    def await_votes(self, type_, timeout_s):
        return []


class _InstrumentedBus(Bus):
    """The kernel's Bus, timing its flushes (CPU and wall, in the bus thread) and snapshotting the
    training thread's and the plugins' CPU time between wait_ready (training starts) and wait_drained
    (diagnose puts _instrumented_wait_ready/_drained in place of session's wait_ready/wait_drained)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.flush_cpu = self.flush_wall = 0.0
        self.flushed_events = 0
        self.snaps: list[tuple] = []

    def _flush(self, *args, **kwargs):
        n = len(self._queue)
        c, w = time.thread_time(), time.perf_counter()
        super()._flush(*args, **kwargs)
        self.flush_cpu += time.thread_time() - c
        self.flush_wall += time.perf_counter() - w
        self.flushed_events += n

    def _snapshot(self) -> tuple:
        plugin_cpu = 0.0
        for child in self.supervisor.children.values():
            try:
                t = psutil.Process(child.proc.pid).cpu_times()
                plugin_cpu += t.user + t.system
            except (psutil.Error, AttributeError):
                pass
        return time.thread_time(), self.flush_cpu, self.flush_wall, self.flushed_events, plugin_cpu


# *args/**kwargs: whatever the kernel's signatures grow, pass it on
def _instrumented_wait_ready(bus: _InstrumentedBus, *args, **kwargs):
    missing = wait_ready(bus, *args, **kwargs)
    bus.snaps.append(bus._snapshot())
    return missing


def _instrumented_wait_drained(bus: _InstrumentedBus, *args, **kwargs):
    # before the plugins exit (their CPU time goes with them); a moment to handle the last flush
    bus.flush_now()
    time.sleep(0.05)
    bus.snaps.append(bus._snapshot())
    return wait_drained(bus, *args, **kwargs)


def diagnose(args, workdir: Path, measure: Measurer) -> None:
    """Tiny MLP, one torch thread: bare -> + Loop code -> + bus thread -> + default plugins, with CPU split."""
    from trainbus.kernel import run_bus, session

    torch.set_num_threads(1)
    hp, epochs = {"model": "mlp"}, args.mlp_epochs
    default_plugins = load_config(None).plugins
    log = workdir / "trainbus-output.log"
    variants = ["bare", "Loop + null publisher", "trainbus, 0 plugins", "trainbus, default plugins"]

    def one(variant):
        if variant == "bare":
            cpu: list[float] = []
            stamps = bare_run(hp, epochs, args.seed, cpu)
            return run_mean(stamps), cpu[0] / sum(len(s) for s in stamps), None
        if variant.startswith("Loop"):
            seed_everything(args.seed)
            spec = build_spec(DEFAULT_TARGET, hp)
            spec.epochs = epochs
            pub = _NullPublisher()
            c = time.thread_time()
            out = Loop(spec, pub, torch.device("cpu")).run()
            return run_mean([pub.stamps[k] for k in sorted(pub.stamps)]), (time.thread_time() - c) / out.steps, None
        plugins = [] if variant.endswith("0 plugins") else default_plugins
        buses = []

        def make_bus(*a, **kw):
            buses.append(_InstrumentedBus(*a, **kw))
            return buses[-1]

        # run_training builds its bus in run_bus.open_bus, which calls run_bus's Bus
        run_bus.Bus, session.wait_ready, session.wait_drained = (make_bus, _instrumented_wait_ready,
                                                                  _instrumented_wait_drained)
        try:
            stamps, _, _ = trainbus_run(hp, epochs, args.seed, plugins, workdir / "runs", log)
        finally:
            run_bus.Bus, session.wait_ready, session.wait_drained = Bus, wait_ready, wait_drained
        steps = sum(len(s) for s in stamps)
        (c0, fc0, fw0, fe0, p0), (c1, fc1, fw1, fe1, p1) = buses[0].snaps[:2]
        return run_mean(stamps), (c1 - c0) / steps, ((fc1 - fc0) / steps, (fw1 - fw0) / steps,
                                                        (fe1 - fe0) / steps, (p1 - p0) / steps)

    reps = args.diagnose_reps
    got: dict[str, list] = {v: [] for v in variants}
    foreign_before = len(measure.foreign)
    for rep in range(reps):
        measure.settle()
        for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            got[variant].append(measure(lambda: one(variant)))
    rows, previous = [], None
    for variant in variants:
        step = median([g[0] for g in got[variant]])
        cpu = median([g[1] for g in got[variant]])
        extra = [g[2] for g in got[variant] if g[2] is not None]
        cols = ["-"] * 4
        if extra:
            cols = [f"{median([e[0] for e in extra]) * 1e6:.1f}", f"{median([e[1] for e in extra]) * 1e6:.1f}",
                    f"{median([e[2] for e in extra]):.2f}",
                    f"{median([e[3] for e in extra]) * 1e6:.0f}" if "default plugins" in variant else "-"]
        bare = median([g[0] for g in got["bare"]])
        rows.append([variant, f"{step * 1e6:.0f}", f"{(step / bare - 1) * 100:+.1f} %" if previous else "-",
                     f"{(step / previous - 1) * 100:+.1f} %" if previous else "-", f"{cpu * 1e6:.0f}", *cols])
        previous = step
    print(table(["variant", "us/step", "vs bare", "vs row above", "train-thread CPU us/step",
                 "bus flush CPU us/step", "bus flush wall us/step", "events/step", "plugin CPU us/step"], rows,
                f"where the tiny MLP's overhead goes (1 torch thread, median of {reps} interleaved reps; "
                f"CPU columns over the whole run incl. validation, per training step)"))
    print("  " + quiet_note(measure.foreign[foreign_before:], args.quiet_cores))
    print()
    flush_cost(workdir)
    plugin_cpu(workdir)


def flush_cost(workdir: Path) -> None:
    """What the bus thread does per event, uncontended: _flush() called on this thread, and its parts."""
    from trainbus.kernel.journal import Journal
    from trainbus.proto import pack, unpack

    run_dir = workdir / "flush-cost"
    run_dir.mkdir()
    bus, _, sockets = open_bus("bench-flush-cost-run", run_dir, [])  # not started: we drive _flush() ourselves
    sub = bus.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(bus.events_endpoint)
    time.sleep(0.2)

    def drain():
        while True:
            try:
                sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    def fill(n):  # a tiny-MLP step's two events, n/2 times: one flush's worth
        for i in range(n // 2):
            bus.publish(ev.START_TRAINING_BATCH, i, 1, {"batch_index": i % 45})
            bus.publish(DATA, i, 1, batch_data(i))

    burst, rounds = 72, 300  # ~ 20 ms of a 550 us step: 36 steps, 72 events
    per_round = []
    for r in range(rounds):
        fill(burst)
        t = time.perf_counter()
        bus._flush()
        per_round.append((time.perf_counter() - t) / burst)
        drain()
    whole = median(per_round)  # median of rounds: robust to a neighbour's burst on a shared box
    rows = [["Bus._flush(), whole, per event", f"{whole * 1e6:.2f}", "100 %"]]

    n, chunk = 21_600, burst
    raws = [pack({"v": 1, "seq": i + 1, "run": "bench-flush-cost-run", "type": DATA, "ts": time.time(),
                  "step": i, "epoch": 1, "data": batch_data(i)}) for i in range(n)]

    def timed(fn):
        """Median over chunks of `burst` items of fn(chunk_index, items) per item, drains not timed."""
        costs = []
        for k in range(0, n, chunk):
            t = time.perf_counter()
            fn(k, raws[k:k + chunk])
            costs.append((time.perf_counter() - t) / chunk)
            drain()
        return median(costs)

    def build(k, items):
        for i in range(k, k + len(items)):
            {"v": 1, "seq": i, "run": "r", "type": DATA, "ts": 0.0, "step": i, "epoch": 1, "data": batch_data(i)}

    def pack_all(k, items):
        for i in range(k, k + len(items)):
            pack({"v": 1, "seq": i, "run": "bench-flush-cost-run", "type": DATA, "ts": 0.0, "step": i, "epoch": 1,
                  "data": {"batch_index": 1, "loss": 0.5, "training_loss_total": 3.5, "training_batch_count": 2}})

    def unpack_all(k, items):
        for raw in items:
            unpack(raw)

    jdir = workdir / "flush-cost-journal"
    jdir.mkdir()
    journal = Journal(jdir / "events")

    def append(k, items):
        journal.append(items, journal.last_seq + 1)

    pub = bus.publishers.pub

    def send_multipart(k, items):
        for raw in items:
            pub.send_multipart((b"end_training_batch", raw), zmq.NOBLOCK)

    more, last = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)

    def send_two(k, items):
        for raw in items:
            pub.send(b"end_training_batch", more)
            pub.send(raw, last)

    parts = [("build envelope + data dicts", timed(build)),
             ("proto.pack (msgpack)", timed(pack_all)),
             ("proto.unpack (the decode check, user data only)", timed(unpack_all)),
             (f"Journal.append, {burst}-event batches", timed(append)),
             ("two pub.send() with int flags (the bus's send)", timed(send_two)),
             ("  was: pub.send_multipart((topic, raw), NOBLOCK)", timed(send_multipart))]
    journal.close()
    for name, cost in parts:
        rows.append([name, f"{cost * 1e6:.2f}", f"{cost / whole * 100:.0f} %"])
    sub.close()
    bus.journal.close()  # the bus was never started (Bus.close() joins its thread): close its parts by hand
    bus.ctx.destroy(linger=0)  # every socket of the bus, then the context
    if sockets != run_dir:
        shutil.rmtree(sockets, ignore_errors=True)
    print(table(["bus thread, per event, no contention", "us", "of _flush"], rows,
                f"the bus thread's cost per event (flushes of {burst} events, on this thread, nothing else running)"))
    print()


def plugin_cpu(workdir: Path) -> None:
    """CPU per step of each default plugin vs a bare SUB that only unpacks, at a tiny-MLP pace."""
    specs = {p.name: PluginSpec(p.name, p.target, p.settings, console=(p.name == "console"))
             for p in load_config(None).plugins}
    rows = []
    step_s, duration_s = 550e-6, 2.0
    for name in [*specs, "bare SUB (_subscriber.py)"]:
        run_dir = workdir / f"plugin-cpu-{len(rows)}"
        run_dir.mkdir()
        with output_to(workdir / "trainbus-output.log"):
            bus, _, sockets = open_bus("bench-plugin-cpu", run_dir, [specs[name]] if name in specs else [])
            bus.start()
            missing = wait_ready(bus, 15)
            subs = None
            if name not in specs:
                subs = Subscribers(1, bus.events_endpoint, workdir)
                subs.wait_ready(lambda: time.sleep(0.02))
                pids = [subs.procs[0].pid]
            else:
                pids = [c.proc.pid for c in bus.supervisor.children.values()]
            time.sleep(0.3)
            procs = [psutil.Process(pid) for pid in pids]
            cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in procs)
            c0, t0, steps = cpu(), time.monotonic(), 0
            while time.monotonic() - t0 < duration_s:
                bus.publish(ev.START_TRAINING_BATCH, steps, 1, {"batch_index": steps % 45})
                end = time.perf_counter() + step_s
                while time.perf_counter() < end:  # the step: holds the GIL like PyTorch's Python side
                    pass
                bus.publish(DATA, steps, 1, batch_data(steps))
                steps += 1
            bus.flush_now()
            time.sleep(0.3)
            c1 = cpu()
            bus.publish(ev.END_TRAINING_SESSION, steps, 1, {})
            if subs:
                subs.finish(lambda: bus.publish(FINAL, steps, 1, {}))
            wait_drained(bus, 5)
            close_bus(bus, run_dir, sockets)
        if missing:
            raise RuntimeError(f"plugin {name} never said hello")
        rows.append([name, f"{(c1 - c0) / steps * 1e6:.1f}", f"{(c1 - c0) / steps / 2 * 1e6:.1f}"])
    print(table(["subscriber process", "CPU us/step", "CPU us/event published"], rows,
                f"subscriber CPU at a tiny-MLP pace (2 events per {step_s * 1e6:.0f} us busy step, {duration_s:.0f} s; "
                f"console subscribes to end_training_batch only, the others to everything)"))
    print()

