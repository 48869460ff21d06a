"""What the tests of a kernel on TCP share (test_remote.py, test_remote_network.py, test_remote_floods.py,
test_hostile_load.py): a key directory with a key of each kind, a paced run listening on a free port, its connection
file, and a raw pyzmq client as an outsider would write one."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
import zlib
from pathlib import Path

import msgpack
import pytest
import zmq

from kernel_process import KernelProcess, wait_until
from trainbus.kernel.config import RunConfig
from trainbus.kernel.keys import KeyStore
from trainbus.proto.remote import CONNECTION_FILE, read_connection_file, secure_client

PACED = "fixture_targets:paced_digits"
STEPS_PER_EPOCH = 45
LIMITS = dict(raw=False, strict_map_key=True, max_str_len=1 << 20, max_bin_len=1 << 20, max_array_len=100_000,
              max_map_len=10_000, max_ext_len=0)
NOTHING_WINDOW_S = 2.0  # how long a refused client listens for anything at all (a good one hears ~20 heartbeats)
LIVENESS_S = 3.5  # a killed peer's name is held while it counts as live: 3 heartbeat intervals (peers.py)


@pytest.fixture
def keys(tmp_path) -> dict[str, Path]:
    """A key directory with a server pair, a monitor key, a control key and a revoked key; plus, outside it,
    an unknown client key and another server's key. Values are the secret files (public for `other_server`)."""
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    found = {"dir": store.directory, "server": store.server_secret}
    for name, role in (("watcher", "monitor"), ("pilot", "control"), ("former", "control"), ("late", "control")):
        found[name] = store.generate_client(name, role)[1]
    found["former"] = revoke_keeping_a_copy(store, "former", tmp_path)
    outside = KeyStore(tmp_path / "elsewhere")
    found["stranger"] = outside.generate_client("stranger", "control")[1]
    found["other_server"] = outside.generate_server()[0]
    return found


def revoke_keeping_a_copy(store: KeyStore, name: str, where: Path) -> Path:
    """Revoke a client key; its holder keeps a copy of the secret that the revocation deletes here."""
    secret = next(k.path for k in store.clients() if k.name == name).with_suffix(".key_secret")
    kept = where / secret.name
    shutil.copy(secret, kept)
    kept.chmod(0o600)
    store.revoke(name)
    return kept


def listening_config(runs: Path, keys_dir: Path, host: str = "127.0.0.1", epochs: int = 2,
                     step_sleep_s: float = 0.03, gate: Path | None = None) -> RunConfig:
    """A paced run listening on HOST:0; held where `gate` says (fixture_targets.open_gate), if given."""
    held = {"gate": str(gate)} if gate is not None else {}
    return RunConfig(target=PACED, epochs=epochs, device="cpu", runs_dir=str(runs), plugins=[],
                     hyperparameters={"step_sleep_s": step_sleep_s, **held}, checkpoint_every_n_epochs=0,
                     listen=f"{host}:0", keys_dir=str(keys_dir))


def connection(kernel: KernelProcess, timeout_s: float = 60.0) -> dict[str, str]:
    path = kernel.run_dir / CONNECTION_FILE

    def written():
        kernel._check_alive()
        return path.exists() and read_connection_file(path)
    return wait_until(written, timeout_s, "the run's connection file")


def local_control(kernel: KernelProcess, timeout_s: float = 60.0) -> str:
    """The run's ipc control endpoint, as kernel.log's `sockets:` line names it: in the run directory, or in a
    temporary one when the run directory's path is too long for a Unix socket (a test's, under xdist's)."""
    from trainbus.sdk.attach import SOCKETS_LINE

    def said():
        kernel._check_alive()
        found = SOCKETS_LINE.findall((kernel.run_dir / "kernel.log").read_text(errors="replace")) \
            if (kernel.run_dir / "kernel.log").exists() else []
        return found[-1][1] if found else None
    return wait_until(said, timeout_s, "the run's sockets line in kernel.log")


class RemoteClient:
    """SUBs (events, and bursts when the connection names them) + DEALER on a kernel's TCP endpoints in raw pyzmq +
    msgpack; CURVE when given a key file."""

    def __init__(self, conn: dict[str, str], key_file: Path | None = None, server_key: bytes | Path | None = None):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.bursts = self.ctx.socket(zmq.SUB)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, f"remote-{secrets.token_hex(4)}".encode())
        for sock in (self.sub, self.bursts, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            if key_file is not None:
                secure_client(sock, key_file, server_key or conn["server_key"].encode())
        # A test reads when it is ready to: what a run sends a test fits in memory, so no queue limit (1,000 events
        # by default) drops any of it meanwhile.
        for sub in (self.sub, self.bursts):
            sub.setsockopt(zmq.RCVHWM, 0)
        for sub in (self.sub, self.bursts):
            sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(conn["events"])
        if conn.get("bursts"):
            self.bursts.connect(conn["bursts"])
        self.dealer.connect(conn["control"])

    def send(self, type_: str, **fields) -> None:
        self.dealer.send(msgpack.packb({"v": 1, "type": type_, **fields}, use_bin_type=True), zmq.NOBLOCK)

    def hello(self, name: str, replies=("stop", "checkpoint_now")) -> None:
        self.send("hello", name=name, pid=os.getpid(), subscriptions=[""], replies=list(replies),
                  delivery="best_effort")

    def next_event(self, timeout_s: float) -> dict | None:
        if not self.sub.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(self.sub.recv_multipart()[1], **LIMITS)

    def next_burst(self, timeout_s: float) -> list[dict] | None:
        if not self.bursts.poll(int(timeout_s * 1000)):
            return None
        return msgpack.unpackb(zlib.decompress(self.bursts.recv()), **LIMITS)

    def reply(self, timeout_s: float, type_: str | None = None) -> dict | None:
        """The next control message (of `type_`, others skipped) within timeout_s, or None."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not self.dealer.poll(int(left * 1000)):
                return None
            msg = msgpack.unpackb(self.dealer.recv(), **LIMITS)
            if type_ is None or msg["type"] == type_:
                return msg
        return None

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def stopped_by(kernel: KernelProcess, conn: dict[str, str], key_file: Path, reason: str,
               timeout_s: float = 120.0) -> dict:
    """The run stopped by a control key's `stop` over TCP (a test done with it need not wait for its last epochs):
    its result. The client stays connected until the kernel has ended, so the stop is not lost with its socket."""
    pilot = RemoteClient(conn, key_file)
    try:
        pilot.hello("operator", replies=["stop"])
        pilot.send("stop", reason=reason)
        return kernel.result(timeout_s=timeout_s)
    finally:
        pilot.close()


def stopped_locally(kernel: KernelProcess, reason: str, timeout_s: float = 120.0) -> dict:
    """As stopped_by, from a peer on the run's ipc control socket holding its credential."""
    ctx = zmq.Context()
    try:
        pilot = ctx.socket(zmq.DEALER)
        pilot.setsockopt(zmq.LINGER, 0)
        pilot.connect(local_control(kernel))
        secret = (kernel.run_dir / "credential").read_text().strip()
        for message in ({"type": "hello", "name": "operator", "pid": os.getpid(), "subscriptions": [],
                         "replies": ["stop"], "delivery": "best_effort", "secret": secret},
                        {"type": "stop", "reason": reason}):
            pilot.send(msgpack.packb({"v": 1, **message}, use_bin_type=True))
        return kernel.result(timeout_s=timeout_s)
    finally:
        ctx.destroy(linger=0)


def heard_within(clients: dict[str, RemoteClient], seconds: float) -> dict[str, int]:
    """Events, bursts and control messages each client received in `seconds` (each polled in turn)."""
    heard, end = dict.fromkeys(clients, 0), time.monotonic() + seconds
    while time.monotonic() < end:
        for name, client in clients.items():
            heard[name] += client.next_event(0.01) is not None
            heard[name] += client.next_burst(0.01) is not None
            heard[name] += client.reply(0.01) is not None
    return heard


def three_ports_refusing() -> list[socket.socket]:
    """Sockets bound, not listening, to three consecutive loopback ports (bounded tries)."""
    for _ in range(50):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        held = [first]
        try:
            for offset in (1, 2):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", first.getsockname()[1] + offset))
            return held
        except OSError:  # taken: another base
            for bound in held:
                bound.close()
    raise AssertionError("no three consecutive free loopback ports in 50 tries")


def curve_dealers(ctx: zmq.Context, key_file: Path, server_key: bytes, endpoint: str, count: int) -> list[zmq.Socket]:
    """`count` DEALERs holding `key_file`, connected to `endpoint` (a kernel's control port, a daemon's), LINGER 0."""
    dealers = []
    for _ in range(count):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        secure_client(dealer, key_file, server_key)
        dealer.connect(endpoint)
        dealers.append(dealer)
    return dealers


def peak_growth_while_flooding(floods: list[zmq.Socket], message: bytes, seconds: float, process) -> int:
    """`message` sent on every socket as fast as each takes it for `seconds`: the most `process` (psutil.Process)
    grew in RSS meanwhile, in bytes."""
    before, grown, end = process.memory_info().rss, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for flood in floods:
            try:
                flood.send(message, zmq.NOBLOCK)
            except zmq.Again:
                pass
        grown = max(grown, process.memory_info().rss - before)
        time.sleep(0.001)
    return grown
