"""Hostile load on a live run, with real processes and real sockets: nothing is mocked.

An attacker runs in a process of its own (this file, run as a script) against a kernel in a process of
its own (tests/kernel_process.KernelProcess); the test watches the kernel's RSS and journal while it
lasts, and reads heartbeats, step times and plugin events from the journal afterwards.

    4. a welcomed external peer asks replay(from_seq=1) 200 times a second: heartbeats keep their
       interval, no plugin is lost, steps are as fast as without it
    5. 20,000 random-bytes messages a second at the control socket: no plugin is lost, metrics.jsonl
       has every epoch
    6. 10 stalled subscribers, plus peers sending 1 MB metric names (over the control socket's
       MAXMSGSIZE: libzmq drops the connection) and 200 KB ones (under it: truncated) 50 times a second
       each: kernel RSS and the journal stay bounded, training completes
    7. (issue #12) 10^5 hostile messages over CURVE from authorized keys and 200 raw TCP connections sending
       garbage or nothing: the kernel stays up, the final weights equal an unattacked run's, every raw
       connection is closed within the handshake timeout, the kernel's file descriptors return to baseline

Each has a short CI variant (a few seconds of attack) and a `slow` one with the spec's full figures.
Figures are printed as `HOSTILE <name>: ...` lines (pytest -s) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMED = "fixture_targets:digits_for_seconds"  # each epoch trains for epoch_s of wall time, whatever the machine
HEARTBEAT_INTERVAL_S = 1.0  # kernel/liveness.py; the journal's heartbeats after start_training_session
LOST = ("plugin_hung", "plugin_crashed", "plugin_exited", "plugin_failed", "plugin_restarted")


# ---------------------------------------------------------------------------------------------------
# The attacker: this file run as a script, `python test_hostile_load.py MODE PARAMS_JSON`; it prints
# one JSON line of what it did. Only zmq and msgpack, as any peer speaking PROTOCOL.md would.
# ---------------------------------------------------------------------------------------------------


def _attack_main(mode: str, params: dict) -> dict:
    import msgpack
    import zmq

    ctx = zmq.Context()
    run_dir = Path(params["run_dir"])
    from trainbus.sdk.attach import target_of

    target = target_of(str(run_dir))  # the run directory's sockets, or where kernel.log says (a path too long)
    control_endpoint, events_endpoint = target.control, target.events

    def pack(type_: str, **fields) -> bytes:
        return msgpack.packb({"v": 1, "type": type_, **fields}, use_bin_type=True)

    def dealer(routing_id: bytes, sndhwm: int = 1000) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.ROUTING_ID, routing_id)  # a reconnect keeps our identity
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, sndhwm)
        s.connect(control_endpoint)
        return s

    def hello(s: zmq.Socket, name: str, delivery: str, replies: list[str]) -> dict:
        """Say hello with the run's attach credential; the kernel's answer (welcome or refused)."""
        secret = (run_dir / "credential").read_text().strip()
        s.send(pack("hello", name=name, pid=os.getpid(), subscriptions=[], replies=replies, delivery=delivery,
                    votes=[], capabilities=[], secret=secret))
        if not s.poll(60_000):  # a hang guard: on a busy box the kernel answers late, not never
            raise SystemExit(f"{name}: no answer to hello in 60 s")
        return msgpack.unpackb(s.recv(), raw=False)

    def drain(s: zmq.Socket) -> tuple[int, int]:
        count = nbytes = 0
        while True:
            try:
                raw = s.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count, nbytes
            count, nbytes = count + 1, nbytes + len(raw)

    duration, out = float(params.get("duration_s", 0)), {}  # the tcp mode lasts as long as its frames take
    if mode == "replay":  # acceptance 4: a welcomed peer asking for the whole journal, over and over
        s = dealer(f"replayer-{os.getpid()}".encode())
        answer = hello(s, params["name"], params["delivery"], [])
        assert answer["type"] == "welcome", answer
        request, beat = pack("replay", from_seq=1), pack("heartbeat")
        rate, sent, batches, nbytes = float(params["rate"]), 0, 0, 0
        start = time.time()
        t0 = time.monotonic()
        next_beat = t0
        while (now := time.monotonic()) - t0 < duration:
            while sent < (now - t0) * rate:
                s.send(request)
                sent += 1
            if now >= next_beat:
                s.send(beat)
                next_beat = now + 1.0
            got, size = drain(s)
            batches, nbytes = batches + got, nbytes + size
            s.poll(max(0.0, min(t0 + (sent + 1) / rate, next_beat) - time.monotonic()) * 1000)  # until due or a batch
        end = time.time()
        s.send(pack("bye", reason="attack over"))
        out = {"sent": sent, "replay_batches": batches, "bytes": nbytes}

    elif mode == "garbage":  # acceptance 5: random bytes of random size, no hello, as fast as asked
        s = dealer(f"garbage-{os.getpid()}".encode())
        rng = random.Random(params.get("seed", 0))
        rate, max_size = float(params["rate"]), int(params["max_size"])
        sent = again = multipart = 0
        start = time.time()
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < duration:
            due = int((now - t0) * rate)
            while sent + again < due:
                size = rng.randrange(max_size) if rng.random() < 0.01 else rng.randrange(1, 512)
                try:
                    if rng.random() < 0.05:  # a few with more than one frame
                        s.send_multipart([os.urandom(rng.randrange(64)) for _ in range(rng.randrange(2, 5))],
                                         zmq.NOBLOCK)
                        multipart += 1
                    else:
                        s.send(os.urandom(size), zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:  # the kernel reads no faster: its queue and ours are full
                    again += 1
                if (sent + again) % 256 == 0 and time.monotonic() - t0 >= duration:
                    break
            time.sleep(0.0005)
        end = time.time()
        # The kernel reads this socket at a small share of its time: what it has not read when we leave is lost.
        # A connection is read in order and random bytes draw no answer (none is welcomed), so the welcome to a
        # hello sent last says every message before it was read.
        answer = hello(s, f"garbage-end-{os.getpid()}", "best_effort", [])
        assert answer["type"] == "welcome", answer
        s.send(pack("bye", reason="attack over"))
        s.poll(5000)  # its farewell (as the reference client, a bounded wait: nothing counted hangs on it)
        out = {"sent": sent, "again": again, "multipart": multipart}

    elif mode == "stall":  # acceptance 6: stalled subscribers, and metric names of 1 MB and 200 KB
        from zmq.utils.monitor import recv_monitor_message

        subs = []
        for _ in range(int(params["subscribers"])):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(events_endpoint)
            subs.append(sub)  # never read
        # SNDHWM 2: what libzmq keeps for a dropped connection is a couple of MB, not a GB
        huge, big = dealer(b"huge-names", sndhwm=2), dealer(b"big-names")
        monitor = huge.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        answers = [hello(huge, "huge-names", "best_effort", ["metric"]),
                   hello(big, "big-names", "best_effort", ["metric"])]
        assert [a["type"] for a in answers] == ["welcome", "welcome"], answers
        huge_msg = pack("metric", name="H" * int(params["huge_bytes"]), value=1.0, step=None)
        big_msg = pack("metric", name="B" * int(params["big_bytes"]), value=2.0, step=None)
        beat = pack("heartbeat")
        rate = float(params["rate"])
        sent = {"huge": 0, "huge_again": 0, "big": 0, "big_again": 0}
        connects = disconnects = 0
        start = time.time()
        t0 = time.monotonic()
        next_beat = t0
        n = 0
        while (now := time.monotonic()) - t0 < duration:
            while n < (now - t0) * rate:
                n += 1
                for key, s, msg in (("huge", huge, huge_msg), ("big", big, big_msg)):
                    try:
                        s.send(msg, zmq.NOBLOCK)
                        sent[key] += 1
                    except zmq.Again:
                        sent[key + "_again"] += 1
            if now >= next_beat:
                for s in (huge, big):
                    try:
                        s.send(beat, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                next_beat = now + 0.5
            while monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                connects += event == zmq.EVENT_CONNECTED
                disconnects += event == zmq.EVENT_DISCONNECTED
            drain(huge), drain(big)
            time.sleep(0.002)
        end = time.time()
        big.send(pack("bye", reason="attack over"))
        huge.disable_monitor()
        out = {**sent, "connects": connects, "disconnects": disconnects}

    elif mode == "tcp":  # remote acceptance 6: hostile frames from authorized keys, raw connections, over TCP
        start = time.time()
        out = _tcp_attack(ctx, params)
        end = time.time()

    else:
        raise SystemExit(f"unknown mode {mode}")
    ctx.destroy(linger=200)
    cpu = os.times()
    return {"start": start, "end": end, "cpu_s": round(cpu.user + cpu.system, 2), **out}


CONTROL_TYPES = ("hello", "heartbeat", "ack", "replay", "bye", "stop", "metric", "log", "checkpoint_now",
                 "checkpoint_saved", "checkpoint_failed", "snapshot", "attach_plugin", "detach_plugin",
                 "welcome", "replay_batch", "run_state", "refused", "no_such_type")  # PROTOCOL.md's, both ways
FIELDS = ("name", "pid", "seq", "from_seq", "reason", "value", "step", "level", "text", "replies", "delivery",
          "subscriptions", "id", "settings", "path", "events", "capabilities", "votes")
# ZMTP 3.0's 64-byte greeting asking for CURVE (RFC 23): a raw connection sends a cut of it, then stalls
ZMTP_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" + bytes(31)
OVERSIZED_BYTES = 300 * 1024  # over the control socket's MAXMSGSIZE (256 KiB): libzmq drops the connection


def _junk(rng: random.Random, depth: int = 0):
    """A random msgpack-able value: wrong types for any field, huge and negative ints, nested containers."""
    kinds = ["none", "int", "big", "neg", "float", "nan", "str", "bin", "bool"] + ["list", "map"] * (depth < 3)
    kind = rng.choice(kinds)
    if kind in ("list", "map"):
        items = [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
        return items if kind == "list" else {str(i) if rng.random() < 0.5 else i: v for i, v in enumerate(items)}
    return {"none": None, "int": rng.randrange(100), "big": 2**64 - 1, "neg": -2**63, "float": rng.random(),
            "nan": float("nan"), "str": "x" * rng.randrange(300), "bin": os.urandom(rng.randrange(64)),
            "bool": True}[kind]


def _hostile_frame(rng: random.Random, pack, name: str) -> tuple[str, list[bytes]]:
    """(kind, frames) of one message an authorized but hostile peer sends. It never declared stop or
    checkpoint_now in its hello, so even a well-formed one of those is refused, whatever its key's role."""
    roll = rng.random()
    if roll < 0.20:
        return "bytes", [os.urandom(rng.randrange(1, 512))]
    if roll < 0.40:
        return "msgpack", [pack(_junk(rng))]
    if roll < 0.60:  # a real type with fields of wrong types, or missing
        fields = {f: _junk(rng) for f in rng.sample(FIELDS, rng.randrange(len(FIELDS)))}
        return "wrong_types", [pack({"v": 1, "type": rng.choice(CONTROL_TYPES), **fields})]
    if roll < 0.66:
        return "bad_envelope", [pack({"v": rng.choice([0, 2, "1", None]), "type": rng.choice(CONTROL_TYPES)})]
    if roll < 0.70:
        return "multipart", [os.urandom(rng.randrange(64)) for _ in range(rng.randrange(2, 5))]
    if roll < 0.80:  # replay floods: from the start, from nowhere, from the far future
        return "replay", [pack({"v": 1, "type": "replay", "from_seq": rng.choice([0, 1, 1, 2**62])})]
    if roll < 0.85:
        return "snapshot", [pack({"v": 1, "type": "snapshot"})]
    if roll < 0.92:
        big = rng.random() < 0.02  # under MAXMSGSIZE: truncated by the kernel
        return "metric", [pack({"v": 1, "type": "metric", "name": "n" * (200_000 if big else 10),
                                "value": rng.random(), "step": None})]
    if roll < 0.97:
        return "ack", [pack({"v": 1, "type": "ack", "seq": rng.choice([0, 2**62, 2**63 - 1])})]
    if roll < 0.99:
        return "steer", [pack({"v": 1, "type": rng.choice(["stop", "checkpoint_now"]), "reason": "hostile"})]
    return "hello", [pack({"v": 1, "type": "hello", "name": name, "pid": os.getpid(), "subscriptions": [""],
                           "replies": ["metric", "log"], "delivery": rng.choice(["best_effort", "durable"])})]


def _watch_closed(raw: list, give_up_s: float, closed_after: list) -> None:
    """Append, for each raw connection, the seconds from its connect until the kernel closed it (None: not
    closed within give_up_s). Reads what the kernel sends (its greeting) until end of stream or a reset."""
    import select

    pending = {tcp: connected_at for tcp, connected_at in raw}
    end = time.monotonic() + give_up_s
    while pending and time.monotonic() < end:
        readable, _, _ = select.select(list(pending), [], [], 0.05)
        for tcp in readable:
            try:
                if tcp.recv(65536):
                    continue
            except BlockingIOError:
                continue
            except OSError:  # a reset: closed all the same
                pass
            closed_after.append(time.monotonic() - pending.pop(tcp))
    closed_after.extend([None] * len(pending))


def _tcp_attack(ctx, params: dict) -> dict:
    """Raw TCP connections (random bytes, a cut ZMTP greeting, or nothing) left open at both TCP endpoints,
    then `frames` hostile messages over CURVE from a monitor-role and a control-role key, welcomed first,
    plus a few over MAXMSGSIZE on a connection of their own."""
    import socket
    import threading

    import msgpack
    import zmq
    import zmq.auth
    from zmq.utils.monitor import recv_monitor_message

    rng = random.Random(params["seed"])
    server_key = params["server_key"].encode()

    def pack(value) -> bytes:
        return msgpack.packb(value, use_bin_type=True)

    raw = []
    for i in range(int(params["connections"])):
        host, port = params[("control", "events")[i % 2]].removeprefix("tcp://").rsplit(":", 1)
        tcp = socket.create_connection((host, int(port)), timeout=30)
        sends = (b"", os.urandom(rng.randrange(1, 4096)), ZMTP_GREETING[:rng.randrange(1, 64)])[i % 3]
        tcp.sendall(sends)
        tcp.setblocking(False)
        raw.append((tcp, time.monotonic()))
    closed_after: list = []
    watcher = threading.Thread(target=_watch_closed, args=(raw, float(params["close_give_up_s"]), closed_after))
    watcher.start()

    def dealer(key_file: str, routing_id: bytes) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(key_file)
        s.curve_serverkey = server_key
        s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 60_000)  # every frame goes out, as fast as the kernel reads
        s.connect(params["control"])
        return s

    peers = [(dealer(params[role + "_key"], f"{role}-{os.getpid()}".encode()), f"hostile-{role}")
             for role in ("monitor", "control")]
    for s, name in peers:
        s.send(pack({"v": 1, "type": "hello", "name": name, "pid": os.getpid(), "subscriptions": [""],
                     "replies": ["metric", "log"], "delivery": "best_effort"}))
        if not s.poll(30_000):
            raise SystemExit(f"{name}: no answer to hello in 30 s")
        answer = msgpack.unpackb(s.recv(), raw=False)
        assert answer["type"] == "welcome", answer
    oversized = dealer(params["monitor_key"], b"oversized")
    monitor = oversized.get_monitor_socket(zmq.EVENT_DISCONNECTED)

    frames = int(params["frames"])
    n_oversized = max(1, frames // 2000)  # each costs the connection: the next goes out once it reconnected
    by_kind: dict[str, int] = {"oversized": n_oversized}
    received = disconnects = 0

    def next_oversized(wait_ms: int) -> None:
        """Count the kernel's drops of the oversized connection; after each, queue the next oversized message."""
        nonlocal disconnects
        while disconnects < n_oversized and monitor.poll(wait_ms):
            disconnects += recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
            if disconnects < n_oversized:
                oversized.send(os.urandom(OVERSIZED_BYTES))

    def read_to_the_end(s: zmq.Socket, name: str) -> int:
        """Return once the kernel has read every frame sent on `s`, then say bye (the answers read meanwhile,
        counted). What is still queued when the attacker exits is lost, and the kernel reads a connection a few
        messages at a time at a small share of its bus thread: beside busy cores a good part of the attack was still
        queued as it ended, never counted. A connection's messages are read in order, so an answer to the last one
        proves the rest were read; it must be one no hostile frame draws (a hostile hello draws `welcome`, a bye
        `farewell`): a hello under a name of its own, then a snapshot, whose run_state names that name only once the
        hello was read. A snapshot is dropped while the key's replay budget is short, and a reply while the
        connection's queue is full: it is asked again."""
        final = f"{name}-last-{os.getpid()}"  # no hostile frame says it
        s.send(pack({"v": 1, "type": "hello", "name": final, "pid": os.getpid(), "subscriptions": [""],
                     "replies": [], "delivery": "best_effort"}))
        count, give_up, read = 0, time.monotonic() + 60, False  # a hang guard: on a busy box late, not never
        while not read and time.monotonic() < give_up:
            s.send(pack({"v": 1, "type": "snapshot"}))
            ask_again = time.monotonic() + 1.0
            while not read and s.poll(max(0.0, ask_again - time.monotonic()) * 1000):
                answer = msgpack.unpackb(s.recv_multipart()[-1], raw=False)
                count += 1
                read = answer["type"] == "run_state" and any(p.startswith(final)
                                                             for p in answer["state"].get("plugins", {}))
        if not read:
            raise SystemExit(f"{name}: the kernel had not read the attack's last frames 60 s after they were sent")
        # every hostile frame was answered before that run_state: a farewell now is this bye's (waited for
        # boundedly, as the reference client does: a bye still unread then is lost, and the name forgotten as silent)
        s.send(pack({"v": 1, "type": "bye", "reason": "attack over"}))
        give_up = time.monotonic() + 5
        while s.poll(max(0.0, give_up - time.monotonic()) * 1000):
            count += 1
            if msgpack.unpackb(s.recv_multipart()[-1], raw=False)["type"] == "farewell":
                break
        return count

    oversized.send(os.urandom(OVERSIZED_BYTES))
    for n in range(frames - n_oversized):
        s, name = peers[n % 2]
        kind, message = _hostile_frame(rng, pack, name)
        s.send_multipart(message)
        by_kind[kind] = by_kind.get(kind, 0) + 1
        if n % 64 == 0:  # what the kernel answers (replay batches, refusals, run states): read and dropped
            for s, _ in peers:
                while s.poll(0):
                    s.recv_multipart()
                    received += 1
            next_oversized(0)
    end = time.monotonic() + 30
    while disconnects < n_oversized and time.monotonic() < end:
        next_oversized(100)
    oversized.disable_monitor()
    for s, name in peers:
        received += read_to_the_end(s, name)
    watcher.join()
    for tcp, _ in raw:
        tcp.close()
    closed = [c for c in closed_after if c is not None]
    return {"frames": frames, "by_kind": by_kind, "answers_received": received,
            "oversized_disconnects": disconnects, "raw_connections": len(raw),
            "raw_still_open": closed_after.count(None), "raw_close_s_max": round(max(closed, default=0.0), 2)}


if __name__ == "__main__":
    print(json.dumps(_attack_main(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------

import psutil  # noqa: E402

from trainbus.kernel.config import RunConfig  # noqa: E402
from trainbus.kernel.plugin_names import resolve_plugin  # noqa: E402
from trainbus.kernel.journal import read_events  # noqa: E402
from trainbus.proto import JOURNAL_NAME  # noqa: E402

from kernel_process import KernelProcess, of  # noqa: E402


def config(tmp_path: Path, epochs: int, epoch_s: float = 1.0, batch_size: int = 4) -> RunConfig:
    """The digits demo at batch 4 (~2,400 events a second), each epoch `epoch_s` of training, with a durable
    plugin (metrics_log) and a best-effort one (the CPU monitor, which sends metric replies)."""
    return RunConfig(target=TIMED, epochs=epochs, seed=0, device="cpu", runs_dir=str(tmp_path / "runs"),
                     hyperparameters={"batch_size": batch_size, "epoch_s": epoch_s},
                     plugins=[resolve_plugin("metrics_log", {}), resolve_plugin("cpu", {"interval_s": 1.0})])


class Attack:
    """The attacker process, started once the kernel trains; what it reported when it ends."""

    def __init__(self, mode: str, kernel: KernelProcess, **params):
        kernel.wait_step(1, timeout_s=60)  # plugins said hello, training runs: the startup phase is over
        self.proc = subprocess.Popen([sys.executable, __file__, mode, json.dumps({"run_dir": str(kernel.run_dir),
                                                                                  **params})],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Teardown of a test that failed halfway (the `kernels` fixture calls it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def report(self, timeout_s: float = 60) -> dict:
        out, err = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, f"attacker exited {self.proc.returncode}:\n{err[-3000:]}"
        return json.loads(out.strip().splitlines()[-1])


def watch(kernel: KernelProcess, attack: Attack) -> dict:
    """Kernel RSS and journal size every 50 ms while the attack lasts: first and largest of each."""
    process = psutil.Process(kernel.pid)
    journal = kernel.run_dir / JOURNAL_NAME
    rss, size, cpu = [], [], []
    while attack.running():
        try:
            rss.append(process.memory_info().rss)
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            break
        cpu.append(times.user + times.system)
        size.append(journal.stat().st_size)
        time.sleep(0.05)
    if not rss:
        attack.report()  # says why the attacker ended at once
        raise AssertionError("the attack ended before the kernel could be watched")
    return {"rss_first": rss[0], "rss_max": max(rss), "journal_first": size[0], "journal_last": size[-1],
            "kernel_cpu_s": round(cpu[-1] - cpu[0], 2)}


def step_times(events, start: float = 0.0, end: float = float("inf")) -> list[float]:
    """Seconds between consecutive end_training_batch events of one epoch, both within [start, end]."""
    batches = [e for e in of(events, "end_training_batch") if start <= e.ts <= end]
    return [b.ts - a.ts for a, b in zip(batches, batches[1:]) if a.epoch == b.epoch]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def heartbeat_gaps(events) -> list[float]:
    """Gaps between the journal's heartbeats from start_training_session (the 1 s phase) to the final event."""
    first = of(events, "start_training_session")[0].seq
    last = of(events, "end_training_session")[0].seq
    beats = [e for e in of(events, "heartbeat") if first < e.seq < last]
    return [b.ts - a.ts for a, b in zip(beats, beats[1:])]


def assert_no_plugin_lost(events) -> None:
    final = of(events, "end_training_session")
    assert final, "the run has no end_training_session"
    spawned = {e.data["plugin"] for e in of(events, "plugin_started")}  # attackers attach by hand, leave with bye
    lost = [(e.type, e.data) for e in events if e.type in LOST and e.seq < final[0].seq and e.data["plugin"] in spawned]
    assert not lost, f"plugins lost under attack: {lost}"


def assert_metrics_log_complete(run_dir: Path, events) -> None:
    """metrics.jsonl has a record for every end_epoch (and the session's end), by seq."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["seq"] for r in records if r["kind"] == "epoch"}
    want = {e.seq for e in of(events, "end_epoch")}
    assert want and epochs == want, f"metrics.jsonl epoch records {sorted(epochs)}, journal end_epochs {sorted(want)}"
    assert [r for r in records if r["kind"] == "session_end"], "metrics.jsonl has no session_end record"


def finish(kernel: KernelProcess, timeout_s: float = 120) -> tuple[dict, list]:
    result = kernel.result(timeout_s)
    assert result["status"] == "completed", result
    assert not result["bus"].get("bus_errors"), f"the bus thread raised; see {kernel.run_dir / 'kernel.log'}"
    return result, read_events(kernel.run_dir)


# -- 4. replay(from_seq=1) 200 times a second ---------------------------------------------------------


@pytest.fixture(scope="module")
def replay_baselines(tmp_path_factory):
    """Median step time of attack-free runs, by epochs; each run once per module."""
    cache: dict[int, float] = {}

    def get(epochs: int, fresh: bool = False) -> float:
        """fresh: run it again now, right before the run it is compared with (the box's load drifts)."""
        if fresh or epochs not in cache:
            tmp = tmp_path_factory.mktemp("baseline")
            kernel = KernelProcess(config(tmp, epochs), tmp)
            try:
                _, events = finish(kernel)
            finally:
                kernel.kill()
            cache[epochs] = median(step_times(events))
        return cache[epochs]
    return get


def replay_flood(tmp_path, kernels, baseline_step_s: float, epochs: int, attack_s: float, delivery: str) -> dict:
    kernel = KernelProcess(config(tmp_path, epochs), tmp_path)
    kernels.append(kernel)
    attack = Attack("replay", kernel, name="replayer", delivery=delivery, rate=200, duration_s=attack_s)
    kernels.append(attack)  # killed at teardown too, if the test fails halfway
    memory = watch(kernel, attack)
    report = attack.report()
    result, events = finish(kernel)

    assert_no_plugin_lost(events)
    gaps = heartbeat_gaps(events)
    window = [e.ts for e in of(events, "heartbeat") if report["start"] <= e.ts <= report["end"]]
    assert len(window) >= attack_s / HEARTBEAT_INTERVAL_S - 2, f"heartbeats during the attack: {window}"
    attacked = step_times(events, report["start"], report["end"])
    ratio = median(attacked) / baseline_step_s
    # the same run's steps outside the attack (after it, and before it from the second epoch on): another yardstick
    calm = step_times([e for e in events if e.epoch > 1 and not report["start"] - 0.5 <= e.ts <= report["end"] + 0.5])
    served = result["bus"].get("replayed", 0)
    figures = {"delivery": delivery, "attack_s": round(report["end"] - report["start"], 1),
               "replay_requests": report["sent"], "replay_batches_received": report["replay_batches"],
               "replay_mb_received": round(report["bytes"] / 2**20, 1), "heartbeat_max_gap_s": round(max(gaps), 3),
               "step_ms_attacked": round(median(attacked) * 1e3, 3),
               "step_ms_baseline": round(baseline_step_s * 1e3, 3),
               "step_ratio": round(ratio, 3),
               "step_ms_same_run_outside_attack": round(median(calm) * 1e3, 3) if calm else None,
               "attacker_cpu_s": report["cpu_s"], "kernel_cpu_s_during_attack": memory["kernel_cpu_s"],
               "rss_growth_mb": round((memory["rss_max"] - memory["rss_first"]) / 2**20, 1),
               "kernel_replayed_events": served}
    print(f"\nHOSTILE replay_flood: {json.dumps(figures)}")

    # the attacker was welcomed and served, within its replay budget (50 batches/s, a 2 s burst)
    assert report["sent"] >= 0.5 * 200 * attack_s, report
    assert 0 < report["replay_batches"] <= 50 * (attack_s + 2) + 100, report
    assert max(gaps) <= 2 * HEARTBEAT_INTERVAL_S, f"heartbeat gaps {sorted(gaps)[-5:]}"
    return figures


def test_replay_flood_short(tmp_path, kernels, replay_baselines):
    """CI: ~4 s of 200 replay(1)/s from a durable attached peer; step time recorded, asserted generously.

    Two runs on a shared 2-core box differ by up to ~50 % in step time whatever they do (1.51x against both
    yardsticks with two CPU burners and three test workers on 2 cores), so the CI check is against the better of
    two yardsticks (the attack-free run, and this run's own steps outside the attack), with a margin that holds
    on busy cores: it catches a flood that takes over the training thread, not a 10 % drift, which
    the 30 s soak's 1.10 is for."""
    # the baseline's median step needs no more than a few epochs: thousands of steps at batch 4
    figures = replay_flood(tmp_path, kernels, replay_baselines(4), epochs=8, attack_s=4.0, delivery="durable")
    same_run = figures["step_ms_attacked"] / (figures["step_ms_same_run_outside_attack"] or float("inf"))
    assert min(figures["step_ratio"], same_run) < 2.0, figures


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("delivery", ["durable", "best_effort"])
def test_replay_flood_30s(tmp_path, kernels, replay_baselines, delivery):
    """The spec: 200 replay(1)/s for 30 s; heartbeats within 2x, no plugin lost, steps within 10 %."""
    baseline = replay_baselines(36, fresh=True)
    figures = replay_flood(tmp_path, kernels, baseline, epochs=36, attack_s=30.0, delivery=delivery)
    assert figures["step_ratio"] <= 1.10, figures


# -- 5. random bytes at the control socket --------------------------------------------------------


def garbage_flood(tmp_path, kernels, epochs: int, attack_s: float) -> dict:
    kernel = KernelProcess(config(tmp_path, epochs), tmp_path)
    kernels.append(kernel)
    seed = fresh_seed()
    attack = Attack("garbage", kernel, rate=20_000, duration_s=attack_s, max_size=64 * 1024, seed=seed)
    kernels.append(attack)  # killed at teardown too, if the test fails halfway
    memory = watch(kernel, attack)
    report = attack.report()
    result, events = finish(kernel)

    assert_no_plugin_lost(events)
    assert_metrics_log_complete(kernel.run_dir, events)
    gaps = heartbeat_gaps(events)
    bus = result["bus"]
    figures = {"attack_s": round(report["end"] - report["start"], 1), "sent": report["sent"], "again": report["again"],
               "sent_per_s": round(report["sent"] / (report["end"] - report["start"])),
               "kernel_malformed": bus.get("malformed", 0), "heartbeat_max_gap_s": round(max(gaps), 3),
               "rss_growth_mb": round((memory["rss_max"] - memory["rss_first"]) / 2**20, 1),
               "epochs": len(of(events, "end_epoch")), "seed": seed}
    print(f"\nHOSTILE garbage_flood: {json.dumps(figures)}")
    # every message that got out reached the kernel and was dropped as malformed (none slipped through): the
    # attacker left only once the kernel had read all it sent
    assert bus.get("malformed", 0) >= report["sent"], (bus, report)
    assert max(gaps) <= 2 * HEARTBEAT_INTERVAL_S, f"heartbeat gaps {sorted(gaps)[-5:]}"
    return figures


def test_garbage_flood_short(tmp_path, kernels):
    """CI: ~2 s of random-bytes messages at up to 20,000/s; every plugin stays, metrics.jsonl is complete. The kernel
    reads its ipc control socket for at most 5 % of its bus thread's time (kernel/control_reading.py
    LOCAL_CONTROL_SHARE): what it does not take waits with the attacker (`again`), so the attack is what was tried,
    sent or held back."""
    figures = garbage_flood(tmp_path, kernels, epochs=5, attack_s=2.0)
    assert figures["sent"] + figures["again"] >= 0.25 * 20_000 * 2.0, figures  # it really happened, on a busy box too
    assert figures["sent"] >= 1_000, figures  # and the kernel read a good part of it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_garbage_flood_20s(tmp_path, kernels):
    """The spec: 20,000 random-bytes messages a second for 20 s."""
    figures = garbage_flood(tmp_path, kernels, epochs=26, attack_s=20.0)
    assert (figures["sent"] + figures["again"]) / figures["attack_s"] >= 15_000, figures  # tried: sent or held back


# -- 6. stalled subscribers and oversized metric names --------------------------------------------


def stalled_and_huge(tmp_path, kernels, epochs: int, attack_s: float) -> dict:
    kernel = KernelProcess(config(tmp_path, epochs), tmp_path)
    kernels.append(kernel)
    attack = Attack("stall", kernel, subscribers=10, rate=50, duration_s=attack_s,
                    huge_bytes=1 << 20, big_bytes=200_000)
    kernels.append(attack)  # killed at teardown too, if the test fails halfway
    memory = watch(kernel, attack)
    report = attack.report()
    result, events = finish(kernel, timeout_s=180)

    assert_no_plugin_lost(events)
    assert_metrics_log_complete(kernel.run_dir, events)
    bus = result["bus"]
    rss_growth = memory["rss_max"] - memory["rss_first"]
    journal_growth = memory["journal_last"] - memory["journal_first"]
    big = of(events, "metric", "big-names")
    figures = {"attack_s": round(report["end"] - report["start"], 1),
               "rss_first_mb": round(memory["rss_first"] / 2**20),
               "rss_growth_mb": round(rss_growth / 2**20, 1), "journal_growth_mb": round(journal_growth / 2**20, 2),
               "huge_sent": report["huge"], "huge_again": report["huge_again"],
               "huge_disconnects": report["disconnects"], "big_sent": report["big"],
               "metric_truncated": bus.get("metric_truncated", 0), "big_metrics_journaled": len(big),
               "heartbeat_max_gap_s": round(max(heartbeat_gaps(events)), 3)}
    print(f"\nHOSTILE stalled_and_huge: {json.dumps(figures)}")

    assert rss_growth <= 200 * 2**20, figures
    assert journal_growth <= 50 * 2**20, figures
    # 1 MB names never reach the kernel's code: libzmq drops the connection (MAXMSGSIZE), the peer reconnects
    assert not of(events, "metric", "huge-names"), "a message over MAXMSGSIZE reached the kernel"
    assert report["huge"] >= 1 and report["disconnects"] >= 1, report
    # 200 KB names are under the cap: counted as truncated, republished cut to 200 characters, a marker included
    assert bus.get("metric_truncated", 0) >= 0.5 * report["big"], figures
    assert big and all(e.data["name"].startswith("B" * 150) and e.data["name"].endswith(" chars]") for e in big)
    assert max(len(e.data["name"]) for e in of(events, "metric")) <= 200
    return figures


def test_stalled_subscribers_and_huge_names_short(tmp_path, kernels):
    """CI: ~3 s of 10 stalled subscribers, 1 MB and 200 KB metric names at 50/s each."""
    stalled_and_huge(tmp_path, kernels, epochs=6, attack_s=3.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stalled_subscribers_and_huge_names_30s(tmp_path, kernels):
    """The spec's figures, 30 s of it: the stalled subscribers' queues fill up to their high-water mark."""
    stalled_and_huge(tmp_path, kernels, epochs=36, attack_s=30.0)


# -- 7. the TCP endpoint: hostile frames from authorized keys, raw connections ---------------------

from fixture_targets import open_gate  # noqa: E402
from helpers import assert_same_weights, fresh_seed, run_config  # noqa: E402
from kernel_process import wait_until  # noqa: E402
from remote_support import PACED, STEPS_PER_EPOCH, connection, keys  # noqa: E402, F401 (keys: a fixture)
from trainbus.kernel.session import run_training  # noqa: E402
from trainbus.proto.remote import HANDSHAKE_IVL_MS  # noqa: E402

TCP_EPOCHS = 2
HELD_BEFORE_END = 5  # steps: the gate holds the run there until the attack is over, however long it takes
CLOSE_MARGIN_S = 5.0  # past HANDSHAKE_IVL, for a loaded machine (test_remote's handshake test allows the same)
FDS_SETTLE_S = 30.0  # the kernel closes what the attack left open within this (a bounded wait, not a figure)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_attack(tmp_path, kernels, keys, frames: int, connections: int) -> dict:
    """A listening run held by a gate a few steps before its end (so the attack always overlaps it), attacked
    over TCP; then the gate opens and the run must end as an unattacked run of the same seed ends."""
    total = TCP_EPOCHS * STEPS_PER_EPOCH
    gate = tmp_path / "gate"
    open_gate(gate, total - HELD_BEFORE_END)
    kernel = KernelProcess(run_config(tmp_path / "runs", epochs=TCP_EPOCHS, target=PACED, step_sleep_s=0.02,
                                      gate=str(gate), checkpoint_every_n_epochs=0, listen="127.0.0.1:0",
                                      keys_dir=str(keys["dir"])), tmp_path)
    kernels.append(kernel)
    # the unattacked run, here while that kernel starts (torch is imported here already: a second or two)
    reference = run_training(run_config(tmp_path / "reference", epochs=TCP_EPOCHS, target=PACED, step_sleep_s=0.0,
                                        checkpoint_every_n_epochs=0))
    assert reference.status == "completed", reference
    conn = connection(kernel)
    kernel.wait_step(1, timeout_s=60)
    fds_before = open_fds(kernel.pid)  # the listener is up and training runs
    seed = fresh_seed()
    attack = Attack("tcp", kernel, control=conn["control"], events=conn["events"], server_key=conn["server_key"],
                    monitor_key=str(keys["watcher"]), control_key=str(keys["pilot"]), frames=frames,
                    connections=connections, seed=seed, close_give_up_s=HANDSHAKE_IVL_MS / 1000 + 30)
    kernels.append(attack)  # killed at teardown too, if the test fails halfway
    memory = watch(kernel, attack)
    report = attack.report(timeout_s=600)
    kernel._check_alive()
    fds_after_attack = open_fds(kernel.pid)  # the attacker has exited; what it opened may still be closing
    wait_until(lambda: open_fds(kernel.pid) <= fds_before, FDS_SETTLE_S,
               f"the kernel's open file descriptors back to their {fds_before} of before the attack", poll_s=0.1)
    open_gate(gate, total)
    result, events = finish(kernel)
    figures = {**report, "seed": seed, "attack_s": round(report["end"] - report["start"], 1),
               "fds_before": fds_before, "fds_after_attack": fds_after_attack,
               "kernel_malformed": result["bus"].get("malformed", 0),
               "kernel_refused": {k: v for k, v in result["bus"].items() if k.startswith("refused_")},
               "rss_growth_mb": round((memory["rss_max"] - memory["rss_first"]) / 2**20, 1)}
    figures.pop("start"), figures.pop("end")
    print(f"\nHOSTILE tcp_attack: {json.dumps(figures)}")

    assert report["raw_still_open"] == 0, figures
    assert report["raw_close_s_max"] <= HANDSHAKE_IVL_MS / 1000 + CLOSE_MARGIN_S, figures
    assert report["oversized_disconnects"] >= 1, figures
    # every garbled message reached the kernel during the run and was dropped there (none slipped through): the
    # attacker left only once the kernel had read all it sent
    garbled = sum(report["by_kind"].get(k, 0) for k in ("bytes", "msgpack", "multipart", "bad_envelope"))
    assert figures["kernel_malformed"] >= garbled, figures
    assert not result["outcome"]["stopped_early"] and not result["outcome"]["stop_reasons"], result["outcome"]
    assert not of(events, "stop_requested")
    assert_same_weights(result["run_dir"], reference.run_dir)
    return figures


def test_tcp_attack_short(tmp_path, kernels, keys):
    """CI: 10^4 hostile frames over CURVE and 30 raw connections; the same checks as the spec's figures."""
    tcp_attack(tmp_path, kernels, keys, frames=10_000, connections=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tcp_attack_full(tmp_path, kernels, keys):
    """The spec (issue #12): 10^5 hostile frames at the TCP control endpoint during a run and 200 raw TCP
    connections sending garbage or nothing: the kernel stays up, the run's final weights equal an unattacked
    run's, the connections are closed within the handshake timeout, file descriptors return to their baseline."""
    tcp_attack(tmp_path, kernels, keys, frames=100_000, connections=200)
