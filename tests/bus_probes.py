"""Test parts that stand beside a real Bus: a peer attached by hand (raw pyzmq + msgpack, in a thread of its own,
the test's thread being the training thread), and a hold on the bus thread inside a flush."""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import msgpack
import zmq

from trainbus.kernel import bus as bus_module
from trainbus.proto import events as ev


class AttachedPeer(threading.Thread):
    """An attached peer in a thread of its own (the test's other thread is the training thread): hello with the run's
    credential after its first event, an ack for every event of `acks` it receives (None: every event), a heartbeat
    every 0.5 s. `acked` lists the seqs it acked."""

    def __init__(self, run_dir: Path, bus, delivery: str = "best_effort", votes: tuple[str, ...] = (),
                 acks: str | None = None, capabilities: tuple[str, ...] = (), name: str = "peer"):
        super().__init__(name=name, daemon=True)
        self.secret = (run_dir / "credential").read_text().strip()
        self.events, self.control = bus.events_endpoint, bus.control_endpoint
        self.delivery, self.votes, self.acks, self.capabilities = delivery, list(votes), acks, list(capabilities)
        self.welcomed, self.stopping = threading.Event(), threading.Event()
        self.acked: list[int] = []
        self.received: list[dict] = []  # control messages from the kernel, the welcome too

    def run(self) -> None:
        ctx = zmq.Context()
        sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        dealer.setsockopt(zmq.ROUTING_ID, f"{self.name}-{secrets.token_hex(4)}".encode())
        for socket, endpoint in ((sub, self.events), (dealer, self.control)):
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoint)
        send = lambda type_, **fields: dealer.send(msgpack.packb({"v": 1, "type": type_, **fields}))  # noqa: E731
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        said_hello, next_beat = False, 0.0
        try:
            while not self.stopping.is_set():
                ready = dict(poller.poll(50))
                if sub in ready:
                    event = msgpack.unpackb(sub.recv_multipart()[1], raw=False, strict_map_key=False)
                    if not said_hello:  # our subscription is live: the first event came
                        send("hello", name=self.name, pid=os.getpid(), subscriptions=[""], replies=[],
                             delivery=self.delivery, votes=self.votes, capabilities=self.capabilities,
                             secret=self.secret)
                        said_hello = True
                    if self.welcomed.is_set() and event["type"] != ev.HEARTBEAT and self.acks in (None, event["type"]):
                        self.acked.append(event["seq"])  # first: the kernel may act on the ack before we go on
                        send("ack", seq=event["seq"])
                if dealer in ready:
                    self.received.append(msgpack.unpackb(dealer.recv(), raw=False))
                    if self.received[-1]["type"] == "welcome":
                        self.welcomed.set()
                if self.welcomed.is_set() and time.monotonic() >= next_beat:
                    send("heartbeat")
                    next_beat = time.monotonic() + 0.5
        finally:
            ctx.destroy(linger=0)


def hold_flush_of(monkeypatch, type_: str) -> tuple[threading.Event, threading.Event]:
    """Hold the bus thread inside the flush that took an event of `type_` (where it reads the batch's tensors, before
    it numbers anything) until `let_go`; returns (inside, let_go)."""
    inside, let_go = threading.Event(), threading.Event()
    read_tensors = bus_module.materialize_tensors

    def held(batch: list) -> None:
        if any(item[0] == type_ for item in batch) and not inside.is_set():
            inside.set()
            let_go.wait(60)
        read_tensors(batch)

    monkeypatch.setattr(bus_module, "materialize_tensors", held)
    return inside, let_go
