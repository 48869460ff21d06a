"""The plugins' guard: a small process that ends the kernel's plugin process groups once the kernel is gone.

A plugin written with the SDK leaves when its kernel dies (PR_SET_PDEATHSIG, the heartbeat watch) and takes its
process group with it; one written from PROTOCOL.md alone need not (§8 says SHOULD), and after a kill -9 of the
kernel no supervisor is left to end it or the helpers it started in its group. The kernel starts this guard with its
first plugin (kernel/plugin_processes.py), in a process group of its own (a Ctrl-C to the terminal's group is for
the kernel), and writes it one line per plugin group on a pipe only the kernel holds: `+PGID` once the group's
leader started, `-PGID` before that leader is reaped (after that the id may become another group's).

The kernel is gone when that pipe reads end-of-file, or when the guard's parent is no longer the kernel (a child
the kernel forked, a DataLoader worker, may hold the pipe's write end a few seconds longer). Each group still listed
then has ORPHAN_TERM_AFTER_S to end on its own (a plugin that alerts on its kernel's death does so in that time),
then gets SIGTERM, as at the end of a run, and SIGKILL ORPHAN_KILL_AFTER_S later if anything of it is left.
Usage (the kernel's): python -I -S plugin_guard.py KERNEL_PID, the pipe on stdin; it imports only the standard
library.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

# Longer than the SDK's own way out of an orphaned plugin (Plugin.on_kernel_gone, bounded at 10 s, and
# sdk/plugin_exit.py ORPHAN_EXIT_S, 10 s after it saw the kernel gone): the guard never cuts that short.
ORPHAN_TERM_AFTER_S = 15.0
ORPHAN_KILL_AFTER_S = 3.0  # SIGTERM -> SIGKILL, as at a run's end (kernel/supervisor.py EXIT_TERM_GRACE_S)
PARENT_CHECK_S = 0.2  # how often the guard looks whether its parent is still the kernel
GROUP_CHECK_S = 0.1  # how often, once the kernel is gone, it looks which groups have ended


def watch(fd: int, kernel_pid: int) -> set[int]:
    """Read the kernel's `+PGID`/`-PGID` lines from `fd` until the kernel is gone; the groups still listed then."""
    groups: set[int] = set()
    pending = b""
    while True:
        # once the parent is gone, what it wrote before it died is still read: a plugin it started just then too
        orphaned = os.getppid() != kernel_pid
        readable, _, _ = select.select([fd], [], [], 0 if orphaned else PARENT_CHECK_S)
        if not readable:
            if orphaned:
                return groups
            continue
        chunk = os.read(fd, 4096)
        if not chunk:  # every write end closed: the kernel exited, however it went
            return groups
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line[:1] == b"+" and line[1:].isdigit():
                groups.add(int(line[1:]))
            elif line[:1] == b"-" and line[1:].isdigit():
                groups.discard(int(line[1:]))


def end_groups(groups: set[int], sleep=time.sleep, clock=time.monotonic) -> None:
    """Give each group ORPHAN_TERM_AFTER_S to end, then SIGTERM, then SIGKILL what is left. A group is dropped as soon
    as it is empty: once it is, its id may be given to another's group, which must never be signalled."""
    for sig, wait_s in ((None, ORPHAN_TERM_AFTER_S), (signal.SIGTERM, ORPHAN_KILL_AFTER_S), (signal.SIGKILL, 0.0)):
        if sig is not None:
            groups = {g for g in groups if _signal(g, sig)}
        deadline = clock() + wait_s
        while groups and clock() < deadline:
            sleep(GROUP_CHECK_S)
            groups = {g for g in groups if _signal(g, 0)}


def _signal(pgid: int, sig: int) -> bool:
    """Signal the group (0: only look); False when it has no process left (or none of ours)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C and hangup are the kernel's to take
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    end_groups(watch(sys.stdin.fileno(), int(sys.argv[1])))


if __name__ == "__main__":
    main()
