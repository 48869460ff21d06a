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
HEARTBEAT_INTERVAL_S = 1.0  # kernel/supervisor.py; the journal's heartbeats after start_training_session
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
    control_endpoint = f"ipc://{run_dir / 'control.sock'}"
    events_endpoint = f"ipc://{run_dir / 'events.sock'}"

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
        if not s.poll(10_000):
            raise SystemExit(f"{name}: no answer to hello in 10 s")
        return msgpack.unpackb(s.recv(), raw=False)

    def drain(s: zmq.Socket) -> tuple[int, int]:
        count = nbytes = 0
        while True:
            try:
                raw = s.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count, nbytes
            count, nbytes = count + 1, nbytes + len(raw)

    duration, out = float(params["duration_s"]), {}
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
        s.close(linger=2000)  # what our queue still holds goes out before we leave
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

    else:
        raise SystemExit(f"unknown mode {mode}")
    ctx.destroy(linger=200)
    cpu = os.times()
    return {"start": start, "end": end, "cpu_s": round(cpu.user + cpu.system, 2), **out}


if __name__ == "__main__":
    print(json.dumps(_attack_main(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------------

import psutil  # noqa: E402

from trainbus.kernel.config import RunConfig, resolve_plugin  # noqa: E402
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
    """CI: ~5 s of 200 replay(1)/s from a durable attached peer; step time recorded, asserted generously.

    Two runs on a shared 2-core box differ by up to ~50 % in step time whatever they do, so the CI check is
    against the better of two yardsticks (the attack-free run, and this run's own steps outside the attack):
    a real slowdown shows against both."""
    figures = replay_flood(tmp_path, kernels, replay_baselines(10), epochs=10, attack_s=5.0, delivery="durable")
    same_run = figures["step_ms_attacked"] / (figures["step_ms_same_run_outside_attack"] or float("inf"))
    assert min(figures["step_ratio"], same_run) < 1.5, figures


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
    seed = int(os.environ.get("TRAINBUS_TEST_SEED", random.randrange(2**32)))  # TRAINBUS_TEST_SEED=... replays it
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
    # every message that got out reached the kernel and was dropped as malformed (none slipped through)
    assert bus.get("malformed", 0) >= 0.95 * report["sent"], (bus, report)
    assert max(gaps) <= 2 * HEARTBEAT_INTERVAL_S, f"heartbeat gaps {sorted(gaps)[-5:]}"
    return figures


def test_garbage_flood_short(tmp_path, kernels):
    """CI: ~3 s of random-bytes messages at up to 20,000/s; every plugin stays, metrics.jsonl is complete."""
    figures = garbage_flood(tmp_path, kernels, epochs=7, attack_s=3.0)
    assert figures["sent"] >= 0.25 * 20_000 * 3.0, figures  # the attack really happened, even on a busy box


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_garbage_flood_20s(tmp_path, kernels):
    """The spec: 20,000 random-bytes messages a second for 20 s."""
    figures = garbage_flood(tmp_path, kernels, epochs=26, attack_s=20.0)
    assert figures["sent_per_s"] >= 15_000, figures


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
    # 200 KB names are under the cap: counted as truncated, republished cut to 200 characters and a marker
    assert bus.get("metric_truncated", 0) >= 0.5 * report["big"], figures
    assert big and all(e.data["name"].startswith("B" * 200) and len(e.data["name"]) < 260 for e in big)
    assert max(len(e.data["name"]) for e in of(events, "metric")) < 260
    return figures


def test_stalled_subscribers_and_huge_names_short(tmp_path, kernels):
    """CI: ~5 s of 10 stalled subscribers, 1 MB and 200 KB metric names at 50/s each."""
    stalled_and_huge(tmp_path, kernels, epochs=9, attack_s=5.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stalled_subscribers_and_huge_names_30s(tmp_path, kernels):
    """The spec's figures, 30 s of it: the stalled subscribers' queues fill up to their high-water mark."""
    stalled_and_huge(tmp_path, kernels, epochs=36, attack_s=30.0)
