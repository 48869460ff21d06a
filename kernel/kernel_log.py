"""Logs kept to a size: kernel.log rotated (where the sockets are atop every file), and a file another process
appends to (a plugin's log, a daemon run's output) copied aside and emptied in place."""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
from pathlib import Path

from trainbus.proto.text import printable

log = logging.getLogger(__name__)

# Past this size kernel.log is renamed kernel.log.1 (the previous one removed) and begun again: every plugin's log
# replies are kernel.log lines (50 a second and 256 KiB/s a peer, kernel/limits.py), so a plugin saying a line a step
# grew it by ~1.6 GB a day (1,000 characters a line) until the disk was full. The journal keeps every log event.
MAX_BYTES = 64 * 1024 * 1024
# `log.info(..., extra=KEEP)`: a line that every kernel.log must hold, written again atop the file a rotation begins
# (the `sockets:` line a client attached by hand reads, PROTOCOL.md §2).
KEEP = {"kernel_log_keep": True}


class KernelLog(logging.handlers.RotatingFileHandler):
    """kernel.log, rotated at `max_bytes` into one older file; on a full disk, lines that cannot be written are
    counted, not printed as tracebacks."""

    failed_writes = 0

    def __init__(self, path: Path, max_bytes: int):
        # a lone surrogate (a file name that is not UTF-8, in an exception) is written escaped, not lost with its line
        super().__init__(path, maxBytes=max_bytes, backupCount=1, encoding="utf-8", errors="backslashreplace")
        self.kept: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "kernel_log_keep", False):
            self.kept.append(record)
        super().emit(record)

    def doRollover(self) -> None:
        super().doRollover()
        for record in self.kept:
            logging.FileHandler.emit(self, record)  # the file's own write: a rotation inside it would never end

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed_writes += 1
        if self.failed_writes == 1:
            print(f"trainbus: cannot write {self.baseFilename} ({sys.exc_info()[1]}); kernel log lines are being lost",
                  file=sys.stderr)

    def close(self) -> None:
        """The last lines' flush fails on a full disk too: lost lines, not a traceback at the run's very end."""
        try:
            super().close()
        except OSError:
            self.failed_writes += 1


class OneRecordALine(logging.Formatter):
    """A record's control characters escaped (\\x1b) and its further lines indented: a peer's name or log text
    (any welcomed peer's, a remote monitor key's too) then cannot write a line of kernel.log that reads as the
    kernel's own, such as the `sockets:` line a client attached by hand takes its endpoints from (PROTOCOL.md §2)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), lines=True).replace("\n", "\n    ")


def log_to(path: Path) -> logging.Handler:
    """The `trainbus` loggers' records at INFO and above, into `path` from now on, rotated at MAX_BYTES."""
    handler = KernelLog(path, MAX_BYTES)
    handler.setFormatter(OneRecordALine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("trainbus")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    # kernel.log's alone: a root handler the user's code set up (logging.basicConfig(level=INFO) in build()) would
    # print the kernel's and its plugins' records on the terminal, between the run's own lines
    if not _propagated:
        _propagated.append(root.propagate)
    root.propagate = False
    return handler


_propagated: list[bool] = []  # the `trainbus` logger's propagate before the first log_to that is still in place


def stop_logging_to(handler: logging.Handler) -> None:
    """log_to's handler removed and closed; once none is left, the `trainbus` loggers propagate as they did before."""
    root = logging.getLogger("trainbus")
    root.removeHandler(handler)
    if _propagated and not any(isinstance(h, KernelLog) for h in root.handlers):
        root.propagate = _propagated.pop()
    handler.close()


def cap_log(path: Path, max_bytes: int, what: str) -> None:
    """Past max_bytes, `path` is copied to `path.1` (the previous copy replaced) and emptied in place, as logrotate's
    copytruncate does: the process writing it holds it open, O_APPEND, so its next write lands at the new start. What
    it writes between the copy and the truncation (microseconds) is lost. A copy that fails (a full disk) still
    empties it, said once: the cap is there to keep the disk from filling. `what`: the file, as the warning names it."""
    copy = path.with_name(path.name + ".1")
    try:
        if path.stat().st_size <= max_bytes:
            return
    except FileNotFoundError:  # not started yet, or its directory is being removed
        return
    try:
        shutil.copy(path, copy)  # with its mode: an owner-only file's copy is owner-only
    except OSError as exc:
        copy.unlink(missing_ok=True)
        log.warning("%s %s passed %d MiB and could not be copied to %s (%s): emptied without a copy",
                    what, path, max_bytes >> 20, copy.name, exc.strerror or exc)
    try:
        os.truncate(path, 0)
    except OSError as exc:
        log.warning("cannot empty %s %s: %s", what, path, exc.strerror or exc)
