"""A TensorBoard event file written on the caller's thread, all or nothing: what the disk refuses is held, not lost.

TensorBoard's EventFileWriter writes from a thread of its own and keeps that thread's first error (ENOSPC on a
disk full for a second) to raise it from every later call, space back or not: the records it had queued are
gone, and nothing more is written for the rest of the run. Here each record is framed by TensorBoard's own
RecordWriter and written with pwrite; a refused write is cut back to the end of the last whole record, and the
records wait for the next write that fits (metrics_log's way): never a torn record, never one twice.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Callable

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

# Records held while the disk refuses writes; past this, add() raises (the handler fails: retried, dead-lettered).
MAX_HELD_BYTES = 16 << 20
FILE_VERSION = "brain.Event:2"  # what EventFileWriter's first record says: the format TensorBoard reads
_file_numbers = itertools.count()  # EventFileWriter's global uid: two files of one process in one second differ


class EventFile:
    """`add` records; `write_held` retries what the disk refused; `close` writes what it can and says what it could
    not. `on_refused(path, exc)` is called once per outage, at the first record held back."""

    def __init__(self, log_dir: Path, on_refused: Callable[[Path, OSError], None]):
        self.log_dir = Path(log_dir)
        # EventFileWriter's name: TensorBoard reads the files of a directory in this order
        self.path = self.log_dir / (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                                    f"{os.getpid()}.{next(_file_numbers)}")
        self._on_refused = on_refused
        self._fd: int | None = None
        self._size = 0  # the end of the last whole record on disk
        self._held: list[bytes] = []
        self._held_bytes = 0
        self.add(Event(wall_time=time.time(), file_version=FILE_VERSION))

    @property
    def held(self) -> int:
        """Records waiting for room on the disk."""
        return len(self._held)

    def add(self, event: Event) -> None:
        if self._held_bytes >= MAX_HELD_BYTES:
            raise OSError(f"{self.path}: {len(self._held)} TensorBoard records wait for room on the disk; "
                          f"no more are held")
        buffer = io.BytesIO()
        RecordWriter(buffer).write(event.SerializeToString())
        self._held.append(buffer.getvalue())
        self._held_bytes += len(self._held[-1])
        self.write_held()

    def write_held(self) -> bool:
        """Write every held record, or none of them; True when none is left."""
        if not self._held:
            return True
        blob = b"".join(self._held)
        try:
            if self._fd is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            done = 0
            while done < len(blob):
                done += os.pwrite(self._fd, blob[done:], self._size + done)
        except OSError as exc:
            if self._fd is not None:
                os.ftruncate(self._fd, self._size)  # shrinking takes no space: a reader never sees a torn record
            if len(self._held) == 1:  # the first record held back: once per outage
                self._on_refused(self.path, exc)
            return False
        self._size += len(blob)
        self._held.clear()
        self._held_bytes = 0
        return True

    def close(self) -> int:
        """Write what is held if the disk takes it now, close; the number of records that could not be written."""
        self.write_held()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        lost, self._held, self._held_bytes = len(self._held), [], 0
        return lost
