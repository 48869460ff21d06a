"""Ctrl-C while a command has made nothing yet: one line saying so, and exit 130 at once, instead of a traceback of
whichever import it cut (torch's, the user's target's, ours)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from typing import Callable, NoReturn


def interrupted_before_start(said: str) -> NoReturn:
    """A stop before anything was made: `said` in one line, and exit 130 at once. A rank of `run --nproc`
    (cluster.LAUNCH set) says nothing and exits 0: its launcher, which had the Ctrl-C too, says it, and 130 would have
    torchrun restart the group."""
    launched = bool(os.environ.get("TRAINBUS_LAUNCH"))
    for stream in (sys.stdout, sys.stderr):  # what was said before it
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a handler that cut a write to it (reentrant)
            pass
    if not launched:
        os.write(2, f"trainbus: {said}\n".encode())
    os._exit(0 if launched else 130)


class _SaysAndExits:
    """The SIGINT handler while nothing has been made: interrupted_before_start. Python's KeyboardInterrupt there
    printed a traceback of whichever import it cut, and in torch's import was now and then lost (the run then
    trained to its end, exit 0) or raised through a C++ callback, which aborted the process."""

    def __init__(self, said: str):
        self.said = said

    def __call__(self, signum: int, frame) -> None:
        interrupted_before_start(self.said)


def ctrl_c_says(said: str) -> None:
    """From here a Ctrl-C says `said` and exits; a process whose Ctrl-C is not Python's own (ignored under nohup or
    in a background job, or a caller's) is left as it is."""
    current = signal.getsignal(signal.SIGINT)
    if isinstance(current, _SaysAndExits):
        current.said = said
    elif current is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _SaysAndExits(said))


def ctrl_c_back(handler) -> None:
    """Ctrl-C as it was before ctrl_c_says (when that took it)."""
    if isinstance(signal.getsignal(signal.SIGINT), _SaysAndExits):
        signal.signal(signal.SIGINT, handler)


def says_ctrl_c_until_the_run_begins(command: Callable) -> Callable:
    """`run`, where a Ctrl-C before the run takes it (run_training's handler, torchrun's) says nothing was made and
    exits: most of that time is torch's import, the user's target's or ours."""
    @functools.wraps(command)
    def run_command(*args, **kwargs):
        before = signal.getsignal(signal.SIGINT)
        ctrl_c_says("Ctrl-C before the run began; nothing was made")
        try:
            return command(*args, **kwargs)
        finally:
            ctrl_c_back(before)
    return run_command
