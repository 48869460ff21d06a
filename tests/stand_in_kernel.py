"""A minimal kernel on real ZeroMQ sockets (PROTOCOL.md): a PUB for events, a ROUTER for control, and a plugin
process started against it with the environment a spawned plugin gets."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from trainbus.proto import Event, control, decode_control, encode_control, encode_event, encode_replay_batch, pack

TESTS_DIR = Path(__file__).resolve().parent


class StandInKernel:
    def __init__(self, events_endpoint: str, control_endpoint: str, run_id: str = "stand-in"):
        """Endpoints to bind: "tcp://127.0.0.1:*" (as from another machine) or "ipc://..."."""
        self.run_id = run_id
        self.seq = 0
        self.journal: list[bytes] = []  # every event published, encoded, for replay()
        self.ctx = zmq.Context()
        self.pub, self.router = self.ctx.socket(zmq.PUB), self.ctx.socket(zmq.ROUTER)
        for socket, endpoint in ((self.pub, events_endpoint), (self.router, control_endpoint)):
            socket.setsockopt(zmq.LINGER, 0)
            socket.bind(endpoint)

    def start_plugin(self, target: str, name: str, settings: dict, run_dir: Path, args=()) -> subprocess.Popen:
        """`python -m trainbus.sdk target *args`, stdout and stderr together in proc.stdout; with a secret, as the
        kernel spawns a plugin (by hand, one would read run_dir's credential, which has none)."""
        env = dict(os.environ, TRAINBUS_SECRET="stand-in",
                   TRAINBUS_EVENTS=self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
                   TRAINBUS_CONTROL=self.router.getsockopt_string(zmq.LAST_ENDPOINT), TRAINBUS_RUN_ID=self.run_id,
                   TRAINBUS_RUN_DIR=str(run_dir), TRAINBUS_PLUGIN_NAME=name,
                   TRAINBUS_PLUGIN_SETTINGS=pack(settings).hex(), PYTHONPATH=str(TESTS_DIR))
        env.pop("TRAINBUS_KERNEL_PID", None)
        return subprocess.Popen([sys.executable, "-m", "trainbus.sdk", target, *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def publish(self, kind: str, live: bool = True, **data) -> None:
        """The next event, journaled; sent on the PUB unless not `live` (as if this subscriber dropped it)."""
        self.seq += 1
        self.journal.append(encode_event(Event(self.seq, self.run_id, kind, time.time(), 0, 0, data)))
        if live:
            self.pub.send_multipart([kind.encode(), self.journal[-1]])

    def replay(self, identity: bytes, from_seq: int) -> None:
        """One replay_batch: every journaled event from from_seq on."""
        records = self.journal[from_seq - 1:]
        self.router.send_multipart([identity, encode_replay_batch(len(records), b"".join(records), True)])

    def receive(self, timeout_ms: int) -> tuple[bytes, dict] | None:
        """The next control message and its sender's identity, or None after timeout_ms."""
        if not self.router.poll(timeout_ms):
            return None
        identity, raw = self.router.recv_multipart()
        return identity, decode_control(raw)

    def welcome(self, identity: bytes, resume_from: int) -> None:
        self.router.send_multipart([identity, encode_control(
            control("welcome", run=self.run_id, heartbeat_interval_s=1.0, resume_from=resume_from))])

    def close(self) -> None:
        self.pub.close()
        self.router.close()
        self.ctx.term()
