"""The kernel trusts no peer: real kernels in their own processes, hostile peers on the run's real ZeroMQ
sockets (raw pyzmq + msgpack, as an attacker would write them), real kill -9, and another local user.

What a hostile peer can reach here: the run's ipc sockets in its run directory, as the same uid. Some
attacks use the attach credential (<run_dir>/credential), which is the strongest a same-uid attacker can
hold short of reading a spawned plugin's environment in /proc. Nothing is mocked.

Runs go under a short directory in /tmp, so the sockets are <run_dir>/{control,events}.sock (a run
directory whose socket path is too long gets a private temp directory instead, kernel/credentials.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from fixture_targets import open_gate
from helpers import metrics_records_expected
from kernel_process import KernelProcess, of, process_gone, wait_until
from trainbus.kernel.control import REFUSAL_REPEAT_S
from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.proto import JOURNAL_NAME, pack

TESTS_DIR = Path(__file__).resolve().parent
PACED = "fixture_targets:paced_digits"  # the digits demo with a sleep per step: a run lasts a known time
STEPS_PER_EPOCH = 45  # tests/test_checkpoint_e2e.py: 1,437 training images at batch size 32
LIMITS = dict(raw=False, strict_map_key=True, max_str_len=1 << 20, max_bin_len=1 << 20, max_array_len=100_000,
              max_map_len=10_000, max_ext_len=0)
NO_SUCH_SECRET = "0" * 64


@pytest.fixture
def short_runs():
    """A runs directory with a short path (the sockets then sit in the run directory itself)."""
    path = Path(tempfile.mkdtemp(prefix="tb-trust-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(runs: Path, plugins=(), epochs: int = 2, step_sleep_s: float = 0.03, every_n_steps: int = 0) -> RunConfig:
    # Training waits for every plugin's hello: on a loaded box a plugin at nice 10 can take far longer than the
    # default 15 s to import torch, and a run that trained without its checkpoint plugin would prove nothing.
    return RunConfig(target=PACED, epochs=epochs, device="cpu", runs_dir=str(runs), plugins=list(plugins),
                     hyperparameters={"step_sleep_s": step_sleep_s}, checkpoint_every_n_epochs=0,
                     checkpoint_every_n_steps=every_n_steps, ready_timeout_s=120)


class Intruder:
    """A peer on a live run's control socket (and, when asked, its events), in raw pyzmq + msgpack.

    Not thread-safe (ZeroMQ sockets): create and use it in one thread.
    """

    def __init__(self, run_dir: Path, label: str, subscribe: bool = False):
        self.run_dir = Path(run_dir)
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, f"{label}-{secrets.token_hex(4)}".encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(f"ipc://{self.run_dir / 'control.sock'}")
        self.sub = None
        if subscribe:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.sub.setsockopt(zmq.LINGER, 0)
            self.sub.connect(f"ipc://{self.run_dir / 'events.sock'}")
        self.replies: list[dict] = []

    def send(self, type_: str, **fields) -> None:
        self.dealer.send(msgpack.packb({"v": 1, "type": type_, **fields}, use_bin_type=True))

    def hello(self, name: str, secret: str | None, **fields) -> None:
        """A well-formed hello; secret None leaves the field out."""
        msg = dict(name=name, pid=os.getpid(), subscriptions=[""], replies=[], delivery="best_effort", votes=[],
                   capabilities=[])
        msg.update(fields)
        if secret is not None:
            msg["secret"] = secret
        self.send("hello", **msg)

    def receive(self, timeout_s: float = 0.0) -> dict | None:
        if not self.dealer.poll(int(timeout_s * 1000)):
            return None
        msg = msgpack.unpackb(self.dealer.recv(), **LIMITS)
        self.replies.append(msg)
        return msg

    def wait_reply(self, type_: str, timeout_s: float = 20.0) -> dict:
        """The next control message of `type_` the kernel sends us (others are kept in self.replies)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            msg = self.receive(min(0.1, max(0.0, end - time.monotonic())))
            if msg is not None and msg["type"] == type_:
                return msg
        raise AssertionError(f"no {type_} from the kernel within {timeout_s:.0f} s; got {self.replies}")

    def next_event(self, timeout_s: float) -> dict | None:
        if not self.sub.poll(int(timeout_s * 1000)):
            return None
        _, raw = self.sub.recv_multipart()
        return msgpack.unpackb(raw, **LIMITS)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def attach_credential(run_dir: Path) -> str:
    return (Path(run_dir) / "credential").read_text().strip()


def wait_sockets(kernel: KernelProcess, timeout_s: float = 60.0) -> None:
    """The kernel bound its sockets (the credential file is written before)."""
    def bound():
        kernel._check_alive()
        return (kernel.run_dir / "control.sock").exists() and (kernel.run_dir / "events.sock").exists()
    wait_until(bound, timeout_s, "the run's sockets")


def assert_completed(result: dict, epochs: int) -> None:
    outcome = result["outcome"]
    assert result["status"] == "completed", result
    assert (outcome["epochs_completed"], outcome["steps"]) == (epochs, epochs * STEPS_PER_EPOCH), outcome
    assert not outcome["stopped_early"] and outcome["stop_reasons"] == [], outcome


def refused_counters(result: dict) -> dict[str, int]:
    return {k: v for k, v in result["bus"].items() if k.startswith("refused_") and v}


# -- 1. a stop from a peer the kernel did not welcome ----------------------------------------------


def test_stop_from_a_peer_without_a_valid_hello_is_refused_and_counted(short_runs, tmp_path, kernels):
    """Three hostile peers on the control socket while training runs: one that never says hello, one whose
    hello carries a wrong secret, one whose hello carries none. Each sends stop (and checkpoint_now, metric,
    log); the run trains every epoch, and each refusal is counted with its reason in summary.json."""
    epochs = 2
    cfg = config(short_runs, epochs=epochs, step_sleep_s=0.0)
    gate = tmp_path / "gate"  # the run waits at step 20 until every refusal is in
    open_gate(gate, 20)
    cfg.hyperparameters["gate"] = str(gate)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_event("start_training_session", timeout_s=120)
    no_hello, wrong, missing = (Intruder(kernel.run_dir, label) for label in ("no-hello", "wrong-secret", "no-secret"))
    try:
        no_hello.send("stop", reason="hostile: no hello")
        no_hello.send("checkpoint_now", reason="hostile: no hello")
        no_hello.send("metric", name="hostile_metric", value=1.0, step=None)
        no_hello.send("log", level="error", text="hostile log line")
        wrong.hello("intruder_wrong", NO_SUCH_SECRET, replies=["stop"])
        missing.hello("intruder_missing", None, replies=["stop"])
        for peer in (wrong, missing):
            peer.send("stop", reason=f"hostile: after a refused hello ({peer.dealer.getsockopt(zmq.ROUTING_ID)})")
        # the kernel answers each (peer, reason) once: proof it read and refused them, before training ended
        reasons = [no_hello.wait_reply("refused")["reason"]]
        for peer in (wrong, missing):
            reasons += [peer.wait_reply("refused")["reason"], peer.wait_reply("refused")["reason"]]
        time.sleep(REFUSAL_REPEAT_S)  # a hello said again later hears its refusal again (a flood: once a second)
        wrong.hello("intruder_wrong", NO_SUCH_SECRET, replies=["stop"])
        reasons.append(wrong.wait_reply("refused")["reason"])
        step_when_refused = kernel.journal.step()
    finally:
        for peer in (no_hello, wrong, missing):
            peer.close()
        open_gate(gate, epochs * STEPS_PER_EPOCH)
    assert step_when_refused < epochs * STEPS_PER_EPOCH - 5, \
        f"the stops were refused at step {step_when_refused}, too late to prove anything: pace the run slower"
    assert "say hello first" in reasons[0]
    assert "wrong secret" in reasons[1] and "say hello first" in reasons[2], reasons
    assert "no secret" in reasons[3] and "say hello first" in reasons[4], reasons
    assert "wrong secret" in reasons[5], reasons

    result = kernel.result(timeout_s=120)
    assert_completed(result, epochs)
    assert refused_counters(result) == {"refused_unknown_peer": 6, "refused_hello_secret": 3}, result["bus"]
    events = read_events(result["run_dir"])
    assert not of(events, "plugin_ready"), "no hostile hello may be welcomed"
    assert not of(events, "metric") and not of(events, "log"), "nothing a refused peer sent may be republished"
    assert not of(events, "save_checkpoint") and not of(events, "checkpoint_skipped")
    assert of(events, "end_training_session")[0].data["stopped_early"] is False
    assert not of(events, "stop_requested")


# -- 2. a peer posing as a durable plugin cannot move its position ---------------------------------


def test_hello_as_a_spawned_plugin_with_the_attach_credential_is_refused_and_its_ack_moves_nothing(
        short_runs, tmp_path, kernels):
    """A peer with the attach credential says hello as `metrics_log` (the real plugin's name and pid) and acks
    2**63-1 while the real metrics_log is behind (SIGSTOPped for 1 s, well inside its liveness window); then
    the real one is killed with kill -9, and while it is down a second impostor tries the same. Both hellos
    are refused (the credential grants no spawned plugin's name), the acks move nothing, and the restarted
    metrics_log writes every record: metrics.jsonl matches the journal exactly.

    Had the forged ack counted, the restarted plugin would resume after it, and the records of the second
    the real one was stopped (~6 step records) would be missing."""
    epochs, every_n_steps = 3, 5
    kernel = KernelProcess(config(short_runs, [resolve_plugin("metrics_log", {"every_n_steps": every_n_steps})],
                                  epochs=epochs, step_sleep_s=0.03), tmp_path)
    kernels.append(kernel)
    real_pid = kernel.wait_ready("metrics_log", timeout_s=120)
    credential = attach_credential(kernel.run_dir)

    def pose(label: str) -> Intruder:
        """Hello as the real plugin, with the credential and the real pid; an ack far ahead; a replay."""
        peer = Intruder(kernel.run_dir, label)
        peer.hello("metrics_log", credential, pid=real_pid, delivery="durable")
        peer.send("ack", seq=2**63 - 1)
        peer.send("replay", from_seq=1)  # nothing may come back but refusals
        return peer

    def refusals(peer: Intruder) -> list[str]:
        try:
            reasons = [peer.wait_reply("refused")["reason"] for _ in range(3)]  # the hello, the ack, the replay
            while peer.receive(0.3) is not None:  # whatever else the kernel sends us arrives meanwhile
                pass
        finally:
            peer.close()
        assert [m["type"] for m in peer.replies] == ["refused"] * 3, peer.replies  # told once per message type
        return reasons

    kernel.wait_step(10, timeout_s=120)
    os.kill(real_pid, signal.SIGSTOP)  # the real plugin falls behind: its own position lags the published seq
    try:
        time.sleep(1.0)
        live = pose("impostor-live")
        time.sleep(0.2)  # the kernel reads it while the real plugin is still the current, stopped process
    finally:
        os.kill(real_pid, signal.SIGKILL)  # within its liveness window (3 s): the supervisor never saw it hang
    killed_at = kernel.journal.step()
    before = refusals(live)
    wait_until(lambda: process_gone(real_pid), 10, "metrics_log to die")
    during = refusals(pose("impostor-dead"))  # while the real one is dead or restarting, the name is still not free
    assert killed_at < epochs * STEPS_PER_EPOCH - 20, f"killed at step {killed_at}, too late: pace the run slower"
    for reasons in (before, during):
        assert "belongs to a plugin this run spawned" in reasons[0], reasons
        assert "say hello first" in reasons[1] and "say hello first" in reasons[2], reasons

    result = kernel.result(timeout_s=120)
    assert_completed(result, epochs)
    assert result["undrained"] == {}
    summary = result["plugins"]["metrics_log"]
    assert (summary["restarts"], summary["crashes"]) == (1, ["signal SIGKILL"]), summary
    # hello, then ack and replay from a peer that is not welcomed (2 impostors)
    assert refused_counters(result) == {"refused_hello_name_spawned": 2, "refused_unknown_peer": 4}, result["bus"]
    events = read_events(result["run_dir"])
    assert [e.data["pid"] for e in of(events, "plugin_ready")] == [real_pid, of(events, "plugin_restarted")[0].data["pid"]]
    assert not of(events, "plugin_hung"), "stopped for too long: the test meant to stay inside the liveness window"
    lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    got = [(r["kind"], r["seq"]) for r in map(json.loads, lines)]
    want = metrics_records_expected(events, every_n_steps)
    assert len(of(events, "end_epoch")) == epochs
    assert got == want, f"metrics.jsonl has {len(got)} records, the journal calls for {len(want)}"


def test_the_sdk_run_by_hand_under_a_spawned_plugins_name_says_the_kernel_refused_it_and_never_sets_up(
        short_runs, tmp_path, kernels):
    """`python -m trainbus.sdk` by hand as `metrics_log`, which the run spawned: one line saying the kernel refused
    the hello, why, and the fix; exit 1; neither setup nor teardown runs (there is nothing to undo)."""
    cfg = config(short_runs, [resolve_plugin("metrics_log", {})], epochs=1)
    gate = tmp_path / "gate"  # the run waits before its first step until the refused plugin has exited
    cfg.hyperparameters["gate"] = str(gate)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_ready("metrics_log", timeout_s=120)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "TRAINBUS_EVENTS": f"ipc://{kernel.run_dir / 'events.sock'}",
           "TRAINBUS_CONTROL": f"ipc://{kernel.run_dir / 'control.sock'}", "TRAINBUS_RUN_DIR": str(kernel.run_dir),
           "TRAINBUS_PLUGIN_NAME": "metrics_log", "TRAINBUS_PLUGIN_SETTINGS": pack({"path": str(calls)}).hex()}
    env.pop("TRAINBUS_KERNEL_PID", None)
    elsewhere = tmp_path / "not-the-run"  # a TRAINBUS_RUN_DIR that is not the run's: no credential there
    try:
        proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Lifecycle"], env=env,
                              capture_output=True, text=True, timeout=120)
        lost = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Lifecycle", "--name", "lost"],
                              env={**env, "TRAINBUS_RUN_DIR": str(elsewhere)}, capture_output=True, text=True,
                              timeout=120)
        # the run directory alone: the SDK finds the sockets there, as `trainbus attach RUN_DIR` does
        endpoints = ("TRAINBUS_EVENTS", "TRAINBUS_CONTROL")
        found = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Lifecycle"],
                               env={k: v for k, v in env.items() if k not in endpoints}, capture_output=True,
                               text=True, timeout=120)
        elsewhere.mkdir()
        nowhere = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Lifecycle", "--name", "lost"],
                                 env={**{k: v for k, v in env.items() if k not in endpoints},
                                      "TRAINBUS_RUN_DIR": str(elsewhere)}, capture_output=True, text=True, timeout=120)
    finally:
        open_gate(gate, STEPS_PER_EPOCH)
    for refused in (proc, found):
        assert (refused.returncode, refused.stderr) == (1, "[metrics_log] the kernel refused the hello as 'metrics_log': "
                                                           "name 'metrics_log' belongs to a plugin this run spawned; "
                                                           "pick another name with --name NAME\n"), refused.stderr
    assert (nowhere.returncode, nowhere.stderr) == (2, (
        f"error: no live kernel sockets for {elsewhere} (no events.sock; kernel.log names none): is TRAINBUS_RUN_DIR "
        f"a running run's directory? (`trainbus runs list` says)\n")), nowhere.stderr
    assert (lost.returncode, lost.stderr) == (1, (  # where it looked for the credential, at once: no hello is sent
        f"error: cannot read {elsewhere / 'credential'} (No such file or directory): is TRAINBUS_RUN_DIR the run's "
        f"directory, and are you its owner? (the kernel takes no plugin without it)\n")), lost.stderr
    assert not calls.exists(), calls.read_text()
    result = kernel.result(timeout_s=120)
    assert_completed(result, epochs=1)
    assert result["bus"].get("refused_hello_name_spawned") == 2, result["bus"]  # both by hand (then a heartbeat: unknown_peer)


# -- 3. forged checkpoint_saved ---------------------------------------------------------------------


class Forger(threading.Thread):
    """Two hostile peers with the attach credential, on both sockets, answering every save_checkpoint with
    forgeries:
      bystander (no checkpoint capability): checkpoint_saved naming /etc/passwd and a file in the run
        directory, and checkpoint_failed; all must be refused as not from a persister.
      shadow (claims the checkpoint capability under a name no spawned plugin has): checkpoint_saved naming
        /etc/passwd, the run's config.json and a path that climbs out of checkpoints/ (refused: path), for a
        seq that is no save_checkpoint (refused: seq), and one inside checkpoints/, which the kernel accepts
        as the shadow's own verdict (it must free nothing the real persister has not settled).
    The shadow acks every event and both heartbeat, so neither holds a snapshot buffer.
    """

    def __init__(self, kernel: KernelProcess):
        super().__init__(name="forger", daemon=True)
        self.kernel = kernel
        self.run_dir = kernel.run_dir
        self.sent: dict[str, int] = {}  # what we expect the kernel to count
        self.forged_seqs: list[int] = []
        self.first_live_seq: dict[str, int] = {}  # per peer: its welcome's resume_from (the next seq)
        self.accepted_paths: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set by the test once the kernel has exited
        self.done = threading.Event()

    def count(self, key: str, n: int = 1) -> None:
        self.sent[key] = self.sent.get(key, 0) + n

    def run(self) -> None:
        peers = {}
        try:
            credential = attach_credential(self.run_dir)
            peers = {"bystander": Intruder(self.run_dir, "bystander", subscribe=True),
                     "shadow": Intruder(self.run_dir, "shadow", subscribe=True)}
            for label, peer in peers.items():
                if peer.next_event(120) is None:  # the first event: our subscription is live
                    raise AssertionError(f"{label}: no event within 120 s")
                peer.hello(f"{label}_peer", credential, capabilities=["checkpoint"] if label == "shadow" else [])
                self.first_live_seq[label] = peer.wait_reply("welcome")["resume_from"]
            self.loop(peers)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            for peer in peers.values():
                peer.close()
            self.done.set()

    def loop(self, peers: dict[str, Intruder]) -> None:
        bystander, shadow = peers["bystander"], peers["shadow"]
        next_beat, ended = 0.0, False
        outside = ["/etc/passwd", str(self.run_dir / "config.json"), str(self.run_dir / "checkpoints" / ".." / JOURNAL_NAME)]
        while not ended and not self.stop.is_set():
            if time.monotonic() >= next_beat:
                bystander.send("heartbeat")
                shadow.send("heartbeat")
                next_beat = time.monotonic() + 0.5
            for peer in peers.values():
                peer.receive(0.0)
            bystander.next_event(0.0)  # keep its queue short; the shadow's stream drives us
            event = shadow.next_event(0.05)
            if event is None:
                continue
            shadow.send("ack", seq=event["seq"])
            if event["type"] in ("end_training_session", "run_failed"):
                ended = True
            if event["type"] != "save_checkpoint":
                continue
            seq = event["seq"]
            self.forged_seqs.append(seq)
            fields = dict(step=event["step"], epoch=event["epoch"], sha256="0" * 64, size=1)
            for path in ("/etc/passwd", str(self.run_dir / "config.json")):
                bystander.send("checkpoint_saved", seq=seq, path=path, **fields)
            bystander.send("checkpoint_failed", seq=seq, reason="forged by a bystander")
            self.count("refused_not_persister", 3)
            for path in outside:
                shadow.send("checkpoint_saved", seq=seq, path=path, **fields)
            self.count("refused_settle_path", len(outside))
            for wrong_seq in (seq - 1, seq + 10**6):
                shadow.send("checkpoint_saved", seq=wrong_seq, path=str(self.run_dir / "checkpoints" / "x.pt"), **fields)
            self.count("refused_settle_seq", 2)
            # a path past the 1,000 characters of a reason (PATH_MAX is 4,096): published whole, not cut
            accepted = str(self.run_dir / "checkpoints" / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200) /
                           ("h" * 200) / f"forged-{seq}.pt")
            shadow.send("checkpoint_saved", seq=seq, path=accepted, **fields)
            self.accepted_paths.append(accepted)


def test_forged_checkpoint_saved_loses_no_checkpoint_and_names_no_outside_path(short_runs, tmp_path, kernels):
    """Every snapshot gets forged verdicts from two peers holding the attach credential (see Forger) while
    the real checkpoint plugin persists it. No checkpoint is lost (each save_checkpoint gets its
    checkpoint_saved from the real plugin, a file matching it; none failed; a skip only where the real plugin
    was still writing), no journal entry names a path outside the run directory, and every forgery is counted
    with its reason."""
    epochs = 2
    # priority "low": the writing thread at the plugins' nice 10, not 19, so a loaded box skips fewer snapshots
    kernel = KernelProcess(config(short_runs, [resolve_plugin("checkpoint", {"priority": "low"})], epochs=epochs,
                                  step_sleep_s=0.04, every_n_steps=10), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    forger = Forger(kernel)
    forger.start()
    try:
        result = kernel.result(timeout_s=180)
    finally:
        forger.stop.set()
        forger.done.wait(30)
    assert forger.error is None, f"the forger failed: {forger.error!r}"
    assert_completed(result, epochs)
    run_dir = Path(result["run_dir"]).resolve()
    events = read_events(run_dir)

    ready = of(events, "plugin_ready", "checkpoint")
    assert ready and ready[0].seq < of(events, "start_training_session")[0].seq, \
        f"the checkpoint plugin was not up when training started: {[e.data for e in of(events, 'plugin_hung')]}"
    saves = [e.seq for e in of(events, "save_checkpoint")]
    skips = of(events, "checkpoint_skipped")
    print(f"saves {saves}; forged {forger.forged_seqs}; welcomed from {forger.first_live_seq}; counted {result['bus']}; "
          f"skipped {[(e.step, e.data) for e in skips]}")
    assert len(saves) + len(skips) == epochs * STEPS_PER_EPOCH // 10, (saves, skips)
    # forged for every snapshot published after both forgers were welcomed (hello comes after the first event)
    first_live = max(forger.first_live_seq.values())
    assert [s for s in saves if s >= first_live] == [s for s in forger.forged_seqs if s >= first_live]
    assert len([s for s in forger.forged_seqs if s >= first_live]) >= 3, (first_live, saves)

    # no checkpoint lost: every snapshot persisted by the real plugin, whole, under its own seq
    real = {e.data["seq"]: e for e in of(events, "checkpoint_saved", "checkpoint")}
    assert sorted(real) == saves
    for seq, saved in real.items():
        path = Path(saved.data["path"])
        assert path.resolve().is_relative_to(run_dir / "checkpoints"), saved.data
        assert hashlib.sha256(path.read_bytes()).hexdigest() == saved.data["sha256"], f"{path} does not match seq {seq}"
    assert not of(events, "checkpoint_failed"), [e.data for e in of(events, "checkpoint_failed")]
    # A skip means both buffers were still being persisted when a snapshot was due: with a snapshot every 10
    # steps (>= 0.4 s) the real plugin took over 0.8 s to write one, which happens on a loaded box (none on
    # an idle one; ~50 ms a write). Forgeries cannot cause one: the kernel refuses every verdict that would
    # free a buffer early, and the shadow persister settled (and acked) every snapshot before any skip, so
    # it held no buffer: what kept both busy was the real persister's writing.
    shadow_settled = {e.data["seq"]: e.seq for e in of(events, "checkpoint_saved", "shadow_peer")}
    for skip in skips:
        assert "still being persisted" in skip.data["reason"], skip.data
        held = [s for s in saves if forger.first_live_seq["shadow"] <= s < skip.seq]
        assert all(shadow_settled.get(s, skip.seq) < skip.seq for s in held), (skip, shadow_settled)

    # no journal entry names a path outside the run directory
    for e in of(events, "checkpoint_saved") + of(events, "checkpoint_failed"):
        assert e.data["plugin"] in ("checkpoint", "shadow_peer"), e.data
        if "path" in e.data:
            assert Path(e.data["path"]).resolve().is_relative_to(run_dir), e.data
    journal_bytes = (run_dir / JOURNAL_NAME).read_bytes()
    assert b"/etc/passwd" not in journal_bytes and b"forged by a bystander" not in journal_bytes
    assert str(run_dir / "config.json").encode() not in journal_bytes
    # the shadow's own verdicts inside checkpoints/ are taken as its own, and only those
    shadow = [e.data["path"] for e in of(events, "checkpoint_saved", "shadow_peer")]
    assert shadow == forger.accepted_paths
    assert refused_counters(result) == forger.sent, result["bus"]


# -- 10. liveness: any message is a sign of life, silence is not -----------------------------------


def test_any_message_is_a_sign_of_life_and_a_silent_plugin_is_declared_hung(short_runs, tmp_path, kernels):
    """Two raw plugins that never send a heartbeat message: `chatty` acks events and logs, `silent` says
    hello and then nothing (alive, reading events). The chatty one is never declared hung; the silent one
    is, within the liveness window (3 x 1 s) of its hello, for its silence."""
    script = str(TESTS_DIR / "raw_quiet_plugin.py")
    plugins = [PluginConfig("chatty", "", command=[sys.executable, script, "chatty"]),
               PluginConfig("silent", "", command=[sys.executable, script, "silent"])]
    epochs = 2
    kernel = KernelProcess(config(short_runs, plugins, epochs=epochs, step_sleep_s=0.06), tmp_path)
    kernels.append(kernel)
    result = kernel.result(timeout_s=120)
    assert_completed(result, epochs)
    events = read_events(result["run_dir"])

    hung = of(events, "plugin_hung", "silent")
    assert hung, f"the silent plugin was never declared hung: {result['plugins']['silent']}"
    first = hung[0]
    ready = [e for e in of(events, "plugin_ready", "silent") if e.data["pid"] == first.data["pid"]]
    assert ready, "the hung process never said hello"
    assert "silent" in first.data["reason"], first.data
    waited = first.ts - ready[0].ts
    print(f"silent: hung {waited:.2f} s after its hello; {result['plugins']}")
    assert 2.5 < waited < 10, f"declared hung {waited:.1f} s after its hello (liveness is 3 x 1 s)"
    assert any(c.startswith("hung (silent") for c in result["plugins"]["silent"]["crashes"]), result["plugins"]

    assert not of(events, "plugin_hung", "chatty") and not of(events, "plugin_crashed", "chatty")
    assert result["plugins"]["chatty"]["restarts"] == 0, result["plugins"]["chatty"]
    chatty_ready = of(events, "plugin_ready", "chatty")[0]
    end = of(events, "end_training_loop")[-1]
    assert end.ts - chatty_ready.ts > 4.0, "the run was too short to prove the chatty plugin outlived a liveness window"
    assert len(of(events, "log", "chatty")) >= 6, "the chatty plugin's logs did not reach the kernel"
    assert refused_counters(result) == {}, result["bus"]


# -- 8. another local user ------------------------------------------------------------------------


PROBE_SCRIPT = r"""
import json, os, socket, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path, "rb") as f:
            f.read(1)
        out[path] = "read"
    except OSError as exc:
        out[path] = type(exc).__name__
for path in json.loads(sys.argv[2]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.sendall(b"\xff\x00\x00\x00\x00\x00\x00\x00\x01\x7f")  # a ZMTP greeting's start: we got in
        out[path] = "connected"
    except OSError as exc:
        out[path] = type(exc).__name__
    finally:
        s.close()
for path in json.loads(sys.argv[3]):
    try:
        os.listdir(path)
        out[path] = "listed"
    except OSError as exc:
        out[path] = type(exc).__name__
print(json.dumps({"uid": os.getuid(), "groups": os.getgroups(), "results": out}))
"""


@pytest.fixture
def other_user():
    """A fresh local user (name, uid, gid), removed at teardown; skipped where one cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user")
    if not shutil.which("useradd") or not shutil.which("userdel"):
        pytest.skip("useradd/userdel not installed")
    name = "tbtrust" + secrets.token_hex(3)
    made = subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        yield name, entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def python_for_anyone() -> str:
    """An interpreter another user may execute (the venv's links into /root, which is 0700 here)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system python3 another user could run")


def test_another_user_can_reach_neither_sockets_nor_journal_nor_checkpoints(tmp_path, kernels, other_user):
    """A run under a world-traversable runs directory: another local user cannot open its journal,
    credential, checkpoint or snapshot buffers, cannot list it, and cannot connect to its sockets (so
    cannot send it a stop); the run trains every epoch."""
    name, uid, gid = other_user
    base = Path(tempfile.mkdtemp(prefix="tb-trust-"))
    try:
        base.chmod(0o755)  # the other user can traverse the runs directory: only the run directory's mode protects it
        probe = base / "probe.txt"
        probe.write_text("readable by anyone\n")
        probe.chmod(0o644)
        epochs = 3
        cfg = config(base, [resolve_plugin("checkpoint", {})], epochs=epochs, step_sleep_s=0.0, every_n_steps=10)
        gate = tmp_path / "gate"  # the run waits at step 12, live (its sockets exist), until the probe is done
        open_gate(gate, 12)
        cfg.hyperparameters["gate"] = str(gate)
        kernel = KernelProcess(cfg, tmp_path)
        kernels.append(kernel)
        saved = kernel.wait_event("checkpoint_saved", timeout_s=120)
        run_dir = kernel.run_dir
        checkpoint = Path(saved.data["path"])
        # snapshot buffers: in /dev/shm, or in the run directory where /dev/shm is missing or too small
        buffers = sorted(Path("/dev/shm").glob(f"trainbus-*-{kernel.run_id}-slot*")) + sorted(run_dir.glob("trainbus-*-slot*"))
        assert buffers, "no snapshot buffer found"
        files = [str(p) for p in (run_dir / JOURNAL_NAME, run_dir / "credential", checkpoint, run_dir / "config.json",
                                  *buffers, probe)]
        sockets = [str(run_dir / "control.sock"), str(run_dir / "events.sock")]
        listings = [str(run_dir), str(checkpoint.parent), str(base)]
        assert all(Path(p).exists() for p in files + sockets)
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        for owner_only in (run_dir / JOURNAL_NAME, run_dir / "credential", *buffers):
            assert stat.S_IMODE(owner_only.stat().st_mode) & 0o077 == 0, f"{owner_only} is readable by others"

        probe_run = subprocess.run(
            [python_for_anyone(), "-I", "-c", PROBE_SCRIPT, json.dumps(files), json.dumps(sockets), json.dumps(listings)],
            user=uid, group=gid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60)
        assert probe_run.returncode == 0, probe_run.stderr
        report = json.loads(probe_run.stdout)
        assert report["uid"] == uid and 0 not in report["groups"], report
        results = report["results"]
        # the control: the other user can read what is meant for anyone beside the run directory
        assert results.pop(str(probe)) == "read" and results.pop(str(base)) == "listed", report
        assert results == {p: "PermissionError" for p in results}, report

        open_gate(gate, epochs * STEPS_PER_EPOCH)
        result = kernel.result(timeout_s=120)
        assert_completed(result, epochs)
        assert refused_counters(result) == {}, result["bus"]
        assert result["bus"].get("malformed", 0) == 0, result["bus"]
        assert not of(read_events(result["run_dir"]), "stop_requested")
    finally:
        shutil.rmtree(base, ignore_errors=True)


PLANT_SCRIPT = r"""
import json, os, sys
runs = sys.argv[1]
out = {}
for what, act in (("replace the registry", lambda: os.rename(sys.argv[2], os.path.join(runs, "registry.sqlite"))),
                  ("make a run directory", lambda: os.mkdir(os.path.join(runs, "20991231-000000-abcdef"))),
                  ("make .daemon", lambda: os.mkdir(os.path.join(runs, ".daemon-planted")))):
    try:
        act()
        out[what] = "done"
    except OSError as exc:
        out[what] = type(exc).__name__
print(json.dumps(out))
"""


def test_under_umask_000_another_user_can_plant_neither_a_registry_nor_a_run_in_the_runs_directory(other_user):
    """A daemon started under umask 000 made its runs directory (and the folders above it) writable by all: another
    user replaced registry.sqlite with one queueing their own target, and the daemon ran it as its owner. The runs
    directory is now made 0755 at most, and others can change nothing in it."""
    from conftest import trainbus_cmd

    name, uid, gid = other_user
    base = Path(tempfile.mkdtemp(prefix="tb-trust-"))
    runs = base / "made" / "runs"
    try:
        base.chmod(0o755)
        started = subprocess.run([*trainbus_cmd(), "daemon", "start", "--runs-dir", str(runs)], umask=0,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        for made in (runs.parent, runs):
            assert stat.S_IMODE(made.stat().st_mode) & 0o022 == 0, oct(made.stat().st_mode)
        planted = base / "planted.sqlite"  # theirs: a registry whose queue holds their job
        planted.write_bytes(b"SQLite format 3\x00")
        os.chown(planted, uid, gid)
        attempt = subprocess.run([python_for_anyone(), "-I", "-c", PLANT_SCRIPT, str(runs), str(planted)],
                                 user=uid, group=gid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                                 capture_output=True, text=True, timeout=60)
        assert attempt.returncode == 0, attempt.stderr
        assert json.loads(attempt.stdout) == {"replace the registry": "PermissionError",
                                              "make a run directory": "PermissionError",
                                              "make .daemon": "PermissionError"}, attempt.stdout
    finally:
        subprocess.run([*trainbus_cmd(), "daemon", "stop", "--runs-dir", str(runs)], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_a_runs_directory_others_can_write_or_a_registry_that_is_not_ours_is_refused_in_one_line(tmp_path):
    """Made so by hand (chmod 777, a shared folder): `run` and `daemon start` refuse it, exit 2, one line naming the
    fix, and the registry is not read; nothing is queued, nothing started."""
    from conftest import trainbus_cmd
    from trainbus.kernel.registry import Registry, RegistryError

    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)
    try:
        for command in (["daemon", "start"], ["run", "--epochs", "1"], ["run", "--epochs", "1", "--detach"]):
            done = subprocess.run([*trainbus_cmd(), *command, "--runs-dir", str(runs)], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 2 and done.stderr.count("\n") == 1, (command, done.stdout, done.stderr)
            assert done.stderr.startswith("error: runs_dir") and f"fix: chmod go-w {runs}" in done.stderr
        assert sorted(p.name for p in runs.iterdir()) == []
        with pytest.raises(RegistryError, match="writable by other users"):
            Registry(runs)
        runs.chmod(0o755)
        (runs / "registry.sqlite").touch(mode=0o666)
        os.chmod(runs / "registry.sqlite", 0o666)  # made by another hand while the directory was open to all
        with pytest.raises(RegistryError, match="not a file of this user's alone"):
            Registry(runs)
        done = subprocess.run([*trainbus_cmd(), "daemon", "start", "--runs-dir", str(runs)], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and "not a file of this user's alone" in done.stderr, (done.stdout, done.stderr)
        # a shared folder like /tmp (sticky, writable by all): refused as the runs directory, fine above one
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o1777)
        done = subprocess.run([*trainbus_cmd(), "run", "--epochs", "1", "--runs-dir", str(shared)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"use a directory of your own in it, e.g. {shared / 'runs'}" in done.stderr
        from trainbus.kernel.private_dirs import others_can_write

        assert others_can_write(shared / "runs") is None  # made by the run, 0755 at most: nobody else's to change
        # a project's group folder on a cluster (2775): runs go in it; the runs directory itself stays ours alone
        project = tmp_path / "project"
        project.mkdir()
        os.chown(project, -1, 4242)  # a group that is not this user's own
        project.chmod(0o2775)
        (project / "runs").mkdir(mode=0o755)
        assert others_can_write(project / "runs") is None
        (project / "runs").chmod(0o775)
        assert "writable by other users" in (others_can_write(project / "runs") or "")
        project.chmod(0o2777)
        assert "writable by other users" in (others_can_write(project / "runs") or "")
    finally:  # a daemon that started all the same is stopped
        subprocess.run([*trainbus_cmd(), "daemon", "stop", "--runs-dir", str(runs)], capture_output=True, timeout=120)


def test_snapshot_buffer_names_another_user_took_first_send_the_buffers_to_the_run_directory(other_user):
    """A buffer's name (trainbus-<kernel pid>-<run id>-slot<i>) is on the preparer's command line, which every local
    user can read. Another user who made files of those names in /dev/shm first had the kernel's unlink of them fail
    (EPERM: the directory is sticky), which ended the allocation before it tried the run directory: every checkpoint
    of the run was skipped. Such a name is now passed over like a full /dev/shm: the buffers go to the next place.
    The kernel here is a forked child running as a user of its own (root may remove anyone's file)."""
    import torch

    from trainbus.kernel.buffer_files import buffer_name
    from trainbus.kernel.snapshot import SnapshotBuffers

    _, uid, gid = other_user
    shm = Path(tempfile.mkdtemp(prefix="tb-shm-"))
    shm.chmod(0o1777)  # as /dev/shm is: sticky, writable by all
    base = Path(tempfile.mkdtemp(prefix="tb-trust-"))  # the other user can reach it (tmp_path's parents are 0700)
    base.chmod(0o755)
    run_dir = base / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, uid, gid)
    run_id = "squat-" + secrets.token_hex(3)
    state = {"weights": torch.arange(1000, dtype=torch.float32)}
    go_read, go_write = os.pipe()
    said_read, said_write = os.pipe()
    child = os.fork()
    if child == 0:  # the kernel, as the other user
        try:
            os.close(go_write)
            os.setgid(gid)
            os.setgroups([])
            os.setuid(uid)
            os.read(go_read, 1)  # once its buffer names are taken
            buffers = SnapshotBuffers(run_id, [shm, run_dir])
            snapshot = buffers.take(state, lambda slot: True)
            os.write(said_write, str(snapshot.buffer if snapshot else None).encode())
            buffers.close()
        except BaseException as exc:
            os.write(said_write, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    try:
        os.close(said_write)
        squatted = [shm / f"{buffer_name(run_id).replace(str(os.getpid()), str(child))}-slot{slot}" for slot in (0, 1)]
        for path in squatted:
            path.touch()  # someone else's (here root's, which the other user cannot remove either)
        os.write(go_write, b"1")
        said = os.read(said_read, 4096).decode()
        os.waitpid(child, 0)
        assert Path(said).parent == run_dir, said
        assert all(path.exists() for path in squatted)  # theirs, untouched
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_a_key_directory_another_user_could_swap_lets_none_of_their_keys_in(other_user):
    """`trainbus keys generate` under umask 000 made the folders above the key directory writable by all: another
    user renamed the key directory of a running daemon and put theirs in its place, with their key in control/,
    and the daemon ran the target they submitted with it, as its owner. The folders are now made 0755 at most; a
    daemon or kernel refuses to start on a key directory others could swap, and a running one that finds it so lets
    no key in (as with any key directory it cannot trust)."""
    from conftest import trainbus_cmd
    from trainbus.kernel.daemon_files import daemon_dir
    from trainbus.kernel.keys import KeyStore

    name, uid, gid = other_user
    base = Path(tempfile.mkdtemp(prefix="tb-trust-"))
    runs = base / "runs"
    keys = base / "config" / "trainbus" / "keys"

    def trainbus(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess:
        return subprocess.run([*trainbus_cmd(), *args], capture_output=True, text=True, timeout=120, umask=umask)

    try:
        base.chmod(0o755)
        for made in (trainbus("keys", "generate", "server", "--keys-dir", str(keys), umask=0),
                     trainbus("keys", "generate", "client", "alice", "--role", "control", "--keys-dir", str(keys),
                              umask=0)):
            assert made.returncode == 0, made.stderr
        for folder in (keys.parent, keys.parent.parent):
            assert stat.S_IMODE(folder.stat().st_mode) & 0o022 == 0, oct(folder.stat().st_mode)
        keys.parent.chmod(0o777)  # as an older trainbus, or the owner's hand, left it
        refused = trainbus("daemon", "start", "--runs-dir", str(runs), "--listen", "127.0.0.1:0", "--keys-dir",
                           str(keys))
        assert refused.returncode == 2 and f"chmod go-w {keys.parent}" in refused.stderr, refused.stderr
        keys.parent.chmod(0o755)
        started = trainbus("daemon", "start", "--runs-dir", str(runs), "--listen", "127.0.0.1:0", "--keys-dir",
                           str(keys))
        assert started.returncode == 0, started.stderr
        theirs = KeyStore(base / "theirs")  # the other user's own key pair
        planted = theirs.generate_client("mallory", "control")
        shutil.chown(theirs.directory, uid, gid)
        for path in (*planted, planted[0].parent):
            shutil.chown(path, uid, gid)
        keys.parent.chmod(0o777)  # open again, while the daemon serves
        swap = subprocess.run([python_for_anyone(), "-I", "-c", (
            "import os, shutil, sys\n"
            "keys, public = sys.argv[1], sys.argv[2]\n"
            "os.rename(keys, keys + '.theirs-now')\n"
            "os.makedirs(os.path.join(keys, 'control'))\n"
            "shutil.copy(public, os.path.join(keys, 'control', 'mallory.key'))\n"), str(keys), str(planted[0])],
            user=uid, group=gid, extra_groups=[], cwd="/", capture_output=True, text=True, timeout=60)
        assert swap.returncode == 0, swap.stderr
        endpoint = json.loads((daemon_dir(runs) / "remote.json").read_text())["endpoint"]
        submitted = trainbus("daemon", "submit", "--remote", endpoint, "--key", str(planted[1]), "--server-key",
                             str(daemon_dir(runs) / "remote.json"), "--", "/nowhere/evil.py:build")
        assert submitted.returncode == 2 and "refused this client's key" in submitted.stderr, \
            (submitted.stdout, submitted.stderr)
        said = (daemon_dir(runs) / "daemon.log").read_text()
        assert f"no client key is let in while another user could change the key directory: key directory {keys} " \
               f"could be written by others (mode 755, owner uid {uid})" in said, said[-2000:]
    finally:
        trainbus("daemon", "stop", "--runs-dir", str(runs))
        shutil.rmtree(base, ignore_errors=True)
