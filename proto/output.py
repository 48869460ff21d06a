"""A standard stream on a full disk: the first refused write said once, naming the file and the fix; the rest dropped.

`trainbus run > train.log` (nohup, a batch script) puts the command's output, and the console plugin's, in a file
on some disk. When that disk fills, a write there raises ENOSPC (EDQUOT, EFBIG, EIO): the run itself is fine and
its directory holds its results, so losing the terminal's copy must not fail the command, nor turn a completed run's
exit 0 into a traceback and exit 1.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TextIO


def stream_path(stream: TextIO) -> str:
    """The file behind a stream, as the user redirected it (`/proc/self/fd/N`); its name where that cannot be read."""
    try:
        return os.readlink(f"/proc/self/fd/{stream.fileno()}")
    except (OSError, ValueError, AttributeError):
        return getattr(stream, "name", None) or "the output"


REST_DROPPED = "what follows is not written there"
# attach's output is all it makes: a refused write is an error and attach stops, not a warning that the rest is dropped
ATTACH_STOPS = "attach stops"


def refused_line(path: str, exc: OSError, then: str = REST_DROPPED) -> str:
    """The one line that says a stream's file refuses writes, and the fix; `then`: what the command does now."""
    return f"cannot write to {path} ({exc.strerror or exc}); free space there, or send the output elsewhere: {then}"


def error_on_stderr(line: str) -> None:
    """Say a refusal of stdout as an error on stderr (attach's); stderr on the same full disk: the exit code says it."""
    try:
        print(f"error: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass


class RefusalGuard:
    """Wraps a text stream (sys.stdout): a write or flush the file refuses calls `said(line)` once, then the stream's
    descriptor points at /dev/null, so the text its buffer still holds and every later write go nowhere, quietly.

    A broken pipe (`| head`) is left to its own handling (rich's, the caller's): a reader that went away is not a
    full disk. `then` ends the line: what the command does now (REST_DROPPED: goes on, its output dropped)."""

    def __init__(self, stream: TextIO, said: Callable[[str], None], then: str = REST_DROPPED):
        self._stream = stream
        self._said = said
        self._then = then
        self.refused: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._refuse(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._refuse(exc)

    def say_instead(self, said: Callable[[str], None], then: str) -> None:
        """What a refusal from now on calls, and what its line says the command does then: a command that has just
        learned its output is all it makes (`attach` of an ended run, told from its directory)."""
        self._said, self._then = said, then

    def __getattr__(self, name: str):  # fileno, isatty, encoding, buffer ...: the stream's own
        return getattr(self._stream, name)

    def _refuse(self, exc: OSError) -> None:
        if self.refused is not None:
            return
        self.refused = exc
        path = stream_path(self._stream)
        try:  # what the stream's buffer holds is retried at its next flush: into /dev/null from now on
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
            self._stream.flush()
        except (OSError, ValueError):
            pass
        self._said(refused_line(path, exc, self._then))
