"""Attaching to a live run from outside: a snapshot, then every event after it in seq order; reconnects; steers.

zguide's Clone pattern (PROTOCOL.md §7.4): subscribe to everything (the kernel's bursts: every event of a flush
in one message, PROTOCOL.md §4, where it has them) and say hello, buffer the live events,
ask for a `snapshot`; the kernel's `run_state` is the run as of seq S, so buffered events up to S are
dropped and the rest follow without gap or duplicate. A gap in the live stream (a SUB queue overflowed) is
filled with `replay`, as a durable plugin does (§12). When the kernel's heartbeats stop, the client
reconnects with a doubling backoff, a bounded number of times, and goes on from the seq it needs next.

    attachment = Attachment(target_of("runs/20250101-120000-a1b2c3"))
    for item in attachment:          # ("snapshot", RunState) once, then ("event", Event) ...
        ...                          # attachment.state is the run as of the last item
"""

from __future__ import annotations

import collections
import getpass
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import zmq

from trainbus.proto import BEST_EFFORT, Event, control, events as ev
from trainbus.proto.messages import KEY_REVOKED_CODES
from trainbus.proto.remote import UNANSWERED_S, KeyFileError, key_refused
from trainbus.proto.run_state import CLIENT_PREFIX, RunState

from .plugin_io import UNKNOWN_PEER, PluginIO
from .kernel_watch import KERNEL_PID, connection_run_dir, kernel_alive, kernel_died, remote_endpoints, run_summary
from .entry import CREDENTIAL_FILE
from .replay import REPLAY_RESEND_S, events_to_take

RECONNECT_FIRST_S = 0.5  # backoff after the kernel went silent: 0.5, 1, 2, 4, 8, 8 ... (zguide's ppworker)
RECONNECT_MAX_S = 8.0
RECONNECT_ATTEMPTS = 8  # about a minute of trying, then the client gives up (AttachError)
SNAPSHOT_RETRY_S = 5.0  # no run_state this long after asking (the answer was lost): ask again
PLUGINS_REFRESH_S = 5.0  # a fresh snapshot this often, for what only the kernel knows (durable plugins' acks)
BUFFER_MAX_EVENTS = 50_000  # live events held while the snapshot is on its way; past it they are replayed
POLL_S = 0.1
# kernel.log's line of the kernel's own (kernel/session.py open_bus), whole: a plugin's log text is written there too
# (`[name] text`, its further lines indented), and one that says "sockets: events ..." must not send us (and the run's
# credential, in our hello) to sockets of its choosing. Bursts only from a kernel that has them
SOCKETS_LINE = re.compile(r"^\S+ \S+ INFO trainbus\.kernel: sockets: events (\S+) control (\S+)(?: bursts (\S+))?$",
                          re.MULTILINE)


class AttachError(Exception):
    """Nothing to attach to, refused by the kernel, or gone for good: the text says which."""


class TargetError(AttachError):
    """WHERE, a key or a connection file as given cannot be used: the user's to fix (exit code 2)."""


@dataclass
class Target:
    """Where a run's kernel listens, and how to prove who we are there."""

    events: str  # the kernel's PUB endpoint
    control: str  # its ROUTER endpoint
    run_dir: Path | None = None  # a local run's directory: its credential (ipc), its kernel's pid, its summary.json
    # Applied to both sockets before they connect: a remote kernel's CURVE keys (tcp). None on ipc, where the
    # credential file proves us; the TCP work fills this in (one function: client keys onto a socket).
    secure: Callable[[zmq.Socket], None] | None = None
    # Where a summary.json would say the run has ended: the run directory, or the folder of the connection.json
    # we were given (a run directory when read in place; a copy elsewhere has none, and the run's end is then
    # known only from its events). Never the credential's place: over TCP the key proves us, and no secret leaves.
    ended_dir: Path | None = None
    # Its bursts XPUB (every event of a flush as one message): what the client subscribes to when there is one, "" when
    # not known (EVENTS,CONTROL given, an older kernel): then the events PUB, an event a message.
    bursts: str = ""

    def __post_init__(self) -> None:
        if self.ended_dir is None:
            self.ended_dir = self.run_dir

    def secret(self) -> str:
        if self.run_dir is None:
            return ""
        try:
            return (self.run_dir / CREDENTIAL_FILE).read_text().strip()
        except OSError:
            return ""  # the kernel refuses the hello and says why


def target_of(where: str, key: str = "", server_key: str = "") -> Target:
    """RUN_DIR, or ENDPOINT: `ipc://DIR/events.sock` (its control.sock beside it) or `EVENTS,CONTROL`; with
    `key` (this client's secret key file), a remote kernel's HOST:PORT or connection.json over TCP + CURVE."""
    if key:
        try:
            control_endpoint, events, bursts, secure = remote_endpoints(where, key, server_key)
        except (KeyFileError, ValueError) as exc:
            raise TargetError(str(exc)) from None
        return Target(events, control_endpoint, None, secure, connection_run_dir(where), bursts)
    if "tcp://" in where:
        raise TargetError(f"{where}: a kernel's TCP endpoint takes CURVE keys: give --key (this client's secret key "
                          f"file) with HOST:PORT or the run's connection.json")
    if "://" in where:
        events, _, control_endpoint = where.partition(",")
        if not control_endpoint:
            if not events.startswith("ipc://") or not events.endswith("events.sock"):
                raise TargetError(f"{where}: give both endpoints as EVENTS,CONTROL (only an ipc events.sock "
                                  f"names its control socket)")
            control_endpoint = events[: -len("events.sock")] + "control.sock"
        _check_sockets(None, events, control_endpoint)
        run_dir = Path(events.removeprefix("ipc://")).parent if events.startswith("ipc://") else None
        return Target(events, control_endpoint, run_dir if run_dir and (run_dir / CREDENTIAL_FILE).exists() else None,
                      bursts=_bursts_beside(events))
    try:
        run_dir = Path(where).resolve()
    except RuntimeError:  # pathlib's word for a loop of symbolic links (ELOOP)
        raise TargetError(f"{where} is a loop of symbolic links (each leads to the next, and the last back): give the "
                          f"run's directory") from None
    if (run_dir / "events.sock").exists():
        events = f"ipc://{run_dir / 'events.sock'}"
        return Target(events, f"ipc://{run_dir / 'control.sock'}", run_dir, bursts=_bursts_beside(events))
    try:  # a run directory too deep for a Unix socket path: its kernel says where they are
        found = list(SOCKETS_LINE.finditer((run_dir / "kernel.log").read_text(errors="replace")))
    except OSError:
        found = []
    if found and _said_before_its_kernel_started(found[-1].group(0), run_dir):
        pid = kernel_alive(run_dir)
        if pid is not None:
            raise AttachError(f"the run's kernel (pid {pid}) is starting and has not said where its sockets are yet "
                              f"(kernel.log's last sockets line is the previous kernel's): try again in a moment")
    if found:
        events, control_endpoint, bursts = found[-1].groups(default="")
        _check_sockets(run_dir, events, control_endpoint)
        return Target(events, control_endpoint, run_dir, bursts=bursts)
    raise AttachError(f"no live kernel sockets for {run_dir} (no events.sock; kernel.log names none)")


def _said_before_its_kernel_started(line: str, run_dir: Path) -> bool:
    """A sockets line older than kernel.pid, which each kernel writes before it binds its sockets and says where they
    are: a continued run's new kernel in its first moment, the last line still its predecessor's (PROTOCOL.md §2)."""
    try:
        said = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))  # logging's asctime: local, to the second
        started = (run_dir / KERNEL_PID).stat().st_mtime
    except (ValueError, OSError):  # no kernel.pid (a run from before it): the line is all there is
        return False
    return said + 1.0 < started  # + 1 s: the line's milliseconds, which the comparison leaves out


def _check_sockets(run_dir: Path | None, *endpoints: str) -> None:
    """Say now what connecting would retry for minutes in silence: an ipc socket that is not there. A run that has
    ended is let through (attach says how it ended); a live kernel whose socket files were removed cannot be
    reached by anyone again, and a signal is what still stops it. run_dir: the run's, when the sockets are not in
    it (a directory too deep for a socket path); else the sockets' own."""
    for endpoint in endpoints:
        socket_path = Path(endpoint.removeprefix("ipc://"))
        where = run_dir or socket_path.parent
        if not endpoint.startswith("ipc://") or socket_path.exists() or run_summary(where) is not None:
            continue
        pid = kernel_alive(where)
        if pid is not None:
            raise TargetError(f"no socket {socket_path}, though the run's kernel (pid {pid}) is alive: its socket "
                              f"files were removed, so nothing can reach it; `kill -TERM {pid}` stops it as Ctrl-C "
                              f"does")
        raise TargetError(f"no socket {socket_path}: is the run still running? (`trainbus runs list` says)")


def _bursts_beside(events: str) -> str:
    """The bursts socket beside an ipc events.sock, where the kernel has one; else ""."""
    if not events.startswith("ipc://") or not events.endswith("/events.sock"):
        return ""
    bursts = Path(events.removeprefix("ipc://")).with_name("bursts.sock")
    return f"ipc://{bursts}" if bursts.exists() else ""


def client_name() -> str:
    """Who we are, as the kernel journals it with every command we send: attach-USER@HOST-PID."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{CLIENT_PREFIX}{user}@{socket.gethostname()}-{os.getpid()}"[:200]


class Attachment:
    """One attached client: iterate for ("snapshot", RunState as of its seq) once, then ("event", Event), gap-free,
    in seq order (`state` is the live one, every event folded in).

    Iteration yields None every POLL_S when nothing arrived (a dashboard redraws then), and ends with the
    kernel's bus_closing, its last event: after the run's final event come its plugins' last words (the final
    checkpoint_saved, plugin_exited). A kernel that goes after the final event without it (an older one, or one
    cut short) ends it too. It raises AttachError when the kernel refuses us or cannot be reached again.
    """

    def __init__(self, target: Target, steer: bool = False, name: str | None = None):
        self.target = target
        self.name = name or client_name()
        self.peer_name = self.name  # this connection's name: the name, then name.1, name.2 ... after reconnects
        self.on_reconnect: Callable[[str], None] = lambda why: None  # told before each try (a line for the user)
        # told once a try reached the kernel again, with the seconds since it was lost (a line for the user)
        self.on_reconnected: Callable[[float], None] = lambda seconds: None
        self.reconnect_try = 0  # which try of RECONNECT_ATTEMPTS is under way (on_reconnect reads it)
        self.replies = ["stop", "checkpoint_now", "log"] if steer else []
        self.state: RunState | None = None
        self.next_seq = 0  # the next seq to hand out; 0 until the snapshot came
        self.gaps = 0  # events the live stream missed (all filled by replay)
        self.refusals: list[str] = []  # why the kernel did not act on a message of ours (a monitor key's stop)
        self.reconnects = 0
        self._io: PluginIO | None = None
        self._buffer: collections.deque[Event] = collections.deque()  # live events while a snapshot is pending
        self._replaying = False
        self._asked_replay = 0.0  # when the replay in flight was asked for (monotonic)
        self._asked_snapshot = 0.0  # when the latest snapshot was asked for (monotonic), 0: none pending
        self._ready: collections.deque = collections.deque()  # items for the caller, in order
        self._welcomed = False  # the kernel answered us once: losing it later is worth retrying
        self.ended_quietly = ""  # why the stream ended after the final event without the kernel's bus_closing

    # -- the caller's side ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[str, Any] | None]:
        try:
            self._connect()
            while True:
                while self._ready:
                    item = self._ready.popleft()
                    closing = item[0] == "event" and item[1].type == ev.BUS_CLOSING
                    if closing and self._io is not None:  # nothing follows it: no bye, nor a wait for its farewell
                        self._io.kernel_closing = True  # before the yield: a caller may stop iterating at it
                    yield item
                    if closing:
                        return  # attached after the final event too: what the plugins' drain brings comes first
                if self._io is None:  # the kernel went after the final event
                    return
                if not self._step():
                    yield None
        finally:
            self.close()

    def send(self, type_: str, **fields: Any) -> None:
        """A reply to the kernel (stop, checkpoint_now, log): it acts on it and journals it under our name."""
        if self._io is not None:
            self._io.send(control(type_, **fields))

    def close(self) -> None:
        io, self._io = self._io, None
        if io is not None:
            io.close()  # its thread says bye as it ends (once: a second one was refused as from nobody)
            io.join(timeout=3)

    # -- one connection ---------------------------------------------------------------------------

    def _connect(self) -> None:
        # A new name per connection: the kernel keeps the old one's name for its liveness window (3 s) after we
        # leave, and refuses a second hello under a name a live peer holds.
        self.peer_name = self.name if not self.reconnects else f"{self.name}.{self.reconnects}"
        hello = control("hello", name=self.peer_name, pid=os.getpid(), subscriptions=[""], replies=self.replies,
                        delivery=BEST_EFFORT, votes=[], capabilities=[], secret=self.target.secret())
        self._io = PluginIO(self.target.bursts or self.target.events, self.target.control, [""], hello,
                            handler_timeout_s=float("inf"), kernel_pid=None, secure=self.target.secure,
                            log_not_acted=False, bursts=bool(self.target.bursts),
                            # a first connection to a port that refuses it: a wrong port, said in seconds, not 30
                            unanswered_after_s=None if self.reconnects else UNANSWERED_S)
        self._io.start()
        self._asked_snapshot, self._replaying = 0.0, False
        self._buffer.clear()

    def _step(self) -> bool:
        """Handle what the connection brought within POLL_S; False when nothing did."""
        io = self._io
        with io.wake:
            if not io.inbox and not io.gone:
                io.wake.wait(POLL_S)
            items = [io.inbox.popleft() for _ in range(len(io.inbox))]
        while io.not_acted:
            self.refusals.append(io.not_acted.popleft())
        for kind, payload in items:
            if kind == "event":
                self._on_live(payload)
            elif payload["type"] == "welcome":
                self._on_welcome(payload)
            elif payload["type"] == "run_state":
                self._on_run_state(payload)
            elif payload["type"] == "replay_batch":
                self._on_replay(payload)
        now = time.monotonic()
        if self._asked_snapshot and now - self._asked_snapshot > (SNAPSHOT_RETRY_S if not self.next_seq
                                                                  else PLUGINS_REFRESH_S):
            self._ask_snapshot()
        if self._replaying and now - self._asked_replay >= REPLAY_RESEND_S:  # its answer was lost: ask again
            self._request_replay()
        if io.gone or not io.is_alive():
            if self.state is not None and self.state.ended is not None and self._kernel_done():
                self.ended_quietly = io.gone or "connection closed"  # no bus_closing: said by the caller
                self.close()
                return True
            self._reconnect(io.gone or "connection closed")
        return bool(items)

    def _on_welcome(self, welcome: dict[str, Any]) -> None:
        if self.replies and welcome["role"] == "monitor":  # said now, not once a stop sent later is refused
            raise TargetError(f"{self.target.control}: this client's key has role monitor: it watches, and the kernel "
                              f"refuses its stop and checkpoint_now; steer with a control-role key (on the kernel's "
                              f"host: `trainbus keys generate client NAME --role control`), or attach without "
                              f"--control, --stop or --checkpoint to watch")
        self._welcomed = True
        if self.next_seq:  # a reconnect: we know where we are; the journal has what went by meanwhile
            self._request_replay()
        self._ask_snapshot()  # first time: the clone's start; later: the refresh of plugins' positions

    def _ask_snapshot(self) -> None:
        self._asked_snapshot = time.monotonic()
        self._io.send(control("snapshot"))

    def _on_run_state(self, msg: dict[str, Any]) -> None:
        self._asked_snapshot = time.monotonic()  # the next refresh is due PLUGINS_REFRESH_S from now
        fresh = RunState.from_map(msg["seq"], msg["state"])
        if self.state is not None:  # a refresh: take only what the kernel alone knows
            for name, plugin in fresh.plugins.items():
                if name in self.state.plugins:
                    self.state.plugins[name].update(acked=plugin.get("acked"), lag=plugin.get("lag"))
            return
        self.state, self.next_seq = fresh, msg["seq"] + 1
        # a state of its own: `fresh` goes on folding the buffered events below before the caller sees the item
        self._ready.append(("snapshot", RunState.from_map(msg["seq"], msg["state"])))
        buffered, self._buffer = self._buffer, collections.deque()
        for event in buffered:
            self._on_live(event)

    def _on_live(self, event: Event) -> None:
        if not self.next_seq:
            if len(self._buffer) >= BUFFER_MAX_EVENTS:
                self._buffer.popleft()  # its seq will be missing: a gap, replayed
            self._buffer.append(event)
            return
        if self._replaying or event.seq < self.next_seq:
            return  # the replay covers it, or it is at or before the snapshot (a held-back heartbeat too)
        if event.seq > self.next_seq:
            self.gaps += event.seq - self.next_seq
            self._request_replay()
            return
        self._deliver(event)

    def _on_replay(self, batch: dict[str, Any]) -> None:
        for event in events_to_take(batch, self.next_seq, "attach:"):
            self._deliver(event)  # its next_seq goes on from it
        if batch["done"] and (not batch["events"] or batch["events"][-1].seq < self.next_seq):
            self._replaying = False
        else:
            self._request_replay()

    def _request_replay(self) -> None:
        self._replaying, self._asked_replay = True, time.monotonic()
        self._io.send(control("replay", from_seq=self.next_seq))

    def _deliver(self, event: Event) -> None:
        self.state.fold(event)
        self.next_seq = event.seq + 1
        self._ready.append(("event", event))

    # -- reconnecting -----------------------------------------------------------------------------

    def _raise_if_over(self) -> None:
        """RunEnded when the run's summary.json says it ended; AttachError when its kernel is known dead (the run
        directory, or the connection.json read in place beside its kernel.pid)."""
        summary = run_summary(self.target.ended_dir)
        if summary is not None:
            raise RunEnded(summary)
        dead = kernel_died(self.target.run_dir or self.target.ended_dir)
        if dead:
            raise AttachError(dead)

    def _kernel_done(self) -> bool:
        """After the run's final event, the kernel went quiet: done when its summary is written or it is gone, or
        when we cannot tell (a remote kernel: its directory is not ours to read). Else (stalled while its plugins
        drain) we reconnect for the rest."""
        where = self.target.run_dir or self.target.ended_dir
        return where is None or run_summary(self.target.ended_dir) is not None or bool(kernel_died(where))

    def _reconnect(self, why: str) -> None:
        """The kernel went silent: try again with a doubling backoff, a bounded number of times."""
        io = self._io
        refused, denied = io.refused, io.denied
        self.close()
        if refused and io.refused_code in KEY_REVOKED_CODES:  # revoked while attached: as a fresh attach is told
            raise TargetError(key_refused(self.target.control))
        if refused and io.refused_code == UNKNOWN_PEER and self._welcomed:
            # Our messages stood still past the kernel's liveness window while its events kept coming (this
            # process stopped or asleep, a stalled link): it forgot us. A new connection says hello again.
            refused, why = None, "the kernel forgot this client after a silence of its own (stopped, asleep, a " \
                                 "stalled link)"
        if refused:
            raise AttachError(f"the kernel refused us: {refused}")
        if denied:  # our keys' handshake failed (unknown or revoked, another server's key pinned): no retry helps
            raise TargetError(denied)
        self._raise_if_over()
        if not self._welcomed and self.target.secure is not None:
            # Silence with no handshake failure reported: nothing answers there (or too slowly to finish one).
            raise TargetError(f"no answer from {self.target.control} ({why}): check that the run listens there and "
                              f"that this machine reaches it (`trainbus runs list` on its host)")
        delay_s, lost_at = RECONNECT_FIRST_S, time.monotonic()
        for attempt in range(1, RECONNECT_ATTEMPTS + 1):
            self._raise_if_over()
            self.reconnect_try = attempt
            self.on_reconnect(why)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, RECONNECT_MAX_S)
            self.reconnects += 1
            self._connect()
            if self._wait_heard(delay_s + 2.0):
                self.on_reconnected(time.monotonic() - lost_at)
                return
            denied = self._io.denied
            self.close()
            if denied:  # revoked while we were away
                raise TargetError(denied)
        # A remote client cannot read the run directory that would tell a dead kernel (_raise_if_over): name both
        what = ("its kernel has exited or hangs, or this machine no longer reaches its host (`trainbus runs list` on "
                "the run's host says whether the run still goes; attach again once it answers)"
                if kernel_alive(self.target.run_dir or self.target.ended_dir) is None else
                "its kernel hangs (stopped, or starved of memory or CPU): attach again once it answers")
        raise AttachError(f"lost the kernel ({why}) and could not reach it again after {RECONNECT_ATTEMPTS} tries: "
                          f"{what}")

    def _wait_heard(self, timeout_s: float) -> bool:
        """Anything from the kernel within timeout_s (its heartbeat comes every second)."""
        end = time.monotonic() + timeout_s
        io = self._io
        with io.wake:
            while not io.inbox and not io.gone and time.monotonic() < end:
                io.wake.wait(POLL_S)
            return bool(io.inbox)


class RunEnded(AttachError):
    """The run ended while we were away: its summary.json says how."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(f"run {summary.get('run_id', '?')} has ended: {summary.get('status', '?')}")
        self.summary = summary
