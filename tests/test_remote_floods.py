"""What a key (or no key) that floods or hoards over TCP costs the kernel: bounded, and training goes on.

Connections that never finish their handshake, peers that ask for replays or subscribe and never read, a key that
fills the peer table, sends costly or cheap messages as fast as the kernel takes them, or reports at its budget for
days: each against a real kernel in its own process listening on 127.0.0.1 (port 0: free ones), the attacker raw
pyzmq + msgpack as an outsider would write it. Nothing is mocked. A network that fails remote clients:
test_remote_network.py; who gets in: test_remote.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import time

import msgpack
import pytest
import zmq

from fixture_targets import open_gate
from kernel_process import KernelProcess, of, wait_until
from trainbus.kernel.journal import read_events
from trainbus.kernel.limits import BURST_S, LOGS_PER_S
from trainbus.kernel.remote import TCP_EVENTS_HWM
from trainbus.proto import pack
from trainbus.proto.remote import secure_client

from remote_support import (LIMITS, STEPS_PER_EPOCH, RemoteClient, connection, curve_dealers,  # noqa: F401
                            keys, listening_config, local_control, peak_growth_while_flooding, stopped_by,
                            stopped_locally)


def test_a_flood_of_connections_with_no_key_costs_the_kernel_a_bounded_number_of_descriptors(keys, runs_dir, tmp_path,
                                                                                              kernels):
    """libzmq accepts every TCP connection and holds it, a descriptor of the kernel's, until its handshake times out
    (5 s): 1,100 connections with no key, reopened as they were closed, made a run that trained to its end fail to
    save final.pt (EMFILE). A socket holding more than CONNECTIONS_PER_SOCKET connections is now closed and bound
    again, cutting them all: the kernel holds a bounded number, a keyed monitor hears the run again once the flood
    stops, and the run completes."""
    from helpers import flood_connections
    from trainbus.kernel.remote import CONNECTIONS_PER_SOCKET

    gate = tmp_path / "gate"  # held at its first batch while the flood goes on
    kernel = KernelProcess(listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate), tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    watcher = RemoteClient(conn, keys["watcher"])
    try:
        assert watcher.next_event(30.0) is not None
        # twice the cap on each of two sockets: 1,024 connections, which the kernel held every one of
        # at 2,000 a second, as the daemon's test (a burst accepted without the GIL can outrun a busy bus thread)
        before, peak = flood_connections([conn["control"], conn["events"]], 2 * CONNECTIONS_PER_SOCKET, 4.0,
                                         kernel.proc.pid, per_s=2000)
        # those accepted between the count and the cut on top
        assert peak - before <= 2 * CONNECTIONS_PER_SOCKET * 3 // 2, (before, peak)
        wait_until(lambda: watcher.next_event(0.2) is not None, 30, "the keyed monitor to hear the run again")
    finally:
        watcher.close()
    open_gate(gate, 2 * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed" and (kernel.run_dir / "final.pt").exists(), result
    assert result["bus"].get("tcp_connections_cut", 0) >= 1, result["bus"]


def test_monitor_peers_that_ask_for_replays_and_never_read_them_hold_little_of_the_kernels_memory(keys, runs_dir,
                                                                                                   tmp_path, kernels):
    """Replay is pulled a batch at a time, but nothing made a client read what it pulled: four monitor-key peers
    asking for the journal from seq 1 fifty times a second and reading nothing had the kernel queue 1,000 batches
    each on the TCP control socket, +300 MB of its memory in 20 s. That socket now queues a few messages per
    connection; past them a reply is dropped, counted unroutable (the peer asks again). The key's replay budget
    (peers.py: 50 batches a second, shared by its peers) does not bound it: here 320 lines of 16 KiB, and four peers
    had the kernel grow by ~100 MB in 3 s. Nor did those few messages alone: a batch was up to 4 MiB, 4 x 8 of them
    as much (64 peers of one key: 2 GiB); a remote peer's are 512 KiB (control.py). Now a few MB."""
    import psutil

    lines = 320  # 5 MiB of the journal: a batch as big as the kernel makes one for the peer
    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], epochs=1, step_sleep_s=0, gate=gate)
    cfg.limits = {"bytes_per_s": 64 << 20, "logs_per_s": 10_000.0}  # the lines go in at once
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    ctx = zmq.Context()
    try:
        log_big_lines(ctx, keys, conn, kernel, lines)
        hogs = peers_that_never_read(ctx, keys, conn, 4)
        memory = psutil.Process(kernel.proc.pid)
        before = memory.memory_info().rss
        end = time.monotonic() + 3.0  # the budget's burst (100 batches) and 150 more; 1,000 a peer held them all
        while time.monotonic() < end:
            for hog in hogs:
                hog.send(pack({"v": 1, "type": "replay", "from_seq": 1}), zmq.NOBLOCK)
                hog.send(pack({"v": 1, "type": "heartbeat"}), zmq.NOBLOCK)
            time.sleep(0.01)
        grown = memory.memory_info().rss - before
    finally:
        ctx.destroy(linger=0)
    assert grown < 48 << 20, f"the kernel grew {grown >> 20} MB"
    open_gate(gate, STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed" and result["bus"].get("unroutable", 0) > 0, result["bus"]


def test_one_monitor_key_whose_many_peers_ask_for_replays_and_never_read_them_holds_a_bounded_sum(keys, runs_dir,
                                                                                                  tmp_path, kernels):
    """Each TCP connection queues at most 8 replies, but one key may hold 56 peers (and the connections of its
    forgotten silent ones, up to the socket's 256): 40 peers of one monitor key, each asking for a 512 KiB batch 9
    times within the key's replay budget and reading nothing, grew the kernel by ~70 MB (56: ~100 MB; 1 GiB at
    worst). What a key's connections may hold unread is now bounded in bytes (reply_ledger.py, 24 MiB): batches
    past it are cut to one event."""
    import psutil

    lines, hogs_n, asks = 320, 40, 9
    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], epochs=1, step_sleep_s=0, gate=gate)
    cfg.limits = {"bytes_per_s": 64 << 20, "logs_per_s": 10_000.0}  # the lines go in at once
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    ctx = zmq.Context()
    try:
        log_big_lines(ctx, keys, conn, kernel, lines)
        hogs = peers_that_never_read(ctx, keys, conn, hogs_n)
        memory = psutil.Process(kernel.proc.pid)
        before = memory.memory_info().rss
        for hog in hogs:  # a connection at a time, each to its queue's brim, within the key's 50 batches a second
            for _ in range(asks):
                hog.send(pack({"v": 1, "type": "replay", "from_seq": 1}), zmq.NOBLOCK)
                for other in hogs:  # all stay live: none is forgotten
                    other.send(pack({"v": 1, "type": "heartbeat"}), zmq.NOBLOCK)
                time.sleep(0.025)
        time.sleep(1.0)
        grown = memory.memory_info().rss - before
    finally:
        ctx.destroy(linger=0)
    print(f"\nthe kernel grew {grown >> 20} MB")
    assert grown < 40 << 20, f"the kernel grew {grown >> 20} MB"
    # their connections closed, what they held went with them: the key's next reader gets whole batches again
    reader = RemoteClient(conn, keys["watcher"])
    try:
        reader.hello("reader", replies=[])
        assert reader.reply(30, "welcome") is not None
        batch, end = None, time.monotonic() + 30
        while batch is None and time.monotonic() < end:  # asked again while the closed ones are still being told
            reader.send("replay", from_seq=1)
            batch = reader.reply(0.5, "replay_batch")
            if batch is not None and len(batch["events"]) == 1:
                batch = None
        assert batch is not None, "one event a batch: the closed connections still count against the key"
    finally:
        reader.close()
    open_gate(gate, STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result["bus"]


@pytest.mark.timeout(300)
def test_a_local_peer_that_asks_for_replays_and_never_reads_them_holds_a_bounded_queue_in_the_kernel(keys, runs_dir,
                                                                                                   tmp_path, kernels):
    """The TCP control socket queues 8 replies a connection (CONTROL_SNDHWM), the run's ipc one 1,000: a peer
    attached with the run's credential (or a plugin of the run, stuck) asking for replay batches of 16 KiB log lines
    within its 50 a second, and reading none, grew the kernel by ~4 GB in 25 s, 4 MiB a batch. The ipc control socket
    now queues LOCAL_CONTROL_SNDHWM (16) replies a connection; past it a reply is dropped (counted unroutable) and
    the peer asks again, as on TCP."""
    import psutil

    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], epochs=1, step_sleep_s=0, gate=gate)
    cfg.limits = {"bytes_per_s": 64 << 20, "logs_per_s": 10_000.0}  # the lines go in at once
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    ctx = zmq.Context()
    try:
        log_big_lines(ctx, keys, conn, kernel, 320)  # 4 MiB replay batches
        hog = ctx.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.setsockopt(zmq.RCVBUF, 4096)
        hog.connect(local_control(kernel))
        hog.send(pack({"v": 1, "type": "hello", "name": "hog", "pid": os.getpid(), "subscriptions": [""],
                       "replies": [], "delivery": "best_effort",
                       "secret": (kernel.run_dir / "credential").read_text().strip()}))
        memory = psutil.Process(kernel.proc.pid)
        before, grown, end = memory.memory_info().rss, 0, time.monotonic() + 10.0
        while time.monotonic() < end and grown < 256 << 20:  # past that it failed: spare the box the rest
            hog.send(pack({"v": 1, "type": "replay", "from_seq": 1}), zmq.NOBLOCK)
            hog.send(pack({"v": 1, "type": "heartbeat"}), zmq.NOBLOCK)
            time.sleep(0.025)  # within its 50 batches a second
            grown = max(grown, memory.memory_info().rss - before)
    finally:
        ctx.destroy(linger=0)
    assert grown < 128 << 20, f"the kernel grew {grown >> 20} MB"
    open_gate(gate, STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed" and result["bus"].get("unroutable", 0) > 0, result["bus"]  # it was served


@pytest.mark.timeout(300)
def test_a_local_peer_flooding_the_control_socket_with_big_messages_holds_little_of_the_kernels_memory(
        keys, runs_dir, tmp_path, kernels):
    """As the TCP one, on the run's ipc control socket: it queued 10,000 messages a connection (RCVHWM), of up to
    256 KiB each, 2.5 GB, and messages the bus decodes slower than they come (a plugin stuck in a loop resending a
    big one, or any process of the run's user) grew the kernel by 2.3 GB in 8 s from 4 connections. It now queues
    LOCAL_CONTROL_RCVHWM (1,000) a connection, ~250 MB of such messages; past it the sender waits (the SDK holds its
    replies, sdk/plugin_io.py). One connection here: the bound is per connection."""
    import psutil

    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(2, timeout_s=120)
    memory, endpoint = psutil.Process(kernel.proc.pid), local_control(kernel)
    bulky = msgpack.packb({"v": 1, "type": "heartbeat", "x": ["a"] * 100_000, "y": ["b"] * 26_000})
    ctx = zmq.Context()
    try:
        flood = ctx.socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.connect(endpoint)
        grown = peak_growth_while_flooding([flood], bulky, 8.0, memory)
    finally:
        ctx.destroy(linger=0)
    assert grown < 320 << 20, f"the kernel grew {grown >> 20} MB"
    result = stopped_locally(kernel, "the flood is over", timeout_s=180)
    assert result["status"] == "stopped" and result["bus"].get("refused_unknown_peer", 0) > 0, result["bus"]


@pytest.mark.timeout(300)
def test_a_control_key_sending_checkpoint_now_in_a_loop_leaves_kernel_log_its_history(keys, runs_dir, tmp_path,
                                                                                       kernels):
    """Each stop or checkpoint_now of a remote key was a line of kernel.log naming the key (~1 KB with its reason),
    with no bound but the wire: a control key sending checkpoint_now in a loop (which does not end the run, as a
    stop does) wrote ~20 MB of them in a few seconds, and kernel.log, rotated at 64 MB into one older file, kept
    nothing of the run's earlier lines. They are now written within the key's budget of log lines (50 a second,
    as its log messages are); the rest are counted (`reply_lines_dropped`)."""
    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    kernel.wait_step(2, timeout_s=120)
    pilot = RemoteClient(conn, keys["pilot"])
    log = kernel.run_dir / "kernel.log"
    try:
        pilot.hello("pilot", replies=["checkpoint_now"])
        assert pilot.reply(30, "welcome") is not None
        # at least `least` in at least 6 s, however long a busy machine takes to send them: the budget is a rate
        least, start, number = 5_000, time.monotonic(), 0
        while (number < least or time.monotonic() < start + 6.0) and time.monotonic() < start + 120:
            try:
                pilot.send("checkpoint_now", id=str(number), reason=f"{number:06d} " + "c" * 900)
                number += 1
            except zmq.Again:
                time.sleep(0.001)
        time.sleep(1.0)
        written = log.read_text().count("checkpoint_now from key pilot (control): ")
        elapsed = time.monotonic() - start
    finally:
        pilot.close()
    assert number >= least, f"only {number} sent in 120 s"
    allowed = LOGS_PER_S * (elapsed + BURST_S) + 1  # the bucket full at the start, then its rate
    assert allowed < number / 2, f"{number} sent in {elapsed:.0f} s: too slow a flood to tell a bound from none"
    assert 0 < written <= allowed, f"kernel.log has {written} of {number} checkpoint_now in {elapsed:.1f} s"
    assert "checkpoint_now from key pilot (control): 000000 ccc" in log.read_text()
    kernel.kill()


@pytest.mark.timeout(300)
def test_a_tcp_subscriber_that_never_reads_holds_a_bounded_queue_in_the_kernel(keys, runs_dir, tmp_path, kernels):
    """A TCP events subscriber that connects and never reads had the kernel hold up to EVENTS_HWM (10,000) events for
    it, as a local plugin does: with plugins logging 16 KiB lines at their budget, 64 such connections grew the kernel
    by 266 MB in 110 s and still growing (docs/architecture.md). The TCP publisher now holds TCP_EVENTS_HWM per
    connection; past it the subscriber sees a seq gap and replays (PROTOCOL.md §4). The journal keeps every event."""
    from trainbus.kernel.limits import LOG_TEXT_MAX_CHARS

    logs = 3 * 1000  # three times the queue: what is past it, and past the TCP buffers, is dropped
    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.05)
    cfg.limits = {"bytes_per_s": 64 << 20, "logs_per_s": 10_000.0}  # the lines go in as fast as they are sent
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    kernel.wait_step(2, timeout_s=120)
    ctx = zmq.Context()
    try:
        stalled = ctx.socket(zmq.SUB)
        stalled.setsockopt(zmq.LINGER, 0)
        stalled.setsockopt(zmq.RCVHWM, 1)  # what it does not read stays with the kernel (and the TCP buffers)
        secure_client(stalled, keys["watcher"], conn["server_key"].encode())
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(conn["events"])
        assert stalled.poll(30_000), "the subscriber never got an event"  # connected, and from now on reads nothing
        probe = ctx.socket(zmq.SUB)
        probe.setsockopt(zmq.LINGER, 0)
        secure_client(probe, keys["watcher"], conn["server_key"].encode())
        probe.setsockopt(zmq.SUBSCRIBE, b"log")
        probe.connect(conn["events"])
        logger = ctx.socket(zmq.DEALER)
        logger.setsockopt(zmq.LINGER, 0)
        secure_client(logger, keys["watcher"], conn["server_key"].encode())
        logger.connect(conn["control"])
        logger.send(pack({"v": 1, "type": "hello", "name": "logger", "pid": os.getpid(), "subscriptions": [],
                          "replies": ["log"], "delivery": "best_effort"}))
        for number in range(logs):
            text = f"{number:06d} " + secrets.token_hex(LOG_TEXT_MAX_CHARS // 2)[:LOG_TEXT_MAX_CHARS - 7]
            logger.send(pack({"v": 1, "type": "log", "level": "info", "text": text}))
            time.sleep(0.002)

        def after_the_lines() -> int | None:
            """The seq of a short line after them, seen by a subscriber that reads (it may miss some: it is sent
            until one is seen): every line went out before it."""
            logger.send(pack({"v": 1, "type": "log", "level": "info", "text": "done"}))
            end = time.monotonic() + 0.2
            while probe.poll(max(0, int((end - time.monotonic()) * 1000))):
                body = probe.recv_multipart()[1]
                if len(body) < 1000 and b"done" in body:
                    return msgpack.unpackb(body, **LIMITS)["seq"]
            return None
        final = wait_until(after_the_lines, 120, "a line after them", poll_s=0)
        received, seqs = 0, [0]
        while seqs[-1] < final and stalled.poll(10_000):  # now what the kernel held for it, and the TCP buffers
            event = msgpack.unpackb(stalled.recv_multipart()[1], **LIMITS)
            seqs.append(event["seq"])
            received += event["type"] == "log" and str(event["data"].get("text", "")).startswith("0")
    finally:
        ctx.destroy(linger=0)
    # its queue and what the TCP buffers hold (~900 lines here); with the ipc PUB's 10,000 it got all 3,000
    assert received < logs - 500 and TCP_EVENTS_HWM < logs - 500, (received, TCP_EVENTS_HWM)
    assert any(b > a + 1 for a, b in zip(seqs[1:], seqs[2:])), "no gap: the subscriber cannot tell what it missed"
    journaled = [e for e in of(read_events(kernel.run_dir), "log") if str(e.data.get("text", "")).startswith("0")]
    assert len(journaled) == logs, "the journal lost lines"


def test_a_key_that_says_hello_under_another_clients_durable_name_cannot_move_where_that_client_resumes(
        keys, runs_dir, tmp_path, kernels):
    """A durable name's position (what `resume_from` answers, §12) is kept by name across reconnects, and a remote
    hello may take any free name: a monitor key that said hello as a local hand-attached durable plugin while it was
    away, and acked the last seq, had that plugin welcomed back past every event it never processed. A name's
    position now counts only for the client that acked it (the run's owner on ipc, or one key): under another one,
    it starts again at seq 1, and the first client's return replays from 1 too rather than skip anything."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate), tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    open_gate(gate, 20)
    wait_until(lambda: kernel.journal.step() >= 20, 120, "twenty steps in the journal")
    ctx = zmq.Context()
    credential = (kernel.run_dir / "credential").read_text().strip()
    from trainbus.sdk.attach import target_of

    def local_hello() -> tuple[zmq.Socket, dict]:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(target_of(str(kernel.run_dir)).control)  # the run dir's, or a temp dir's where its path is long
        dealer.send(pack({"v": 1, "type": "hello", "name": "archive", "pid": os.getpid(), "subscriptions": [""],
                          "replies": [], "delivery": "durable", "secret": credential}))
        return dealer, reply_of(dealer, "welcome")

    def reply_of(dealer: zmq.Socket, type_: str) -> dict:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if dealer.poll(200):
                msg = msgpack.unpackb(dealer.recv(), **LIMITS)
                if msg["type"] == type_:
                    return msg
        raise AssertionError(f"no {type_}")

    try:
        owner, welcome = local_hello()
        assert welcome["resume_from"] == 1
        owner.send(pack({"v": 1, "type": "ack", "seq": 10}))
        owner.send(pack({"v": 1, "type": "bye", "reason": "away for a moment"}))
        time.sleep(0.5)
        intruder = RemoteClient(conn, keys["watcher"])
        intruder.send("hello", name="archive", pid=os.getpid(), subscriptions=[""], replies=[], delivery="durable")
        taken = intruder.reply(20.0, "welcome")
        assert taken is not None and taken["resume_from"] == 1, taken  # not the owner's 11: nothing of theirs
        intruder.send("ack", seq=10 ** 9)  # clamped to the last seq published: everything
        intruder.send("bye", reason="done")
        time.sleep(0.5)
        intruder.close()
        owner.close()
        _, back = local_hello()
        assert back["resume_from"] <= 11, back  # never past what the owner's plugin processed
    finally:
        ctx.destroy(linger=0)
        open_gate(gate, 2 * STEPS_PER_EPOCH)
    assert kernel.result(timeout_s=120)["status"] == "completed"


def test_a_monitor_key_that_fills_the_peer_table_keeps_no_plugin_of_the_run_from_coming_back(keys, runs_dir, tmp_path,
                                                                                             kernels):
    """The kernel welcomes 64 peers at once. One monitor key held all 64 places with live peers, and the run's own
    plugin, killed and restarted by the supervisor, had its hello refused (`hello_table_full`) until it was given
    up: a key that may only watch took a plugin away from the run. The run's spawned plugins now need no place, and
    the remote peers have 64 of their own (so do the owner's peers on ipc: `runs stop` says hello too).

    Of those 64, monitor keys take at most 56: one filling them kept every control key, the run's operator, out."""
    from trainbus.kernel.config import PluginConfig
    from trainbus.kernel.peers import CONTROL_PLACES, MAX_PEERS

    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate)
    cfg.plugins = [PluginConfig(name="rec", target="fixture_plugins:Recorder", settings={"path": str(tmp_path / "r")})]
    cfg.ready_timeout_s = 120
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    first = kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "rec", timeout_s=120)
    ctx = zmq.Context()
    crowd: dict[zmq.Socket, bool] = {}  # each peer: welcomed now
    refusals: set[str] = set()

    def hello(peer: zmq.Socket, number: int) -> None:
        peer.send(pack({"v": 1, "type": "hello", "name": f"crowd{number}", "pid": os.getpid(), "subscriptions": [""],
                        "replies": [], "delivery": "best_effort"}), zmq.NOBLOCK)

    def keep_the_places() -> None:
        """Every welcomed peer heartbeats; every other says hello again: a place freed is taken at once."""
        for number, peer in enumerate(crowd):
            while peer.poll(0):
                message = msgpack.unpackb(peer.recv(), **LIMITS)
                kind = message["type"]
                crowd[peer] = kind == "welcome" or (crowd[peer] and kind != "refused")
                if kind == "refused":
                    refusals.add(f"{message['code']}: {message['reason'].split(': ', 1)[-1]}")
            if crowd[peer]:
                peer.send(pack({"v": 1, "type": "heartbeat"}), zmq.NOBLOCK)
            else:
                hello(peer, number)

    try:
        for number in range(MAX_PEERS):
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            secure_client(peer, keys["watcher"], conn["server_key"].encode())
            peer.connect(conn["control"])
            crowd[peer] = False
            hello(peer, number)
        end = time.monotonic() + 60
        while (sum(crowd.values()) < MAX_PEERS - CONTROL_PLACES or not refusals) and time.monotonic() < end:
            keep_the_places()
            time.sleep(0.2)
        assert sum(crowd.values()) == MAX_PEERS - CONTROL_PLACES, sum(crowd.values())
        assert refusals == {f"hello_table_full: {MAX_PEERS - CONTROL_PLACES} peers of monitor keys already attached "
                            f"(the other {CONTROL_PLACES} places are kept for control keys)"}, refusals
        pilot = RemoteClient(conn, keys["pilot"], conn["server_key"].encode())  # the operator still gets in
        try:
            pilot.hello("operator", replies=["stop"])
            answer = pilot.reply(30)
            assert answer is not None and answer["type"] == "welcome", answer
        finally:
            pilot.close()
        os.kill(first.data["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 45
        back = None
        while back is None and time.monotonic() < deadline:
            keep_the_places()
            back = kernel.journal.running_pid("rec", not_in=(first.data["pid"],))
            time.sleep(0.2)
        assert back is not None, "the run's plugin was not welcomed back"
    finally:
        ctx.destroy(linger=0)
        open_gate(gate, 2 * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    assert not of(read_events(result["run_dir"]), "plugin_failed")


def test_the_peers_of_one_key_share_one_budget_of_metrics_logs_and_replays(keys, runs_dir, tmp_path, kernels):
    """Each peer had its own metric, log and replay budget, and one key may open up to 64 peers: a monitor key's 64
    peers at their limits journaled ~100 MB of metric and log events in 30 s and slowed training several times over.
    Over TCP the budget is now the key's, whatever number of peers it opens: 8 peers sending 100 metrics each at a
    limit of 10 a second (a burst of 20) get about 20 through, not 8 x 20."""
    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate)
    cfg.limits = {"metrics_per_s": 10.0}
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    ctx = zmq.Context()
    try:
        peers = []
        for number in range(8):
            peer = ctx.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 1000)
            secure_client(peer, keys["watcher"], conn["server_key"].encode())
            peer.connect(conn["control"])
            peer.send(pack({"v": 1, "type": "hello", "name": f"reporter{number}", "pid": os.getpid(),
                            "subscriptions": [], "replies": ["metric"], "delivery": "best_effort"}))
            peers.append(peer)
        for peer in peers:
            assert peer.poll(20_000) and msgpack.unpackb(peer.recv(), **LIMITS)["type"] == "welcome"
        started = time.monotonic()
        for peer in peers:
            for _ in range(100):
                peer.send(pack({"v": 1, "type": "metric", "name": "reading", "value": 1.0, "step": None}))
        # the kernel answers a bye (farewell) once it has read all its peer sent before: every metric was read, not
        # a fixed wait's worth of them (3 s, which a busy machine could outlast)
        for peer in peers:
            peer.send(pack({"v": 1, "type": "bye", "reason": "flood over"}))
        for peer in peers:
            wait_until(lambda: peer.poll(100) and msgpack.unpackb(peer.recv(), **LIMITS)["type"] == "farewell", 60,
                       "the kernel's farewell, once it read the peer's metrics", poll_s=0)
        elapsed = time.monotonic() - started
    finally:
        ctx.destroy(linger=1000)
        open_gate(gate, 2 * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    taken = [e for e in read_events(result["run_dir"]) if e.type == "metric" and "(key watcher)" in e.data["plugin"]]
    assert len(taken) <= 20 + 10 * elapsed + 5, (len(taken), elapsed)  # one bucket: its burst, and its rate since
    assert result["bus"].get("metric_dropped", 0) >= 800 - len(taken), result["bus"]


def test_what_a_keys_metrics_and_logs_add_to_the_journal_is_bounded_in_all_and_said_naming_the_key(keys, runs_dir,
                                                                                                    tmp_path, kernels):
    """A key's byte budget is a rate: a monitor key logging at it (256 KiB/s) grew the journal 22 GB a day, for as
    long as the run lasted, until the disk was full and training stopped. What one key's metrics and logs add to the
    journal is now bounded in all ([limits] key_journal_mb; 50 kB here): past it they are dropped, counted, and
    kernel.log says so once, naming the key and the setting."""
    gate = tmp_path / "gate"
    cfg = listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate)
    cfg.limits = {"logs_per_s": 10_000.0, "bytes_per_s": float(64 << 20), "key_journal_mb": 50_000 / 2**20}
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    ctx = zmq.Context()
    try:
        logger = ctx.socket(zmq.DEALER)
        logger.setsockopt(zmq.LINGER, 1000)
        secure_client(logger, keys["watcher"], conn["server_key"].encode())
        logger.connect(conn["control"])
        logger.send(pack({"v": 1, "type": "hello", "name": "chatty", "pid": os.getpid(), "subscriptions": [],
                          "replies": ["log"], "delivery": "best_effort"}))
        assert logger.poll(20_000) and msgpack.unpackb(logger.recv(), **LIMITS)["type"] == "welcome"
        for number in range(100):  # 100 x ~1,160 journaled bytes: twice the total
            logger.send(pack({"v": 1, "type": "log", "level": "info", "text": f"{number:04d} " + "x" * 995}))
        wait_until(lambda: "key_journal_mb" in (kernel.run_dir / "kernel.log").read_text(), 60, "the key said")
    finally:
        ctx.destroy(linger=1000)
        open_gate(gate, 2 * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=120)
    taken = [e for e in read_events(result["run_dir"]) if e.type == "log" and "(key watcher)" in e.data["plugin"]]
    assert 40 <= len(taken) <= 50_000 // 1_000, len(taken)
    assert result["bus"]["log_dropped"] == 100 - len(taken), result["bus"]
    said = [line for line in (kernel.run_dir / "kernel.log").read_text().splitlines() if "key_journal_mb" in line]
    assert len(said) == 1 and "key watcher's metric and log messages" in said[0], said


def test_a_monitor_key_subscribing_to_endless_topics_holds_little_of_the_kernels_memory(keys, runs_dir, tmp_path,
                                                                                        kernels):
    """libzmq keeps every distinct subscription prefix in a trie, at ~25 bytes of memory per byte of prefix, and took
    any number of them, up to 4 KiB each: 2,000 subscriptions of 3,000 bytes from one monitor key grew the kernel's
    memory by ~140 MB, and nothing bounded the count. A TCP publisher now takes subscriptions of 256 bytes at most
    (an event's name is under 30) and is cut, as on a revocation, once its subscribers hold 256 distinct ones (the
    events have ~30 names): the kernel holds a few MB, and the others reconnect and hear the run."""
    import psutil

    gate = tmp_path / "gate"
    kernel = KernelProcess(listening_config(runs_dir, keys["dir"], step_sleep_s=0, gate=gate), tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    good = RemoteClient(conn, keys["pilot"])
    ctx = zmq.Context()
    try:
        assert good.next_event(30.0) is not None
        memory = psutil.Process(kernel.proc.pid)
        before = memory.memory_info().rss
        for size in (3000, 100):  # longer than any name; then short ones, many
            for endpoint in (conn["events"], conn["bursts"]):
                hog = ctx.socket(zmq.SUB)
                hog.setsockopt(zmq.LINGER, 0)
                secure_client(hog, keys["watcher"], conn["server_key"].encode())
                hog.connect(endpoint)
                for number in range(2000):
                    hog.setsockopt(zmq.SUBSCRIBE, b"%08d" % number + b"t" * size)
        time.sleep(3.0)
        grown = memory.memory_info().rss - before
        assert grown < 32 << 20, f"the kernel grew {grown >> 20} MB"
        wait_until(lambda: good.next_event(0.2) is not None, 30, "the keyed client to hear the run again")
    finally:
        ctx.destroy(linger=0)
        good.close()
        open_gate(gate, 2 * STEPS_PER_EPOCH)
    assert kernel.result(timeout_s=120)["status"] == "completed"


@pytest.mark.timeout(300)
def test_messages_that_are_costly_to_decode_keep_neither_the_bus_nor_training_waiting(keys, runs_dir, tmp_path,
                                                                                     kernels):
    """A control message is decoded before anything else is known of it, and msgpack makes one Python object per
    array or map: 240 KB of empty arrays (`[[]] * 60000` four times, under MAXMSGSIZE) took ~33 ms to decode, the
    GIL held throughout, and far more in a kernel whose heap holds a model (each message's 240,000 lists lived long
    enough to be promoted, and the collector walked the whole heap). A monitor key sending them as fast as it could
    left the digits demo's heartbeats 143 s apart and its steps ~1,000 times slower. The kernel now stops decoding
    a peer's message at its 1,024th array or map (no control message needs more): malformed, counted."""
    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    kernel.wait_step(2, timeout_s=120)
    watcher = RemoteClient(conn, keys["watcher"])
    ctx = zmq.Context()
    costly = msgpack.packb({"v": 1, "type": "heartbeat", **{k: [[]] * 60_000 for k in "wxyz"}})
    try:
        [flood] = watcher_dealers(ctx, keys, conn, 1)
        assert watcher.next_event(30) is not None, "the watcher never got an event"
        first_step, beats, end = kernel.journal.step(), [], time.monotonic() + 6.0
        while time.monotonic() < end:
            try:
                flood.send(costly, zmq.NOBLOCK)
            except zmq.Again:
                pass
            while (event := watcher.next_event(0.001)) is not None:
                if event["type"] == "heartbeat":
                    beats.append(time.monotonic())
        steps = kernel.journal.step() - first_step
    finally:
        ctx.destroy(linger=0)
        watcher.close()
    gaps = [b - a for a, b in zip([end - 6.0, *beats], [*beats, end])]
    assert max(gaps) < 2.5, f"the kernel's heartbeats were {max(gaps):.1f} s apart during the flood"
    assert steps > 200, f"{steps} steps in 6 s of flood (0.005 s a step)"
    result = stopped_by(kernel, conn, keys["pilot"], "the flood is over")
    assert result["status"] == "stopped" and result["bus"].get("malformed", 0) > 0, result["bus"]


@pytest.mark.timeout(300)
def test_a_key_flooding_the_control_socket_with_big_messages_holds_little_of_the_kernels_memory(keys, runs_dir,
                                                                                                tmp_path, kernels):
    """What a TCP connection sends waits in the kernel until the bus thread reads it, up to the control socket's
    receive queue: 1,000 messages of up to 256 KiB (MAXMSGSIZE) a connection, 250 MiB, and 256 connections a socket
    may hold. Messages the bus decodes slower than the wire brings them (a few ms each, 128,000 one-letter strings in
    an unknown field) from 8 connections of one monitor key grew the kernel by hundreds of MB in 8 s. The TCP control
    socket now queues CONTROL_RCVHWM (16) messages a connection; past it TCP holds the sender back."""
    import psutil

    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    kernel.wait_step(2, timeout_s=120)
    memory = psutil.Process(kernel.proc.pid)
    bulky = msgpack.packb({"v": 1, "type": "heartbeat", "x": ["a"] * 100_000, "y": ["b"] * 26_000})
    assert len(bulky) < 256 * 1024
    ctx = zmq.Context()
    try:
        grown = peak_growth_while_flooding(watcher_dealers(ctx, keys, conn, 8), bulky, 8.0, memory)
    finally:
        ctx.destroy(linger=0)
    assert grown < 64 << 20, f"the kernel grew {grown >> 20} MB"
    assert stopped_by(kernel, conn, keys["pilot"], "the flood is over", timeout_s=180)["status"] == "stopped"


@pytest.mark.timeout(300)
def test_a_key_flooding_the_control_socket_gets_a_share_of_the_bus_thread_and_another_keys_stop_still_lands(
        keys, runs_dir, tmp_path, kernels):
    """Each control message costs the bus thread the GIL before anything is known of it (~10 us for a heartbeat from
    a peer that never said hello, more to decode): a monitor key's heartbeats from 4 connections kept it reading
    ~40,000 a second, most of a core, beside training on 2 cores. It now reads the TCP control socket for at most 5 %
    of its time (kernel/control_reading.py REMOTE_CONTROL_SHARE), says so naming the key, and leaves the rest in the
    connections, where TCP holds the sender back; libzmq takes turns between connections, so a control key's stop
    still lands."""
    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    kernel.wait_step(2, timeout_s=120)
    ctx, pilot, beat = zmq.Context(), None, pack({"v": 1, "type": "heartbeat"})
    try:
        floods = watcher_dealers(ctx, keys, conn, 4)
        started, sent, pilot = time.monotonic(), 0, RemoteClient(conn, keys["pilot"])
        while kernel.proc.poll() is None and time.monotonic() < started + 120:
            for flood in floods:
                try:
                    flood.send(beat, zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    pass
            if pilot is not None and time.monotonic() > started + 3.0:  # the flood well under way
                pilot.hello("operator", replies=["stop"])
                pilot.send("stop", reason="stopped through a flood")
                pilot = pilot.close()
    finally:
        ctx.destroy(linger=0)
        if pilot is not None:
            pilot.close()
    result = kernel.result(timeout_s=120)
    assert result["status"] == "stopped" and "stopped through a flood" in str(result), result
    assert result["bus"].get("remote_control_paced", 0) >= 1, (sent, result["bus"])
    said = [line for line in (kernel.run_dir / "kernel.log").read_text().splitlines() if "TCP control messages" in line]
    assert said and "from key 'watcher'" in said[0] and "took over 5 % of the bus thread's time" in said[0], said


@pytest.mark.timeout(300)
def test_a_local_peer_flooding_the_control_socket_gets_a_share_of_the_bus_thread_and_another_peers_stop_lands(
        keys, runs_dir, tmp_path, kernels):
    """As the TCP one, on the run's ipc control socket: a plugin of the run's reporting a metric in a loop from a
    thread of its own kept the bus thread at 0.16 cores (24 times a calm run's), every message read before it was
    dropped past [limits]. The ipc socket is now read for at most 5 % of the bus thread's time too
    (LOCAL_CONTROL_SHARE), said naming the peer; the rest waits with its sender, and another peer's stop lands."""
    cfg = listening_config(runs_dir, keys["dir"], epochs=50, step_sleep_s=0.005)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(2, timeout_s=120)
    secret, endpoint = (kernel.run_dir / "credential").read_text().strip(), local_control(kernel)
    # a heartbeat with a field the kernel decodes and ignores (~1 ms): its share is spent by a sender a loaded box
    # starves too, as it is by a cheap one's tens of thousands a second on a quiet one
    ctx, sent, beat = zmq.Context(), 0, pack({"v": 1, "type": "heartbeat", "x": ["a"] * 20_000})

    def peer(name: str, replies: list[str]) -> zmq.Socket:
        socket = ctx.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.connect(endpoint)
        socket.send(pack({"v": 1, "type": "hello", "name": name, "pid": os.getpid(), "subscriptions": [],
                          "replies": replies, "delivery": "best_effort", "secret": secret}))
        return socket

    def paced() -> bool:
        return "run's ipc socket" in (kernel.run_dir / "kernel.log").read_text()

    try:
        hog, pilot, started = peer("hog", []), None, time.monotonic()
        next_look = started
        while kernel.proc.poll() is None and time.monotonic() < started + 120:
            try:
                hog.send(beat, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:
                time.sleep(0.0005)
            if pilot is None and time.monotonic() >= next_look:  # once the kernel holds the flood back (a busy box
                next_look += 0.2                                  # may take a while to send that much)
                if paced():
                    pilot = peer("operator", ["stop"])
                    pilot.send(pack({"v": 1, "type": "stop", "reason": "stopped through a flood"}))
    finally:
        ctx.destroy(linger=0)
    result = kernel.result(timeout_s=120)
    assert result["bus"].get("local_control_paced", 0) >= 1, (sent, result["bus"])
    assert result["status"] == "stopped" and "stopped through a flood" in str(result), result
    said = [line for line in (kernel.run_dir / "kernel.log").read_text().splitlines() if "run's ipc socket" in line]
    assert said and "from 'hog'" in said[0] and "took over 5 % of the bus thread's time" in said[0], said


def log_big_lines(ctx: zmq.Context, keys: dict, conn: dict, kernel: KernelProcess, lines: int) -> None:
    """`lines` log lines of 16 KiB of random text, sent by a peer of the watcher's key, once the journal holds them:
    each line is its 16 KiB in the journal and in a replay batch, so batches are as big as the kernel makes them."""
    from trainbus.kernel.limits import LOG_TEXT_MAX_CHARS

    logger = ctx.socket(zmq.DEALER)
    logger.setsockopt(zmq.LINGER, 0)
    secure_client(logger, keys["watcher"], conn["server_key"].encode())
    logger.connect(conn["control"])
    logger.send(pack({"v": 1, "type": "hello", "name": "logger", "pid": os.getpid(), "subscriptions": [],
                      "replies": ["log"], "delivery": "best_effort"}))
    for number in range(lines):
        text = f"{number:06d} " + secrets.token_hex(LOG_TEXT_MAX_CHARS // 2)[:LOG_TEXT_MAX_CHARS - 7]
        logger.send(pack({"v": 1, "type": "log", "level": "info", "text": text}))
    wait_until(lambda: len(kernel.journal.of("log")) >= lines, 120, "the lines in the journal")


def watcher_dealers(ctx: zmq.Context, keys: dict, conn: dict, count: int) -> list[zmq.Socket]:
    """`count` connections of the watcher's (monitor) key to the run's control port, none said hello."""
    return curve_dealers(ctx, keys["watcher"], conn["server_key"].encode(), conn["control"], count)


def peers_that_never_read(ctx: zmq.Context, keys: dict, conn: dict, count: int) -> list[zmq.Socket]:
    """`count` peers of the watcher's key, said hello, that read nothing: what they are sent stays with the kernel."""
    hogs = []
    for number in range(count):
        hog = ctx.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.setsockopt(zmq.RCVHWM, 1)
        hog.setsockopt(zmq.RCVBUF, 4096)
        secure_client(hog, keys["watcher"], conn["server_key"].encode())
        hog.connect(conn["control"])
        hog.send(pack({"v": 1, "type": "hello", "name": f"hog{number}", "pid": os.getpid(),
                       "subscriptions": [""], "replies": [], "delivery": "best_effort"}))
        hogs.append(hog)
    return hogs
