"""What `trainbus run --nnodes N` says while torchrun's rendezvous waits for machines that have not joined.

torchrun's agent meets the other machines' agents before it starts a single rank, and waits up to its join
timeout (10 min) without a word; a Ctrl-C or SIGTERM meanwhile reached no handler (the agent installs its own
only once its ranks run), so the command ended 130 or 143 saying nothing. The launcher watches for its first
rank to appear: until then a wait past WAITING_SAID_AFTER_S is said once, and a signal or the timeout is one
line naming the endpoint and the fix. Torch-free: the CLI imports it.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import psutil

WAITING_SAID_AFTER_S = 10.0  # as a rank waiting for the others says so (kernel/distributed.py)
POLL_S = 0.5  # how often the watch looks for the first rank: a child process of this one
JOIN_TIMEOUT_S = 600  # torchrun's rendezvous join_timeout, its default, handed to it so the line can name it


def ranks_started() -> bool:
    """torchrun runs in this process and starts the ranks as its children once the rendezvous is complete."""
    return bool(psutil.Process().children())


def signal_name(signum: int) -> str:
    """A signal as the lines about it say it: Ctrl-C, SIGTERM."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class RendezvousWatch:
    """Says once, after said_after_s, that the machines have not met yet; `started` once a rank runs.

    Time is a parameter: tick(now) is what the thread calls, and a test calls it with a fake clock."""

    def __init__(self, nnodes: int, endpoint: str | None, say: Callable[[str], None], began: float,
                 started: Callable[[], bool] = ranks_started, said_after_s: float | None = None):
        self.nnodes, self.endpoint, self.say, self.began = nnodes, endpoint, say, began
        # None: the module's WAITING_SAID_AFTER_S as it is now (as distributed.py reads its own), not at import
        self._started = started
        self.said_after_s = WAITING_SAID_AFTER_S if said_after_s is None else said_after_s
        self.started = self.said = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: float) -> None:
        if self.started:
            return
        if self._started():
            self.started = True
        elif self.nnodes > 1 and not self.said and now - self.began >= self.said_after_s:
            self.said = True
            self.say(self.waiting_line(now - self.began))

    def waiting_line(self, waited_s: float) -> str:
        return (f"trainbus: has waited {waited_s:.0f} s for the {self.nnodes} machines of --nnodes {self.nnodes} to "
                f"meet at {self.endpoint}: run this same command, with the same --rdzv-endpoint, on each of the "
                f"others (torchrun gives up after {JOIN_TIMEOUT_S} s); Ctrl-C stops it")

    def stopped_line(self, signum: int) -> str:
        name = signal_name(signum)
        if self.nnodes == 1:  # --standalone: torchrun meets itself, and was about to start the ranks
            return f"trainbus: {name} before the ranks started; nothing was made"
        return (f"trainbus: {name} while waiting for the {self.nnodes} machines of --nnodes {self.nnodes} to meet at "
                f"{self.endpoint}; nothing was made")

    def timed_out_line(self) -> str:
        return (f"error: --nnodes {self.nnodes}: not every machine joined at {self.endpoint} within {JOIN_TIMEOUT_S} s "
                f"(torchrun's rendezvous timeout): run this same command, with the same --rdzv-endpoint, on each of "
                f"the {self.nnodes} machines; nothing was made")

    def __enter__(self) -> "RendezvousWatch":
        def watch() -> None:
            while not self.started and not self._done.wait(POLL_S):
                self.tick(time.monotonic())

        self._thread = threading.Thread(target=watch, name="trainbus-rendezvous-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
