"""Answers sent on a ROUTER (ROUTER_MANDATORY) to the peer that asked: the kernel's control sockets, the daemon's."""

from __future__ import annotations

from typing import Sequence

import zmq


def send_answer(router: zmq.Socket, frames: Sequence[bytes]) -> bool:
    """Send `frames` (the peer's routing id first) without blocking; False when dropped: the peer is gone, or its
    queue is full (a peer that does not read; it asks again). The ROUTER learns what libzmq's I/O thread took from a
    connection's queue only from commands it reads now and then, so a queue its peer reads at once can look full on a
    busy box (a welcome dropped in 1 run of 5, a daemon's answer left a client waiting): EVENTS reads them, and the
    answer is sent once more."""
    try:
        try:
            router.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            router.getsockopt(zmq.EVENTS)
            router.send_multipart(frames, zmq.NOBLOCK)
    except zmq.ZMQError:  # Again included
        return False
    return True
