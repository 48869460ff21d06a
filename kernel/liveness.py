"""When a silent plugin is hung, not slow: Paranoid Pirate's liveness window, with patience for one starved of CPU."""

from __future__ import annotations

import subprocess
from typing import Callable

from trainbus.proto.messages import HEARTBEAT_LIVENESS

from .plugin_processes import Processes

# Paranoid Pirate (zguide ch. 4): a peer silent for HEARTBEAT_LIVENESS intervals is hung.
HEARTBEAT_INTERVAL_S = 1.0
# Starved is not hung. On a box busy with other work (two neighbours' jobs on two cores) a nice-10 plugin gets ~1/11
# of a core, and a thread of it at nice 19 (the checkpoint writer) ~1/70 while it holds the GIL the I/O thread needs:
# it can stay silent for seconds, or take seconds to exit, while it waits for a CPU. Its threads' run-queue wait
# (/proc/<pid>/task/*/schedstat, counted by the scheduler) tells the two apart: silent while waiting for a CPU
# most of the time is slow; silent while asleep (deadlocked, stopped) or while running (spinning in C with the GIL
# held) is hung. Sampled only for a plugin silent past the liveness window less one sample, or overdue to exit.
STARVED_SAMPLE_S = HEARTBEAT_INTERVAL_S  # the window each verdict looks at
STARVED_WAIT_FRACTION = 0.5  # waited for a CPU at least this part of the window: starved, given one more window
STARVED_CPU_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS  # ... unless it ran this much CPU since, saying nothing
STARVED_MAX_S = 60.0  # ... and never past this much more than it was given, whatever the reason


class Patience:
    """Whether a silent (or overdue) plugin is starved rather than hung, from its threads' run-queue wait between
    samples (STARVED_*): each verdict looks at the time since the previous one, and samples again."""

    def __init__(self, processes: Processes, pid: int, now: float):
        self.processes, self.pid = processes, pid
        self.first = self.last = (now, processes.sched_seconds(pid))
        self.measurable = self.first[1] is not None

    def waiting(self, now: float) -> bool:
        """Wait on: the window since the last look is not over yet, or it is and the plugin was starved over it.
        Never without schedstat (not Linux): there, the deadline alone decides."""
        return self.measurable and (now < self.last[0] + STARVED_SAMPLE_S or self.starved(now))

    def starved(self, now: float) -> bool:
        (then, before), (started, first) = self.last, self.first
        after = self.processes.sched_seconds(self.pid)
        self.last = (now, after)
        if before is None or after is None or now <= then or now - started > STARVED_MAX_S:
            return False  # no schedstat (the process gone), or patient long enough
        waited = after[1] - before[1]
        return waited >= STARVED_WAIT_FRACTION * (now - then) and after[0] - first[0] < STARVED_CPU_S


def await_exit(processes: Processes, procs: list[subprocess.Popen], seconds: float, clock: Callable[[], float],
               sleep: Callable[[float], None], abort: Callable[[], bool] = lambda: False) -> list[subprocess.Popen]:
    """Waits up to `seconds` (or until abort()) for procs to exit; one that spent the last part of it waiting
    for a CPU gets a sample window more, and more, within STARVED_MAX_S (Patience). Returns those still running."""
    due = {p.pid: clock() + seconds for p in procs}
    patience: dict[int, Patience] = {}
    while True:
        now = clock()
        procs = [p for p in procs if p.poll() is None]
        if not procs or abort():
            return procs
        waiting = False
        for p in procs:
            if p.pid not in patience and now >= due[p.pid] - STARVED_SAMPLE_S:
                patience[p.pid] = Patience(processes, p.pid, now)
            waiting = waiting or now < due[p.pid] or patience[p.pid].waiting(now)
        if not waiting:
            return procs
        sleep(0.02)
