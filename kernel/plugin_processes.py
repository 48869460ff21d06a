"""What the supervisor does to the OS for its plugins: start a process, lower it below training, signal its group,
read its CPU time and what the scheduler counted for it. The decisions (liveness, hung, backoff) are the supervisor's;
tests hand it a fake of this (tests/test_supervisor_clock.py) and try this on real processes (tests/test_scheduling.py).
"""

from __future__ import annotations

import os
import signal
import subprocess

import psutil

PLUGIN_NICE = 10  # plugins run below training's priority: a busy plugin takes idle CPU, not training's
LOWER_PASSES = 4  # Processes.lower: looks for threads started while the others were being lowered


class PluginProcess(subprocess.Popen):
    """A plugin's process, the leader of its own group: what it started in that group (a worker, a helper program)
    goes with it. Once the leader has exited, before it is reaped (a zombie's pid is not reused, nor its group id),
    the group's leftovers are killed: orphaned, they would run on past the run's end, one more at each restart."""

    def poll(self) -> int | None:
        self._kill_leftovers()
        return super().poll()

    def wait(self, timeout: float | None = None) -> int:
        self._kill_leftovers()  # the supervisor waits only on a leader that exited or that it killed, group and all
        return super().wait(timeout)

    def _kill_leftovers(self) -> None:
        if self.returncode is not None or not hasattr(os, "waitid"):  # reaped: its pid may be another's now
            return
        try:
            exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by another thread meanwhile
            return
        if exited is not None:
            _signal_group(self, signal.SIGKILL)


class Processes:
    """The supervisor's hands on its plugins' processes (see the module's docstring)."""

    def spawn(self, cmd: list[str], env: dict[str, str], stdout, stderr, below_training: bool) -> subprocess.Popen:
        proc = PluginProcess(
            # Its own process group (Ctrl-C reaches the kernel only; the group is what gets killed)
            # in the kernel's session: with sched_autogroup a session is a scheduling group, and
            # one of its own would get an equal share against the kernel's whatever its nice.
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, process_group=0,
        )
        if below_training:
            _lower_priority(proc.pid)  # before it starts a thread: they all inherit it
        return proc

    def lower(self, pid: int) -> None:
        """A plugin started at the kernel's priority goes below training now: priority is per thread (Linux), so
        each thread of its process and of the processes it started. Until a look finds no thread it had not
        lowered (at most a few): one started meanwhile by a thread not yet lowered inherited the old priority."""
        done: set[int] = set()
        for _ in range(LOWER_PASSES):
            try:
                root = psutil.Process(pid)
                tids = {t.id for proc in (root, *root.children(recursive=True)) for t in _threads(proc)} - done
            except psutil.Error:  # gone: nothing left to lower
                return
            if not tids:
                return
            for tid in tids:
                _lower_priority(tid)
            done |= tids

    def signal(self, proc: subprocess.Popen, sig: int) -> None:
        _signal_group(proc, sig)

    def cpu_seconds(self, pid: int) -> float:
        return _cpu_seconds(pid)

    def sched_seconds(self, pid: int) -> tuple[float, float] | None:
        return _sched_seconds(pid)


def _lower_priority(pid: int) -> None:
    """Plugins yield the CPU to training: nice PLUGIN_NICE and SCHED_BATCH for a process before it starts a thread
    (they inherit both), or for one thread (Linux: both are per thread).

    SCHED_BATCH: a plugin thread that wakes (events arrive in bursts every 0.1 s) never preempts a
    training thread; it runs on a free core, or when the running thread's slice ends. Plugins stay in
    the kernel's session, so they compete with training's threads directly (docs/architecture.md).
    """
    try:
        if os.sched_getscheduler(pid) == os.SCHED_OTHER:  # not one already lower (SCHED_IDLE: the "idle" writer)
            os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):  # not Linux: wake-ups may preempt
        pass
    try:  # only ever lower it: a kernel started at nice 15 gives its plugins 15, not 10
        os.setpriority(os.PRIO_PROCESS, pid, max(PLUGIN_NICE, os.getpriority(os.PRIO_PROCESS, pid)))
    except OSError:  # not permitted: plugins run at the kernel's priority
        pass


def _threads(proc: psutil.Process) -> list:
    try:
        return proc.threads()
    except psutil.Error:  # a child that ended meanwhile
        return []


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _sched_seconds(pid: int) -> tuple[float, float] | None:
    """(on a CPU, waiting for one) in seconds, summed over the process's threads, from the scheduler's own count
    (/proc/<pid>/task/<tid>/schedstat: run ns, run-queue wait ns, slices); None without it (not Linux, a kernel
    without CONFIG_SCHED_INFO, the process gone). A thread that ended meanwhile takes its share with it: a sample
    may go down, which reads as not waiting."""
    ran = waited = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                fields = f.read().split()
            ran, waited = ran + int(fields[0]), waited + int(fields[1])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return (ran / 1e9, waited / 1e9) if tids else None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
