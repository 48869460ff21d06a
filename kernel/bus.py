"""The kernel's wire: numbers, journals and publishes events; reads control messages and hands them on.

All sockets live in one bus thread; the training thread only appends to a deque (`publish`) and drains
replies (`take_replies`), so it never waits on a plugin, a socket or the disk. What a control message
does is kernel/control.py, who may send it kernel/peers.py; kernel/session.py wires them together.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import zmq

from trainbus.proto import Event, ProtocolError, decode_event, encode_event, events as ev
from trainbus.proto.codec import CONTROL_MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES, N_COUNTS, new_packer
from trainbus.proto.run_state import RunState

from .bursts import BURSTS_HWM, bursts_of, read_subscriptions
from .control_reading import CONTROL_PER_WAKE, LOCAL_CONTROL_RCVHWM, LOCAL_CONTROL_SNDHWM, REMOTE, ControlReading
from .journal import Journal
from .remote import Listener
from .remote_policing import RemotePolicing
from .replies import Reply
from .rank_stacks import described
from .reply_ledger import ReplyLedger
from .spec import is_user_file
from .stall_watch import StallWatch, thread_stack
from .tensors import materialize_tensors

log = logging.getLogger("trainbus.kernel")

# Events wait at most this long before they go out as one burst. Each burst costs training the GIL and every
# plugin a wake-up of each of its threads (~100-200 us of a core on a busy 2-core box; docs/benchmarks.md): 100 ms
# bursts cost the tiny MLP ~2 points less than 20 ms. Events that are not per-batch used to go out within 5 ms, so
# a small model's epoch boundaries (5-20 a second) woke every plugin again and again; they ride the bursts now.
# What someone waits on goes at once: the training thread's flush_now (a vote at end_epoch, the run's end).
FLUSH_INTERVAL_S = 0.1
# The loop's per-step events carry only numbers it made (batch index and size, losses, counts): their bytes
# need no decode to prove a peer can read them. 2 us of the bus thread's GIL an event, each step twice.
STEP_EVENTS = frozenset({ev.START_TRAINING_BATCH, ev.END_TRAINING_BATCH})
# Per subscriber. With every plugin-made string capped (kernel/limits.py) an event is at most ~17 KiB and
# usually ~200 B, so a stalled subscriber holds a few MB, and ~250 MB where plugins log 16 KiB lines at their
# budget; a PUB queue past this drops (durable plugins replay). Local subscribers are the run's own plugins.
EVENTS_HWM = 10_000
PENDING_REPLIES_MAX = 64  # stops, and checkpoint_nows, held for the next step boundary (which lists 8: replies.py)
STARTUP_HEARTBEAT_INTERVAL_S = 0.1  # fast heartbeats until every plugin said hello (slow joiners)
CLOSE_TIMEOUT_S = 10.0  # close() waits this long for the bus thread's last round
FLUSH_NOW_TIMEOUT_S = 5.0  # flush_now's wait for a flush: the bus never takes longer unless its disk holds it up
LINGER_MS = 1000
FINAL_EVENTS = frozenset({ev.END_TRAINING_SESSION, ev.RUN_FAILED})
_MORE, _LAST = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)


class Bus:
    """Publishes events in seq order through the journal, and dispatches control messages to their owners."""

    def __init__(self, run_id: str, journal: Journal, socket_dir: Path, heartbeat_interval_s: float,
                 remote: Listener | None = None, stalled_after_s: float = 0.0):
        """`remote`: the run's TCP endpoints (kernel/remote.py), served beside the ipc ones by this thread.
        `stalled_after_s`: the loop reaching no seam this long is said, with where it waits (0: never)."""
        self.run_id = run_id
        self.stall_watch = StallWatch(stalled_after_s)
        # Under torchrun: where the other ranks of this machine wait (kernel/rank_stacks.py), asked at a stall
        self.ask_other_ranks: Callable[[], list[dict[str, Any]]] | None = None
        self._training_thread: int | None = None  # the thread that started the bus: the loop's
        self._last_loop_event = ""
        self.remote = remote
        self.journal = journal
        self.heartbeat_interval_s = heartbeat_interval_s
        self.last_seq = journal.last_seq  # the last seq numbered
        self.session_seq = journal.last_seq + 1  # this kernel's first: earlier ones are a continued run's past
        self._queue: collections.deque = collections.deque()  # (type, ts, step, epoch, data); step None: emit's
        self._unpublished: collections.deque = collections.deque()  # (topic, raw) numbered, not yet journaled
        # stop and checkpoint_now replies until the next step boundary takes them, each kind at most PENDING_REPLIES_MAX
        self._stops: collections.deque[Reply] = collections.deque()
        self._checkpoint_asks: collections.deque[Reply] = collections.deque()
        self._answers: collections.deque = collections.deque()  # (identity, raw) sent off the bus thread (send)
        # flush_now's: each set once a flush has numbered (journaled, sent) every event queued before it
        self._flushed: collections.deque[threading.Event] = collections.deque()
        self.counters = collections.Counter()
        self.votes_missed: collections.Counter = collections.Counter()  # plugin name -> votes it did not ack in time
        self.ledger = ReplyLedger()  # what each remote key's connections can have queued (reply_ledger.py)
        self.failure: str | None = None  # why the run must stop (the journal's backlog overflowed)
        self.fast_heartbeats = True
        self.position = (0, 0)  # (step, epoch) of the latest numbered event, for kernel events
        self._final_seq = 0  # seq of end_training_session or run_failed: what durable plugins drain to
        self.announce_close = False  # close() ends the journal with bus_closing (a run's end, close_bus)
        self._last_seq_of: dict[str, int] = {}  # event type -> seq of its latest instance
        self._counts = _counts_at_end(journal)  # every envelope's `n`: per-batch events numbered so far in the run
        # What a `snapshot` answers (trainbus attach): every numbered event folded in, here on the bus thread.
        self.run_state = RunState(run_id, journal.last_seq)
        self._closing = threading.Event()
        self._packer = new_packer()  # the bus thread's own: it encodes every event
        self.idle = threading.Condition()  # notified after every round of the bus thread

        self.ctx = zmq.Context()
        self.pub = _socket(self.ctx, zmq.PUB, SNDHWM=EVENTS_HWM, LINGER=LINGER_MS)
        self.bursts = _socket(self.ctx, zmq.XPUB, SNDHWM=BURSTS_HWM, LINGER=LINGER_MS)
        # ROUTER_MANDATORY: an unroutable reply raises (and is counted) instead of vanishing
        self.router = _socket(self.ctx, zmq.ROUTER, ROUTER_MANDATORY=1, MAXMSGSIZE=CONTROL_MAX_MESSAGE_BYTES,
                              SNDHWM=LOCAL_CONTROL_SNDHWM, RCVHWM=LOCAL_CONTROL_RCVHWM, LINGER=0)
        # The training thread's doorbell: a non-batch event is flushed at once, not at the next tick.
        # One pending ring is enough (SNDHWM 1); more would be dropped.
        self._wake_rx = _socket(self.ctx, zmq.PULL, LINGER=0)
        self._wake_rx.bind(f"inproc://trainbus-wake-{id(self)}")
        self._wake_tx = _socket(self.ctx, zmq.PUSH, LINGER=0, SNDHWM=1)  # used by the training thread only
        self._wake_tx.connect(f"inproc://trainbus-wake-{id(self)}")
        # ipc only, in an owner-only directory: never a TCP port anyone on the host could reach
        self.pub.bind(f"ipc://{socket_dir / 'events.sock'}")
        self.bursts.bind(f"ipc://{socket_dir / 'bursts.sock'}")
        self.router.bind(f"ipc://{socket_dir / 'control.sock'}")
        self._pubs = [self.pub] if remote is None else [self.pub, remote.pub]
        self._burst_pubs = [self.bursts] if remote is None else [self.bursts, remote.bursts]
        self._burst_topics: dict[zmq.Socket, set[bytes]] = {pub: set() for pub in self._burst_pubs}  # subscribed
        self.reading = ControlReading(self.router, remote, self.ledger, self.counters)
        self.policing = None if remote is None else RemotePolicing(remote, self.reading.remote_pace, self.ledger,
                                                                   self.counters, self._pubs, self._burst_pubs,
                                                                   self._burst_topics)
        self.events_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bursts_endpoint = self.bursts.getsockopt_string(zmq.LAST_ENDPOINT)
        self.control_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, name="trainbus-bus", daemon=True)

    def serve(self, supervisor, control) -> None:
        """The supervisor it ticks and the dispatcher it feeds (kernel/session.py); before start()."""
        self.supervisor, self.control = supervisor, control
        self.reading.control = control

    # -- the training thread's side ---------------------------------------------------------------

    def start(self) -> None:
        self._training_thread = threading.get_ident()
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

    def reply(self, type_: str, plugin: str, reason: str) -> None:
        """A stop or checkpoint_now for the loop's next step boundary. Past PENDING_REPLIES_MAX of its kind, it is
        counted on the last one queued (Reply.more), whose boundary says how many more came: each was held until
        then, and a peer that may stop the run sending them through a long validation grew the kernel by GBs."""
        pending = self._stops if type_ == "stop" else self._checkpoint_asks
        if len(pending) < PENDING_REPLIES_MAX:
            pending.append(Reply(type_, plugin, reason))
            return
        try:
            pending[-1].more += 1
        except IndexError:  # taken by the boundary this instant: the one it would have joined is being acted on
            pass

    def take_replies(self) -> list[Reply]:
        """Called at every step boundary: the empty case is two truth tests (~100 ns)."""
        if not self._stops and not self._checkpoint_asks:
            return []
        # the bus thread only appends
        return [pending.popleft() for pending in (self._stops, self._checkpoint_asks) for _ in range(len(pending))]

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
        return self.wait(self._ring().is_set, FLUSH_NOW_TIMEOUT_S if timeout_s is None else timeout_s)

    def _ring(self) -> threading.Event:
        """Ask the bus to flush at once; the Event is set once a flush numbered every event queued before it."""
        flushed = threading.Event()
        self._flushed.append(flushed)  # after this thread's events: the flush that takes it takes them
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.Again:  # a ring is already pending: the bus is waking anyway
            pass
        return flushed

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        """Wait until every live plugin voting at `type_` acked its latest instance; return who did not."""
        peers = self.control.peers
        if timeout_s <= 0 or not peers.has_voters(type_):
            return []
        # The vote is at the seq a flush gives the event. Until one has numbered it the latest of its type is the one
        # before, which every voter acked long ago: a flush held up past flush_now's wait (an fsync behind a
        # checkpoint being written) is waited for within the vote's time too, and what it leaves is the vote's.
        out, end = self._ring(), time.monotonic() + FLUSH_NOW_TIMEOUT_S + timeout_s
        if not self.wait(out.is_set, end - time.monotonic()):
            late = [p.name for p in peers if type_ in p.votes and peers.is_live(p, time.monotonic())]
            log.warning("no vote from %s at %s: no flush numbered it within %.3g s (the journal's disk?); training "
                        "went on", ", ".join(late), type_, FLUSH_NOW_TIMEOUT_S + timeout_s)
            if late:  # kernel.log is no one's console: the journal's event is what the console and `runs show` read
                self.votes_missed.update(late)
                self.emit(ev.VOTE_MISSED, {"plugins": late, "at": type_, "seq": 0,
                                           "timeout_s": FLUSH_NOW_TIMEOUT_S + timeout_s})
            return late
        seq = self._last_seq_of.get(type_, 0)
        self.wait(lambda: not peers.voters_behind(type_, seq, time.monotonic()),
                  min(timeout_s, end - time.monotonic()))
        late = peers.voters_behind(type_, seq, time.monotonic())
        if late:
            peers.mark_missed_vote(late, seq)
            log.warning("no vote from %s at %s (seq %d) within vote_timeout_s (%.3g s): training went on, and waits "
                        "for no vote of theirs until they ack seq %d", ", ".join(late), type_, seq, timeout_s, seq)
            # kernel.log is no one's console: the journal's event is what the console and `runs show` read
            self.votes_missed.update(late)
            self.emit(ev.VOTE_MISSED, {"plugins": late, "at": type_, "seq": seq, "timeout_s": timeout_s})
        return late

    @property
    def final_seq(self) -> int:
        return self._final_seq or self.last_seq

    @property
    def ended(self) -> bool:
        """The run's final event is numbered: from here plugins drain and are stopped (bus thread)."""
        return bool(self._final_seq)

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
        for socket in (self.pub, self.bursts, self.router, self._wake_tx, self._wake_rx):
            socket.close()
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
        poller.register(self._wake_rx, zmq.POLLIN)
        if self.policing is not None:
            for socket in self.policing.sockets():  # control; the events XPUB's subscriptions; each socket's monitor
                poller.register(socket, zmq.POLLIN)
        for pub in self._burst_pubs:
            poller.register(pub, zmq.POLLIN)  # (un)subscriptions
        next_heartbeat, next_flush, more = 0.0, 0.0, False
        while not self._closing.is_set():
            try:
                due = self.reading.resumes_at(min(next_heartbeat, self.supervisor.next_deadline(), next_flush))
                ready = dict(poller.poll(0 if more else max(0.0, due - time.monotonic()) * 1000))
                polled = time.monotonic()
                if self._wake_rx in ready:  # the training thread waits on what is queued (flush_now)
                    _drain(self._wake_rx)
                    next_flush = 0.0
                if self.policing is not None:
                    self.policing.after_poll(poller, ready)
                for pub in self._burst_pubs:
                    if pub in ready:
                        read_subscriptions(pub, self._burst_topics[pub])
                if self.policing is not None:
                    self.policing.after_subscriptions(poller, ready)
                control_ready = self.router in ready or (self.remote is not None and self.remote.router in ready)
                more = (more or control_ready) and self.reading.read(CONTROL_PER_WAKE)
                self.reading.pace(poller)
                self._send_answers()
                self.control.peers.heard_at = polled  # what waited then is read (bar a flood's rest: `more`)
                now = time.monotonic()
                if now >= next_heartbeat:
                    self._heartbeat()
                    if self.policing is not None:
                        self.policing.cut_revoked(poller)
                    interval = STARTUP_HEARTBEAT_INTERVAL_S if self.fast_heartbeats else self.heartbeat_interval_s
                    next_heartbeat = now + interval
                    stalled_s = self.stall_watch.tick(now)
                    if stalled_s is not None:
                        self._say_stalled(stalled_s)
                    for peer in self.control.peers.forget_dead(now):  # attached by hand, gone without a bye
                        self.emit(ev.PLUGIN_HUNG, {"plugin": peer.name, "pid": peer.pid, "reason": (
                            f"silent for {now - peer.last_seen:.0f} s without a bye (attached, not ours to "
                            f"stop): forgotten; a new hello under its name is welcome")})
                # Control traffic alone does not flush: events keep their bursts however often a peer talks (a
                # flood of heartbeats or replay requests flushed, and woke every plugin, per message).
                if now >= next_flush:
                    self._flush()
                    next_flush = now + FLUSH_INTERVAL_S
                self.control.tick(now)
                self.supervisor.tick(now)
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
        step, epoch = self.position
        beat = Event(max(1, self.journal.written_seq), self.run_id, ev.HEARTBEAT, time.time(), step, epoch,
                     {"interval_s": self.heartbeat_interval_s, "held_back": len(self._unpublished)})
        self._send_events([(ev.HEARTBEAT.encode(), encode_event(beat))])

    def _flush(self) -> None:
        waiting = _take_all(self._flushed)  # first: every event queued before one of them is in the batch below
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
        self._watch_progress(batch, final)
        try:
            materialize_tensors(batch)
        except Exception:  # a tensor that cannot be read: its event says so below (not encodable), the rest go on
            self._bus_error("reading the events' tensors")
        first_seq, records, counts = self.last_seq + 1, [], self._counts
        for type_, ts, step, epoch, data in batch:
            # A seq is taken only together with its record: an exception here (a kernel bug) costs its event, never
            # a gap in the journal, whose append would refuse every later batch (no event published again).
            try:
                if step is None:  # a kernel event (emit): where the event before it left the loop
                    step, epoch = self.position
                    if type_ == ev.METRIC and data["step"] is None:  # reported without a step: the kernel's
                        data["step"], data["epoch"] = step, epoch        # as it arrived (a step alone: epoch nil)
                seq, n, counted = self.last_seq + 1, counts[:], ev.COUNTED_INDEX.get(type_)
                if counted is not None:
                    n[counted] += 1
                event = Event.fast(seq, self.run_id, type_, ts, step, epoch, data, n)
                try:
                    raw = encode_event(event, check=type_ not in STEP_EVENTS, packer=self._packer)
                except ProtocolError as exc:  # a user metric of an odd type: keep the seq, say why
                    event = Event(seq, self.run_id, type_, ts, step, epoch,
                                  {"error": f"event data not encodable: {exc}"}, n=n)
                    raw = encode_event(event)
                records.append(raw)
                self._unpublished.append((type_.encode(), raw))
                self.last_seq = seq
                if counted is not None:
                    counts[counted] += 1
                self._last_seq_of[type_] = seq
                if type_ in FINAL_EVENTS:
                    self._final_seq = seq
                    self.supervisor.training_over = True
                self.position = (step, epoch)
                self.run_state.fold(event)
                if type_ == ev.SAVE_CHECKPOINT:
                    self.control.checkpointer.numbered(seq, data)
            except Exception:
                self._bus_error(f"numbering a {type_} event")
        written = self.journal.append(records, first_seq)  # journal first: a published event is always replayable
        self._send_events([self._unpublished.popleft() for _ in range(written)])
        self.counters["events"] += written
        if self.journal.overflowing and self.failure is None:  # the disk stays full: stop at the next step
            self.failure = self.journal.overflow_message()
            self.reply("stop", "kernel", self.failure)

    def _watch_progress(self, batch: list, final: bool) -> None:
        """The loop's events (those with a step) move the stall watch; the first after a stall that was said is
        followed by training_resumed, numbered right behind it."""
        first = next((i for i, item in enumerate(batch) if item[2] is not None), None)
        if first is None:
            return
        self._last_loop_event = next(item[0] for item in reversed(batch) if item[2] is not None)
        stalled_s = self.stall_watch.moved(time.monotonic())
        if stalled_s is not None:
            log.warning("training moved again (%s) after standing still for %.0f s", batch[first][0], stalled_s)
            batch.insert(first + 1, (ev.TRAINING_RESUMED, time.time(), None, None,
                                     {"stalled_s": round(stalled_s, 1), "event": batch[first][0]}))
        if final:
            self.stall_watch.ended()

    def _say_stalled(self, stalled_s: float) -> None:
        stack, where = thread_stack(self._training_thread, is_user_file)
        ranks = self.ask_other_ranks() if self.ask_other_ranks is not None else []
        others = "".join(f"\n{described(rank)}" for rank in ranks)
        log.warning("training has stood still for %.0f s (after %s)%s; its thread's stack:\n%s%s", stalled_s,
                    self._last_loop_event, f" in your code at {where}" if where else "", "".join(stack) or "-",
                    others)
        self.emit(ev.TRAINING_STALLED, {"stalled_s": round(stalled_s, 1), "after": self._last_loop_event,
                                        "where": where, "stack": stack, **({"ranks": ranks} if ranks else {})})

    def _send_events(self, frames: list[tuple[bytes, bytes]]) -> None:
        """Each (topic, envelope) on the events sockets, then all of them as bursts on the bursts sockets."""
        # Two sends with int flags: send_multipart's per-frame flag arithmetic on pyzmq's enums is most of its
        # cost (2.9 -> 1.3 us an event uncontended, docs/benchmarks.md). A PUB never blocks: at its high-water
        # mark it drops the whole message for that subscriber.
        for pub in self._pubs:
            for topic, raw in frames:
                pub.send(topic, _MORE)
                pub.send(raw, _LAST)
        takers = [pub for pub in self._burst_pubs if self._burst_topics[pub]]
        if takers and frames:
            for burst in bursts_of([raw for _, raw in frames]):
                for pub in takers:
                    pub.send(burst, _LAST)

    def send(self, identity: bytes, raw: bytes) -> None:
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            # A socket is one thread's: an answer made on the training thread (a detach that ended as the run
            # did: Supervisor.shutdown) is sent by the bus thread, on its next wake or as it stops.
            self._answers.append((identity, raw))
            return
        router = self.remote.router if identity[:1] == REMOTE and self.remote is not None else self.router
        try:
            router.send_multipart((identity[1:], raw), zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):  # gone or stalled peer: it will ask again
            self.counters["unroutable"] += 1
            return
        if identity[:1] == REMOTE:
            self.ledger.sent(identity, len(raw))


def _counts_at_end(journal: Journal) -> list[int]:
    """The `n` of the journal's last event, where a continued run's numbering goes on; zeros for a new journal (or
    one written before `n`: a plugin then sees its counts start afresh, does not take them for proof, and replays)."""
    if journal.written_seq >= 1:
        count, blob = journal.read_range(journal.written_seq, 1, MAX_MESSAGE_BYTES)
        if count:
            n = decode_event(blob).n
            if n is not None:
                return list(n)
    return [0] * N_COUNTS


def _take_all(queue: collections.deque) -> list:
    return [queue.popleft() for _ in range(len(queue))]  # other threads only append


def _drain(socket: zmq.Socket) -> None:
    while True:
        try:
            socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def _socket(ctx: zmq.Context, kind: int, **options: int) -> zmq.Socket:
    socket = ctx.socket(kind)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    return socket
