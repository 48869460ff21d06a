"""The wire's remote side: CURVE key files, the connection file, and the client's socket setup over TCP.

A kernel that listens on TCP does so with CURVE only (PROTOCOL.md, security). Key files are pyzmq's
(`zmq.auth.create_certificates`, read with `zmq.auth.load_certificate`); a secret one must be the owner's
alone. `secure_client` is the one place a client (an SDK plugin, `trainbus attach`) sets a socket up:
its own key pair, and the server's public key pinned.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import time
import weakref
from pathlib import Path

import zmq
import zmq.auth

KEYS_DIR_ENV = "TRAINBUS_KEYS_DIR"
DEFAULT_KEYS_DIR = Path("~/.config/trainbus/keys")
SERVER_KEY = "server"  # <keys dir>/server.key (public) and server.key_secret: the kernel host's pair
ROLES = ("monitor", "control")  # monitor: events, replays, metric/log; control: stop and checkpoint_now too
SECRET_SUFFIX = ".key_secret"  # zmq.auth's names: NAME.key is public, NAME.key_secret holds both halves
CONNECTION_FILE = "connection.json"  # in the run directory: the TCP endpoints and the server's public key
# libzmq drops a TCP connection whose CURVE handshake is not done within this (its default is 30 s): a client
# that connects and says nothing, or garbage, costs a file descriptor this long at most.
HANDSHAKE_IVL_MS = 5000
Z85_KEY_CHARS = 40  # a CURVE public key as text (z85 of 32 bytes), as connection.json and remote.json hold it


# A client's key is made on the host it connects to: one generated on the client's machine is unknown there.
CLIENT_KEY_FIX = (f"a client's key is made on the host it connects to (`trainbus keys generate client NAME --role "
                  f"monitor|control` there) and its {SECRET_SUFFIX} copied to this machine")


class KeyFileError(Exception):
    """A key file that is missing, unreadable, empty or readable by others; the text names the file and the fix."""


def keys_dir(override: str | os.PathLike | None = None) -> Path:
    """The key directory: the given one, else $TRAINBUS_KEYS_DIR, else ~/.config/trainbus/keys."""
    return Path(override or os.environ.get(KEYS_DIR_ENV) or DEFAULT_KEYS_DIR).expanduser()


def check_secret_file(path: Path) -> None:
    """KeyFileError unless `path` is a non-empty file that only its owner can read (0600 or stricter)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise KeyFileError(f"key file {path}: {exc.strerror}; generate it with `trainbus keys generate`") from None
    if stat.S_ISDIR(info.st_mode):  # its mode is a folder's: "chmod 600" would be the wrong fix
        raise KeyFileError(f"key file {path} is a directory, not a key file: give the NAME{SECRET_SUFFIX} file itself")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"secret key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                           f"fix: chmod 600 {path}")
    if info.st_size == 0:
        raise KeyFileError(f"secret key file {path} is empty; fix: generate it again with `trainbus keys generate`")


def load_secret(path: Path, client: bool = False) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a secret key file, after checking it is the owner's alone. `client`: a client's
    --key, which is made on the host it connects to and copied here (generating one here would not help)."""
    path = Path(path)
    if client and not os.path.lexists(path):
        raise KeyFileError(f"key file {path}: {os.strerror(errno.ENOENT)}; {CLIENT_KEY_FIX}")
    if client and path.is_file() and path.stat().st_size == 0:
        raise KeyFileError(f"key file {path} is empty; {CLIENT_KEY_FIX}")
    fix = CLIENT_KEY_FIX if client else "generate one with `trainbus keys generate`"
    try:
        check_secret_file(path)
    except KeyFileError:
        # A public key file is 0644 as pyzmq writes it: "chmod 600" would be the wrong fix for it.
        if path.is_file() and not _load(path, fix)[1]:
            raise KeyFileError(f"{path} holds no secret key; give the {SECRET_SUFFIX} file, not the public "
                               f"one") from None
        raise
    public, secret = _load(path, fix)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key; give the {SECRET_SUFFIX} file, not the public one")
    return public, secret


def load_public(path: Path) -> bytes:
    """The z85 public key of a key file (public or secret)."""
    return _load(Path(path))[0]


def is_z85_key(key: object) -> bool:
    """A CURVE public key as text: Z85_KEY_CHARS characters of the z85 alphabet."""
    from zmq.utils.z85 import Z85CHARS

    return isinstance(key, str) and len(key) == Z85_KEY_CHARS and all(ord(c) < 128 and ord(c) in Z85CHARS for c in key)


def load_server_key(path: Path) -> bytes:
    """The z85 public key a client pins for a server: from its public key file (server.key), or the server_key a
    run's connection.json or a daemon's remote.json holds. KeyFileError naming the fix otherwise, and for a
    secret key file: a server's secret key belongs on its host alone, and whoever holds a copy can pose as it."""
    path = Path(path)
    fix = (f"copy {SERVER_KEY}.key from the server's key directory (`trainbus keys list` there), or its run's "
           f"{CONNECTION_FILE} (a daemon's .daemon/remote.json)")
    if path.suffix == ".json" or _holds_json_object(path):
        try:
            key = json.loads(path.read_text())["server_key"]
            if not is_z85_key(key):
                raise ValueError(key)
        except OSError as exc:
            raise KeyFileError(f"server key file {path}: {exc.strerror}; {fix}") from None
        except (ValueError, KeyError, TypeError):
            raise KeyFileError(f"{path} holds no server_key: {fix}") from None
        return key.encode()
    try:
        public, secret = _load(path)
    except KeyFileError:
        if path.exists():
            raise KeyFileError(f"server key file {path} is not a readable CURVE public key; {fix}") from None
        raise
    if secret:
        raise KeyFileError(f"{path} is a secret key: a client pins the server's public key, {fix}; and keep the "
                           f"secret on the server's host alone (whoever holds it can pose as the server)")
    return public


def _holds_json_object(path: Path) -> bool:
    """Whether a file is a connection file under another name (a copy renamed, as a client's target may be): a JSON
    object, where a key file is ZeroMQ's certificate text, its first line a comment."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:  # not there, a directory: _load names it
        return False


def _load(path: Path, fix: str = "generate one with `trainbus keys generate`") -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise KeyFileError(f"no key file {path}: copy it there (a server's server.key comes from its host, "
                           f"`trainbus keys list` there), or name another")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"key file {path} is not a readable CURVE key ({exc}); {fix}") from None


# Each CURVE client socket's (public, secret, pinned server) keys, for as long as the socket lives.
_CLIENT_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def secure_client(socket: zmq.Socket, key_file: Path | tuple[bytes, bytes], server_key: bytes | Path) -> None:
    """Make `socket` a CURVE client before it connects: its own key pair from `key_file` (a .key_secret file,
    owner-only; or the (public, secret) pair load_secret read from one), the server's public key pinned (z85
    bytes, or a key file holding it). A server holding any other key fails the handshake, and the socket never
    receives a byte."""
    public, secret = key_file if isinstance(key_file, tuple) else load_secret(Path(key_file))
    pinned = server_key if isinstance(server_key, bytes) else load_server_key(Path(server_key))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = pinned
    _CLIENT_KEYS[socket] = (public, secret, pinned)  # libzmq gives no key back: ConnectionWatch's probe reads them
    socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
    # No ZeroMQ heartbeats (ZMTP PING): libzmq 4.3.5 aborts the process that reads a PING left in a connection it
    # had stopped reading once its peer closed it (upstream #4841), and the kernel holds back a client that sends
    # past its share. A silent link is told by the kernel's own heartbeats instead, and the client connects anew
    # (sdk/plugin_io.py REDIAL_AFTER_S, sdk/attach.py).
    socket.setsockopt(zmq.IPV6, 1)  # a kernel listening on [::1] or another IPv6 address; IPv4 ones still connect


# How long an interactive client (attach, a remote daemon command) keeps trying a port where nothing accepts
# connections before it says so: a kernel or daemon being restarted there is back within it.
UNANSWERED_S = 5.0


class CannotConnect(Exception):
    """A client cannot get in, in a way that retrying cannot mend (ConnectionWatch): its keys are not taken, or
    nothing accepts connections there. The text says which, and what to check."""


def key_refused(endpoint: str) -> str:
    """The one line for a client key the host does not take: unknown there, or revoked (before or while connected)."""
    return (f"{endpoint} refused this client's key: it is not authorized on that host, or was revoked (`trainbus "
            f"keys list` there shows its keys, and `trainbus keys generate client NAME` makes one)")


class ConnectionWatch:
    """What libzmq's socket monitor reports of a CURVE client socket's connections and handshakes. The socket
    itself only goes silent when one fails, and the client used to wait out its whole connect timeout (30 s)
    before saying it could not tell an unknown key from a wrong server key or an address where nothing listens.

    Made before the socket connects; `read()` (when `monitor` is readable, or now and then) gives the verdict
    once there is one. Read by the thread that owns the socket. `unanswered_after_s`: also a verdict when no
    connection was accepted at all for that long, or handshakes keep timing out (None: never; a plugin may be
    started before its kernel, or meet one too busy to answer in time)."""

    # A server holding another key than the one pinned cannot read our HELLO and drops the connection at once;
    # libzmq reconnects (~0.1 s later) and it fails again. A drop that comes later than this after the connect is
    # something else (a server too slow to finish the handshake): not counted.
    QUICK_DROP_S = 1.0
    QUICK_DROPS = 3  # in a row, with no handshake succeeding between them
    # A peer that takes the connection and never answers the greeting (another service on the port, a hung
    # kernel) costs HANDSHAKE_IVL_MS a try: an interactive client (unanswered_after_s) gives up after this many.
    SLOW_DROPS = 2
    # A peer that answers the greeting with something not ZeroMQ (an SSH or HTTP server's first line) is read as
    # ZMTP 1.0, which CURVE cannot speak: libzmq drops the connection with no handshake event and, taking it for a
    # protocol error, never connects again. A drop with no handshake event that no new connect follows within this
    # (libzmq reconnects after 0.1 s) is that: the socket is silent for good.
    ABANDONED_S = 1.5
    EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
              | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, socket: zmq.Socket, endpoint: str, unanswered_after_s: float | None = None,
                 server_key_file: str = f"the run's {CONNECTION_FILE}", service: str = "trainbus kernel",
                 said_as: str | None = None):
        self.endpoint = endpoint
        # what the lines about the host (its keys, its name) call it: the HOST:PORT the user gave, where this
        # socket's endpoint is another port of it (events PORT + 1, bursts PORT + 2), never typed
        self.said_as = said_as or endpoint
        # what the lines name: the file holding the server's public key, and what should listen there
        self.server_key_file, self.service = server_key_file, service
        self.unanswered_after_s = unanswered_after_s
        # pyzmq's default address names the socket's fd, which a socket made after this one closes may reuse
        # before libzmq has let the address go ("Address already in use")
        self.monitor = socket.get_monitor_socket(self.EVENTS, f"inproc://trainbus-handshake-{os.urandom(8).hex()}")
        self._socket: zmq.Socket | None = socket  # its keys, for a probe of what drops it (a publisher?)
        self.verdict: str | None = None
        self._connected_at: float | None = None  # the latest connection's
        self._first_retry: float | None = None  # the first failed connect, while none has been accepted yet
        self._quick_drops = self._slow_drops = 0
        self._shaken = False  # the latest connection met a handshake event (succeeded or failed)
        self._abandoned_at: float | None = None  # dropped with none, and no connect since (ABANDONED_S)
        self._unresolved: str | None = None  # why the endpoint's host name does not resolve, once a connect failed
        self.shaken_ok = False  # a CURVE handshake succeeded here once: a trainbus peer with our keys answers

    def refused_for(self, now: float) -> float:
        """Seconds every connect has failed (refused or unreachable) while none was ever accepted; 0 otherwise."""
        return now - self._first_retry if self._connected_at is None and self._first_retry is not None else 0.0

    def unresolved(self) -> str:
        """The line for an endpoint whose host name does not resolve ("" when it does, or before any connect failed):
        a typo in HOST, which libzmq retries as it does a refused port, and would be said as one."""
        if self._first_retry is None or self._connected_at is not None:
            return ""
        if self._unresolved is None:
            host = self.endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
            try:
                socket.getaddrinfo(host, None)
                self._unresolved = ""
            except (socket.gaierror, UnicodeError) as exc:
                why = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
                self._unresolved = (f"cannot resolve the host {host} of {self.said_as} ({why}): check the HOST in "
                                    f"HOST:PORT (a name this machine knows, or an address)")
        return self._unresolved

    def read(self) -> str | None:
        """Take what the monitor holds; the verdict, once one event settled it (it stays). Called now and then
        too, not only when the monitor is readable: a connection libzmq gave up on is told by the silence after."""
        from zmq.utils.monitor import recv_monitor_message

        while self.verdict is None:
            try:
                message = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            self.take(message["event"], message["value"], time.monotonic())
        if self.verdict is None:
            self.look(time.monotonic())
        if self.verdict is None and self.unanswered_after_s is not None and self.unresolved():
            self.verdict = self._unresolved  # an interactive client: said at once, not after its window
        return self.verdict

    def look(self, now: float) -> None:
        """The verdict that silence since the last event settles at `now`: a connection libzmq abandoned."""
        if self._abandoned_at is not None and now - self._abandoned_at >= self.ABANDONED_S:
            self.verdict = (f"{self.endpoint} takes connections but finishes no ZeroMQ handshake (what answered "
                            f"is not ZeroMQ): no trainbus kernel or daemon listens on that port (another "
                            f"service?)")

    def take(self, event: int, value: int, now: float) -> None:
        """One monitor event at `now` (monotonic): tests drive it with a fake clock."""
        if event in (zmq.EVENT_CONNECTED, zmq.EVENT_CONNECT_DELAYED, zmq.EVENT_CONNECT_RETRIED):
            self._abandoned_at = None
        elif event == zmq.EVENT_DISCONNECTED:
            self._abandoned_at = None if self._shaken or self._connected_at is None else now
        elif event & (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
            self._shaken = True
        if event == zmq.EVENT_CONNECTED:
            self._connected_at, self._shaken = now, False
        elif event == zmq.EVENT_CONNECT_RETRIED and self._connected_at is None:
            # refused (nothing listens on that port) or unreachable, each retry: libzmq tries every ~0.1 s
            self._first_retry = now if self._first_retry is None else self._first_retry
            if self.unanswered_after_s is not None and now - self._first_retry >= self.unanswered_after_s:
                self.verdict = (f"nothing accepts connections at {self.endpoint} (refused or unreachable for "
                                f"{now - self._first_retry:.0f} s): is a run or daemon listening on that port? (the "
                                f"endpoint it printed; a run's kernel.log names it; a run that has ended listens no "
                                f"more: `trainbus runs list` on its host says)")
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._quick_drops = self._slow_drops = 0
            self.shaken_ok = True
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH and value == 400:  # the authenticator said no: final
            # (300 and 500, a failing authenticator, are left to the client's own retries: another try may pass)
            self.verdict = key_refused(self.said_as)
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.verdict = (f"{self.endpoint} does not speak CURVE: no trainbus kernel or daemon listens there with "
                            f"keys (is the port the one it printed?)"
                            if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH else
                            f"{self.endpoint} broke the ZeroMQ handshake (protocol error {value:#x}): is it a "
                            f"trainbus endpoint?")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            quick = self._connected_at is not None and now - self._connected_at <= self.QUICK_DROP_S
            self._quick_drops, self._slow_drops = (self._quick_drops + 1, 0) if quick else (0, self._slow_drops + 1)
            if self.unanswered_after_s is not None and self._slow_drops >= self.SLOW_DROPS:
                self.verdict = (f"{self.endpoint} takes connections but finishes no ZeroMQ handshake (each timed "
                                f"out): no trainbus kernel or daemon listens on that port (another service?), or "
                                f"the one there is hung")
            elif self._quick_drops >= self.QUICK_DROPS and self._a_publisher_takes_our_keys():
                self.verdict = (f"{self.endpoint} is a run's events or bursts port (PORT + 1 or PORT + 2), not "
                                + ("a daemon's endpoint: give the daemon's --listen HOST:PORT (the endpoint in its "
                                   ".daemon/remote.json)" if "daemon" in self.service else
                                   f"its control port: give the PORT the run printed first (`control` in its "
                                   f"{CONNECTION_FILE})"))
            elif self._quick_drops >= self.QUICK_DROPS and self._closes_unheard():
                check = ("is the daemon up? `trainbus daemon status` on its host says" if "daemon" in self.service
                         else "has the run ended? `trainbus runs list` on its host says")
                self.verdict = (f"{self.endpoint} takes connections and closes each at once, unheard: a tunnel or "
                                f"forwarder (ssh -L) with nothing listening at its far end ({check}), or a service "
                                f"that is not trainbus")
            elif self._quick_drops >= self.QUICK_DROPS:
                # A server without CURVE drops us as quickly when it notices the mismatch before we do.
                self.verdict = (f"{self.said_as} drops every handshake: the server key pinned for it is not that "
                                f"host's (give --server-key its server.key, or {self.server_key_file}), its "
                                f"authenticator is down, or no {self.service} listens there with keys")

    def _a_publisher_takes_our_keys(self) -> bool:
        """Whether a SUB with this (control) socket's own CURVE keys completes a handshake at its endpoint: a run's
        events or bursts port (an XPUB) drops a DEALER after the handshake, for the socket types, as quickly as a
        server holding another key drops it before; there a SUB gets in. False for a SUB's own watch, or unsure."""
        keys = _CLIENT_KEYS.get(self._socket) if self._socket is not None else None
        if keys is None or self._socket.closed or self._socket.type == zmq.SUB:
            return False
        from zmq.utils.monitor import recv_monitor_message

        probe = self._socket.context.socket(zmq.SUB)
        monitor = None
        try:
            probe.setsockopt(zmq.LINGER, 0)
            for option, key in zip((zmq.CURVE_PUBLICKEY, zmq.CURVE_SECRETKEY, zmq.CURVE_SERVERKEY), keys):
                probe.setsockopt(option, key)
            monitor = probe.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED,
                                               f"inproc://trainbus-probe-{os.urandom(8).hex()}")
            probe.connect(self.endpoint)
            return bool(monitor.poll(1500)) and recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        except zmq.ZMQError:
            return False
        finally:
            if monitor is not None:  # the monitor goes before its socket (a reader closed first froze the context)
                probe.disable_monitor()
                monitor.close(linger=0)
            probe.close(linger=0)

    def _closes_unheard(self) -> bool:
        """Whether a plain connection to the endpoint is closed before the peer says a byte. A ZeroMQ peer greets
        first (its signature, at once), also one holding another server key; a tunnel whose far end has nothing
        listening (`ssh -L` to a run that ended) accepts and closes unheard, which libzmq reports as the same quick
        drop. Unsure (no answer within a second, no connection, a name that does not resolve): False."""
        host, _, port = self.endpoint.removeprefix("tcp://").rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0) as probe:
                return probe.recv(1) == b""
        except (OSError, ValueError):
            return False

    def why_silent(self) -> str:
        """What the socket met, for a client giving up without a verdict ("" when nothing tells)."""
        if self._connected_at is None and self._first_retry is not None:
            return self.unresolved() or "nothing accepted a connection there (refused or unreachable)"
        if self._slow_drops:
            return "it took connections, but no handshake finished (each timed out)"
        return ""

    def close(self) -> None:
        self.monitor.close(linger=0)


RUN_PORTS = 3  # a run's TCP ports from its PORT on: control, events (PORT + 1), bursts (PORT + 2)


def split_host_port(text: str, ports: int = RUN_PORTS, lowest: int = 1) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` or `tcp://HOST:PORT` (what a kernel prints and connection.json holds); ValueError
    naming the form otherwise. `ports`: how many the peer uses from PORT on (a run: RUN_PORTS; the daemon: 1);
    `lowest`: 0 where 0 means a free port (--listen)."""
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    if ":" in host and not host.startswith("["):  # ::1:5555 reads as host ::1 only by luck, and libzmq takes none
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, [{host}]:{port}")
    if ("[" in host or "]" in host) and not re.fullmatch(r"\[[^\[\]]+\]", host):  # libzmq would take "[:" for a host
        raise ValueError(f"{text!r}: an IPv6 address goes in brackets, then its port: [ADDRESS]:PORT, as [::1]:5555")
    if not sep or not host or "/" in host or not port.isdigit() or not lowest <= int(port) <= 65536 - ports:
        span = f"a port from {lowest} to {65536 - ports}" + ("; events use PORT + 1, bursts PORT + 2"
                                                            if ports == RUN_PORTS else "")
        raise ValueError(f"{text!r} is not HOST:PORT ({span})")
    return host, int(port)


def endpoints(host_port: str) -> tuple[str, str, str]:
    """(control, events, bursts) TCP endpoints of a run's `HOST:PORT`: PORT, PORT + 1 and PORT + 2."""
    host, port = split_host_port(host_port)
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}"


WILDCARD_HOSTS = ("0.0.0.0", "[::]", "::", "*")


def advertised(endpoint: str) -> str:
    """A bound TCP endpoint as another machine reaches it: a wildcard bind (0.0.0.0, every interface) names this
    host by its name, which tcp://0.0.0.0 would not (a client there would reach itself)."""
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    return f"tcp://{socket.gethostname()}:{port}" if sep and host in WILDCARD_HOSTS else endpoint


def write_connection_file(run_dir: Path, run_id: str, control: str, events: str, bursts: str,
                          server_key: bytes) -> Path:
    """<run_dir>/connection.json (0600), like Jupyter's connection files: what a remote client needs besides
    its own key. The server's key in it is public; the file is owner-only as everything in a run directory.
    A wildcard bind's endpoints are written with this host's name (advertised)."""
    path = Path(run_dir) / CONNECTION_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    content = {"run": run_id, "transport": "tcp", "control": advertised(control), "events": advertised(events),
               "bursts": advertised(bursts), "server_key": server_key.decode("ascii")}
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(json.dumps(content, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def names_connection_file(where: str) -> bool:
    """Whether a client's target (`attach WHERE`, `--connect WHERE`) is a connection file rather than HOST:PORT:
    a name ending .json, or any file there is (a copy may be renamed; a HOST:PORT is no file)."""
    return where.endswith(".json") or os.path.isfile(where)


def read_connection_file(path: Path) -> dict[str, str]:
    """A connection file's content: run, control, events, bursts ("" in one from a kernel without them), server_key
    (z85 text)."""
    again = f"copy the run's {CONNECTION_FILE} again"
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"connection file {path} is unreadable ({exc}); {again}") from None
    if not isinstance(content, dict):
        raise KeyFileError(f"connection file {path} is not a JSON object of the run's endpoints; {again}")
    missing = next((k for k in ("run", "control", "events", "server_key") if k not in content), None)
    if missing:  # cut short, or written by hand
        raise KeyFileError(f"connection file {path} holds no {missing!r}; {again}")
    info = {k: str(content[k]) for k in ("run", "control", "events", "server_key")}
    info["bursts"] = str(content.get("bursts", ""))
    if not is_z85_key(info["server_key"]):  # libzmq would refuse it, with a traceback
        raise KeyFileError(f"connection file {path}: its server_key is not a CURVE public key ({Z85_KEY_CHARS} "
                           f"characters of z85); copy the run's {CONNECTION_FILE} again")
    return info
