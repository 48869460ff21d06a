"""The training thread's doorbell: asks the bus thread to flush at once, and is told once that flush is done."""

from __future__ import annotations

import collections
import threading

import zmq


class Doorbell:
    """An inproc PUSH rung by the training thread, and the PULL the bus thread polls. One pending ring is enough
    (SNDHWM 1); more would be dropped: each ring's Event is set by the flush that follows (`answered`)."""

    def __init__(self, ctx: zmq.Context, name: str):
        self.rx = ctx.socket(zmq.PULL)
        self.rx.setsockopt(zmq.LINGER, 0)
        self.rx.bind(f"inproc://{name}")
        self._tx = ctx.socket(zmq.PUSH)  # used by the training thread only
        self._tx.setsockopt(zmq.LINGER, 0)
        self._tx.setsockopt(zmq.SNDHWM, 1)
        self._tx.connect(f"inproc://{name}")
        # flush_now's: each set once a flush has numbered (journaled, sent) every event queued before it
        self._flushed: collections.deque[threading.Event] = collections.deque()

    def ring(self) -> threading.Event:
        """Ask the bus to flush at once; the Event is set once a flush numbered every event queued before it."""
        flushed = threading.Event()
        self._flushed.append(flushed)  # after this thread's events: the flush that takes it takes them
        try:
            self._tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # a ring is already pending: the bus is waking anyway
            pass
        return flushed

    def heard(self) -> None:
        """The bus thread saw it ring (polled ready): the rings taken, so the next one wakes it again."""
        while True:
            try:
                self.rx.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def waiting(self) -> list[threading.Event]:
        """The rings' Events a flush starting now answers (the bus thread's); other threads only append."""
        return [self._flushed.popleft() for _ in range(len(self._flushed))]

    def close(self) -> None:
        self._tx.close()
        self.rx.close()
