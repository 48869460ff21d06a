"""The kernel's wire: numbers, journals and publishes events; reads control messages and hands them on.

All sockets live in one bus thread; the training thread only appends to a deque (`publish`) and drains
replies (`take_replies`), so it never waits on a plugin, a socket or the disk. Each job of the thread's round is
a part the Bus holds: numbering.py, publishers.py, doorbell.py, control_reading.py, remote_policing.py, votes.py,
loop_watch.py, and replies.py holds the replies for the loop's next step boundary. What a control message does is
kernel/control.py, who may send it kernel/peers.py; kernel/session.py wires them together.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import zmq

from trainbus.proto import Event, encode_event, events as ev
from trainbus.proto.codec import CONTROL_MAX_MESSAGE_BYTES

from .answers import send_answer
from .control_reading import CONTROL_PER_WAKE, LOCAL_CONTROL_RCVHWM, LOCAL_CONTROL_SNDHWM, REMOTE, ControlReading
from .doorbell import Doorbell
from .journal import Journal
from .loop_watch import LoopWatch
from .numbering import FINAL_EVENTS, Numbering
from .publishers import Publishers
from .remote import Listener
from .remote_policing import RemotePolicing
from .replies import HeldReplies
from .reply_ledger import ReplyLedger
from .tensors import materialize_tensors
from .votes import Votes

log = logging.getLogger("trainbus.kernel")

# Events wait at most this long before they go out as one burst. Each burst costs training the GIL and every
# plugin a wake-up of each of its threads (~100-200 us of a core on a busy 2-core box; docs/benchmarks.md): 100 ms
# bursts cost the tiny MLP ~2 points less than 20 ms. Events that are not per-batch used to go out within 5 ms, so
# a small model's epoch boundaries (5-20 a second) woke every plugin again and again; they ride the bursts now.
# What someone waits on goes at once: the training thread's flush_now (a vote at end_epoch, the run's end).
FLUSH_INTERVAL_S = 0.1
STARTUP_HEARTBEAT_INTERVAL_S = 0.1  # fast heartbeats until every plugin said hello (slow joiners)
CLOSE_TIMEOUT_S = 10.0  # close() waits this long for the bus thread's last round
FLUSH_NOW_TIMEOUT_S = 5.0  # flush_now's wait for a flush: the bus never takes longer unless its disk holds it up


class Bus:
    """Publishes events in seq order through the journal, and dispatches control messages to their owners."""

    def __init__(self, run_id: str, journal: Journal, socket_dir: Path, heartbeat_interval_s: float,
                 remote: Listener | None = None, stalled_after_s: float = 0.0):
        """`remote`: the run's TCP endpoints (kernel/remote.py), served beside the ipc ones by this thread.
        `stalled_after_s`: the loop reaching no seam this long is said, with where it waits (0: never)."""
        self.run_id = run_id
        self.remote = remote
        self.journal = journal
        self.heartbeat_interval_s = heartbeat_interval_s
        self.numbering = Numbering(run_id, journal, self._final_numbered, self._checkpoint_numbered, self._bus_error)
        self.run_state = self.numbering.run_state  # what a `snapshot` answers (trainbus attach)
        self.loop_watch = LoopWatch(stalled_after_s, self.emit)
        self.votes = Votes(self)
        self.session_seq = journal.last_seq + 1  # this kernel's first: earlier ones are a continued run's past
        self._queue: collections.deque = collections.deque()  # (type, ts, step, epoch, data); step None: emit's
        self._unpublished: collections.deque = collections.deque()  # (topic, raw) numbered, not yet journaled
        # stop and checkpoint_now replies until the next step boundary takes them (replies.py); the loop calls
        # take_replies at every step, so it is HeldReplies.take itself, not a method wrapping it
        self.held_replies = HeldReplies()
        self.reply, self.take_replies = self.held_replies.add, self.held_replies.take
        self._answers: collections.deque = collections.deque()  # (identity, raw) sent off the bus thread (send)
        self.counters = collections.Counter()
        self.ledger = ReplyLedger()  # what each remote key's connections can have queued (reply_ledger.py)
        self.failure: str | None = None  # why the run must stop (the journal's backlog overflowed)
        self.fast_heartbeats = True
        self.announce_close = False  # close() ends the journal with bus_closing (a run's end, close_bus)
        self._closing = threading.Event()
        self.idle = threading.Condition()  # notified after every round of the bus thread

        self.ctx = zmq.Context()
        self.publishers = Publishers(self.ctx, socket_dir, remote)  # the events and bursts sockets
        # ROUTER_MANDATORY: an unroutable reply raises (and is counted) instead of vanishing
        self.router = _socket(self.ctx, zmq.ROUTER, ROUTER_MANDATORY=1, MAXMSGSIZE=CONTROL_MAX_MESSAGE_BYTES,
                              SNDHWM=LOCAL_CONTROL_SNDHWM, RCVHWM=LOCAL_CONTROL_RCVHWM, LINGER=0)
        # What the training thread waits on is flushed at once, not at the next tick.
        self.doorbell = Doorbell(self.ctx, f"trainbus-wake-{id(self)}")
        # ipc only, in an owner-only directory: never a TCP port anyone on the host could reach
        self.router.bind(f"ipc://{socket_dir / 'control.sock'}")
        self.reading = ControlReading(self.router, remote, self.ledger, self.counters)
        self.policing = None if remote is None else RemotePolicing(remote, self.reading.remote_pace, self.ledger,
                                                                   self.counters, self.publishers)
        self.events_endpoint, self.bursts_endpoint = self.publishers.events_endpoint, self.publishers.bursts_endpoint
        self.control_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="trainbus-bus", daemon=True)

    def serve(self, supervisor, control) -> None:
        """The supervisor it ticks and the dispatcher it feeds (kernel/session.py); before start()."""
        self.supervisor, self.control = supervisor, control
        self.reading.control = control

    # -- the training thread's side ---------------------------------------------------------------

    def start(self) -> None:
        self.loop_watch.started()
        self.supervisor.start_all()
        self._thread.start()

    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None:
        """Queue an event; never blocks. Tensor values are read to floats later, in the bus thread; it goes out
        with the next burst (FLUSH_INTERVAL_S), or at once with flush_now."""
        self._queue.append((type_, time.time(), step, epoch, data))

    def emit(self, type_: str, data: dict[str, Any]) -> None:
        """A kernel event, numbered in order with the loop's events (called from the bus thread). Its step and
        epoch are filled in as it is numbered: per-batch events queued before it (not yet flushed) come first."""
        self._queue.append((type_, time.time(), None, None, data))

    def wait(self, done, timeout_s: float) -> bool:
        """Block the calling thread until done() holds (checked after each bus round) or timeout_s passes."""
        end = time.monotonic() + timeout_s
        with self.idle:
            while not done():
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self.idle.wait(min(left, 0.05))
        return True

    def journal_refused_since(self, since: float) -> bool:
        """The journal's disk refused a write at or after `since` (monotonic) and has not taken one since: nothing
        numbered meanwhile is published (journal first), so a plugin cannot answer it, and waiting for one to is
        waiting in vain. (Its writes are retried every 0.2 s while events or heartbeats come.)"""
        journal = self.journal
        return journal.error is not None and journal.refused_at is not None and journal.refused_at >= since

    def flush_now(self, timeout_s: float | None = None) -> bool:
        """Send what is queued now, not with the next burst, and wait until it is out (the training thread's).

        Out means numbered by a flush that started after this call: an empty queue is not enough, since a burst
        may have taken the events and not yet numbered them (a vote would then be awaited at the seq before).
        False when timeout_s passed first: a flush held up (the journal's fsync behind other writes to its disk)."""
        return self.wait(self.doorbell.ring().is_set, FLUSH_NOW_TIMEOUT_S if timeout_s is None else timeout_s)

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        """Wait until every live plugin voting at `type_` acked its latest instance; return who did not (votes.py)."""
        return self.votes.wait(type_, timeout_s, FLUSH_NOW_TIMEOUT_S)

    @property
    def last_seq(self) -> int:
        """The last seq numbered."""
        return self.numbering.last_seq

    @property
    def final_seq(self) -> int:
        return self.numbering.final_seq or self.numbering.last_seq

    @property
    def ended(self) -> bool:
        """The run's final event is numbered: from here plugins drain and are stopped (bus thread)."""
        return bool(self.numbering.final_seq)

    def close(self) -> OSError | None:
        """Stop the bus thread after a last flush; close sockets and the journal (its last error, if any)."""
        self._closing.set()
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            # Held up (its last flush waiting for the journal's disk): closing the journal under it would lose the
            # run's last events, and a replay it still serves could read a descriptor reused by another file. The
            # process's exit closes them; this run's end is not held up longer.
            log.error("the bus thread did not stop within %.0f s (the journal's disk?): its journal and sockets are "
                      "left open until the process exits", CLOSE_TIMEOUT_S)
            return self.journal.error
        error = self.journal.close()
        self.publishers.close()
        self.router.close()
        self.doorbell.close()
        self.ctx.term()
        if self.remote is not None:
            self.remote.close()
        for endpoint in (self.events_endpoint, self.bursts_endpoint, self.control_endpoint):
            Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)  # libzmq leaves the file behind
        return error

    # -- the bus thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.doorbell.rx, zmq.POLLIN)
        if self.policing is not None:
            for socket in self.policing.sockets():  # control; the events XPUB's subscriptions; each socket's monitor
                poller.register(socket, zmq.POLLIN)
        for pub in self.publishers.burst_pubs:
            poller.register(pub, zmq.POLLIN)  # (un)subscriptions
        next_heartbeat, next_flush, more = 0.0, 0.0, False
        while not self._closing.is_set():
            try:
                # The control sockets in the poller now: what waits on them at `polled` is read this round (bar a
                # flood's rest: `more`). One left unread while its share is spent holds its peers' heartbeats, not
                # their silence: no liveness window ends meanwhile (peers.heard_at, Supervisor.tick).
                local_read, remote_read = self.reading.local_pace.polled, self.reading.remote_pace.polled
                due = self.reading.resumes_at(min(next_heartbeat, self.supervisor.next_deadline(local_read),
                                                  next_flush))
                ready = dict(poller.poll(0 if more else max(0.0, due - time.monotonic()) * 1000))
                polled = time.monotonic()
                if self.doorbell.rx in ready:  # the training thread waits on what is queued (flush_now)
                    self.doorbell.heard()
                    next_flush = 0.0
                if self.policing is not None:
                    self.policing.watch_connections(poller, ready)
                self.publishers.read_subscriptions(ready)
                if self.policing is not None:
                    self.policing.watch_subscriptions(poller, ready)
                control_ready = self.router in ready or (self.remote is not None and self.remote.router in ready)
                more = (more or control_ready) and self.reading.read(CONTROL_PER_WAKE)
                self.reading.pace(poller)
                self._send_answers()
                if local_read:
                    self.control.peers.heard_at = polled
                if remote_read:
                    self.control.peers.heard_remote_at = polled
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat()
                    if self.policing is not None:
                        self.policing.cut_revoked(poller)
                    interval = STARTUP_HEARTBEAT_INTERVAL_S if self.fast_heartbeats else self.heartbeat_interval_s
                    next_heartbeat = now + interval
                    self.loop_watch.tick(now)
                    for peer in self.control.peers.forget_dead(now):  # attached by hand, gone without a bye
                        self.emit(ev.PLUGIN_HUNG, {"plugin": peer.name, "pid": peer.pid, "reason": (
                            f"silent for {now - peer.last_seen:.0f} s without a bye (attached, not ours to "
                            f"stop): forgotten; a new hello under its name is welcome")})
                    # once a heartbeat: segments due are handed to the journal's worker, never compacted here
                    self.journal.compact_through(self.control.compactable_through(now))
                # Control traffic alone does not flush: events keep their bursts however often a peer talks (a
                # flood of heartbeats or replay requests flushed, and woke every plugin, per message).
                if now >= next_flush:
                    self._flush()
                    next_flush = now + FLUSH_INTERVAL_S
                self.control.tick(now)
                self.supervisor.tick(now, self.control.peers.heard_at)
            except Exception:  # the bus must never take training down: log, count, go on
                self._bus_error("the bus thread's loop")
                time.sleep(FLUSH_INTERVAL_S)
            with self.idle:
                self.idle.notify_all()
        self.reading.read_what_was_sent()  # the plugins' last words (byes, final acks, a backlog's log lines)
        if self.announce_close:  # here, after the thread's last heartbeat and peer messages: nothing follows it
            self.emit(ev.BUS_CLOSING, {})
        self._flush()
        self._send_answers()

    def _send_answers(self) -> None:
        while self._answers:
            self.send(*self._answers.popleft())

    def _bus_error(self, where: str) -> None:
        """An exception the bus thread survives (called from its handler): counted, the first ten logged."""
        self.counters["bus_errors"] += 1
        if self.counters["bus_errors"] <= 10:
            log.error("bus error in %s (training goes on):\n%s", where, traceback.format_exc())

    def _heartbeat(self) -> None:
        if not self._unpublished:
            self.emit(ev.HEARTBEAT, {"interval_s": self.heartbeat_interval_s})
            return
        # Events wait for the disk and nothing is published before it is journaled: a sign of life only,
        # repeating the last journaled seq (PROTOCOL.md, the journal), so plugins do not take us for gone.
        step, epoch = self.numbering.position
        beat = Event(max(1, self.journal.written_seq), self.run_id, ev.HEARTBEAT, time.time(), step, epoch,
                     {"interval_s": self.heartbeat_interval_s, "held_back": len(self._unpublished)})
        self.publishers.send([(ev.HEARTBEAT.encode(), encode_event(beat))])

    def _flush(self) -> None:
        waiting = self.doorbell.waiting()  # first: every event queued before one of them is in the batch below
        try:
            self._number_and_send(_take_all(self._queue))
        finally:
            for flushed in waiting:
                flushed.set()

    def _number_and_send(self, batch: list) -> None:
        final = any(item[0] in FINAL_EVENTS for item in batch)
        if final:
            # Replies already sent go out before the final event: a plugin may exit right after it.
            self.reading.read_what_was_sent()
            batch += _take_all(self._queue)
            batch.sort(key=lambda item: item[0] in FINAL_EVENTS)  # stable: only the final event moves
        if not batch and not self._unpublished:
            return
        self.loop_watch.moved(batch, final)
        try:
            materialize_tensors(batch)
        except Exception:  # a tensor that cannot be read: its event says so below (not encodable), the rest go on
            self._bus_error("reading the events' tensors")
        first_seq = self.numbering.last_seq + 1
        records = self.numbering.number(batch, self._unpublished)
        written = self.journal.append(records, first_seq)  # journal first: a published event is always replayable
        self.publishers.send([self._unpublished.popleft() for _ in range(written)])
        self.counters["events"] += written
        if self.journal.overflowing and self.failure is None:  # the disk stays full: stop at the next step
            self.failure = self.journal.overflow_message()
            self.reply("stop", "kernel", self.failure)

    def _final_numbered(self) -> None:
        self.supervisor.training_over = True

    def _checkpoint_numbered(self, seq: int, data: dict) -> None:
        self.control.checkpointer.numbered(seq, data)

    def send(self, identity: bytes, raw: bytes) -> None:
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            # A socket is one thread's: an answer made on the training thread (a detach that ended as the run
            # did: Supervisor.shutdown) is sent by the bus thread, on its next wake or as it stops.
            self._answers.append((identity, raw))
            return
        router = self.remote.router if identity[:1] == REMOTE and self.remote is not None else self.router
        if not send_answer(router, (identity[1:], raw)):  # gone or stalled peer: it will ask again
            self.counters["unroutable"] += 1
            return
        if identity[:1] == REMOTE:
            self.ledger.sent(identity, len(raw))


def _take_all(queue: collections.deque) -> list:
    return [queue.popleft() for _ in range(len(queue))]  # other threads only append


def _socket(ctx: zmq.Context, kind: int, **options: int) -> zmq.Socket:
    socket = ctx.socket(kind)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    return socket
