"""The daemon process: its lock, its log, its control endpoints and the loop that serves them (kernel/daemon.py
holds the queue it ticks).

The local endpoint is an ipc ROUTER in the owner-only `.daemon` directory: its peers are the owner (LOCAL), who
may ask everything. With `--listen` a CURVE ROUTER behind the ZAP authenticator (kernel/remote.py) sits beside
it; what each request may do comes from its connection's key (ZAP's User-Id), never from the request (OPS).
"""

from __future__ import annotations

import fcntl
import json
import logging
import logging.handlers
import os
import shlex
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq

from trainbus.proto import ProtocolError, unpack
from trainbus.proto.codec import MAX_CONTROL_CONTAINERS
from trainbus.proto.process import drain
from trainbus.proto.remote import advertised

from .answers import send_answer
from .credentials import bindable
from .daemon import TICK_S, Daemon
from .daemon_files import (CONTROL_MAX_BYTES, ENDPOINT_FILE, LOG_FILE, PID_FILE, REMOTE_FILE, DaemonError,
                           make_daemon_dir, private_append_fd)
from .daemon_queue import cancel, ended_jobs, epochs_of, local_user, resumed_run, submit, why_not_resumable
from .placement import detected_devices, unplaceable
from .private_dirs import write_private
from .registry import MAX_RESUMES, JobError, Registry, RegistryError, cannot_read
from .runs import RUNS_DIR_HINT
from .target import DEFAULT_TARGET

log = logging.getLogger("trainbus.daemon")
LOG_MAX_BYTES = 10 * 1024 * 1024  # daemon.log is rotated at this size, 3 old files kept


class Lock:
    """The flock on daemon.pid: one daemon per runs directory, released by the kernel however we exit."""

    def __init__(self, directory: Path):
        self.path = directory / PID_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 32).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise DaemonError(f"a daemon (pid {holder}) already serves {directory.parent}; `trainbus daemon status "
                              f"--runs-dir {shlex.quote(str(directory.parent))}` shows it") from None
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk: nothing the daemon writes (its log, its runs' output) would land
            os.close(self.fd)
            raise DaemonError(f"cannot write {self.path} ({exc.strerror or exc}); free space there, or give "
                              f"--runs-dir another place") from None


def serve(runs_dir: Path, devices: list[str] | None, max_concurrent: int, foreground_log: bool = True,
          listen: str | None = None, keys_dir: str | None = None) -> int:
    """Run the daemon until `stop` or SIGTERM/SIGINT; its runs go on training. Returns the exit code.

    listen: HOST:PORT of a TCP endpoint (CURVE, the keys of `trainbus keys`) beside the local one: a monitor
    key may ask status, a control key may also submit and cancel runs."""
    directory = make_daemon_dir(runs_dir)
    lock = Lock(directory)
    if not listen:  # a killed daemon's, naming a port nothing listens on (one listening writes its own)
        (directory / REMOTE_FILE).unlink(missing_ok=True)
    if not foreground_log:  # started by start_background: the log is ours now
        _output_into(directory / LOG_FILE)
    _log_to(directory / LOG_FILE, foreground_log)
    daemon = Daemon(runs_dir, detected_devices() if devices is None else devices, max_concurrent)
    # before the first round's lines (a run that ended while no daemon watched, one adopted): read top down, the log
    # would say the daemon before, killed maybe, saw them
    log.info("daemon pid %d starting for %s: settling the runs it finds, then serving", os.getpid(), daemon.runs_dir)
    remote = None
    try:
        # the TCP endpoint before the local one (a port it cannot bind leaves no endpoint file for clients to try) and
        # before the first round: a daemon that cannot start settles nothing it would then leave unwatched
        remote = Remote(listen, keys_dir, directory) if listen else None
        # a registry it cannot read: a refusal to start; the queued runs start once it serves (its log says so first)
        daemon.safe_tick(time.time(), fatal=(RegistryError,), start=False)
    except BaseException:  # ListenError, KeyFileError, DaemonError, RegistryError: each names its fix (the CLI)
        if remote is not None:  # bound, and then the registry refused: no endpoint left for clients to try
            remote.close()
            (directory / REMOTE_FILE).unlink(missing_ok=True)
        os.close(lock.fd)
        raise
    daemon.remote_endpoint = remote and remote.endpoint
    context = zmq.Context()
    socket, endpoint, socket_home = _bind_control(context, directory)
    stopping: list[str] = []
    refusals = Refusals()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signal.Signals(signum).name))
    # A run the daemon started is its child: its end (SIGCHLD) wakes the loop through this pipe, so the next queued
    # run starts then, not up to a round (TICK_S) later. (A run adopted from an earlier daemon is seen each round.)
    woken_r, woken_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous_wakeup_fd = signal.set_wakeup_fd(woken_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a Python handler: only then is the pipe written
    log.info("daemon pid %d serving %s: devices %s, max_concurrent %d, control %s%s", os.getpid(), daemon.runs_dir,
             ",".join(daemon.devices) or "none", max_concurrent, endpoint,
             f", remote {remote.endpoint}" if remote else "")
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    poller.register(woken_r, zmq.POLLIN)
    if remote:
        poller.register(remote.socket, zmq.POLLIN)
        poller.register(remote.crowd.monitor, zmq.POLLIN)
    try:
        next_tick = time.monotonic()  # the first round that starts runs: now
        while not stopping:
            ready = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000))))
            if woken_r in ready:  # a signal: a child's end (or a stop, which the loop's test sees)
                drain(woken_r)
                daemon.woken = daemon.woken or not stopping
            if socket in ready:
                _answer(socket, lambda frames: (LOCAL, f"the owner ({local_user()})"), daemon, stopping, refusals)
            if remote and remote.crowd.monitor in ready:
                old = (remote.socket, remote.crowd.monitor)
                if remote.cut_crowded():
                    for closed in old:
                        poller.unregister(closed)
                    poller.register(remote.socket, zmq.POLLIN)
                    poller.register(remote.crowd.monitor, zmq.POLLIN)
            if remote and remote.socket in ready:
                _answer(remote.socket, remote.peer_of, daemon, stopping, refusals)
            if time.monotonic() >= next_tick or daemon.woken:
                daemon.woken = False
                daemon.safe_tick(time.time())
                refusals.flush(time.monotonic())
                if remote:
                    remote.bind_unbound()
                next_tick = time.monotonic() + TICK_S
        log.info("daemon stopping (%s); %d run(s) still training, adopted by the next daemon: %s", stopping[0],
                 len(daemon.watched), ", ".join(daemon.watched) or "none")
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(previous_wakeup_fd)
        os.close(woken_r)
        os.close(woken_w)
        socket.close(linger=0)
        if remote:
            remote.close()
        context.term()
        (directory / ENDPOINT_FILE).unlink(missing_ok=True)
        if remote:  # its endpoint is gone with it (a copy taken elsewhere still pins the same server key)
            (directory / REMOTE_FILE).unlink(missing_ok=True)
        if socket_home != directory:
            import shutil

            shutil.rmtree(socket_home, ignore_errors=True)
        else:  # libzmq leaves the ipc socket's file behind as it closes
            (directory / CONTROL_SOCKET).unlink(missing_ok=True)
        os.close(lock.fd)
    return 0


LOCAL = "owner"  # the ipc endpoint's peers: only the owner can enter the 0700 directory it is in
STEERING = ("submit", "cancel", "stop")  # logged with who asked
# What each peer may ask: a remote monitor key the state, a control key also the queue; the owner everything.
OPS = {"status": ("monitor", "control", LOCAL), "submit": ("control", LOCAL), "cancel": ("control", LOCAL),
       "wake": (LOCAL,), "stop": (LOCAL,)}
ARGV_MAX_WORDS = 256
# A key's refused requests after its first: a count in daemon.log at most this often. A line each, a monitor key asking
# `submit` in a loop rotated every older line of the log (who submitted what, which run died) out in ~3 minutes.
REFUSED_LOG_EVERY_S = 10.0
# Requests a TCP connection may have queued in the daemon (a client sends one a connection and waits for its answer): at
# 100 (up to 64 KiB each), 32 connections of one monitor key sending them faster than the loop decodes them grew the
# daemon by ~180 MB in 15 s, up to 1.6 GB with 256. Past it TCP holds the sender back.
REMOTE_RCVHWM = 4
# Answers queued for a connection that does not read them (a status is a few KiB). Not fewer: the ROUTER drops an
# answer when the queue looks full, and it learns what libzmq's I/O thread took from it only every SNDHWM / 2
# messages, when the loop gets round to it; at 4, one request in ~50 went unanswered (at 16 too, now and then, on a
# busy box: kernel/answers.py then reads the socket's commands and tries once more).
REMOTE_SNDHWM = 16
REMOTE_RUNS_HINT = ("(--resume names a run of the daemon's runs directory: `trainbus daemon status --remote ...` "
                    "lists the runs it ended last)")
RUN_ID_MAX_CHARS = 200  # a request's run id, as far as it is read (ours are 22)


class Refusals:
    """Requests refused for their key's role, in daemon.log: a key's first at once, the ones after it as a count at
    most every REFUSED_LOG_EVERY_S (one entry per key of the key directory, and the owner's: bounded)."""

    def __init__(self) -> None:
        self._by: dict[str, tuple[float, int]] = {}  # who -> (when its last line was written, refused since)

    def refused(self, op: str, who: str, role: str | None, now: float) -> None:
        last, since = self._by.get(who, (-REFUSED_LOG_EVERY_S, 0))
        if now - last < REFUSED_LOG_EVERY_S:
            self._by[who] = (last, since + 1)
            return
        more = f"; {since} more refused from it since" if since else ""
        log.warning("refused %s from %s (role %s)%s", op, who, role or "none", more)
        self._by[who] = (now, 0)

    def flush(self, now: float) -> None:
        """The counts of keys that have stopped asking, once their interval is over (called every round)."""
        for who, (last, since) in list(self._by.items()):
            if since and now - last >= REFUSED_LOG_EVERY_S:
                log.warning("refused %d more request(s) from %s", since, who)
                self._by[who] = (now, 0)


class Remote:
    """The daemon's TCP endpoint: one CURVE ROUTER behind the ZAP authenticator (kernel/remote.py), each
    request carrying its connection's key (ZAP's User-Id), whose role says what it may ask (OPS)."""

    def __init__(self, listen: str, keys_dir: str | None, directory: Path):
        from trainbus.proto.remote import keys_dir as default_keys_dir
        from trainbus.proto.remote import load_secret

        from .keys import KeyRing, KeyStore
        from .remote import bind_error, check_listen, connection_cap, ipv6_for, start_authenticator

        store = KeyStore(default_keys_dir(keys_dir))
        host, port = check_listen(listen, store, ports=1)
        public, self._secret = load_secret(store.server_secret)
        self.keyring = KeyRing(store)
        self.context = zmq.Context()
        self.authenticator = start_authenticator(self.context, self.keyring)
        self.cap = connection_cap()  # a flood of connections with no key must not take the daemon's descriptors
        self.unbound = False  # cut_crowded could not bind the port again yet
        self.cuts = 0
        self.socket, self.crowd = self._router()
        ipv6_for(self.socket, host)
        try:
            self.socket.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as exc:
            self.close()
            raise DaemonError(str(bind_error(host, port, exc, ports=1))) from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        write_private(directory / REMOTE_FILE,
                      json.dumps({"endpoint": advertised(self.endpoint), "server_key": public.decode()}) + "\n")

    def _router(self) -> tuple[zmq.Socket, Any]:
        """A new, unbound CURVE ROUTER and the count of its connections (kernel/remote.py Crowd)."""
        from .remote import Crowd, curve_server

        socket = curve_server(self.context, zmq.ROUTER, self._secret, MAXMSGSIZE=CONTROL_MAX_BYTES, LINGER=0,
                              RCVHWM=REMOTE_RCVHWM, SNDHWM=REMOTE_SNDHWM, ROUTER_MANDATORY=1)
        return socket, Crowd(socket)

    def cut_crowded(self) -> bool:
        """Over `cap` connections at once (kernel/remote.py cut_crowded): the ROUTER closed and bound again on its
        port, every connection cut (a keyed client asks again); True when it was."""
        from .remote import bind_again

        if self.crowd.count() <= self.cap:
            return False
        self.crowd.close()
        self.socket.close(linger=0)
        self.socket, self.crowd = self._router()
        self.cuts += 1
        if self.cuts <= 10:  # a flood that goes on is cut again and again: its first lines say it
            log.warning("over %d TCP connections at once on %s: all of them cut", self.cap, self.endpoint)
        try:
            bind_again(self.socket, self.endpoint)
            self.unbound = False
        except zmq.ZMQError as exc:  # another process took the port in the moment it was free
            self.unbound = True
            log.error("could not bind %s again (%s): tried again every round", self.endpoint, exc)
        return True

    def bind_unbound(self) -> None:
        """Bind again what cut_crowded could not; called every round."""
        if self.unbound:
            try:
                self.socket.bind(self.endpoint)
            except zmq.ZMQError:
                return
            self.unbound = False
            log.info("bound %s again", self.endpoint)

    def peer_of(self, frames: list[zmq.Frame]) -> tuple[str | None, str]:
        """(role, who) of a request's connection: its key's, from ZAP's User-Id, never from the request."""
        key = self.keyring.lookup(frames[-1].get("User-Id") or "")
        if key is None:  # revoked since its handshake: nobody
            return None, "a revoked key"
        return key.role, f"key {key.name}"

    def close(self) -> None:
        self.crowd.close()
        self.socket.close(linger=0)
        self.authenticator.stop()
        self.context.term()


def _answer(socket: zmq.Socket, peer_of: Callable[[list[zmq.Frame]], tuple[str | None, str]], daemon: Daemon,
            stopping: list[str], refusals: Refusals) -> None:
    for _ in range(64):  # bounded per round: a flood of requests never starves the queue
        try:
            frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if len(frames) != 2:  # not one of ours: dropped unanswered
            continue
        try:
            # the wire's limits: a request is hostile until it checks out. A few containers make one (argv is a list):
            # 64 KB of empty arrays, decoded in full, cost ~9 ms of the loop each (C67b, as the kernel reads its peers)
            request = unpack(frames[1].bytes, max_containers=MAX_CONTROL_CONTAINERS)
        except ProtocolError:
            request = None
        op = request.get("op") if isinstance(request, dict) else None
        role, who = peer_of(frames)
        if not isinstance(op, str) or op not in OPS:  # a list or a map is unhashable: never looked up
            reply = {"ok": False, "error": f"unknown request; ops: {', '.join(OPS)}"}
        elif role not in OPS[op]:
            refusals.refused(op, who, role, time.monotonic())
            roles = [r for r in OPS[op] if r != LOCAL]
            fix = (f": it takes a {' or '.join(roles)} key (`trainbus keys generate client NAME --role {roles[-1]}` "
                   f"on the daemon's host)") if roles else ": only the daemon's owner, on its host, may"
            reply = {"ok": False, "error": f"{op} is not granted to this key (role {role or 'none'}){fix}"}
        else:
            try:
                reply = _do(op, request, daemon, stopping, who)
                if op in STEERING:
                    log.info("%s from %s: %s", op, who, reply)
            except Exception as exc:  # one request's fault (a field of an odd type) never takes the queue down
                log.exception("request %s failed", op)
                reply = {"ok": False, "error": f"{op} failed: {type(exc).__name__}: {exc}"}
        send_answer(socket, [frames[0], msgpack.packb(reply, default=str)])  # dropped: the peer is gone, or not reading


def _do(op: str, request: dict[str, Any], daemon: Daemon, stopping: list[str], who: str) -> dict[str, Any]:
    if op == "status":
        try:
            with Registry(daemon.runs_dir) as registry:
                queued = registry.job_ids(["queued"])  # at most registry.MAX_QUEUED: ~240 KB
                ended = ended_jobs(registry)  # how a submission went, for one who cannot `runs list` here
        except (sqlite3.Error, RegistryError, OSError) as exc:
            # the daemon serves all the same (its runs train, watched): status says so, and why its queue is unknown
            why = cannot_read(daemon.runs_dir, exc) if isinstance(exc, sqlite3.Error) else str(exc)
            return {"ok": True, **daemon.status(), "queued": [], "ended": [], "registry_error": why}
        return {"ok": True, **daemon.status(), "queued": queued, "ended": ended}
    if op == "wake":
        daemon.woken = True
        return {"ok": True}
    if op == "stop":
        stopping.append("stop requested")
        return {"ok": True, "running": list(daemon.watched)}
    if op == "cancel":  # a queued run is taken off the queue; a running one is stopped (who asked is its reason)
        run = str(request.get("run", ""))[:RUN_ID_MAX_CHARS]
        try:
            return {"ok": True, "run": cancel(daemon.runs_dir, run, by=who, remote=who != LOCAL)}
        except JobError as exc:
            if not run:  # no id at all
                return {"ok": False, "error": str(exc)}
            not_queued = str(exc)  # why, when it is not running either (cancelled already, ended, never submitted)
        try:
            return {"ok": True, "run": daemon.stop_run(run, who), "stopping": True}
        except JobError as exc:
            return {"ok": False, "error": str(exc) if "several" in str(exc) else not_queued}
    argv, gpus, max_resumes = request.get("argv"), request.get("gpus"), request.get("max_resumes", 0)
    if not (isinstance(argv, list) and len(argv) <= ARGV_MAX_WORDS and all(isinstance(w, str) for w in argv)) \
            or not (gpus is None or (isinstance(gpus, int) and 0 <= gpus <= 1024)) \
            or not (isinstance(max_resumes, int) and 0 <= max_resumes <= MAX_RESUMES):
        return {"ok": False, "error": f"submit needs argv (at most {ARGV_MAX_WORDS} strings), gpus (a count, or nil) "
                                      f"and max_resumes (0 to {MAX_RESUMES}, or left out)"}
    from .cli import SUBMIT_REFUSED, read_run_command  # it imports this module
    from .runs import new_run_id

    options = [w.split("=", 1)[0] for w in argv]
    if set(SUBMIT_REFUSED) & set(options):
        return {"ok": False, "error": "submit's argv is what `trainbus run` is given on the daemon's host: queued "
                                      "already, so no --detach, and the GPUs and resumes go as submit's own --gpus "
                                      "and --max-resumes"}
    if gpus is not None and (why := unplaceable(gpus, daemon.devices)) is not None:  # as `run --detach` says it
        return {"ok": False, "error": f"--gpus {gpus}: the run {why}"}
    # what the run would fail with once started, found only in its output
    command, refused = read_run_command(argv, submitted=True)
    if refused:
        return {"ok": False, "error": f"`trainbus run` would refuse the command: {refused}"}
    run_id, resumes = new_run_id(), None
    continued = resumed_run(argv, daemon.runs_dir) if "--config" not in options and "-c" not in options else None
    if isinstance(continued, str):  # --runs-dir and `runs list` are the host's: a key can ask the daemon's status
        return {"ok": False, "error": continued.replace(RUNS_DIR_HINT, REMOTE_RUNS_HINT)}
    if continued is not None:  # `--resume RUN`: that run goes on in place, under its own id (as `run --detach`)
        why = why_not_resumable(continued, epochs_of(argv), remote=True)  # what `run --resume RUN --detach` says
        if why:
            return {"ok": False, "error": why}
        run_id, resumes = continued.name, continued
    target = _target(command)
    argv = [*argv, "--runs-dir", str(daemon.runs_dir)]  # the last one given counts: this daemon's, whatever it said
    try:
        submit(daemon.runs_dir, run_id, argv, gpus, target, {}, resumes, env=None, cwd=os.getcwd(), wake=False,
               by=who, max_resumes=max_resumes)
    except JobError as exc:
        return {"ok": False, "error": str(exc)}
    daemon.woken = True
    return {"ok": True, "run": run_id}


def _target(command: dict[str, Any]) -> str | None:
    """The target a submitted `trainbus run` command trains, as `runs list` shows it while queued (or, failing
    before it had a directory, for good): its own, or the digits demo's; None when a --config file names it."""
    given = command.get("target")
    if given and "=" not in given:  # `lr=0.1` first is a flag, as `trainbus run` reads it
        return given
    return None if command.get("config") else DEFAULT_TARGET


SOCKET_HOME_PREFIX = "trainbus-daemon-"  # a temporary directory for the socket when the runs path is too long
CONTROL_SOCKET = "control.sock"


def _remove_killed_socket_home(directory: Path) -> None:
    """The temporary socket directory of a daemon of this runs directory that was killed (we hold the lock: it is gone),
    named in the endpoint file it left: it removes its own as it stops, and one killed left it, one more a crash."""
    import shutil

    try:
        endpoint = (directory / ENDPOINT_FILE).read_text().strip()
    except OSError:
        return
    home = Path(endpoint.removeprefix("ipc://")).parent
    if home.parent == Path(tempfile.gettempdir()) and home.name.startswith(SOCKET_HOME_PREFIX) \
            and home.is_dir() and home.stat().st_uid == os.getuid():
        shutil.rmtree(home, ignore_errors=True)


def _bind_control(context: zmq.Context, directory: Path) -> tuple[zmq.Socket, str, Path]:
    _remove_killed_socket_home(directory)
    home = directory
    if not bindable(directory / CONTROL_SOCKET):  # a long runs path: a short owner-only temp dir
        home = Path(tempfile.mkdtemp(prefix=SOCKET_HOME_PREFIX))
    endpoint = f"ipc://{home / CONTROL_SOCKET}"
    (home / CONTROL_SOCKET).unlink(missing_ok=True)  # a previous daemon killed with SIGKILL left it
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a queue that only looks full is said, and sent to again (answers.py)
    socket.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(endpoint)
    os.chmod(home / CONTROL_SOCKET, 0o600)
    write_private(directory / ENDPOINT_FILE, endpoint + "\n")
    return socket, endpoint, home


def _output_into(path: Path) -> None:
    """Our stdout and stderr (a crash's traceback, a library's warning) into the log at `path`, from here on.
    start_background points them at a file of its own until the lock is ours: a daemon that loses it says so
    there, not in the log of the one that won."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _DaemonLog(logging.handlers.RotatingFileHandler):
    """daemon.log, rotated. When our stdout and stderr go into it too (started in the background: _output_into), they
    follow it to the new file at each rotation: left on the old one, a crash's traceback went into daemon.log.1, and
    after three rotations into a deleted file, nowhere."""

    def __init__(self, path: Path, holds_output: bool):
        super().__init__(path, maxBytes=LOG_MAX_BYTES, backupCount=3, encoding="utf-8", errors="backslashreplace")
        self.holds_output = holds_output

    def _open(self):
        # owner-only, as kernel.log and the registry: it names what users ran and who submitted it. The handler's
        # own open() made it, and each rotation's new file, 0644; one an older trainbus made so is made 0600 too.
        return open(private_append_fd(Path(self.baseFilename)), "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:
        super().doRollover()
        if self.holds_output and self.stream is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self.stream.fileno(), 1)
            os.dup2(self.stream.fileno(), 2)


def _same_file(fd: int, path: Path) -> bool:
    try:
        ours, theirs = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _log_to(path: Path, also_stderr: bool) -> None:
    handler = _DaemonLog(path, holds_output=_same_file(2, path))  # _output_into pointed stderr at it
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    log.addHandler(handler)
    if also_stderr:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(formatter)
        log.addHandler(stream)
    log.setLevel(logging.INFO)
    log.propagate = False
