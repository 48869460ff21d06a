"""The run's publishers: each flush's events on the events sockets, and again as bursts on the bursts sockets.

Bursts (PROTOCOL.md §4): each flush's events again as one zlib'd message, for clients that take every event
(trainbus attach). A PUB frames, and on TCP CURVE-encrypts, every message once per connection: as events, each
attached monitor cost libzmq's I/O thread ~2.5 us an event; as bursts, ~6x fewer bytes a burst (docs/benchmarks.md).
Made only while someone subscribes: an XPUB says when the first subscriber comes and the last one goes.
"""

from __future__ import annotations

from pathlib import Path

import zmq

from trainbus.proto import encode_burst

from .control_reading import CONTROL_PER_WAKE
from .remote import Listener

# Per subscriber. With every plugin-made string capped (kernel/limits.py) an event is at most ~17 KiB and
# usually ~200 B, so a stalled subscriber holds a few MB, and ~250 MB where plugins log 16 KiB lines at their
# budget; a PUB queue past this drops (durable plugins replay). Local subscribers are the run's own plugins.
EVENTS_HWM = 10_000
LINGER_MS = 1000
BURST_MAX_BYTES = 256 * 1024  # before zlib; a larger flush (a backlog the journal released at once) goes as several
BURSTS_HWM = 100  # per subscriber, ~10 s of bursts (at most ~25 MB); past it one is dropped and the client replays
BURST_TOPICS_MAX = 1024  # distinct subscriptions tracked per bursts socket (any one means: make the bursts)
_MORE, _LAST = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)


class Publishers:
    """The events sockets (a PUB on ipc, with --listen an XPUB on TCP too) and the bursts XPUBs, which the bus thread
    sends on, and what each bursts socket's subscribers hold. The ipc ones are made here, in the bus's context; a TCP
    socket the Listener replaced is put in its place (replace_remote: kernel/remote_policing.py)."""

    def __init__(self, ctx: zmq.Context, socket_dir: Path, remote: Listener | None):
        self.pub, self.bursts = ctx.socket(zmq.PUB), ctx.socket(zmq.XPUB)
        for socket, hwm, name in ((self.pub, EVENTS_HWM, "events.sock"), (self.bursts, BURSTS_HWM, "bursts.sock")):
            socket.setsockopt(zmq.SNDHWM, hwm)
            socket.setsockopt(zmq.LINGER, LINGER_MS)
            socket.bind(f"ipc://{socket_dir / name}")  # in an owner-only directory: never a TCP port
        self.events_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bursts_endpoint = self.bursts.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pubs = [self.pub] if remote is None else [self.pub, remote.pub]
        self.burst_pubs = [self.bursts] if remote is None else [self.bursts, remote.bursts]
        self.topics: dict[zmq.Socket, set[bytes]] = {pub: set() for pub in self.burst_pubs}  # subscribed

    def read_subscriptions(self, ready: dict) -> None:
        """Each bursts socket that polled ready: its (un)subscriptions."""
        for pub in self.burst_pubs:
            if pub in ready:
                read_subscriptions(pub, self.topics[pub])

    def send(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Each (topic, envelope) on the events sockets, then all of them as bursts on the bursts sockets."""
        # Two sends with int flags: send_multipart's per-frame flag arithmetic on pyzmq's enums is most of its
        # cost (2.9 -> 1.3 us an event uncontended, docs/benchmarks.md). A PUB never blocks: at its high-water
        # mark it drops the whole message for that subscriber.
        for pub in self.pubs:
            for topic, raw in frames:
                pub.send(topic, _MORE)
                pub.send(raw, _LAST)
        takers = [pub for pub in self.burst_pubs if self.topics[pub]]
        if takers and frames:
            for burst in bursts_of([raw for _, raw in frames]):
                for pub in takers:
                    pub.send(burst, _LAST)

    def replace_remote(self, pub: zmq.Socket, bursts: zmq.Socket) -> None:
        """The TCP events and bursts sockets now; a new bursts socket's subscriptions come again as its subscribers
        return."""
        if self.burst_pubs[1] is not bursts:
            del self.topics[self.burst_pubs[1]]
            self.topics[bursts] = set()
        self.pubs[1], self.burst_pubs[1] = pub, bursts

    def close(self) -> None:
        """The ipc ones (their LINGER lets the last events out); the TCP ones are the Listener's."""
        self.pub.close()
        self.bursts.close()


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
