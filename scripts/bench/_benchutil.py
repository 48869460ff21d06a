"""Shared pieces of the benches: the machine line, tables, subscriber processes and their reports."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUBSCRIBER = HERE / "_subscriber.py"
DATA, MARK, FINAL, HEARTBEAT = "end_training_batch", "end_training_loop", "end_training_session", "heartbeat"


def add_rerun_options(p) -> None:
    """The options of the benches that run a noisy run again (CpuWatch, wait_quiet) and keep their runs."""
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="a run during which other processes used more CPU than this (in cores) is run again")
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--quiet-wait-s", type=float, default=10.0,
                   help="before a retry, wait up to this long for the other processes to calm down")
    p.add_argument("--retry-budget-s", type=float, default=100.0, help="no retries after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the runs under runs/bench-*")


def machine_line(torch_threads: int | None = None) -> str:
    """Cores, Python, torch, pyzmq/libzmq, msgpack, and the load average when the bench started."""
    parts = [f"{len(os.sched_getaffinity(0))} cores ({platform.machine()})", f"Python {platform.python_version()}"]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads)")
    parts.append(f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}")
    parts.append(f"msgpack {'.'.join(map(str, msgpack.version))}")
    load = os.getloadavg()
    parts.append(f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    return "machine: " + ", ".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table, left-aligned first column, right-aligned others (pastes into Markdown as code)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [title] if title else []
    lines += [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def envelope(seq: int, run: str, type_: str, step: int, data: dict) -> dict:
    """The v1 event envelope, as the bus builds it."""
    return {"v": 1, "seq": seq, "run": run, "type": type_, "ts": time.time(), "step": step, "epoch": 1, "data": data}


def batch_data(i: int) -> dict:
    """What the loop publishes with end_training_batch."""
    return {"batch_index": i % 45, "loss": 0.123456789 + i * 1e-9, "training_loss_total": 12.3456789 + i,
            "training_batch_count": i % 45 + 1}


class Subscribers:
    """k subscriber processes on an events endpoint, reporting over a PULL socket we bind."""

    def __init__(self, k: int, events_endpoint: str, report_dir: Path, rcvhwm: int = 50_000):
        self.k = k
        self.ctx = zmq.Context.instance()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        path = Path(report_dir) / f"report-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.pull.bind(f"ipc://{path}")
        self.report_endpoint = f"ipc://{path}"
        self.procs = [subprocess.Popen([sys.executable, str(SUBSCRIBER), events_endpoint, self.report_endpoint,
                                        str(i), str(rcvhwm)], stdin=subprocess.DEVNULL)
                      for i in range(k)]
        self.ready: set[int] = set()
        self.reps: dict[int, dict[int, tuple]] = {}
        self.done: set[int] = set()

    def _pump(self, timeout_s: float) -> None:
        if self.pull.poll(int(timeout_s * 1000)):
            while True:
                try:
                    msg = self.pull.recv_pyobj(zmq.NOBLOCK)
                except zmq.Again:
                    return
                kind, ident = msg[0], msg[1]
                if kind == "ready":
                    self.ready.add(ident)
                elif kind == "rep":
                    self.reps.setdefault(msg[2], {})[ident] = msg[3:]
                elif kind == "done":
                    self.done.add(ident)
                elif kind == "timeout":
                    raise RuntimeError(f"subscriber {ident} saw no message in 30 s")

    def wait_ready(self, poke, timeout_s: float = 60.0) -> None:
        """Call poke() (send something) until every subscriber has received a message."""
        end = time.monotonic() + timeout_s
        while len(self.ready) < self.k:
            if time.monotonic() > end:
                raise RuntimeError(f"only {len(self.ready)}/{self.k} subscribers ready after {timeout_s} s")
            poke()
            self._pump(0.01)

    def wait_rep(self, rep: int, resend, timeout_s: float = 60.0) -> dict[int, tuple]:
        """Wait for every subscriber's report of rep; resend() the marker now and then (PUB may drop it)."""
        end = time.monotonic() + timeout_s
        next_resend = time.monotonic() + 0.2
        while len(self.reps.get(rep, {})) < self.k:
            now = time.monotonic()
            if now > end:
                raise RuntimeError(f"only {len(self.reps.get(rep, {}))}/{self.k} reports of rep {rep}")
            if now >= next_resend:
                resend()
                next_resend = now + 0.2
            self._pump(0.01)
        return self.reps[rep]

    def finish(self, send_final, timeout_s: float = 20.0) -> None:
        end = time.monotonic() + timeout_s
        while len(self.done) < self.k and time.monotonic() < end:
            send_final()
            self._pump(0.05)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.pull.close()


class CpuWatch:
    """How many cores' worth of CPU other processes used while we measured (a shared box's noise).

    Busy time of the whole machine (/proc/stat) minus this process's and its reaped children's
    (os.times), over wall time. Children still running when stop() is called are counted as foreign:
    measure around work whose helper processes have exited (run_training reaps its plugins)."""

    def __init__(self, pids: Sequence[int] = ()):
        self.pids = list(pids)  # live helper processes of ours, not reaped yet: not foreign
        self.t0, self.busy0, self.ours0 = time.monotonic(), _machine_busy_s(), _our_cpu_s(self.pids)

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (_machine_busy_s() - self.busy0) - (_our_cpu_s(self.pids) - self.ours0)
        return max(0.0, foreign / wall) if wall > 0 else 0.0


def wait_quiet(threshold_cores: float, max_wait_s: float, sample_s: float = 0.5, pids: Sequence[int] = ()) -> float:
    """Wait (at most max_wait_s) until other processes use at most threshold_cores; the last sample."""
    end = time.monotonic() + max_wait_s
    while True:
        watch = CpuWatch(pids)
        time.sleep(sample_s)
        foreign = watch.stop()
        if foreign <= threshold_cores or time.monotonic() >= end:
            return foreign


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _our_cpu_s(pids: Sequence[int] = ()) -> float:
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def quiet_note(foreign: list[float], threshold: float) -> str:
    noisy = sum(1 for f in foreign if f > threshold)
    return (f"other processes used median {median(foreign):.2f} / max {max(foreign):.2f} cores during the runs"
            + (f"; {noisy} run(s) above {threshold:.2f} even after retries" if noisy else ""))


def filesystem_of(path: Path) -> str:
    """'device (fstype, mounted at mountpoint)' of the mount holding path."""
    path = path.resolve()
    best = ("?", "?", "/")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == Path(mnt) or Path(mnt) in path.parents) and len(mnt) >= len(best[2]):
                best = (dev, fstype, mnt)
    return f"{best[0]} ({best[1]}, mounted at {best[2]})"
