"""Ctrl-C and SIGTERM during a run: the first stops it at a step boundary, a second stops it at once."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from .cluster import LAUNCH
from .distributed import AGREE_EVERY


class Interrupts:
    """First Ctrl-C or SIGTERM (kill, systemd stop, SLURM preemption, torchrun ending the group): stop at the
    next batch boundary, let plugins drain, write the summary (interrupted). Second: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, install: bool):
        self.count = 0
        self.first = ""  # the first signal's name: what the run's stop reason says
        self.last = ""  # the latest one's: what a run ended at once says
        self.started = False  # the run began (its directory and plugins exist): before, a first one stops the setup
        self.closing = False  # training is over: a second Ctrl-C now hurries the shutdown instead of raising
        self.joining = False  # waiting for the other ranks (distributed.join_group): the first one ends that wait
        self.across_ranks = False  # one of several ranks: a stop lands where they next agree (distributed.AGREE_EVERY)
        self._previous: dict[int, Any] = {}
        # across ranks the launcher hands a signal to each: the machine's first rank says what it does, once
        self._speaks = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
        self._pid = os.getpid()
        if install and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a process forked from the kernel with this handler (a DataLoader's worker: a terminal's Ctrl-C reaches
            # its whole process group): the kernel stops the run and its loaders' workers with it; said once, by it
            self.count += 1
            if self.count >= 2:  # twice: the worker ends as Python's own handler would end it
                raise KeyboardInterrupt
            return
        self.count += 1
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.last = name
        if self.count == 1:
            self.first = name
            if signum == signal.SIGTERM and os.environ.get(LAUNCH):
                # `run --nproc`'s torchrun ends the group so when any rank exits (a failure, which is said with the
                # run's end) as well as when it is itself stopped: the run's last line says which it was
                return
            if self.joining:  # join_group stops waiting at once, and the line that says so follows
                return
            message = ("training is over; the plugins are finishing (the last checkpoint, logs)" if self.closing
                       else f"stopping where the ranks next agree (within {AGREE_EVERY} steps)"
                       if self.started and self.across_ranks
                       else "stopping at the next batch boundary" if self.started
                       else "stopping once the model and data are built, before the run begins")
            if self._speaks:
                os.write(2, f"\ntrainbus: {name}: {message} ({name} again to stop now)\n".encode())
            return
        if self.closing and self._speaks:
            os.write(2, f"\ntrainbus: {name} again: not waiting for the plugins\n".encode())
        if not self.closing:
            raise KeyboardInterrupt

    def begin_closing(self) -> None:
        self.closing = True

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def what_raised(self, exc: KeyboardInterrupt) -> str:
        """The run's error for a KeyboardInterrupt out of training: a second signal (ours), Python's own Ctrl-C
        (run_training called without our handler: a notebook), or the training code raising it itself."""
        if self.count >= 2:
            return f"interrupted (a second {self.last})"
        if not self.installed:  # Python's own handler: a Ctrl-C and a raise look alike
            return f"interrupted (KeyboardInterrupt{': ' + str(exc) if str(exc) else ''})"
        return "interrupted: the training code raised KeyboardInterrupt" + (f" ({exc})" if str(exc) else "")

    def hurry(self) -> bool:
        """Ctrl-C twice in all: stop waiting for plugins. Once, even after training ended, lets them drain (the
        last checkpoint may be being written), as the first Ctrl-C always does."""
        return self.count >= 2

    def requested(self) -> str:
        """The first signal's name ("Ctrl-C", "SIGTERM"); "" while none came."""
        return self.first

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if sig == signal.SIGTERM and os.environ.get(LAUNCH):
                # torchrun's, as another rank exits: this rank has only to say how the run ended and exit, which
                # that signal would cut short (torchrun kills it after 30 s all the same)
                previous = signal.SIG_IGN
            signal.signal(sig, previous)
        self._previous = {}
