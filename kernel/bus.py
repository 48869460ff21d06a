"""The kernel's bus: numbers, journals and publishes events, and serves plugins' control traffic.

All sockets live in one bus thread. The training thread only appends to a deque (`publish`) and
drains replies (`take_replies`), so it never waits on a plugin, a socket or the disk.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from trainbus.proto import (
    JOURNAL_NAME,
    DURABLE,
    PROTOCOL_VERSION,
    ProtocolError,
    control,
    decode_control,
    encode_control,
    events as ev,
    pack,
    unpack,
)

from .journal import Journal
from .supervisor import HEARTBEAT_INTERVAL_S, PluginSpec, Supervisor

log = logging.getLogger("trainbus.kernel")

# Per-batch events wait at most this long in the bus before they go out as one burst; every other
# event wakes the bus at once. Each wake-up costs training the GIL and every plugin a wake of its own
# (~35 us a message on a busy 2-core box, DESIGN.md): 20 ms bursts cost the tiny MLP ~+7 % with no
# plugin, 100 ms ~+5 %, and ~6 points less with the default plugins (docs/benchmarks.md).
FLUSH_INTERVAL_S = 0.1
EVENTS_HWM = 50_000  # per subscriber; a PUB queue past this drops (durable plugins then replay)
CONTROL_MAX_MESSAGE_BYTES = 1024 * 1024  # what a plugin may send us
REPLAY_BATCH_MAX_EVENTS = 512  # one replay_batch; the plugin asks for the next when done (pull = flow control)
REPLAY_BATCH_MAX_BYTES = 4 * 1024 * 1024
STARTUP_HEARTBEAT_INTERVAL_S = 0.1  # fast heartbeats until every plugin said hello (slow joiners)
LINGER_MS = 1000
SLOT_RESERVED = -1


@dataclass
class Peer:
    """A plugin process that said hello on the control socket."""

    name: str
    pid: int
    delivery: str
    subscriptions: list[str]
    votes: list[str]
    capabilities: list[str]
    last_seen: float
    acked: int = 0


@dataclass
class Reply:
    """A reply the training loop acts on at a step boundary."""

    type: str  # stop | checkpoint_now
    plugin: str
    reason: str


class Bus:
    """Publishes events in seq order, keeps the journal, supervises plugins, collects replies."""

    def __init__(self, run_id: str, run_dir: Path, plugins: list[PluginSpec],
                 events_endpoint: str | None = None, control_endpoint: str | None = None,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S):
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.journal = Journal(self.run_dir / JOURNAL_NAME)
        self._seq = self.journal.last_seq
        self._queue: collections.deque = collections.deque()  # (type, ts, step, epoch, data)
        self._replies: collections.deque[Reply] = collections.deque()
        self._ready = threading.Condition()
        self._peers: dict[bytes, Peer] = {}
        self.acked: dict[str, int] = {}  # durable plugin name -> highest acked seq
        self.counters = collections.Counter()
        self._closing = threading.Event()
        self._fast_heartbeats = True
        self._position = (0, 0)  # (step, epoch) of the latest published event, for kernel events
        self._final_seq = 0  # seq of end_training_session or run_failed: what durable plugins drain to
        self._last_seq_of: dict[str, int] = {}  # event type -> seq of its latest instance
        self._slot_seq: dict[int, int] = {}  # snapshot buffer slot -> seq of the save_checkpoint using it
        self._settled: set[int] = set()  # save_checkpoint seqs a persister reported saved or failed

        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, EVENTS_HWM)
        self.pub.setsockopt(zmq.LINGER, LINGER_MS)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable replies raise, never vanish
        self.router.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE_BYTES)
        self.router.setsockopt(zmq.SNDHWM, 1000)
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.router.setsockopt(zmq.LINGER, 0)
        # The training thread's doorbell: a non-batch event is flushed at once, not at the next tick.
        self._wake_rx = self.ctx.socket(zmq.PULL)
        self._wake_rx.bind(f"inproc://trainbus-wake-{id(self)}")
        self._wake_tx = self.ctx.socket(zmq.PUSH)  # used by the training thread only
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.setsockopt(zmq.SNDHWM, 1)  # one pending ring is enough; more would be dropped
        self._wake_tx.connect(f"inproc://trainbus-wake-{id(self)}")
        self.events_endpoint = _bind(self.pub, events_endpoint, self.run_dir / "events.sock")
        self.control_endpoint = _bind(self.router, control_endpoint, self.run_dir / "control.sock")

        env = {
            "TRAINBUS_RUN_ID": run_id,
            "TRAINBUS_RUN_DIR": str(self.run_dir),
            "TRAINBUS_EVENTS": self.events_endpoint,
            "TRAINBUS_CONTROL": self.control_endpoint,
        }
        self.supervisor = Supervisor(plugins, dict(os.environ, **env, TRAINBUS_KERNEL_PID=str(os.getpid())),
                                     self.run_dir, self._emit, heartbeat_interval_s)
        self._thread = threading.Thread(target=self._run, name="trainbus-bus", daemon=True)

    # -- the training thread's side ---------------------------------------------------------------

    def start(self) -> None:
        self.supervisor.start_all()
        self._thread.start()

    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None:
        """Queue an event; never blocks. Tensor values are read to floats later, in the bus thread."""
        self._queue.append((type_, time.time(), step, epoch, data))
        if type_ not in ev.BATCH_EVENTS:
            try:
                self._wake_tx.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # a ring is already pending: the bus is waking anyway
                pass

    def take_replies(self) -> list[Reply]:
        out = []
        while self._replies:
            out.append(self._replies.popleft())
        return out

    def wait_ready(self, timeout_s: float) -> list[str]:
        """Wait until every spawned plugin said hello (or failed); return the names still missing."""
        end = time.monotonic() + timeout_s
        with self._ready:
            while True:
                missing = self._missing()
                left = end - time.monotonic()
                if not missing or left <= 0:
                    break
                self._ready.wait(min(left, 0.05))
        self._fast_heartbeats = False
        return missing

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        """Wait until every live plugin voting at `type_` handled its latest instance; return who did not."""
        if timeout_s <= 0 or not any(type_ in p.votes for p in self._peers.values()):
            return []
        self.flush_now()
        target = self._last_seq_of.get(type_, 0)
        end = time.monotonic() + timeout_s
        while True:
            waiting = [p.name for p in list(self._peers.values())
                       if type_ in p.votes and p.acked < target and self._is_live(p)]
            if not waiting or time.monotonic() >= end:
                return waiting
            time.sleep(0.002)

    def wait_drained(self, timeout_s: float, abort: Callable[[], bool] = lambda: False) -> dict[str, int]:
        """Wait until every durable plugin acked the last event; return {name: acked} of laggards."""
        self.flush_now()
        end = time.monotonic() + timeout_s
        while True:
            target = self._final_seq or self._seq
            laggards = {n: self.acked.get(n, 0) for n in self._durable_pending() if self.acked.get(n, 0) < target}
            if not laggards or time.monotonic() >= end or abort():
                return laggards
            time.sleep(0.02)

    def flush_now(self, timeout_s: float = 5.0) -> None:
        end = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.002)

    def close(self, plugin_exit_timeout_s: float = 5.0, abort: Callable[[], bool] = lambda: False) -> None:
        """Flush, let plugins exit (bounded), stop the bus thread, close sockets and the journal."""
        self.flush_now()
        self.supervisor.shutdown(plugin_exit_timeout_s, abort)
        self._closing.set()
        self._thread.join(timeout=10)
        self.journal.close()
        for socket in (self.pub, self.router, self._wake_tx, self._wake_rx):
            socket.close()
        self.ctx.term()
        for endpoint in (self.events_endpoint, self.control_endpoint):
            if endpoint.startswith("ipc://"):  # libzmq leaves the socket file behind
                Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)

    @property
    def last_seq(self) -> int:
        return self._seq

    # -- the bus thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        next_heartbeat = 0.0
        while not self._closing.is_set():
            try:
                wait_s = min(FLUSH_INTERVAL_S, max(0.0, self.supervisor.next_deadline() - time.monotonic()))
                ready = dict(poller.poll(wait_s * 1000))
                if self._wake_rx in ready:
                    _drain(self._wake_rx)
                if self.router in ready:
                    self._drain_control()
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._emit(ev.HEARTBEAT, {"interval_s": self.heartbeat_interval_s})
                    fast = self._fast_heartbeats
                    next_heartbeat = now + (STARTUP_HEARTBEAT_INTERVAL_S if fast else self.heartbeat_interval_s)
                self._flush()
                self.supervisor.tick(now)
                with self._ready:
                    self._ready.notify_all()
            except Exception:  # the bus must never take training down: log, count, go on
                self.counters["bus_errors"] += 1
                if self.counters["bus_errors"] <= 10:
                    log.error("bus error (training goes on):\n%s", traceback.format_exc())
                time.sleep(FLUSH_INTERVAL_S)
        self._drain_control()
        self._flush()

    def _emit(self, type_: str, data: dict[str, Any]) -> None:
        """A kernel event, numbered in order with the loop's events."""
        step, epoch = self._position
        self._queue.append((type_, time.time(), step, epoch, data))

    def _flush(self) -> None:
        if not self._queue:
            return
        batch = []
        while self._queue:
            batch.append(self._queue.popleft())
        _materialize_tensors(batch)
        first_seq = self._seq + 1
        records, topics = [], []
        for type_, ts, step, epoch, data in batch:
            self._seq += 1
            envelope = {"v": PROTOCOL_VERSION, "seq": self._seq, "run": self.run_id, "type": type_,
                        "ts": ts, "step": step, "epoch": epoch, "data": data}
            try:
                raw = pack(envelope)
                unpack(raw)  # what no peer could decode (int map keys, over-long values) is not sent
            except ProtocolError as exc:  # a user metric of an odd type: keep the seq, say why
                envelope["data"] = {"error": f"event data not encodable: {exc}"}
                raw = pack(envelope)
            records.append(raw)
            topics.append(type_.encode())
            self._last_seq_of[type_] = self._seq
            if type_ == ev.SAVE_CHECKPOINT:
                self._slot_seq[data["slot"]] = self._seq
            if type_ in (ev.END_TRAINING_SESSION, ev.RUN_FAILED):
                self._final_seq = self._seq
            self._position = (step, epoch)
        self.journal.append(records, first_seq)  # journal first: a published event is always replayable
        for topic, raw in zip(topics, records):
            self.pub.send_multipart((topic, raw), zmq.NOBLOCK)
        self.counters["events"] += len(records)

    def _drain_control(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.counters["malformed"] += 1
                continue
            identity, raw = frames
            try:
                msg = decode_control(raw)
            except ProtocolError as exc:
                self.counters["malformed"] += 1
                if self.counters["malformed"] <= 10:
                    log.warning("dropped a malformed control message: %s", exc)
                continue
            self._handle(identity, msg)

    def _handle(self, identity: bytes, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        peer = self._peers.get(identity)
        now = time.monotonic()
        if kind == "hello":
            peer = Peer(msg["name"], msg["pid"], msg["delivery"], msg["subscriptions"], msg["votes"],
                        msg["capabilities"], now)
            self._peers[identity] = peer
            resume_from = self.acked.get(peer.name, 0) + 1 if peer.delivery == DURABLE else self._seq + 1
            self._send(identity, control("welcome", run=self.run_id, resume_from=resume_from,
                                         heartbeat_interval_s=self.heartbeat_interval_s))
            self.supervisor.seen(peer.name, peer.pid)
            self._emit(ev.PLUGIN_READY, {"plugin": peer.name, "pid": peer.pid, "delivery": peer.delivery})
            return
        name = peer.name if peer else "?"
        if peer:
            peer.last_seen = now
        if kind == "heartbeat":
            # Liveness counts heartbeats only (Paranoid Pirate): a SIGSTOPped plugin is declared hung
            # HEARTBEAT_LIVENESS intervals after its last heartbeat, 2-3 s after the stop.
            if peer:
                self.supervisor.seen(name, peer.pid)
            return
        if kind == "ack":
            if peer:
                peer.acked = max(peer.acked, min(msg["seq"], self._seq))
                if peer.delivery == DURABLE:
                    self.acked[name] = max(self.acked.get(name, 0), peer.acked)
        elif kind == "replay":
            self._flush()
            batch = self.journal.read_range(max(msg["from_seq"], 1), REPLAY_BATCH_MAX_EVENTS, REPLAY_BATCH_MAX_BYTES)
            done = not batch or batch[-1]["seq"] >= self._seq
            self._send(identity, control("replay_batch", events=batch, done=done))
            self.counters["replayed"] += len(batch)
        elif kind == "bye":
            self.supervisor.leaving(name)
        elif kind == "metric":
            step = msg["step"] if msg["step"] is not None else self._position[0]
            self._emit(ev.METRIC, {"plugin": name, "name": msg["name"], "value": msg["value"], "step": step})
        elif kind == "log":
            self._emit(ev.LOG, {"plugin": name, "level": msg["level"], "text": msg["text"]})
            log.log(logging.getLevelName(msg["level"].upper()), "[%s] %s", name, msg["text"])
        elif kind in ("checkpoint_saved", "checkpoint_failed"):
            self._settled.add(msg["seq"])
            fields = {k: v for k, v in msg.items() if k not in ("v", "type")}
            event = ev.CHECKPOINT_SAVED if kind == "checkpoint_saved" else ev.CHECKPOINT_FAILED
            self._emit(event, {"plugin": name, **fields})
            if kind == "checkpoint_failed":
                log.warning("[%s] checkpoint failed: %s", name, msg["reason"])
        elif kind in ("stop", "checkpoint_now"):
            self._replies.append(Reply(kind, name, msg["reason"]))
        else:
            self.counters["unexpected"] += 1

    def _send(self, identity: bytes, msg: dict[str, Any]) -> None:
        try:
            self.router.send_multipart((identity, encode_control(msg)), zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):  # gone or stalled peer: it will ask again
            self.counters["unroutable"] += 1

    def _missing(self) -> list[str]:
        said_hello = {p.name for p in self._peers.values()}
        return [n for n in self.supervisor.live_names() if n not in said_hello]

    def _durable_pending(self) -> list[str]:
        """Durable plugins the final drain waits for: live ones, and supervised ones on their way back.

        A durable plugin killed or hung near the end is in backoff (or terminating) while the drain
        runs; it comes back, is replayed from its last ack and catches up, so the drain waits for it
        too. Only a plugin the supervisor has given up on (failed) or that left (exited) is not waited for.
        """
        names = {p.name for p in list(self._peers.values()) if p.delivery == DURABLE}
        pending = set()
        for name in names:
            child = self.supervisor.children.get(name)
            if child is not None:
                if child.state not in ("exited", "failed"):
                    pending.add(name)
            elif any(self._is_live(p) for p in list(self._peers.values()) if p.name == name):
                pending.add(name)
        return sorted(pending)

    def reserve_snapshot_slot(self, slot: int) -> None:
        """Called by the training thread as it fills a slot: busy until its event is numbered and handled."""
        self._slot_seq[slot] = SLOT_RESERVED

    def has_persister(self) -> bool:
        """Some plugin that persists snapshots said hello and has not been given up on."""
        return any("checkpoint" in p.capabilities and self._may_return(p) for p in list(self._peers.values()))

    def snapshot_slot_free(self, slot: int) -> bool:
        """A buffer may be reused once every persister handled the snapshot in it (acked, saved or failed).

        A persister that crashed mid-write keeps the buffer busy: restarted, it replays that
        save_checkpoint and needs the bytes still there.
        """
        seq = self._slot_seq.get(slot)
        if seq == SLOT_RESERVED:
            return False  # its save_checkpoint is queued, not yet numbered
        if seq is None or seq in self._settled:
            return True
        persisters = [p for p in list(self._peers.values()) if "checkpoint" in p.capabilities and self._may_return(p)]
        return all(self.acked.get(p.name, p.acked) >= seq for p in persisters)

    def _may_return(self, peer: Peer) -> bool:
        """Live, or supervised and coming back (restarting); not failed, not left."""
        child = self.supervisor.children.get(peer.name)
        if child is not None:
            return child.state not in ("exited", "failed")
        return self._is_live(peer)

    def _is_live(self, peer: Peer) -> bool:
        """A supervised peer lives while its process does; an external one while it keeps talking."""
        child = self.supervisor.children.get(peer.name)
        if child is not None:
            return child.proc is not None and child.proc.pid == peer.pid and child.state in ("starting", "running")
        return time.monotonic() - peer.last_seen < self.supervisor.liveness_s


def _drain(socket: zmq.Socket) -> None:
    while True:
        try:
            socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def _bind(socket: zmq.Socket, endpoint: str | None, ipc_path: Path) -> str:
    """Bind to the given endpoint, else ipc in the run dir, else a free loopback TCP port."""
    if endpoint is None:
        ipc = f"ipc://{ipc_path}"
        if len(str(ipc_path)) < 100:  # sun_path holds 108 bytes
            endpoint = ipc
        else:
            endpoint = "tcp://127.0.0.1:*"
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def _materialize_tensors(batch: list[tuple]) -> None:
    """Turn tensor values in event data into floats with one device read per device per flush."""
    found = [(data, key, value) for *_, data in batch for key, value in data.items()
             if hasattr(value, "detach") and hasattr(value, "device")]
    if not found:
        return
    import torch

    by_device: dict[Any, list] = collections.defaultdict(list)
    for item in found:
        by_device[item[2].device].append(item)
    for items in by_device.values():
        values = torch.stack([v.detach().reshape(()).double() for _, _, v in items]).tolist()
        for (data, key, _), value in zip(items, values):
            data[key] = value
