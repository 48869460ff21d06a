"""A plugin's I/O thread: owns its SUB and DEALER sockets, says hello, heartbeats, watches the kernel, and hands
events and control replies to the thread that runs the handlers (runner.py; attach.py's client too)."""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from typing import Any, Callable

import zmq

from trainbus.proto import (
    MAX_MESSAGE_BYTES,
    Event,
    ProtocolError,
    control,
    decode_burst,
    decode_control,
    decode_event,
    encode_control,
    events as ev,
)
from trainbus.proto.messages import HEARTBEAT_LIVENESS
from trainbus.proto.process import drain
from trainbus.proto.remote import ConnectionWatch

from .kernel_liveness import KernelLiveness
from .tracebacks import user_stack

# the code of the kernel's refusal of a hello under a name still held (PROTOCOL.md §2): the code, not the reason's
# text, which quotes the name (any string) and is worded for people
NAME_HELD = "hello_name_taken"
INBOX_MAX_EVENTS = 10_000  # live events held for a slow handler; beyond it they are dropped (and replayed)
# Replies held for a kernel that reads slower than the plugin sends (a thread reporting a metric in a loop; a remote
# kernel reads TCP at a share of its time): past this many waiting, metrics and logs are dropped (the kernel would
# drop most past its [limits] rates anyway), counted and said once. Others (a stop, a checkpoint's report, the
# protocol's own) are held up to twice it, so a stop behind a flood still goes.
OUTBOX_MAX_REPLIES = 10_000
DROPPABLE_REPLIES = frozenset({"metric", "log"})
# The I/O thread sleeps until something arrives, is to be sent, or a heartbeat or the kernel's liveness is due,
# and at most this long; the main thread until something arrives. A Python thread's wake-up costs ~100 us of a core,
# and on a busy 2-core box a plugin's CPU is taken from training: polling every 50 ms would wake each thread
# ~35 times a second for nothing (docs/benchmarks.md, "Fewer events and fewer wake-ups").
MAX_POLL_S = 1.0
# A durable plugin's acks go at most this often (with its heartbeats when idle), and at once for a vote and at exit:
# each costs the kernel's bus thread, which shares training's GIL, a decode; a restart redoes at most this much more.
ACK_INTERVAL_S = 0.25
FINAL_EVENTS = frozenset({ev.END_TRAINING_SESSION, ev.RUN_FAILED})
UNKNOWN_PEER = "unknown_peer"  # the kernel's refusal of a peer it does not know (forgot, past its liveness window)
# At exit, after bye, the socket stays open until the kernel's farewell says it read everything before it, this long
# at most: closed with messages in flight, they are lost (over TCP the kernel reads 16 at a time, the rest wait in
# its socket buffers, which a reset empties). A kernel at a share of a busy box's core reads thousands a second.
FAREWELL_WAIT_S = 5.0
# Over TCP a link can go silent without a FIN or RST (a NAT's or firewall's entry timed out, a suspended laptop): its
# connections look alive to TCP for ever, and libzmq never makes them again. While the kernel is silent a remote
# plugin connects anew this often. ZeroMQ's own heartbeats would close such a connection, but a PING of a client's
# left unread in a connection the kernel holds back aborts the kernel (libzmq 4.3.5, docs/architecture.md).
REDIAL_AFTER_S = 10.0


class PluginIO(threading.Thread):
    """Owns the SUB and DEALER sockets; the only thread that touches them."""

    def __init__(self, events_endpoint: str, control_endpoint: str, topics: list[str],
                 hello: dict[str, Any], handler_timeout_s: float, kernel_pid: int | None,
                 secure: Callable[[zmq.Socket], None] | None = None, log_not_acted: bool = True,
                 bursts: bool = False, unanswered_after_s: float | None = None):
        """`secure`, when given, is applied to both sockets before they connect (a remote kernel's CURVE keys).
        `log_not_acted`: a refused single message is also a line on stderr (a plugin's log); attach shows its own.
        `bursts`: `events_endpoint` is the kernel's bursts XPUB (every event, a flush's in one message; topics [""]).
        `unanswered_after_s` (with `secure`): give up when the control endpoint accepted no connection that long
        (ConnectionWatch; None: wait out kernel_liveness.CONNECT_TIMEOUT_S, as a plugin started before its kernel
        must)."""
        super().__init__(name="trainbus-plugin-io", daemon=True)
        self.inbox: collections.deque = collections.deque()  # ("event", Event) | ("control", msg)
        self.outbox: collections.deque = collections.deque()  # control messages to send
        self.wake = threading.Condition()
        self.hello = hello
        self.handler_timeout_s = handler_timeout_s
        self.busy_since: float | None = None  # set by the main thread around each handler
        self.busy_with: Event | None = None  # and the event it handles (formatted only if it gets stuck)
        # When the running handler last said it is getting somewhere (still_working), from any thread: its clock runs
        # from the later of the two. Kept apart from busy_since, which only the main thread writes: a report that
        # set busy_since could land just after the handler returned and leave an idle plugin "stuck".
        self.progress_at = 0.0
        self._stuck_told: float | None = None  # the handler clock (_busy_clock) we said is past its timeout
        # whether the kernel is gone (its wait_out_silence_s and kernel_alive are the Runner's to set)
        self.liveness = KernelLiveness(kernel_pid, lambda text: say(f"[{hello['name']}] {text}"))
        self._rehello = False  # saying hello again to a kernel that forgot us (liveness.wait_out_silence_s)
        self.gone: str | None = None  # why the kernel is considered gone
        self.lost_kernel = False  # gone because the kernel died or fell silent (not refused, not our own failure)
        # gone, but on purpose: a plugin run by hand whose user stopped it (Ctrl-C, SIGTERM) says bye as it leaves
        self.stopped_by_user = False
        self.refused: str | None = None  # the kernel turned us down (a wrong secret, a name taken): exit 1
        self.refused_code = ""  # its reason's code (proto/messages.py): KEY_REVOKED_CODES, a key it takes no more
        self.denied: str | None = None  # over TCP: a CURVE handshake failed for good (ConnectionWatch): exit 1
        self.not_acted: collections.deque[str] = collections.deque(maxlen=16)  # single messages refused (attach shows)
        self.log_not_acted = log_not_acted
        self.closing = threading.Event()  # set through close(), which also wakes the thread
        # The poll wakes on this pipe when there is something to send (send) or to stop (close); `_poked` keeps it
        # to one byte between two wake-ups, so a burst of replies costs one write.
        self._poke_r, self._poke_w = os.pipe()
        os.set_blocking(self._poke_r, False)
        os.set_blocking(self._poke_w, False)
        self._poked = False
        self._poke_lock = threading.Lock()  # a poke never writes to the pipe's fds once they are closed (or reused)
        # A durable plugin's progress (ack): sent with whatever this thread next sends or receives, not at a wake-up
        # of its own (one a burst was half of a durable plugin's wake-ups). Votes are acked at once (send).
        self.ack_seq = 0
        self._ack_sent = 0
        self._ack_sent_at = 0.0
        self._ack_now = False
        self.received = 0  # live events that reached us: a durable plugin is not sent every one (Runner)
        self.dropped = 0
        # [first, last] seq runs of the events dropped above that the handler has not passed yet: at exit a
        # best-effort plugin counts them as missed too, since no seq jump has shown them to it
        self.dropped_runs: collections.deque[list[int]] = collections.deque()
        self.passed_seq = 0  # a best-effort plugin's next expected seq, set by its Runner
        self.final_seq = 0  # the run's final event, once it came: what follows it no handler is owed
        self.replies_dropped: dict[str, int] = {}  # by type: what send found no room for (OUTBOX_MAX_REPLIES)
        self.said_hello = False
        self.welcomed = False
        self.farewell = False  # the kernel's welcome said it answers a bye with farewell (older kernels do not)
        self.kernel_closing = False  # its bus_closing came: it closes its sockets, and a bye would go unanswered
        # A name still held by a predecessor that vanished (killed, restarted by hand) is free once it has been
        # silent for the liveness window: until then each hello is refused, and said again an interval later.
        self._hello_tries_left = 2 * HEARTBEAT_LIVENESS
        self._hello_at = 0.0
        self.malformed = 0
        self.heartbeat_interval_s = 1.0
        self._decode = _burst_events if bursts else _one_event
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 50_000)
        self.sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # Before connect: libzmq sends them all together once the connection is made, so the first
        # event received (which releases our hello) finds every topic in place (PROTOCOL.md, startup).
        for topic in topics:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        # Over TCP a failed handshake is silence on the socket; libzmq's monitor says why, at once.
        self._watches: list[ConnectionWatch] = []
        self._events_endpoint, self._unanswered_after_s = events_endpoint, unanswered_after_s
        self._control_endpoint = control_endpoint
        self._remote, self._redialed_at = secure is not None, 0.0  # over TCP: redialed while the kernel is silent
        if secure is not None:
            secure(self.sub)
            self._watches.append(ConnectionWatch(self.sub, events_endpoint, said_as=control_endpoint))
        self.sub.connect(events_endpoint)
        self.dealer = self.ctx.socket(zmq.DEALER)
        # Our own routing id: when libzmq reconnects (the kernel dropped an oversized message's connection)
        # the kernel still knows us, instead of seeing an unknown peer whose acks it ignores.
        self.dealer.setsockopt(zmq.ROUTING_ID, self._routing_id())
        self.dealer.setsockopt(zmq.LINGER, 1000)  # let the last acks out
        self.dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        if secure is not None:
            secure(self.dealer)
            self._watches.append(ConnectionWatch(self.dealer, control_endpoint, unanswered_after_s))
        self.dealer.connect(control_endpoint)

    def put(self, item: tuple) -> None:
        with self.wake:
            self.inbox.append(item)
            self.wake.notify()

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a control message for the kernel; any thread may call it. Dropped (counted) when the outbox is full."""
        kind = msg.get("type")
        if len(self.outbox) >= OUTBOX_MAX_REPLIES * (1 if kind in DROPPABLE_REPLIES else 2):
            if not self.replies_dropped:
                print(f"trainbus: plugin {self.hello['name']}: the kernel takes its messages slower than it sends "
                      f"them: replies past {OUTBOX_MAX_REPLIES} waiting are dropped, metrics and logs first "
                      f"(counted at exit); report less often", file=sys.stderr, flush=True)
            self.replies_dropped[kind] = self.replies_dropped.get(kind, 0) + 1
            return
        self.outbox.append(msg)
        self._poke()

    def ack(self, seq: int, now: bool = False) -> None:
        """A durable plugin handled everything up to `seq`: the ack goes with whatever this thread next sends or
        receives (at least with each heartbeat), or at once with `now` (the last one, before exiting)."""
        self.ack_seq = max(self.ack_seq, seq)
        if now:
            self._ack_now = True
            self._poke()

    def _take_ack(self, now: float | None = None) -> None:
        """The pending ack into the outbox: when ACK_INTERVAL_S has passed since the last (`now`), or at once."""
        if self.ack_seq > self._ack_sent and (now is None or now - self._ack_sent_at >= ACK_INTERVAL_S
                                              or self._ack_now):
            self._ack_sent, self._ack_now = self.ack_seq, False
            self._ack_sent_at = time.monotonic() if now is None else now
            self.outbox.append(control("ack", seq=self._ack_sent))

    def close(self) -> None:
        """Ask the thread to end (it says bye when it said hello) and wake it to do so."""
        self.closing.set()
        self._poke()

    def _poke(self) -> None:
        with self._poke_lock:
            if self._poked:
                return
            self._poked = True
            try:
                os.write(self._poke_w, b"\0")
            except BlockingIOError:  # full: the thread has a wake-up waiting already
                pass

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # never die silently: the main thread sees gone and exits
            self.gone = f"I/O thread failed: {exc!r}"
        finally:
            with self.wake:
                self.wake.notify()
            self.sub.close()
            self._take_ack()
            # leaving on purpose: a peer attached by hand is then gone (without it, the kernel took it for hung)
            said_bye = self.said_hello and not self.kernel_closing and (
                self.gone is None or (self.stopped_by_user and not self.lost_kernel))
            if said_bye:
                self.outbox.append(control("bye", reason="done"))
            self._send_the_rest(until_farewell=said_bye and self.welcomed and self.farewell)
            self.dealer.close()
            for watch in self._watches:
                watch.close()
            self.ctx.term()
            with self._poke_lock:
                self._poked = True  # for good: nothing is read from here on
                os.close(self._poke_r)
                os.close(self._poke_w)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self._poke_r, zmq.POLLIN)
        for watch in self._watches:
            poller.register(watch.monitor, zmq.POLLIN)
        started = time.monotonic()
        last_kernel = None  # monotonic time of the last message from the kernel
        next_heartbeat = 0.0
        while not self.closing.is_set():
            ready = dict(poller.poll(self._poll_ms(time.monotonic(), started, last_kernel, next_heartbeat)))
            now = time.monotonic()
            if self._poke_r in ready:
                # Drained before it is cleared, both before the outbox is read: a send from now on writes again. A send
                # between a clear and a drain would write a byte the drain eats, leaving `_poked` set with the pipe
                # empty, and no send or close() would wake this thread again.
                drain(self._poke_r)
                self._poked = False
            if self.sub in ready:
                last_kernel = now
                self._read_events()
                if not self.said_hello and now >= self._hello_at:  # an event proves our subscription is live
                    self.dealer.send(encode_control(self.hello))
                    self.said_hello = True
            if self.dealer in ready:
                last_kernel = now
                self._read_control()
            for watch in self._watches:
                if watch.read():  # each turn (at most MAX_POLL_S apart): a silence can settle it too
                    self.gone = self.denied = watch.verdict
                    return
            if self._not_a_run(now):
                return
            self._take_ack(now)
            self._flush_outbox()
            # after the welcome only: before it the kernel refuses a heartbeat as from a stranger, and that refusal
            # (welcome_lost) would end a hello it is about to take on a retry (NAME_HELD)
            if self.welcomed and now >= next_heartbeat:
                if not self._handler_stuck(now):
                    try:
                        self.dealer.send(encode_control(control("heartbeat")), zmq.NOBLOCK)
                    except zmq.Again:  # the kernel's queue for us is full (the outbox waits too): not our failure
                        pass
                    next_heartbeat = now + self.heartbeat_interval_s
                elif self._stuck_told != self._busy_clock():
                    self._tell_stuck(now)
            reason = self.liveness.gone(now, started, last_kernel, self.heartbeat_interval_s)
            if reason:
                self.gone, self.lost_kernel = reason, True
                return
            if self._remote and self.liveness.silent_since is not None:
                self._redial(now, last_kernel)

    def _routing_id(self) -> bytes:
        return f"{self.hello['name']}-{self.hello['pid']}-{os.urandom(4).hex()}".encode()[:255]

    def _redial(self, now: float, last_kernel: float) -> None:
        """Connect both sockets anew, once the kernel has been silent for REDIAL_AFTER_S and every REDIAL_AFTER_S
        after: a connection the link left silent is never made again by libzmq. The control socket under a new
        routing id, since the kernel's ROUTER refuses one a connection it still holds has; the kernel, which forgot
        this plugin meanwhile, answers `unknown_peer`, and it says hello again (_read_control)."""
        if now - max(last_kernel, self._redialed_at) < REDIAL_AFTER_S:
            return
        self._redialed_at = now
        self.sub.disconnect(self._events_endpoint)
        self.sub.connect(self._events_endpoint)
        self.dealer.disconnect(self._control_endpoint)
        self.dealer.setsockopt(zmq.ROUTING_ID, self._routing_id())
        self.dealer.connect(self._control_endpoint)

    def why_silent(self) -> str:
        """What the connections met when the kernel never answered ("" when nothing tells: ipc, or no watch saw
        anything). Read after the thread ended."""
        return next((why for why in (watch.why_silent() for watch in self._watches) if why), "")

    def _poll_ms(self, now: float, started: float, last_kernel: float | None, next_heartbeat: float) -> int:
        """How long to sleep when nothing arrives: until our heartbeat is due or the kernel's silence would make
        it gone, and at most MAX_POLL_S."""
        if self.outbox:
            return 50  # the kernel did not take a message (its queue for us is full): try again soon
        due = now + MAX_POLL_S
        if self.welcomed:
            # a heartbeat held back by a stuck handler (_handler_stuck) is looked at again every 0.1 s
            due = min(due, max(next_heartbeat, now + 0.1))
        silent_until = self.liveness.silent_until(started, last_kernel, self.heartbeat_interval_s)
        if silent_until is not None:  # else it is past already: MAX_POLL_S paces the look at the kernel's pid
            due = min(due, silent_until + 0.001)
        return max(1, int((due - now) * 1000) + 1)

    def _read_events(self) -> None:
        """Everything the SUB socket holds, handed to the main thread with one wake-up per burst."""
        burst, recv, received = [], self.sub.recv, 0
        while True:
            # Frames and their `more` flag rather than recv_multipart, whose RCVMORE getsockopt per frame is half
            # of a small event's receive cost (2.9 -> 1.6 us). ZeroMQ delivers a message whole: once its first
            # frame is here, so is the rest.
            try:
                frames = [recv(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                break
            while frames[-1].more:
                frames.append(recv(zmq.NOBLOCK, copy=False))
            try:
                events = self._decode(frames)
            except ProtocolError:
                self.malformed += 1
                continue
            received += len(events)
            for event in events:
                if event.type == ev.HEARTBEAT:
                    self.heartbeat_interval_s = float(event.data.get("interval_s", 1.0))
                if len(self.inbox) + len(burst) >= INBOX_MAX_EVENTS and event.type not in FINAL_EVENTS:
                    self.dropped += 1  # a durable plugin notices the gap and replays it
                    if self.dropped_runs and self.dropped_runs[-1][1] == event.seq - 1:
                        self.dropped_runs[-1][1] = event.seq
                    else:
                        self.dropped_runs.append([event.seq, event.seq])
                    continue
                if event.type in FINAL_EVENTS and not self.final_seq:
                    self.final_seq = event.seq
                burst.append(("event", event))
        self.received += received
        if burst:
            with self.wake:
                self.inbox.extend(burst)
                # runs the handler has passed are counted as its gaps: forget them, so what is kept is bounded by
                # the inbox (a run lies between two events it admitted)
                while self.dropped_runs and self.dropped_runs[0][1] < self.passed_seq:
                    self.dropped_runs.popleft()
                self.wake.notify()

    def _not_a_run(self, now: float) -> bool:
        """An interactive client (unanswered_after_s) whose control port took our keys while the events port has
        refused every connection that long: the port given is not a run's (a daemon's --listen endpoint is one port,
        a run's three). Said for good (denied), where it waited out its first-contact window."""
        if self._unanswered_after_s is None or len(self._watches) != 2:
            return False
        events, control_watch = self._watches
        if not control_watch.shaken_ok or events.refused_for(now) < self._unanswered_after_s:
            return False
        self.gone = self.denied = (
            f"{control_watch.endpoint} answers, but nothing accepts connections at {self._events_endpoint} (refused "
            f"for {events.refused_for(now):.0f} s): that is not a run's --listen HOST:PORT (a run listens on PORT, "
            f"PORT + 1 and PORT + 2; a daemon's endpoint is one port): give the port the run printed, or its "
            f"connection.json")
        return True

    def _read_control(self) -> None:
        while True:
            try:
                raw = self.dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode_control(raw)
            except ProtocolError:
                self.malformed += 1
                continue
            if msg["type"] == "refused" and not msg["welcome_lost"]:  # one message outside our grant
                if self.log_not_acted:
                    say(f"[{self.hello['name']}] the kernel did not act on a message: {msg['reason']}")
                self.not_acted.append(msg["reason"])
                continue
            if (msg["type"] == "refused" and not self.welcomed and msg["code"] == NAME_HELD
                    and self._hello_tries_left > 0):
                self._hello_tries_left -= 1
                self.said_hello, self._hello_at = False, time.monotonic() + self.heartbeat_interval_s
                continue
            if (msg["type"] == "refused" and msg["code"] == UNKNOWN_PEER
                    and (self.liveness.wait_out_silence_s or self.liveness.kernel_alive is not None)
                    and (self.welcomed or self._rehello)):
                # back after a silence longer than the kernel keeps a silent peer's place: it forgot us. Say hello
                # again (after the next event, as the first time); a durable plugin then replays what went by.
                if not self._rehello:  # each message sent meanwhile (heartbeat, ack, replay) is refused alike: once
                    say(f"[{self.hello['name']}] the kernel no longer knew this plugin after the silence; saying "
                        f"hello again")
                    self.welcomed = self.said_hello = False
                    self._rehello, self._hello_at = True, time.monotonic()
                continue
            if msg["type"] == "welcome":
                self.welcomed, self._rehello, self.farewell = True, False, msg["farewell"]
            if msg["type"] == "refused":  # the kernel will not act on anything we send: nothing to do here
                self.refused, self.refused_code = msg["reason"], msg["code"]
                self.gone = f"refused by the kernel: {msg['reason']}"
                self.close()
                return
            self.put(("control", msg))

    def _send_the_rest(self, until_farewell: bool) -> None:
        """The outbox sent as the thread ends; with `until_farewell`, until the kernel's answer to our bye says it
        read all of it (PROTOCOL.md §7.1), for at most FAREWELL_WAIT_S, or until the kernel that spawned us exits.
        Anything else the kernel sends meanwhile is of no use to a plugin that is leaving."""
        self._flush_outbox()
        deadline = time.monotonic() + FAREWELL_WAIT_S
        while until_farewell and (left := deadline - time.monotonic()) > 0 and not self.liveness.exited():
            if self.dealer.poll(int(min(left, 0.05) * 1000) + 1):
                try:
                    if decode_control(self.dealer.recv(zmq.NOBLOCK))["type"] == "farewell":
                        return
                except (zmq.Again, ProtocolError):
                    pass
            self._flush_outbox()

    def _flush_outbox(self) -> None:
        # taken off once sent, not before: a send() on another thread meanwhile counts it, so the outbox keeps to its
        # bound (OUTBOX_MAX_REPLIES) instead of growing by the one this thread was holding
        while self.outbox:
            try:
                self.dealer.send(encode_control(self.outbox[0]), zmq.NOBLOCK)
            except zmq.Again:  # kernel not reading: keep it for the next round
                return
            self.outbox.popleft()

    def still_working(self) -> None:
        """The running handler said it is making progress (Plugin.still_working): restart its clock."""
        self.progress_at = time.monotonic()

    def _tell_stuck(self, now: float) -> None:
        """Say once, before the kernel declares us hung, which handler is past handler_timeout_s, where it is (the
        author's frames), and what to do: the kernel's "hung (silent for 3 s)" names none of it."""
        busy = self._stuck_told = self._busy_clock()
        if busy is None:
            return
        frame = sys._current_frames().get(threading.main_thread().ident)
        where = user_stack(frame) if frame is not None else ""
        event = self.busy_with  # None: setup() (Runner._run), timed as a handler is
        what = f"the handler for {event.type} (seq {event.seq})" if event is not None else "setup()"
        text = (f"{what} has run {now - busy:.0f} s, past handler_timeout_s "
                f"({self.handler_timeout_s:g} s): heartbeats stop, so the kernel takes this plugin for hung and "
                f"restarts it. A long handler calls self.still_working() as it goes, or hands the work to a thread"
                + (f". It is at:\n{where}" if where else ""))
        try:
            self.dealer.send(encode_control(control("log", level="error", text=text)), zmq.NOBLOCK)
        except zmq.Again:  # the kernel is not reading us: our silence tells it all the same
            pass
        say(f"[{self.hello['name']}] {text}")

    def _busy_clock(self) -> float | None:
        """Where the running handler's hang clock starts (its start or its last progress); None when none runs."""
        busy = self.busy_since
        return None if busy is None else max(busy, self.progress_at)

    def _handler_stuck(self, now: float) -> bool:
        busy = self._busy_clock()
        return busy is not None and now - busy > self.handler_timeout_s


def _one_event(frames: list[zmq.Frame]) -> list[Event]:
    """An events PUB's message: [topic, envelope] (PROTOCOL.md §4)."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    return [decode_event(frames[1].bytes)]


def _burst_events(frames: list[zmq.Frame]) -> list[Event]:
    """A bursts XPUB's message: [burst], the envelopes of one flush as one array (PROTOCOL.md §4)."""
    if len(frames) != 1:
        raise ProtocolError(f"expected 1 frame, got {len(frames)}")
    return decode_burst(frames[0].bytes)


def say(text: str) -> None:
    """A line for the plugin's log (its stderr); on a full disk it is lost and the plugin goes on."""
    try:
        print(text, file=sys.stderr)
    except OSError:
        pass
