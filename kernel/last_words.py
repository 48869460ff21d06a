"""Why a plugin's process ended, in words: its exit status, and the error its log ends with."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from trainbus.proto.text import printable

LAST_WORDS_BYTES = 8192  # the end of a plugin's log read for why it exited with an error (last_words)

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)$', re.M)


def _log_tail(log_file: Path) -> str:
    try:
        with open(log_file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LAST_WORDS_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def last_line(log_file: Path) -> str:
    """The last line a plugin wrote that is not blank ("" for none)."""
    lines = [line for line in _log_tail(log_file).splitlines() if line.strip()]
    return printable(lines[-1].strip(), 300) if lines else ""


def last_words(log_file: Path) -> str:
    """Why a plugin exited with an error, when its log ends in a Python traceback: its exception and innermost
    frame, `RuntimeError: no database (at myplugin.py:17 in __init__)`; "" when it ends otherwise (a bare
    sys.exit(3) leaves whatever the plugin printed before, which would be misread as the cause)."""
    tail = _log_tail(log_file)
    start = tail.rfind("Traceback (most recent call last")
    lines = [line for line in tail[max(start, 0):].splitlines() if line.strip()]
    # a traceback's end: its exception's line, under an indented frame or code line
    if start < 0 or len(lines) < 3 or lines[-1][:1].isspace() or not lines[-2][:1].isspace():
        return ""
    frames = list(_FRAME.finditer(tail[start:]))
    where = f" (at {os.path.basename(frames[-1]['file'])}:{frames[-1]['line']} in {frames[-1]['name']})" \
        if frames else ""
    return printable(lines[-1].strip(), 300) + where


def exit_status(code: int) -> str:
    """A process's exit status in words: `exit code 3`, `signal SIGKILL`."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
