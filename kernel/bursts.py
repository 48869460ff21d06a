"""A flush's events again as bursts, for the clients that take every event; which bursts sockets have takers.

Bursts (PROTOCOL.md §4): each flush's events again as one zlib'd message, for clients that take every event
(trainbus attach). A PUB frames, and on TCP CURVE-encrypts, every message once per connection: as events, each
attached monitor cost libzmq's I/O thread ~2.5 us an event; as bursts, ~6x fewer bytes a burst (docs/benchmarks.md).
Made only while someone subscribes: an XPUB says when the first subscriber comes and the last one goes.
"""

from __future__ import annotations

import zmq

from trainbus.proto import encode_burst

from .control_reading import CONTROL_PER_WAKE

BURST_MAX_BYTES = 256 * 1024  # before zlib; a larger flush (a backlog the journal released at once) goes as several
BURSTS_HWM = 100  # per subscriber, ~10 s of bursts (at most ~25 MB); past it one is dropped and the client replays
BURST_TOPICS_MAX = 1024  # distinct subscriptions tracked per bursts socket (any one means: make the bursts)


def bursts_of(records: list[bytes], max_bytes: int = BURST_MAX_BYTES) -> list[bytes]:
    """`records` as bursts of at most `max_bytes` each (one record larger than that goes alone); none for none."""
    made, start, size = [], 0, 0
    for i, record in enumerate(records):
        if size and size + len(record) > max_bytes:
            made.append(encode_burst(records[start:i]))
            start, size = i, 0
        size += len(record)
    if start < len(records):
        made.append(encode_burst(records[start:]))
    return made


def read_subscriptions(pub: zmq.Socket, topics: set[bytes]) -> None:
    """An XPUB passes on a topic's first subscription (b"\\x01" + topic) and its last unsubscription (b"\\x00" +
    topic), kept in `topics`: a bursts socket's make the bursts while any is held (the TCP events XPUB's are
    counted: kernel/remote_policing.py)."""
    for _ in range(CONTROL_PER_WAKE):
        try:
            message = pub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        if message[:1] == b"\x01" and len(topics) < BURST_TOPICS_MAX:
            topics.add(message[1:])
        elif message[:1] == b"\x00":
            topics.discard(message[1:])
