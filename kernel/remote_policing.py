"""Cuts the run's TCP connections that cost too much to keep: a revoked key's, a crowd's, a flood of subscriptions'.

libzmq cannot drop one connection, so kernel/remote.py's Listener replaces the whole socket (the keyed clients
reconnect by themselves); this is the bus thread's side of it: when to, and taking the new sockets in place of the
old ones, to send on and poll.
"""

from __future__ import annotations

import collections
import logging

import zmq

from .limits import PacedReading
from .publishers import Publishers, read_subscriptions
from .remote import SUBSCRIPTIONS_MAX, Listener
from .reply_ledger import ReplyLedger

log = logging.getLogger("trainbus.kernel")


class RemotePolicing:
    """The bus thread's TCP sockets kept affordable; a replaced publisher is put in its place in `publishers`, which
    the bus sends on."""

    def __init__(self, remote: Listener, remote_pace: PacedReading, ledger: ReplyLedger,
                 counters: collections.Counter, publishers: Publishers):
        self.remote, self.remote_pace, self.ledger, self.counters = remote, remote_pace, ledger, counters
        self.publishers = publishers
        self.event_topics: set[bytes] = set()  # what the TCP events XPUB's subscribers hold (counted only)

    def sockets(self) -> list[zmq.Socket]:
        """What this thread polls of the TCP side: its control ROUTER, its events and bursts XPUBs (subscriptions),
        and its connection monitors."""
        return [self.remote.router, self.remote.pub, self.remote.bursts, *self.remote.monitors()]

    def watch_connections(self, poller: zmq.Poller, ready: dict) -> None:
        """A socket monitor that polled ready: connections came or went, perhaps too many (cut_crowded)."""
        if any(monitor in ready for monitor in self.remote.monitors()):
            self.cut_crowded(poller)

    def watch_subscriptions(self, poller: zmq.Poller, ready: dict) -> None:
        """The TCP events XPUB's new subscriptions counted, and a publisher holding too many cut (cut_subscribed)."""
        if self.remote.pub in ready:
            read_subscriptions(self.remote.pub, self.event_topics)
        self.cut_subscribed(poller)

    def cut_revoked(self, poller: zmq.Poller) -> None:
        """A key revoked mid-run loses its open events and bursts connections too (kernel/remote.py cut_revoked):
        the TCP publishers are replaced, and with them what this thread sends on and polls."""
        self.remote.bind_unbound()
        old = self.sockets()
        if not self.remote.cut_revoked():
            return
        self._take(poller, old)
        if self.remote.keyring.unsafe:  # every key gone at once, none revoked: nobody can reconnect until it is fixed
            log.warning("no client key is let in while the key directory is unsafe (said above): every TCP subscriber "
                        "was cut off")
        else:
            log.warning("a client key was revoked: every TCP subscriber was cut off and the others reconnect")

    def cut_crowded(self, poller: zmq.Poller) -> None:
        """A TCP socket holding more connections than its cap (kernel/remote.py cut_crowded, a flood with no key:
        each costs a file descriptor until its handshake times out) is replaced, its connections cut."""
        old = self.sockets()
        cut = self.remote.cut_crowded()
        if "control" in cut:
            self.ledger.clear()
        else:
            self.ledger.closed(self.remote.take_closed_control())
        if not cut:
            return
        self._take(poller, old)
        self.counters["tcp_connections_cut"] += 1
        if self.counters["tcp_connections_cut"] <= 10:
            log.warning("over %d TCP connections at once on the %s socket (a client opening connections it does "
                        "not finish, or too many clients): all of them cut; keyed clients reconnect by themselves",
                        self.remote.cap, " and ".join(cut))

    def cut_subscribed(self, poller: zmq.Poller) -> None:
        """A TCP publisher whose subscribers hold over SUBSCRIPTIONS_MAX distinct topics (libzmq keeps them all, at
        ~25 bytes a byte: a client subscribing to endless made-up ones) is replaced, its subscribers cut."""
        held = (("pub", self.event_topics), ("bursts", self.publishers.topics[self.remote.bursts]))
        for attribute, topics in held:
            if len(topics) < SUBSCRIPTIONS_MAX:
                continue
            old = self.sockets()
            self.remote.cut_subscribed(attribute)
            self._take(poller, old)
            self.counters["tcp_subscriptions_cut"] += 1
            if self.counters["tcp_subscriptions_cut"] <= 10:
                log.warning("over %d distinct subscriptions on the TCP %s socket (a client subscribing to made-up "
                            "topics): every subscriber cut; keyed clients reconnect by themselves", SUBSCRIPTIONS_MAX,
                            Listener.ROLES[attribute])

    def _take(self, poller: zmq.Poller, old: list[zmq.Socket]) -> None:
        """The TCP sockets the Listener has now in place of `old` (some closed: replaced), sent on and polled."""
        for socket in old:
            poller.register(socket, 0)  # unregistered; the control ROUTER may be already (ControlReading.pace)
        if old[1] is not self.remote.pub:
            self.event_topics = set()  # each subscription comes again as its subscriber returns
        self.publishers.replace_remote(self.remote.pub, self.remote.bursts)
        for socket in self.sockets():
            poller.register(socket, zmq.POLLIN)
        if not self.remote_pace.polled:
            poller.register(self.remote.router, 0)
