"""How a plugin's process ends: a SIGTERM's grace for the code it interrupts, a plugin orphaned by its kernel, and
the threads of the plugin's own still running after its teardown."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

from .kernel_liveness import KERNEL_EXITED
from .plugin_io import say

if TYPE_CHECKING:
    from .runner import Runner

# PR_SET_PDEATHSIG fires as the parent *thread* dies: on a kill -9 the kernel's threads die one by one, and the
# SIGTERM often comes before we are re-parented away from the kernel. Watched, that took under a millisecond;
# this long tells it from the SIGTERM of a kernel that lives on (its shutdown, a hang).
KERNEL_EXIT_GRACE_S = 0.25
# A SIGTERM while the plugin's own code runs (a handler, setup) lets it finish for this long after the signal, then cuts
# it short and tears down: well under the kernel's SIGKILL, 3 s after its SIGTERM at the run's end
# (kernel/supervisor.py EXIT_TERM_GRACE_S), with time left for teardown on a busy box.
FINISH_ON_TERM_S = 0.5
# The kernel gone (kill -9) while the plugin's code holds the main thread where no signal reaches it (SIGTERM ignored,
# a blocking C call): past this, the process exits without its teardown rather than live on, an orphan no one ends.
ORPHAN_EXIT_S = 10.0
# After teardown, how long a thread of the plugin's that is no daemon gets to end before it is said, and the process
# (whose Python exit would wait for it for good) ends without it: well inside the kernel's 5 s exit timeout.
LEFTOVER_THREAD_S = 1.0


def terminate(runner: Runner, why: str = "terminated (SIGTERM)") -> None:
    """The plugin process's SIGTERM handler (and Ctrl-C's, run by hand: entry.py): the runner finishes, its code
    given FINISH_ON_TERM_S."""
    # PR_SET_PDEATHSIG follows the parent *thread*: a plugin restarted from the kernel's bus thread is
    # re-parented to another kernel thread as each one dies, and signalled again every time (3 SIGTERMs
    # seen from one kill -9). Handle the first; the rest would run teardown again from inside it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C would run teardown again from inside the first
    arrived = time.monotonic()
    if runner.ended:  # already finishing (the I/O thread saw the kernel go first): let that run to its end
        return
    io = runner.io
    if io.gone is None and io.liveness.exited(KERNEL_EXIT_GRACE_S):  # PR_SET_PDEATHSIG's, not the kernel's own
        io.lost_kernel, io.gone = True, io.gone or KERNEL_EXITED
    io.gone = io.gone or why
    io.stopped_by_user = not runner.spawned  # the kernel started none of it: its user did, and stops it now
    runner.terminating = True
    with io.wake:
        io.wake.notify()  # a main thread waiting for the next event goes to _finish now
    # One busy in the plugin's code (a handler, setup) finishes it, then sees `terminating`; past the grace, CutShort
    # is raised where it is. Raising at once would run teardown in the middle of the handler.
    signal.signal(signal.SIGALRM, lambda *_: _cut_short(runner))
    # from the SIGTERM, not from here: telling the kernel's SIGTERM from PR_SET_PDEATHSIG's took up to 0.25 s of it
    signal.setitimer(signal.ITIMER_REAL, max(0.01, FINISH_ON_TERM_S - (time.monotonic() - arrived)))


class CutShort(SystemExit):
    """Raised in the main thread by the SIGTERM's timer: the plugin's code ran past FINISH_ON_TERM_S."""


def _cut_short(runner: Runner) -> None:
    # Not once _finish has begun (it disarms the timer, but an alarm may already be on its way): cut short there,
    # Runner.run's second _finish would return at once, with no teardown, no last ack and no close.
    if not runner.ended:
        raise CutShort(0)


def leave_if_orphaned(runner: Runner) -> None:
    """Once the I/O thread ended for a lost kernel, the main thread has ORPHAN_EXIT_S to reach Runner._finish (a
    handler the kernel's death SIGTERM cuts short does); one the plugin's code still holds then never will: exit."""
    runner.io.join()
    if not runner.io.lost_kernel:
        return
    deadline = time.monotonic() + ORPHAN_EXIT_S
    while not runner.ended and time.monotonic() < deadline:
        time.sleep(0.1)
    if runner.ended:
        return
    event = runner.io.busy_with
    what = f"the handler for {event.type} (seq {event.seq})" if event is not None else "the plugin's code"
    say(f"[{runner.plugin.name}] the kernel is gone and {what} has not returned {ORPHAN_EXIT_S:g} s later "
        f"(SIGTERM ignored, or blocked where no signal reaches it); exiting without teardown")
    end_own_group(runner)
    os._exit(0)


def end_own_group(runner: Runner) -> None:
    """A spawned plugin whose kernel is gone: what it started in its process group (a worker, a helper program)
    is sent SIGTERM, as the kernel's supervisor would have; none is left to do it. By hand, the group may be a
    shell's: left alone."""
    if not (runner.spawned and runner.io.lost_kernel and os.getpgrp() == os.getpid()):
        return
    if threading.current_thread() is threading.main_thread():  # (else the main thread is stuck: os._exit next)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal is not for us: we are leaving already
    try:
        os.killpg(0, signal.SIGTERM)
    except OSError:
        pass


def threads_left(grace_s: float, before: frozenset[threading.Thread]) -> list[str]:
    """The names of the threads started since `before`, not daemons, still running after `grace_s` (joined meanwhile),
    which Python's exit would wait for. Not a thread pool's workers: Python's exit ends them, after their work."""
    deadline = time.monotonic() + grace_s
    left = []
    for thread in threading.enumerate():
        if thread in before or thread.daemon or _pool_worker(thread):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread.name)
    return left


def _pool_worker(thread: threading.Thread) -> bool:
    target = getattr(thread, "_target", None)
    return getattr(target, "__module__", "") == "concurrent.futures.thread"


def exit_without_threads(code: int) -> None:
    """End the process as Python's exit would, less the wait for threads that are no daemons (the plugin's, said in
    Runner._finish): the exit handlers run, a thread pool's work is done (its own exit handler), the streams are
    flushed."""
    for hook in list(getattr(threading, "_threading_atexits", [])):  # a thread pool's: its queued work first
        hook()
    gc.collect()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
