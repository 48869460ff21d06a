"""The supervisor's hands on real processes (kernel/plugin_processes.py): lowering a running plugin below training,
thread by thread (Processes.lower), and the counts that tell a plugin starved of CPU from one asleep (deadlocked,
stopped) when it goes silent (_sched_seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from trainbus.kernel.plugin_guard import watch
from trainbus.kernel.plugin_processes import PLUGIN_NICE, Processes, _sched_seconds
from trainbus.kernel.liveness import STARVED_WAIT_FRACTION

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task") or not hasattr(os, "sched_setaffinity")
                                or _sched_seconds(os.getpid()) is None, reason="needs Linux schedstat and affinity")

SPIN = "while True: pass"


def test_a_process_waiting_for_its_cpu_counts_its_wait_and_one_asleep_or_stopped_does_not():
    """A nice-19 spinner sharing one CPU with a nice-0 one waits for it nearly all the time (starved); a sleeping
    process and a stopped spinner neither run nor wait."""
    cpu = min(os.sched_getaffinity(0))
    procs = {name: subprocess.Popen([sys.executable, "-c", code])
             for name, code in (("hog", SPIN), ("starved", SPIN), ("asleep", "import time; time.sleep(60)"),
                                ("stopped", SPIN))}
    try:
        for proc in procs.values():
            os.sched_setaffinity(proc.pid, {cpu})
        os.setpriority(os.PRIO_PROCESS, procs["starved"].pid, 19)
        os.kill(procs["stopped"].pid, signal.SIGSTOP)
        time.sleep(0.5)  # started and settled (the interpreters' imports ran and waited too)
        before = {name: _sched_seconds(proc.pid) for name, proc in procs.items()}
        started = time.monotonic()
        time.sleep(1.5)
        window = time.monotonic() - started
        after = {name: _sched_seconds(proc.pid) for name, proc in procs.items()}
        ran, waited = ({name: after[name][i] - before[name][i] for name in procs} for i in (0, 1))
        assert waited["starved"] >= STARVED_WAIT_FRACTION * window, (ran, waited)
        assert ran["starved"] < waited["starved"]
        for name in ("asleep", "stopped"):
            assert ran[name] < 0.05 and waited[name] < 0.05, (name, ran, waited)
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    assert _sched_seconds(procs["hog"].pid) is None  # gone (reaped): nothing to read


THREADS_AND_A_CHILD = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import threading, time; "
                          "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); print(flush=True); "
                          "time.sleep(60)"], stdout=subprocess.PIPE)
child.stdout.readline()  # its thread is there
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_plugin_started_before_training_is_lowered_thread_by_thread_with_what_it_started():
    """Started at the kernel's priority (before training), then lowered: every thread of it and of its child
    process, which priority is for on Linux; lowering the process id alone would leave its other threads."""
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    if ours >= PLUGIN_NICE:
        pytest.skip("this test starts from a nice below the plugins'")
    plugin = subprocess.Popen([sys.executable, "-c", THREADS_AND_A_CHILD], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(plugin.stdout.readline())
        tids = [(pid, int(tid)) for pid in (plugin.pid, child) for tid in os.listdir(f"/proc/{pid}/task")]
        assert len(tids) >= 4 and all(os.getpriority(os.PRIO_PROCESS, tid) == ours for _, tid in tids)
        Processes().lower(plugin.pid)
        for pid, tid in tids:
            assert os.getpriority(os.PRIO_PROCESS, tid) == PLUGIN_NICE, (pid, tid)
            assert os.sched_getscheduler(tid) == os.SCHED_BATCH, (pid, tid)
        assert os.getpriority(os.PRIO_PROCESS, 0) == ours  # the caller (the kernel) is untouched
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        plugin.kill()
        plugin.wait()


def test_the_guard_takes_every_group_its_kernel_told_it_of_even_once_the_kernel_is_gone():
    """kernel/plugin_guard.py: a kernel killed just after it started a plugin has written that group on the pipe,
    but the guard, seeing its parent gone, stopped reading before it: that plugin was left unguarded."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, b"+101\n+102\n-101\n+103")  # the last line cut short: never taken
        not_our_parent = os.getpid()
        assert watch(read_fd, not_our_parent) == {102}
        os.write(write_fd, b"+104\n")
        os.close(write_fd)
        write_fd = -1
        assert watch(read_fd, os.getppid()) == {104}  # the pipe's end: the kernel exited
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
