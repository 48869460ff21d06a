"""Reads the run's control sockets, ipc and TCP, each for at most its share of the bus thread's time, and hands every
message to the dispatcher (kernel/control.py), named by the socket it came on and its routing id.

The bus thread owns and polls the sockets (kernel/bus.py); a socket past its share is left unpolled until the share
is back (`pace`), so a flood waits in its senders' queues and never delays a heartbeat, a flush or a supervision tick.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

import zmq

from .limits import PacedReading
from .remote import Listener
from .reply_ledger import ReplyLedger

log = logging.getLogger("trainbus.kernel")

CONTROL_PER_WAKE = 256  # control messages read per wake-up: heartbeats and flushes never wait behind a flood
# The bus thread reads the TCP control socket for at most this share of the wall clock (up to twice it at once,
# limits.BURST_S), measured on the wall clock (so also charged for the GIL it waits for). Each message costs the GIL
# ~10 us before anything is known of it, more to decode: one monitor key's heartbeats from 4 connections were read
# at ~50,000 a second, half a core, and training's steps took 3.3 times as long on 2 cores; +3 % at 5 %
# (docs/benchmarks.md, "Hostile peers"; scripts/bench/control_flood.py). A bound per round
# (CONTROL_PER_WAKE) is none per second. Past its share the socket is left unread until the share is back: each
# connection's queue fills (CONTROL_RCVHWM) and TCP holds its sender back, so libzmq stops decrypting for it too.
# Remote clients need far less: 50 attached monitors acking 10 bursts a second take ~0.5 %.
REMOTE_CONTROL_SHARE = 0.05
# The run's ipc control socket likewise: a plugin of the run's reporting a metric in a loop from a thread of its own
# (each one read, then dropped past [limits] metrics_per_s) kept the bus thread at 0.16 cores, 24 times a calm run's
# whole bus thread. The run's own plugins need well under 1 %: their acks, heartbeats, votes and a few metrics.
LOCAL_CONTROL_SHARE = 0.05
CONTROL_RESUME_S = 0.01  # once spent, a socket is read again when this much is back: 0.2 s later at 5 %
PACED_SAID_EVERY_S = 60.0  # kernel.log says a flood held back at most this often, naming who sent most of it
# Before the final event and as the bus closes the ipc control socket is read unpaced: what the plugins sent
# (PROTOCOL.md §6.3), for at most this long, waiting this long for each refill of their queues.
FINAL_READ_S = 0.5
FINAL_REFILL_MS = 10
# Replies queued to one local (ipc) connection, at most. A plugin pulls replay batches one at a time, and asks for a
# run_state or sends a command now and then; a peer that asked for batches of up to 4 MiB and never read them had
# 1,000 held for it (~4 GB of the kernel's memory in 25 s). Past it, a reply is dropped and counted unroutable, and the
# peer asks again (as on TCP, kernel/remote.py CONTROL_SNDHWM). Not fewer: the ROUTER learns what libzmq's I/O thread
# took from its queue only every SNDHWM / 2 messages, so a tiny queue can look full to a peer that reads (at 16 too,
# on a busy box: kernel/answers.py then reads the socket's commands and tries once more).
LOCAL_CONTROL_SNDHWM = 16
# Messages queued in the kernel from one local connection before the bus reads them, at most: at 10,000 of up to
# 256 KiB a process of the run's user resending a big message grew the kernel by 2.3 GB in 8 s. Past it the sender
# waits, holding its own (the SDK's DEALER queues 1,000 and its outbox more, sdk/plugin_io.py). Not as few as TCP's
# 16: libzmq drops what a connection has in flight past a full queue when its peer closes it, and at 16 a plugin's
# last replies as it exits (a backlog's 90 log lines) were lost in 1 run of 4; at 1,000 in none of 12.
LOCAL_CONTROL_RCVHWM = 1000
# The dispatcher knows a connection by socket and routing id: a peer on one socket can never pose as one on the
# other by picking its routing id (a local one as a remote key's connection, or the reverse).
LOCAL, REMOTE = b"L", b"R"


class ControlReading:
    """The run's ipc control ROUTER and, with --listen, the Listener's (read where it is now: a cut replaces it),
    read for the bus thread within each socket's share of its time. Senders are counted for kernel.log: ZAP User-Ids
    (TCP), peer names (ipc)."""

    def __init__(self, router: zmq.Socket, remote: Listener | None, ledger: ReplyLedger,
                 counters: collections.Counter):
        self.router, self.remote, self.ledger, self.counters = router, remote, ledger, counters
        self.control = None  # the dispatcher (Bus.serve)
        now = time.monotonic()
        self.local_pace = PacedReading(LOCAL_CONTROL_SHARE, CONTROL_RESUME_S, PACED_SAID_EVERY_S, now)
        self.remote_pace = PacedReading(REMOTE_CONTROL_SHARE, CONTROL_RESUME_S, PACED_SAID_EVERY_S, now)

    def resumes_at(self, due: float) -> float:
        """`due`, or sooner: when a socket left unread has its share back."""
        for paced in (self.local_pace, self.remote_pace):
            if not paced.polled:
                due = min(due, paced.work.resumes_at(time.monotonic()))
        return due

    def read(self, budget: int) -> bool:
        """Handle up to `budget` control messages of each socket, within its share of this thread's time; True when
        more are waiting."""
        more = self._read_paced(self.local_pace, self._read_local_for, budget)
        return self.read_remote(budget) or more

    def read_remote(self, budget: int) -> bool:
        """The TCP control socket: each message with its connection's CURVE key (the ZAP User-Id), which the
        dispatcher maps to a key name and role; never anything the message itself says."""
        return self.remote is not None and self._read_paced(self.remote_pace, self._read_remote_for, budget)

    def read_what_was_sent(self) -> None:
        """What the plugins have sent, read before the final event and as the bus closes, whether or not the ipc
        socket's share is spent: its connections queue LOCAL_CONTROL_RCVHWM messages each, so what waits beyond them
        comes in as they are read, and is waited for while it keeps coming (FINAL_REFILL_MS), for at most
        FINAL_READ_S (a flood's end is no reply)."""
        until = time.monotonic() + FINAL_READ_S
        while time.monotonic() < until:
            if not self._read_local_for(CONTROL_PER_WAKE, until) and not self.router.poll(FINAL_REFILL_MS):
                break
        self.read_remote(CONTROL_PER_WAKE)

    def pace(self, poller: zmq.Poller) -> None:
        """Each control socket polled, or not, as its share of this thread's time says (after a round's reading)."""
        self._pace(poller, self.router, self.local_pace, "local_control_paced", self._say_local_paced)
        if self.remote is not None:
            self._pace(poller, self.remote.router, self.remote_pace, "remote_control_paced", self._say_remote_paced)

    def _pace(self, poller: zmq.Poller, socket: zmq.Socket, paced: PacedReading, counter: str,
              say: Callable[[int, Any, int], None]) -> None:
        """A control socket polled while its share of this thread's time lasts, and left unread until the share is
        back: counted, and said (`say`) at most once every PACED_SAID_EVERY_S with who sent the most since."""
        now = time.monotonic()
        if not paced.poll_changed(now):
            return
        poller.register(socket, zmq.POLLIN if paced.polled else 0)
        if paced.polled:
            return
        self.counters[counter] += 1
        if (said := paced.to_say(now)) is not None:
            say(*said)

    def _say_local_paced(self, total: int, name: str | None, count: int) -> None:
        log.warning("control messages on the run's ipc socket took over %d %% of the bus thread's time (%d since last "
                    "said, %d of them from %s): read at that pace, the rest waits with their senders; training goes "
                    "on", round(LOCAL_CONTROL_SHARE * 100), total, count,
                    "a peer that never said hello" if name == "" else repr(name) if name else "(none)")

    def _say_remote_paced(self, total: int, user_id: str | None, count: int) -> None:
        key = self.control.peers.credentials.remote_key(user_id, time.monotonic()) if user_id else None
        log.warning("TCP control messages took over %d %% of the bus thread's time (%d since last said, %d of them "
                    "from key %s): read at that pace, the rest waits in its connections; training goes on",
                    round(REMOTE_CONTROL_SHARE * 100), total, count,
                    repr(key.name) if key else "(revoked since)" if user_id else "(none)")

    @staticmethod
    def _read_paced(paced: PacedReading, read_for: Callable[[int, float], bool], budget: int) -> bool:
        started = time.monotonic()
        allowance = paced.work.allowance(started)
        try:
            return allowance > 0 and read_for(budget, started + allowance)
        finally:
            paced.work.took(started, time.monotonic())

    def _read_local_for(self, budget: int, until: float) -> bool:
        """The run's ipc control socket's messages, up to `budget` of them or until the clock reads `until`."""
        for _ in range(budget):
            if time.monotonic() >= until:
                return True
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return False
            if len(frames) != 2:
                self.control.malformed(f"{len(frames) - 1} frames from a peer, not 1 (a DEALER sends one; §3)")
                continue
            identity = LOCAL + frames[0]
            peer = self.control.peers.get(identity)
            self.local_pace.heard(peer.name if peer is not None else "")
            self.control.handle(identity, frames[1])
        return True

    def _read_remote_for(self, budget: int, until: float) -> bool:
        """read_remote's messages, up to `budget` of them or until the clock reads `until`."""
        for _ in range(budget):
            if time.monotonic() >= until:
                return True
            try:
                frames = self.remote.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            if len(frames) != 2:
                self.control.malformed(f"{len(frames) - 1} frames from a peer, not 1 (a DEALER sends one; §3)")
                continue
            user_id = frames[1].get("User-Id")
            if not user_id:  # cannot be, behind CURVE and ZAP; if it ever were, such a peer is nobody
                self.counters["unauthenticated"] += 1
                continue
            try:  # the descriptor it came on: its close releases what the ledger counts for it
                fd = frames[1].get(zmq.SRCFD)
            except zmq.ZMQError:  # a libzmq without it: released only when the control socket is replaced
                fd = -1
            self.remote_pace.heard(user_id)  # authenticated keys alone: as many as the key directory holds
            self.ledger.heard(REMOTE + frames[0].bytes, user_id, fd)
            self.control.handle(REMOTE + frames[0].bytes, frames[1].bytes, user_id=user_id)
        return True
