"""Talking to a runs directory's daemon: asking it (here over its ipc socket, or a remote one over TCP with CURVE),
starting it in the background, and stopping it. The daemon itself is kernel/daemon.py."""

from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

from trainbus.proto import ProtocolError, unpack

from .daemon_files import (CONTROL_MAX_BYTES, ENDPOINT_FILE, LOG_FILE, PID_FILE, REMOTE_FILE, DaemonError, daemon_dir,
                           make_daemon_dir)

REQUEST_TIMEOUT_S = 3.0
REMOTE_REQUEST_TIMEOUT_S = 15.0  # a CURVE handshake and the authenticator first, maybe over a slow network


@dataclass
class RemoteDaemon:
    """A daemon's TCP endpoint as a client names it: HOST:PORT, this client's secret key file and the daemon
    host's public server key (a key file, or the daemon's .daemon/remote.json).

    Both keys are read when it is made (KeyFileError, or ValueError for HOST:PORT, naming the fix): a mistake
    found only at connect would look like a daemon that does not answer."""
    host_port: str
    key_file: Path
    server_key: Path
    server_public: bytes = field(init=False)

    def __post_init__(self) -> None:
        from trainbus.proto.remote import load_secret, load_server_key, split_host_port

        try:
            host, port = split_host_port(self.host_port, ports=1)
        except ValueError:
            raise ValueError(f"--remote {self.host_port!r}: give HOST:PORT, the daemon's --listen address "
                             f"(the endpoint in its .daemon/{REMOTE_FILE})") from None
        self.host_port = f"{host}:{port}"
        _not_stale(Path(self.server_key))
        self.server_public = load_server_key(Path(self.server_key))
        load_secret(Path(self.key_file), client=True)

    def connect(self, socket: zmq.Socket):
        """Connect `socket` with our keys; the ConnectionWatch that says at once when the daemon's host takes none of
        them, and in seconds when nothing accepts connections there."""
        from trainbus.proto.remote import UNANSWERED_S, ConnectionWatch, secure_client

        secure_client(socket, self.key_file, self.server_public)
        endpoint = f"tcp://{self.host_port}"
        watch = ConnectionWatch(socket, endpoint, UNANSWERED_S, server_key_file=f"the daemon's .daemon/{REMOTE_FILE}",
                                service="trainbus daemon")
        socket.connect(endpoint)
        return watch


def _not_stale(server_key: Path) -> None:
    """KeyFileError when `server_key` is a daemon's own .daemon/remote.json on this host and no daemon serves that
    runs directory: missing (its daemon stopped, or serves without --listen) or left by one that was killed. A
    connection would wait seconds on a port nothing listens on, then only say so."""
    from trainbus.proto.remote import KeyFileError

    from .daemon_files import DAEMON_DIR

    path = Path(server_key).absolute()
    if path.name != REMOTE_FILE or path.parent.name != DAEMON_DIR:
        return
    runs = path.parent.parent
    start = f"start one with `trainbus daemon start --runs-dir {shlex.quote(str(runs))} --listen HOST:PORT`"
    if not path.exists() and path.parent.is_dir():
        raise KeyFileError(f"{path}: no daemon serves {runs} with --listen (its remote.json is there only while one "
                           f"does); {start}, or give --server-key the host's server.key")
    if path.exists() and not daemon_lives(runs):
        raise KeyFileError(f"{path} is left from a daemon that is gone: no daemon serves {runs} (it was killed, "
                           f"or its host rebooted); {start}")


def request(runs_dir: Path | None, op: str, timeout_s: float | None = None, remote: RemoteDaemon | None = None,
            **fields: Any) -> dict[str, Any] | None:
    """The daemon's answer to `op`: the local one of runs_dir, or `remote`; None when none answers in time
    (default REQUEST_TIMEOUT_S locally, REMOTE_REQUEST_TIMEOUT_S over TCP). CannotConnect when `remote` took
    none of our keys (an unknown or revoked key, another server's key pinned)."""
    if timeout_s is None:
        timeout_s = REQUEST_TIMEOUT_S if remote is None else REMOTE_REQUEST_TIMEOUT_S
    endpoint = None
    if remote is None:
        if not daemon_lives(runs_dir):  # a killed daemon's endpoint file is left: nothing there can answer
            return None
        try:
            endpoint = (daemon_dir(runs_dir) / ENDPOINT_FILE).read_text().strip()
        except OSError:
            return None
    context = zmq.Context.instance()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, 16 * CONTROL_MAX_BYTES)  # a status of many runs
    watch = None
    try:
        if remote is None:
            socket.connect(endpoint)
        else:
            watch = remote.connect(socket)
        socket.send(msgpack.packb({"op": op, **fields}))  # "op" first: a run's kernel knows it by that (control.py)
        if not _answered(socket, timeout_s, watch):
            return None
        reply = unpack(socket.recv())
        if remote is not None and isinstance(reply, dict) and reply.get("type") == "refused" \
                and reply.get("code") == "not_a_daemon":  # kernel/control.py NOT_A_DAEMON: a run's kernel answered
            from trainbus.proto.remote import CannotConnect

            raise CannotConnect(f"{remote.host_port} is a run's --listen endpoint (a trainbus kernel answered), not a "
                                f"daemon's: give the daemon's --listen HOST:PORT (the endpoint in its "
                                f".daemon/{REMOTE_FILE})")
        return reply if isinstance(reply, dict) else None
    except (zmq.ZMQError, ProtocolError):
        return None
    finally:
        if watch is not None:
            watch.close()
        socket.close()


def _answered(socket: zmq.Socket, timeout_s: float, watch) -> bool:
    """`socket` has the answer within timeout_s; CannotConnect as soon as `watch` (a remote's) has a verdict."""
    if watch is None:
        return bool(socket.poll(int(timeout_s * 1000)))
    from trainbus.proto.remote import CannotConnect

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    poller.register(watch.monitor, zmq.POLLIN)
    end = time.monotonic() + timeout_s
    while (left := end - time.monotonic()) > 0:
        ready = dict(poller.poll(int(min(left, 0.5) * 1000) + 1))  # 0.5 s: a silence can settle the watch too
        if socket in ready:
            return True
        if watch.read():
            raise CannotConnect(watch.verdict)
    return False



def start_background(runs_dir: Path, argv: list[str], timeout_s: float = 30.0) -> dict[str, Any]:
    """`daemon start`: the foreground daemon in its own session, detached from this terminal; returns its status
    once it answers. DaemonError with the log's last lines when it exits first. One that holds the runs directory
    but has not answered within timeout_s is settling its runs (its first round: a long queue, a slow disk, the
    registry busy): left to go on, and {"pid": its pid, "starting": True} returned."""
    directory = make_daemon_dir(runs_dir)
    serving = request(runs_dir, "status", timeout_s=0.5)
    if serving is not None:  # refused here: a second daemon would only log its refusal into this one's log
        raise DaemonError(f"a daemon (pid {serving.get('pid', '?')}) already serves {Path(runs_dir).resolve()}; "
                          f"`trainbus daemon status --runs-dir {shlex.quote(str(runs_dir))}` shows it")
    try:
        written = (directory / LOG_FILE).stat().st_size  # its own lines come after this: older ones are others'
    except FileNotFoundError:
        written = 0
    # Its output goes to a file of its own until it holds the lock (daemon_serve.serve: _output_into), then to the
    # log: a daemon started at the same instant that loses the lock says so here, not in the winner's log.
    fd, start_output = tempfile.mkstemp(prefix="start-", suffix=".out", dir=directory)  # 0600, in the 0700 dir
    try:
        with os.fdopen(fd, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "trainbus.kernel.cli", "daemon", "start",
                                        "--foreground", "--quiet", *argv], stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                # its own one-line refusal (a daemon already serves the directory; a port taken), as is: before the
                # lock in its own file, after it among the log's lines written since it started
                lines = _lines_since(Path(start_output), 0) + _lines_since(directory / LOG_FILE, written)
                refusal = next((line for line in reversed(lines) if line.startswith("error: ")), None)
                if refusal is not None:
                    raise DaemonError(refusal.removeprefix("error: "))
                last = lines[-1] if lines else _no_log(directory)
                raise DaemonError(f"the daemon exited at start: {last} (its log: {directory / LOG_FILE})")
            answer = request(runs_dir, "status", timeout_s=0.5)
            if answer is not None and answer.get("pid") == process.pid:
                return answer
            time.sleep(0.1)
        if _holds(runs_dir, process.pid):  # past its lock and working: killed, its first round would be lost too
            return {"pid": process.pid, "starting": True}
        process.terminate()
        raise DaemonError(f"the daemon did not answer within {timeout_s:.0f} s; see {directory / LOG_FILE}")
    finally:
        os.unlink(start_output)


def _holds(runs_dir: Path, pid: int) -> bool:
    """Whether the daemon process `pid` holds runs_dir's lock (serve took it, wrote its pid, and lives)."""
    try:
        written = int((daemon_dir(runs_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return False
    return written == pid and daemon_lives(runs_dir)


def _no_log(directory: Path) -> str:
    """Why a daemon that exited at start wrote nothing: a disk with no room for its first line says so."""
    try:
        full = os.statvfs(directory).f_bavail == 0
    except OSError:
        full = False
    return f"its disk is full (No space left on device); free space in {directory.parent}" if full else "no log"


def _lines_since(path: Path, offset: int) -> list[str]:
    """The lines of the log at `path` from byte `offset` on ([] when it cannot be read)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return []


def daemon_lives(runs_dir: Path) -> bool:
    """Whether a daemon of runs_dir lives: it holds the flock on its pid file for as long as it does (the kernel
    releases it however the daemon ends), so no stale pid file can say otherwise."""
    try:
        fd = os.open(daemon_dir(runs_dir) / PID_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken: no daemon holds it
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def unanswering(runs_dir: Path) -> tuple[int | None, str] | None:
    """(its pid, what to say) when a daemon holds runs_dir's lock but did not answer a request: starting, or stuck
    (stopped, a round blocked). Not `no daemon serves`: one does, and `daemon start` says so. None when none lives."""
    if not daemon_lives(runs_dir):
        return None
    try:
        pid: int | None = int((daemon_dir(runs_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        pid = None
    return pid, (f"daemon pid {pid if pid is not None else '?'} holds {Path(runs_dir).resolve()} but did not answer "
                 f"(it is starting, or stuck: the end of its log {daemon_dir(runs_dir) / LOG_FILE} says which)")


def stop(runs_dir: Path, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Ask the daemon to exit and wait until it has; None when none was running."""
    answer = request(runs_dir, "stop")
    if answer is None:
        return None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not daemon_lives(runs_dir):
            return answer
        time.sleep(0.1)
    raise DaemonError(f"the daemon did not exit within {timeout_s:.0f} s; see {daemon_dir(runs_dir) / LOG_FILE}")
