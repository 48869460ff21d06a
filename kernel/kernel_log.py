"""kernel.log: one record a line, escaped; kept to a size by rotation, with where the sockets are atop every file."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

from trainbus.proto.text import printable

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
    return handler
