"""Whether a plugin's kernel is gone, as the plugin can tell: the kernel that spawned it is no longer its parent, or
its heartbeats are silent past the liveness window with nothing to say it still runs. A kernel stopped or starved,
and over TCP a network down for a while, are waited for, and said once."""

from __future__ import annotations

import os
import time
from typing import Callable

from trainbus.proto.messages import HEARTBEAT_LIVENESS

CONNECT_TIMEOUT_S = 30.0  # no heartbeat from the kernel this long after start: give up
KERNEL_EXITED = "the kernel process exited"
# A remote plugin (over TCP) cannot tell a kernel gone from a network down: it waits this long for the kernel's
# heartbeats to come back (connecting anew now and then, sdk/plugin_io.py REDIAL_AFTER_S) before it gives up, as long as
# attach's reconnects take.
REMOTE_SILENCE_S = 100.0


class KernelLiveness:
    """The plugin's I/O thread asks it, each turn, whether the kernel is gone (`gone`), and when to look again."""

    def __init__(self, kernel_pid: int | None, say: Callable[[str], None]):
        """`kernel_pid`: the kernel that spawned this plugin (None: attached by hand or remotely); `say`: a line for
        the plugin's log."""
        self.kernel_pid = kernel_pid
        self.say = say
        self.silent_since: float | None = None  # the kernel fell silent while still alive (gone): since when
        # over TCP (the Runner of a remote plugin): how long a silent kernel is waited for; 0: gone at once
        self.wait_out_silence_s = 0.0
        # attached by hand on the kernel's machine (the Runner sets it): whether the run's kernel process still
        # runs, so a silence of ours (this process stopped, Ctrl-Z) is not taken for the kernel's death
        self.kernel_alive: Callable[[], object] | None = None

    def exited(self, grace_s: float = 0.0) -> bool:
        """The kernel that spawned us is no longer our parent (orphans are re-parented), or is not within grace_s."""
        if self.kernel_pid is None:
            return False
        deadline = time.monotonic() + grace_s
        while os.getppid() == self.kernel_pid:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def silent_until(self, started: float, last_kernel: float | None, heartbeat_interval_s: float) -> float | None:
        """When the kernel's silence would make it gone, from the thread's start or its last message (None: it is
        silent past that already, and waited for)."""
        if self.silent_since is not None:
            return None
        if last_kernel is None:
            return started + CONNECT_TIMEOUT_S
        return last_kernel + heartbeat_interval_s * HEARTBEAT_LIVENESS

    def gone(self, now: float, started: float, last_kernel: float | None, heartbeat_interval_s: float) -> str | None:
        """Why the kernel is gone, or None: `last_kernel` is when it last sent anything (None: never since
        `started`)."""
        if self.exited():
            return KERNEL_EXITED
        if last_kernel is None:
            too_long = now - started > CONNECT_TIMEOUT_S
            return f"no kernel heartbeat within {CONNECT_TIMEOUT_S:.0f} s" if too_long else None
        window = heartbeat_interval_s * HEARTBEAT_LIVENESS
        if now - last_kernel <= window:
            if self.silent_since is not None:
                self.say(f"the kernel is back after {now - self.silent_since:.1f} s of silence; going on")
                self.silent_since = None
            return None
        if self.kernel_pid is None and self.kernel_alive is not None and self.kernel_alive():
            # attached by hand beside a kernel that still runs: the silence was ours (stopped) or its (stopped,
            # starved); wait for it, as a spawned plugin does
            return self._wait(last_kernel, f"no kernel heartbeat for {now - last_kernel:.1f} s, but the run's kernel "
                                           f"still runs (stopped or starved, or this plugin was); waiting for it")
        if self.kernel_pid is None:  # attached by hand or remote: silence is all we can know of the kernel
            if now - last_kernel > self.wait_out_silence_s:
                return f"no kernel heartbeat for {now - last_kernel:.1f} s"
            # over TCP a silence is as likely a network down for a while (the kernel lives on): wait for it
            return self._wait(last_kernel, f"no kernel heartbeat for {now - last_kernel:.1f} s: the network to its "
                                           f"host is down, or the kernel is gone or hung; waiting up to "
                                           f"{self.wait_out_silence_s:.0f} s")
        # Still our parent (PR_SET_PDEATHSIG ends us with it): a kernel stopped (SIGSTOP, a frozen cgroup, swapped
        # out) is silent, not gone; leaving would lose the rest of the run's events. Wait for it.
        return self._wait(last_kernel, f"no kernel heartbeat for {now - last_kernel:.1f} s, but the kernel (pid "
                                       f"{self.kernel_pid}) is still running (stopped or starved?); waiting for it")

    def _wait(self, last_kernel: float, line: str) -> None:
        """Wait out the kernel's silence, saying so once (not every turn of the I/O thread)."""
        if self.silent_since is None:
            self.silent_since = last_kernel
            self.say(line)
