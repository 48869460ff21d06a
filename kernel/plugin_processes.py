"""What the supervisor does to the OS for its plugins: start a process, lower it below training, signal its group,
read its CPU time and what the scheduler counted for it, and keep a guard that ends the groups if the kernel dies.
The decisions (liveness, hung, backoff) are the supervisor's; tests hand it a fake of this
(tests/test_supervisor_clock.py) and try this on real processes (tests/test_scheduling.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil

from . import plugin_guard

PLUGIN_NICE = 10  # plugins run below training's priority: a busy plugin takes idle CPU, not training's
LOWER_PASSES = 4  # Processes.lower: looks for threads started while the others were being lowered
GUARD_EXIT_WAIT_S = 1.0  # Guard.close: how long the run's end waits for the guard to exit (it has nothing to end)


class PluginProcess(subprocess.Popen):
    """A plugin's process, the leader of its own group: what it started in that group (a worker, a helper program)
    goes with it. Once the leader has exited, before it is reaped (a zombie's pid is not reused, nor its group id),
    the group's leftovers are killed: orphaned, they would run on past the run's end, one more at each restart.
    The guard (kernel/plugin_guard.py) is told the group is done then too, while its id is still this group's."""

    guard: Guard | None = None

    def poll(self) -> int | None:
        if self.returncode is None and hasattr(os, "waitid"):
            try:
                exited = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped by another thread meanwhile
                return super().poll()
            if exited is None:  # reaped only once seen exited here, so the group is always told done first
                return None
            self._group_done()
        return super().poll()

    def wait(self, timeout: float | None = None) -> int:
        # the supervisor waits only on a leader that exited or that it killed, group and all
        if self.returncode is None and hasattr(os, "waitid"):
            try:
                if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    self._group_done()
            except ChildProcessError:
                pass
        code = super().wait(timeout)
        if self.guard is not None:  # one that exited during the wait: its id, no longer listed, is never signalled
            self.guard.ended(self.pid)
        return code

    def _group_done(self) -> None:
        _signal_group(self, signal.SIGKILL)
        if self.guard is not None:
            self.guard.ended(self.pid)


class Guard:
    """The kernel's end of the plugins' guard (kernel/plugin_guard.py): the process that ends the plugins' groups if
    the kernel dies, even by SIGKILL. Started with the first plugin; told each group's start and end on a pipe."""

    def __init__(self):
        self._fd: int | None = None
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()  # plugins start and are reaped on the training thread and the bus thread

    def started(self, pgid: int) -> None:
        with self._lock:
            if self._fd is None:
                self._start()
            self._tell(b"+%d\n" % pgid)

    def ended(self, pgid: int) -> None:
        with self._lock:
            self._tell(b"-%d\n" % pgid)

    def close(self) -> None:
        """As the kernel's exit does: the guard ends what is still listed (at a run's end, nothing), then exits."""
        with self._lock:
            fd, process, self._fd, self._process = self._fd, self._process, None, None
        if fd is not None:
            os.close(fd)
        if process is not None:
            try:
                process.wait(GUARD_EXIT_WAIT_S)  # reaped, in a process that runs on (a test's, runs in-process)
            except subprocess.TimeoutExpired:  # still ending a leftover group: subprocess reaps it later
                pass

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()  # neither inherited by what the kernel execs: only the kernel holds write_fd
        try:
            self._process = subprocess.Popen(
                # isolated, without site: stdlib only, the smallest Python there is (~10 ms, a few MB)
                [sys.executable, "-I", "-S", plugin_guard.__file__, str(os.getpid())], stdin=read_fd,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
        except OSError:  # no guard: the plugins' own watch of the kernel is all there is, as before it
            os.close(write_fd)
            return
        finally:
            os.close(read_fd)
        os.set_blocking(write_fd, False)  # a stopped guard with a full pipe never holds up a restart
        self._fd = write_fd

    def _tell(self, line: bytes) -> None:
        """Under the lock: a close on another thread never leaves us its fd number, which a file opened next may
        have (a bus thread that reaps a plugin as the run's end closes the guard)."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)  # one short line, never blocking: atomic on a pipe
        except OSError:  # the guard is gone, or stopped and its pipe full: the group goes unguarded
            pass


class Processes:
    """The supervisor's hands on its plugins' processes (see the module's docstring)."""

    def __init__(self):
        self.guard = Guard()

    def spawn(self, cmd: list[str], env: dict[str, str], stdout, stderr, below_training: bool,
              cwd: str | None = None) -> subprocess.Popen:
        proc = PluginProcess(
            # Its own process group (Ctrl-C reaches the kernel only; the group is what gets killed)
            # in the kernel's session: with sched_autogroup a session is a scheduling group, and
            # one of its own would get an equal share against the kernel's whatever its nice.
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, process_group=0, cwd=cwd,
        )
        self.guard.started(proc.pid)
        proc.guard = self.guard
        if below_training:
            _lower_priority(proc.pid)  # before it starts a thread: they all inherit it
        return proc

    def close(self) -> None:
        self.guard.close()

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
