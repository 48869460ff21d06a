"""The kernel's TCP side: CURVE publishers and a ROUTER beside the ipc ones, behind a ZAP authenticator (fails closed).

Only with `--listen HOST:PORT` ([run] listen). Control binds PORT, events PORT + 1 and bursts PORT + 2 (PORT 0:
free ones). All three are CURVE servers with the host's key; every handshake goes to zmq.auth's
authenticator, started in this object's own context before any bind, which asks the key directory
(kernel/keys.py KeyRing) whether the client's key is authorized. ZAP_ENFORCE_DOMAIN makes a missing
authenticator a refusal: without it libzmq lets any client key in when nobody answers ("Stonehouse").
The bus thread owns the sockets once built; the authenticator runs on its own thread.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

from trainbus.proto.remote import (HANDSHAKE_IVL_MS, KEYS_DIR_ENV, RUN_PORTS, KeyFileError, load_secret,
                                   split_host_port)

from .keys import REVOKED, KeyRing, KeyStore

ZAP_DOMAIN = "trainbus"
FREE_PORTS_ATTEMPTS = 20  # PORT 0: tries at a free control port whose PORT + 1 and PORT + 2 are free too
# A SUB sends a publisher only subscriptions (a byte, then a topic prefix), which libzmq keeps in a trie at ~25 bytes
# of memory per byte of prefix, with no bound of its own: an event's name is under 30 bytes, and a connection sending
# a longer message than this is dropped (the CURVE handshake's INITIATE, ~400 bytes, must fit too). The distinct
# prefixes a TCP publisher holds are counted (both are XPUBs, which pass each new one up) and past SUBSCRIPTIONS_MAX,
# ~30 event names many times over, the publisher is cut as on a revocation: 2,000 subscriptions of 3,000 bytes from
# one monitor key grew the kernel by ~290 MB.
EVENTS_MAX_INBOUND_BYTES = 1024
SUBSCRIPTIONS_MAX = 256
# Messages queued from one TCP connection until the bus thread reads them, at most: a flooding peer fills its own
# queue, not the others', and past it TCP holds the sender back. At 1,000 of up to 256 KiB (MAXMSGSIZE), 8 connections
# of one monitor key sending messages the bus decodes slower than the wire brings them grew the kernel by 354 MB in
# 8 s (256 connections: 64 GiB). A client sends a heartbeat a second, acks and a few replies: 16 is plenty.
CONTROL_RCVHWM = 16
# Messages queued to one TCP connection, at most. A client pulls replay batches one at a time (and asks for a
# run_state now and then), so a few are all it ever waits for; a peer that asks and never reads had 1,000 replay
# batches of up to 4 MiB each held for it (four monitor keys: +300 MB of the kernel's memory in 20 s). Past it, a
# reply is dropped and counted unroutable, and the peer asks again.
CONTROL_SNDHWM = 8
# EVENTS_HWM (kernel/publishers.py) on TCP (--listen), where any monitor key may hold connections that never read,
# each its own queue of events up to ~17 KiB: 64 of them grew the kernel by 266 MB in 110 s at 10,000, and by 28 MB
# at 1,000 (docs/architecture.md). A reader that keeps up misses nothing at 1,000 (a run at full speed on 2 cores;
# 100 lost 22 % of it); one that falls behind sees a seq gap and replays (PROTOCOL.md §4).
TCP_EVENTS_HWM = 1000
TCP_KEEPALIVE_IDLE_S = 60  # a peer whose machine vanished is noticed and its connection closed
REBIND_ATTEMPTS, REBIND_PAUSE_S = 400, 0.005  # binding a publisher's port again: up to 2 s
# TCP connections one listening socket holds at once, at most (less where the descriptor limit is low: an eighth of
# it). libzmq accepts every connection and keeps it, a file descriptor of the kernel's, until its handshake times out
# (HANDSHAKE_IVL), so a client with no key could hold them all: 1,100 made a run that trained to its end fail to save
# final.pt (EMFILE). 64 peers (peers.MAX_PEERS) need 64 of each.
CONNECTIONS_PER_SOCKET = 256

log = logging.getLogger(__name__)



class ListenError(Exception):
    """--listen cannot be served as asked; the text names the fix."""


def bind_error(host: str, port: int, exc: zmq.ZMQError, ports: int = RUN_PORTS) -> ListenError:
    """Why --listen HOST:PORT could not bind, with the fix: another address when HOST is none of this machine's
    (ENODEV: a name that does not resolve here; EADDRNOTAVAIL: another machine's address), else another port.
    `ports`: how many it binds from PORT on (a run: RUN_PORTS, the daemon: 1)."""
    if exc.errno in (errno.ENODEV, errno.EADDRNOTAVAIL):
        return ListenError(f"--listen {host}:{port}: {host} is not an address of this machine ({exc.strerror}): give "
                           f"one of its addresses or host names (`hostname -I` lists them), or 127.0.0.1 for this "
                           f"machine alone")
    if port:
        which, free = (f"ports {port}-{port + ports - 1}", "free ones") if ports > 1 else (f"port {port}", "a free one")
        return ListenError(f"--listen {host}:{port}: cannot bind {which} ({exc.strerror}); pick another PORT, or 0 "
                           f"for {free}")
    return ListenError(f"--listen {host}:0: cannot bind on {host} ({exc.strerror})")


def check_listen(host_port: str, store: KeyStore, ports: int = RUN_PORTS) -> tuple[str, int]:
    """(host, port) of `--listen HOST:PORT`, once the keys it needs are there and private; else ListenError or
    KeyFileError naming the fix. Loopback too needs keys: any local user can reach a loopback port. `ports`: how
    many it binds from PORT on (a run: control, events and bursts; the daemon: one)."""
    try:
        host, port = split_host_port(host_port, ports, lowest=0)
    except ValueError as exc:
        raise ListenError(f"--listen: {exc}, e.g. 127.0.0.1:5555 (an address of this host; port 0: a free "
                          f"one)") from None
    if store.directory.exists() and not store.directory.is_dir():  # `keys generate` would refuse it: say it now
        raise ListenError(f"--listen {host_port} needs CURVE keys, and the key directory {store.directory} is a file, "
                          f"not a directory: give --keys-dir (or ${KEYS_DIR_ENV}) the directory `trainbus keys "
                          f"generate` made")
    clients = store.clients(unreadable=True)
    if not store.server_secret.exists() or not any(k.role != REVOKED for k in clients):
        where = store.keys_dir_option  # the commands that make keys where this kernel looks
        # Only the commands for what is missing: `keys generate server` refuses an existing server key.
        server = f"`trainbus keys generate server{where}`"
        client = f"`trainbus keys generate client NAME --role monitor{where}` (or control)"
        has_client = any(k.role != REVOKED for k in clients)
        lacks, run = (("no client key", client) if store.server_secret.exists() else
                      ("no server key", server) if has_client else ("no server key", f"{server} and {client}"))
        raise ListenError(f"--listen {host_port} needs CURVE keys, and {store.directory} has {lacks}: run {run} on "
                          f"this host (README, remote access)")
    # A role's file that holds no key lets nobody in; refused here so that its owner hears of it now, not when
    # their client cannot connect.
    unreadable = next((k for k in clients if k.problem and k.role != REVOKED), None)
    if unreadable is not None:
        raise KeyFileError(unreadable.problem)
    store.check_secrets()  # the kernel refuses to start on a secret file others can read
    return host, port


def probe_ports(host: str, port: int) -> None:
    """ListenError naming the fix when PORT .. PORT + 2 cannot be bound on HOST now (taken, not this machine's),
    bound and let go at once, as the run's own sockets will bind them (libzmq: SO_REUSEADDR). PORT 0: nothing."""
    if not port:
        return
    ctx = zmq.Context()
    sockets = [ctx.socket(zmq.ROUTER) for _ in range(RUN_PORTS)]
    try:
        bind_in_a_row(sockets, host, port)
    finally:
        for socket in sockets:
            socket.close(linger=0)
        ctx.term()


def bind_in_a_row(sockets: list[zmq.Socket], host: str, port: int) -> None:
    """Each socket on HOST, at PORT, PORT + 1, ...; ListenError naming the fix when one cannot bind."""
    for offset, socket in enumerate(sockets):
        ipv6_for(socket, host)
        try:
            socket.bind(f"tcp://{host}:{port + offset}")
        except zmq.ZMQError as exc:
            raise bind_error(host, port, exc, ports=len(sockets)) from None


def ipv6_for(socket: zmq.Socket, host: str) -> None:
    """An IPv6 host ([::1], [2001:db8::5]) binds only with IPv6 on; libzmq says `No such device` otherwise."""
    if host.startswith("["):
        socket.setsockopt(zmq.IPV6, 1)


def start_authenticator(ctx: zmq.Context, keyring: KeyRing) -> ThreadAuthenticator:
    """zmq.auth's ZAP handler for `ctx`, asking `keyring` at every CURVE handshake; start it before any bind."""
    authenticator = ThreadAuthenticator(ctx, log=logging.getLogger("trainbus.kernel.zap"))
    authenticator.start()
    authenticator.configure_curve_callback(ZAP_DOMAIN, keyring)
    return authenticator


def curve_server(ctx: zmq.Context, kind: int, secret: bytes, **options: int) -> zmq.Socket:
    """A socket that only completes CURVE handshakes the authenticator approves (ZAP_ENFORCE_DOMAIN: no
    authenticator answering is a refusal), with keepalive so a vanished peer's connection is closed."""
    socket = ctx.socket(kind)
    socket.curve_server = True
    socket.curve_secretkey = secret
    socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
    socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, TCP_KEEPALIVE_IDLE_S)
    for name, value in options.items():
        socket.setsockopt(getattr(zmq, name), value)
    return socket


def bind_again(socket: zmq.Socket, endpoint: str) -> None:
    """Bind `endpoint`, which a socket closed a moment ago held: libzmq closes a listener on its I/O thread, so
    the port is free within milliseconds, not at once."""
    ipv6_for(socket, endpoint.removeprefix("tcp://"))
    for _ in range(REBIND_ATTEMPTS - 1):
        try:
            socket.bind(endpoint)
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            time.sleep(REBIND_PAUSE_S)
    socket.bind(endpoint)


def connection_cap() -> int:
    """CONNECTIONS_PER_SOCKET, or an eighth of this process's descriptor limit where that is less."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CONNECTIONS_PER_SOCKET if soft == resource.RLIM_INFINITY else max(8, min(CONNECTIONS_PER_SOCKET, soft // 8))


class Crowd:
    """The TCP connections one listening socket holds now (accepted, not yet gone), from its socket monitor.

    libzmq's I/O thread sends each monitor event with a blocking send, holding the socket's monitor lock: to a
    monitor queue that is full, or whose reader is gone, it waits forever, and with it every connection of the
    context (a flood of 500 connections stopped the daemon's accepting and closing). So the queue here has no high-
    water mark (the bus thread reads it as it polls), and the socket stops its monitor before the reader goes."""

    def __init__(self, socket: zmq.Socket):
        self.socket = socket
        # an address of its own: pyzmq's default names the socket's fd, which a socket made later may reuse
        address = f"inproc://trainbus-crowd-{os.urandom(8).hex()}"
        socket.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.monitor = socket.context.socket(zmq.PAIR)
        self.monitor.rcvhwm = 0  # no limit: libzmq would block its I/O thread on a full queue
        self.monitor.connect(address)
        self._open: set[int] = set()  # their descriptors
        self.closed: list[int] = []  # descriptors closed since the owner last took them (take_closed)

    def count(self) -> int:
        """How many it holds, once the monitor's news is taken."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                message = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return len(self._open)
            if message["event"] == zmq.EVENT_ACCEPTED:
                self._open.add(message["value"])
            else:
                self._open.discard(message["value"])
                self.closed.append(message["value"])

    def close(self) -> None:
        """Stop the socket's monitor, then close the reader (the other order can block libzmq's I/O thread)."""
        self.socket.disable_monitor()
        self.monitor.close(linger=0)


class Listener:
    """The run's TCP endpoints: `control_endpoint` (ROUTER), `events_endpoint` and `bursts_endpoint` (PUBs), CURVE
    only."""

    ROLES = {"router": "control", "pub": "events", "bursts": "bursts"}  # attribute -> which endpoint it serves

    def __init__(self, host_port: str, store: KeyStore, events_hwm: int, bursts_hwm: int, control_max_bytes: int):
        host, port = check_listen(host_port, store)
        public, secret = load_secret(store.server_secret)
        self.server_key = public
        self.keyring = KeyRing(store)
        self.ctx = zmq.Context()
        # Before any bind, so no handshake can find nobody answering; and with ZAP_ENFORCE_DOMAIN, if it ever
        # stops answering, nobody gets in.
        self.authenticator = start_authenticator(self.ctx, self.keyring)
        self._secret, self._hwms, self._control_max_bytes = secret, (events_hwm, bursts_hwm), control_max_bytes
        self.cap = connection_cap()
        self.crowds: dict[str, Crowd] = {}  # attribute (ROLES) -> its socket's connections
        self._unbound: dict[str, str] = {}  # attribute (ROLES) -> the endpoint it could not bind again yet
        self.router, self.pub, self.bursts = (self._socket(attribute) for attribute in self.ROLES)
        try:
            self._bind(host, port)
        except BaseException:
            self.close()
            raise
        self.control_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.events_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.bursts_endpoint = self.bursts.getsockopt_string(zmq.LAST_ENDPOINT)
        self._revocations = self.keyring.revocations()

    def _socket(self, attribute: str) -> zmq.Socket:
        """A new, unbound CURVE server socket for ROLES' `attribute`, its connections counted (Crowd) from before it
        binds."""
        events_hwm, bursts_hwm = self._hwms
        if attribute == "router":
            socket = curve_server(self.ctx, zmq.ROUTER, self._secret, ROUTER_MANDATORY=1, SNDHWM=CONTROL_SNDHWM,
                                  RCVHWM=CONTROL_RCVHWM, MAXMSGSIZE=self._control_max_bytes, LINGER=0)
        else:
            hwm = events_hwm if attribute == "pub" else bursts_hwm
            socket = curve_server(self.ctx, zmq.XPUB, self._secret, SNDHWM=hwm, MAXMSGSIZE=EVENTS_MAX_INBOUND_BYTES,
                                  LINGER=1000)  # an XPUB for both: each new subscription is passed up, and counted
        self.crowds[attribute] = Crowd(socket)
        return socket

    def take_closed_control(self) -> list[int]:
        """The control socket's connections closed since the last call, by descriptor (reply_ledger.py)."""
        crowd = self.crowds["router"]
        crowd.count()
        closed, crowd.closed = crowd.closed, []
        return closed

    def monitors(self) -> list[zmq.Socket]:
        """What the bus thread polls, to call cut_crowded as soon as a socket's connections change."""
        return [crowd.monitor for crowd in self.crowds.values()]

    def cut_crowded(self) -> list[str]:
        """Each socket holding more than `cap` connections closed and bound again on its port, which cuts all of
        them (libzmq cannot drop one): a flood of connections with no key costs the kernel at most `cap`
        descriptors a socket, and the keyed clients reconnect by themselves (~0.1 s), as after a revocation.
        Returns the endpoints cut, as ROLES names them."""
        crowded = [attribute for attribute, crowd in self.crowds.items() if crowd.count() > self.cap]
        for attribute in crowded:
            self._replace(attribute)
        return [self.ROLES[attribute] for attribute in crowded]

    def cut_subscribed(self, attribute: str) -> None:
        """The publisher `attribute` ("pub", "bursts") holding more than SUBSCRIPTIONS_MAX distinct subscriptions:
        closed and bound again (a new trie), every subscriber cut; they reconnect by themselves and subscribe again."""
        self._replace(attribute)

    def cut_revoked(self) -> bool:
        """Once a key has been revoked since the last look (the directory re-read at most once a second): the
        publishers closed and bound again on their ports, and True (the bus takes the new sockets). libzmq cannot
        drop one subscriber of a PUB, so every events and bursts connection is cut: each reconnects by itself
        within ~0.1 s and handshakes again, and the ZAP handler refuses the revoked key (libzmq never retries a
        refused one). The others miss what went out meanwhile and replay it, as after any gap (PROTOCOL.md §4)."""
        revocations = self.keyring.revocations()
        if revocations == self._revocations:
            return False
        self._revocations = revocations
        for attribute in ("pub", "bursts"):
            self._replace(attribute)
        return True

    def _replace(self, attribute: str) -> None:
        """ROLES' `attribute` closed and a new socket in its place, bound on the same endpoint; what was queued on
        the old one goes with it (the reconnected subscribers replay it)."""
        endpoint = getattr(self, f"{self.ROLES[attribute]}_endpoint")
        self.crowds.pop(attribute).close()
        getattr(self, attribute).close(linger=0)
        setattr(self, attribute, self._socket(attribute))
        self._unbound.pop(attribute, None)
        try:
            bind_again(getattr(self, attribute), endpoint)
        except zmq.ZMQError as exc:  # taken by another process in the moment it was free: tried again later
            self._unbound[attribute] = endpoint
            log.error("could not bind %s again after cutting its connections (%s): remote clients cannot connect "
                      "there until it is free again (tried once a second)", endpoint, exc)

    def bind_unbound(self) -> None:
        """Bind again what _replace could not (another process held the port a while): called once a second."""
        for attribute, endpoint in list(self._unbound.items()):
            try:
                getattr(self, attribute).bind(endpoint)
            except zmq.ZMQError:
                continue
            del self._unbound[attribute]
            log.info("bound %s again: remote clients can connect there again", endpoint)

    def _bind(self, host: str, port: int) -> None:
        publishers = (self.pub, self.bursts)  # on PORT + 1 and PORT + 2
        if port:
            bind_in_a_row([self.router, *publishers], host, port)
            return
        for socket in (self.router, *publishers):
            ipv6_for(socket, host)
        for _ in range(FREE_PORTS_ATTEMPTS):
            try:
                self.router.bind(f"tcp://{host}:*")
            except zmq.ZMQError as exc:
                raise bind_error(host, 0, exc) from None
            endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            base = int(endpoint.rpartition(":")[2])
            bound = []
            try:
                for offset, socket in enumerate(publishers, 1):
                    socket.bind(f"tcp://{host}:{base + offset}")
                    bound.append(socket.getsockopt_string(zmq.LAST_ENDPOINT))
                return
            except zmq.ZMQError:
                for socket, taken in zip(publishers, bound):
                    socket.unbind(taken)
                self.router.unbind(endpoint)
        raise ListenError(f"--listen {host}:0: found no {RUN_PORTS} free ports in a row (PORT, PORT + 1, PORT + 2); "
                          f"give a PORT")

    def close(self) -> None:
        for crowd in self.crowds.values():
            crowd.close()
        self.router.close()
        self.pub.close()  # their LINGER lets the last events out, for a bounded second
        self.bursts.close()
        self.authenticator.stop()
        self.ctx.term()
