"""Whether a process still runs, one answer for the kernel's parts that ask (a daemon's job, rank 0 of a failing
rank, the kernel that left shared memory behind): a zombie is gone, and a reused pid is someone else."""

from __future__ import annotations

import signal
import time

START_TIME_SLACK_S = 1.0  # psutil derives start times from the boot time, which /proc/stat gives in whole seconds
# signalled_when_gone's notice of a parent's death: a real-time signal no library of a training script takes
PARENT_GONE_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else signal.SIGTERM


def process_alive(pid: int, started: float | None) -> bool:
    """Whether `pid` is still the process that started at `started` (None: any process under that pid)."""
    import psutil  # here: `trainbus runs ...` imports this module and asks only sometimes

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def gone_within(pid: int, seconds: float) -> bool:
    """Whether `pid` is gone (a zombie counts) within `seconds`. A process killed with SIGKILL closes its sockets as
    the kernel tears it down, before it is gone: a peer that saw them close and asks at once may find it still there."""
    deadline = time.monotonic() + seconds
    while process_alive(pid, None):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def started_by(pid: int, when: float) -> bool:
    """Whether `pid` runs a process that started by `when` (a wall-clock time, give or take the second psutil's start
    times are good to): one that started later is not the process that made a file last written at `when`."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= when + START_TIME_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def signalled_when_gone(parent: int) -> None:
    """SIGTERM to this process once `parent` (the process that started it) is gone, at once if it is gone already.
    A rank of `run --nproc` runs in a session of its own, out of its launcher's reach: a launcher killed with
    SIGKILL left its ranks training on, unseen, to the run's end. Linux's PR_SET_PDEATHSIG; elsewhere nothing.

    Linux sends that signal as each thread of the parent that holds this process ends: once per thread of a dying
    launcher it is handed through, and when the thread that started it ends while the launcher lives (prctl(2)).
    Each taken for a SIGTERM, the second would read as "stop at once" and cut the run short, its plugins undrained;
    so the signal is a real-time one of ours, turned into one SIGTERM, sent once, when the parent process is gone."""
    import ctypes
    import os
    import threading

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    notice = signal.SIGTERM
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGRTMIN"):
        notice = PARENT_GONE_SIGNAL
        said = []

        def _parent_gone(signum, frame) -> None:
            if not said and os.getppid() != parent:
                said.append(True)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(notice, _parent_gone)
    if prctl(1, notice, 0, 0, 0) == 0 and os.getppid() != parent:  # 1: PR_SET_PDEATHSIG; already gone
        os.kill(os.getpid(), signal.SIGTERM)


def killed_by(number: int) -> str:
    """The name of the signal that ended a process (SIGKILL), or its number where it has none."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
