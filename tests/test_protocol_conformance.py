"""proto/PROTOCOL.md, statement by statement, against a real kernel (its own process, its real ipc sockets)
and a client written from the spec alone: raw pyzmq + msgpack, attached with the run's credential.

Each check names the statement of the conformance table (PROTOCOL.md, appendix) it holds, e.g. [C12].
Nothing is mocked.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
import zlib

from pathlib import Path

import msgpack
import zmq

from fixture_targets import open_gate
from kernel_process import Command, KernelProcess, of, wait_until
from test_trust import LIMITS, Intruder, attach_credential, config, short_runs, wait_sockets  # noqa: F401
from trainbus.kernel.config import PluginConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.proto import decode_control, decode_event, pack
from trainbus.sdk import Plugin

ENVELOPE_KEYS = {"v", "seq", "run", "type", "ts", "step", "epoch", "data"}
STEPS_PER_EPOCH = 45  # the digits demo at batch size 32
NAME = "conformance"


class Client(Intruder):
    """The spec's client: SUB to everything, DEALER with its own routing id, hello after the first event."""

    def __init__(self, run_dir):
        super().__init__(run_dir, NAME, subscribe=True)
        self.events: list[tuple[list[bytes], dict]] = []  # (frames, envelope) as received on the SUB
        # [C105] and the bursts socket beside events.sock, everything subscribed
        self.bursts_sub = self.ctx.socket(zmq.SUB)
        self.bursts_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.bursts_sub.setsockopt(zmq.LINGER, 0)
        self.bursts_sub.connect(f"ipc://{self.run_dir / 'bursts.sock'}")
        self.bursts: list[list[bytes]] = []  # frames of each burst as received
        self.said_hello, self.next_beat = False, 0.0

    def hello(self, *args, **fields) -> None:
        super().hello(*args, **fields)
        self.said_hello = True

    def beat(self) -> None:
        """[C60] a heartbeat every half interval after hello: an attached peer lives while it talks."""
        if self.said_hello and time.monotonic() >= self.next_beat:
            self.send("heartbeat")
            self.next_beat = time.monotonic() + 0.5

    def receive(self, timeout_s: float = 0.0) -> dict | None:
        self.beat()
        return super().receive(timeout_s)

    def drain_events(self, timeout_s: float = 0.0) -> None:
        self.beat()
        while self.bursts_sub.poll(0):
            self.bursts.append(self.bursts_sub.recv_multipart())
        while self.sub.poll(int(timeout_s * 1000)):
            self.beat()
            frames = self.sub.recv_multipart()
            self.events.append((frames, msgpack.unpackb(frames[-1], **LIMITS)))
            timeout_s = 0.0

    def wait_event(self, where, timeout_s: float = 30.0) -> dict:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for _, event in self.events:
                if where(event):
                    return event
            self.drain_events(0.1)
        raise AssertionError(f"no such event within {timeout_s:.0f} s")

    def request(self, type_: str, answer: str, timeout_s: float = 20.0, **fields) -> dict:
        self.send(type_, **fields)
        return self.wait_reply(answer, timeout_s)


def test_the_wire_of_a_real_run_is_as_specified(short_runs, tmp_path, kernels):  # noqa: F811
    """Envelopes and frames [C12, C14], welcome [C36], malformed input dropped and counted and never fatal [C9,
    C69-C71], metric/log republishing [C46, C47], replay batches [C40], run_state [C51],
    command ids [C44], checkpoints without a persister [C26], final events [C31], bye of an attached peer [C42]."""
    cfg = config(short_runs, epochs=2, step_sleep_s=0.03)
    gate = tmp_path / "gate"  # the last batch waits for the client's bye to be handled: the run is live for it
    open_gate(gate, 2 * STEPS_PER_EPOCH - 1)
    cfg.hyperparameters["gate"] = str(gate)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    client = Client(kernel.run_dir)
    try:
        client.drain_events(60.0)  # the first event proves the subscription is live: then hello
        assert client.events, "no event within 60 s of connecting"
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["metric", "log", "checkpoint_now"])
        welcome = client.wait_reply("welcome")
        # [C36] welcome: run id, the heartbeat interval, and for best_effort the next seq to be published
        assert welcome["v"] == 1 and welcome["run"] == kernel.run_id, welcome
        assert type(welcome["heartbeat_interval_s"]) is float and welcome["heartbeat_interval_s"] == 1.0, welcome
        ready = client.wait_event(lambda e: e["type"] == "plugin_ready" and e["data"]["plugin"] == NAME)
        assert 1 < welcome["resume_from"] <= ready["seq"], (welcome, ready["seq"])
        assert ready["data"]["delivery"] == "best_effort" and ready["data"]["pid"] == os.getpid()
        client.wait_event(lambda e: e["type"] == "start_epoch", timeout_s=120)

        # [C9, C69-C71] malformed control input: dropped, counted, never acted on, no answer
        malformed = [
            [b"", msgpack.packb({"v": 1, "type": "checkpoint_now", "reason": "a REQ's delimiter frame"})],
            [msgpack.packb({"v": 2, "type": "checkpoint_now", "reason": "v=2"})],
            [msgpack.packb({"v": True, "type": "checkpoint_now", "reason": "v=true"})],
            [msgpack.packb({"v": 1.0, "type": "checkpoint_now", "reason": "v=1.0"})],
            [msgpack.packb({"v": 1, "type": "launch_missiles"})],
            [msgpack.packb({"v": 1, "type": "checkpoint_now"})],  # a missing required field
            [msgpack.packb({"v": 1, "type": "ack", "seq": True})],  # bool where an int is expected
            [msgpack.packb({"v": 1, "type": "ack", "seq": -1})],  # breaks a constraint
            [msgpack.packb({"v": 1, "type": "log", "level": "fatal", "text": "not a level"})],
            [msgpack.packb({"v": 1, "type": "metric", "name": "conf/nan", "value": math.nan, "step": None})],
            [msgpack.packb({"v": 1, "type": "metric", "name": "conf/bool", "value": True, "step": None})],
            [msgpack.packb({"v": 1, 7: "heartbeat"})],  # a map key that is not a string
            [msgpack.packb({"v": 1, "type": "heartbeat", "x": msgpack.ExtType(1, b"")})],  # an ext type
            [b"\xc1 not msgpack"],
        ]
        for frames in malformed:
            client.dealer.send_multipart(frames)
        # [C46] a metric reply: republished with the sender's name, a nil step (and its epoch) filled in, an int
        # value accepted
        client.send("metric", name="conf/reading", value=3, step=None, unknown_extra_field="ignored")  # [C33]
        client.send("log", level="warning", text="conformance says hi")  # [C47]
        metric = client.wait_event(lambda e: e["type"] == "metric" and e["data"]["name"] == "conf/reading")
        assert metric["data"] == {"plugin": NAME, "name": "conf/reading", "value": 3.0,
                                  "step": metric["step"], "epoch": metric["epoch"]} \
            and type(metric["data"]["step"]) is int and type(metric["data"]["epoch"]) is int, metric
        log_event = client.wait_event(lambda e: e["type"] == "log" and e["data"]["plugin"] == NAME)
        assert log_event["data"] == {"plugin": NAME, "level": "warning", "text": "conformance says hi"}
        # [C44] a command id acts once per (sender, id): the resend is counted, not acted on
        client.send("checkpoint_now", reason="conformance", id="cmd-1")
        client.send("checkpoint_now", reason="conformance again", id="cmd-1")

        # [C40] replay: from_seq 0 means 1; consecutive events from from_seq, <= 512 a batch, done at the end
        replayed, next_seq = [], 0
        while True:
            batch = client.request("replay", "replay_batch", from_seq=next_seq)
            seqs = [e["seq"] for e in batch["events"]]
            assert seqs == list(range(max(next_seq, 1), max(next_seq, 1) + len(seqs))), seqs[:5]
            assert 0 < len(seqs) <= 512 and all(set(e) >= ENVELOPE_KEYS for e in batch["events"])
            replayed += batch["events"]
            next_seq = seqs[-1] + 1
            if batch["done"]:
                break
        # [C51] snapshot -> run_state: the state as of seq, no later event folded in
        run_state = client.request("snapshot", "run_state")
        assert type(run_state["seq"]) is int and run_state["seq"] >= next_seq - 1, run_state["seq"]
        state = run_state["state"]
        assert state["run"]["id"] == kernel.run_id and state["progress"]["step"] >= 0, state
        assert state["plugins"][NAME]["delivery"] == "best_effort", state["plugins"]

        client.send("bye", reason="conformance done")  # [C42]
        client.said_hello = False  # gone: it says nothing more (a heartbeat now would come from an unknown peer)
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == NAME, timeout_s=120)
        open_gate(gate, 2 * STEPS_PER_EPOCH)
        final = client.wait_event(lambda e: e["type"] == "end_training_session", timeout_s=120)
        end = time.monotonic() + 30  # its burst goes out right after it
        while time.monotonic() < end and not (
                client.bursts and msgpack.unpackb(zlib.decompress(client.bursts[-1][0]), **LIMITS)[-1]["seq"]
                >= final["seq"]):
            client.drain_events(0.1)
    finally:
        open_gate(gate, 2 * STEPS_PER_EPOCH)
        client.close()
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    bus = result["bus"]
    assert bus.get("malformed") == len(malformed), bus  # every one dropped and counted, once
    assert bus.get("duplicate_command") == 1, bus
    assert not any(k.startswith("refused_") and v for k, v in bus.items()), bus  # no refusal: nothing was acted on

    events = read_events(kernel.run_dir)
    # [C14, C85] the journal's seqs are 1, 2, 3, ... with no gap
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # [C12] every event as received: two frames, the topic is its type, v 1, the run's id, typed fields
    journal = {e.seq: e for e in events}
    assert client.events
    for frames, envelope in client.events:
        assert len(frames) == 2 and frames[0] == envelope["type"].encode(), frames[0]
        assert set(envelope) >= ENVELOPE_KEYS and envelope["v"] == 1 and envelope["run"] == kernel.run_id
        for key in ("v", "seq", "step", "epoch"):
            assert type(envelope[key]) is int, (key, envelope)
        assert type(envelope["ts"]) is float and isinstance(envelope["data"], dict)
        assert journal[envelope["seq"]].type == envelope["type"]  # [C78] the same event the journal holds
    received = [envelope["seq"] for _, envelope in client.events]
    assert received == sorted(received), "[C14] events arrive in seq order"
    # [C105] a burst is one frame, zlib of at most 256 KiB: an array of envelopes consecutive in seq, each the
    # journal's; together they hold every event from the first one received on (a held-back heartbeat repeats a seq)
    assert client.bursts
    burst_seqs = []
    for frames in client.bursts:
        assert len(frames) == 1, [len(f) for f in frames]
        body = zlib.decompress(frames[0])
        assert len(body) <= 256 * 1024, len(body)
        envelopes = msgpack.unpackb(body, **LIMITS)
        assert type(envelopes) is list and envelopes, envelopes
        seqs = [envelope["seq"] for envelope in envelopes]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert all(decode_event(pack(envelope)) == journal[envelope["seq"]] for envelope in envelopes)
        burst_seqs += seqs
    assert burst_seqs == sorted(burst_seqs) and set(burst_seqs) == set(range(burst_seqs[0], burst_seqs[-1] + 1))
    assert burst_seqs[-1] >= final["seq"], (burst_seqs[-1], final["seq"])
    # [C40, C78] what replay served is what the journal holds
    assert [e["seq"] for e in replayed] == list(range(1, len(replayed) + 1))
    assert all(journal[e["seq"]].type == e["type"] and journal[e["seq"]].ts == e["ts"] for e in replayed)
    # the malformed checkpoint_now / stop never reached the loop; the one valid checkpoint_now did (once)
    assert not of(events, "stop_requested")
    assert len(of(events, "checkpoint_skipped")) == 1, [e.data for e in of(events, "checkpoint_skipped")]
    assert not of(events, "save_checkpoint"), "[C26] published only while a checkpoint plugin is attached"
    assert [e.data["name"] for e in of(events, "metric")] == ["conf/reading"]
    assert not [e for e in of(events, "log") if "not a level" in e.data["text"]]
    # [C31] after the final event: only heartbeats, supervisor events and late replies; [C104] bus_closing last
    after = [e.type for e in events if e.seq > final["seq"]]
    assert after[-1:] == ["bus_closing"] and after.count("bus_closing") == 1, after
    assert all(t == "heartbeat" or t.startswith("plugin_") or t in ("metric", "log") for t in after[:-1]), after
    # [C42] the attached peer's bye is its exit
    exited = [e for e in of(events, "plugin_exited") if e.data["plugin"] == NAME]
    assert len(exited) == 1 and exited[0].data["exit_code"] == 0
    # [C95] every data key of every event this run journaled is named in its type's row of the event tables
    undocumented = sorted({(e.type, key) for e in events for key in e.data if key not in documented_keys(e.type)})
    assert not undocumented, f"proto/PROTOCOL.md's event tables do not name: {undocumented}"


def documented_keys(type_: str, _rows: dict[str, str] = {}) -> set[str]:
    """The `names` in PROTOCOL.md's table row for an event type, with those of the rows it takes every key of."""
    if not _rows:
        spec = (Path(__file__).resolve().parents[1] / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
        for line in spec.splitlines():
            cells = line.split("|")
            if line.startswith("| `") and len(cells) > 2:
                _rows.setdefault(cells[1].strip().strip("`"), line)
    row = _rows.get(type_, "")
    names = set(re.findall(r"`([a-z_]+)`", row))
    for other in re.findall(r"every key of `([a-z_]+)`", row):
        names |= documented_keys(other)
    return names


def test_a_kernel_heartbeat_comes_every_interval_and_each_names_it(short_runs, tmp_path, kernels):  # noqa: F811
    """[C58] the kernel's heartbeat event: every interval_s (1 s) while training, data.interval_s the interval;
    [C17] kernel events carry the step and epoch of the event numbered just before them."""
    kernel = KernelProcess(config(short_runs, epochs=1, step_sleep_s=0.1), tmp_path)
    kernels.append(kernel)
    result = kernel.result(timeout_s=180)
    assert result["status"] == "completed", result
    events = read_events(kernel.run_dir)
    start = of(events, "start_training_session")[0].seq
    end = of(events, "end_training_session")[0].seq
    beats = [e for e in of(events, "heartbeat") if start < e.seq < end]
    assert len(beats) >= 3, "the run must last a few seconds"
    assert all(b.data["interval_s"] == 1.0 for b in beats)
    gaps = [b.ts - a.ts for a, b in zip(beats, beats[1:])]
    assert max(gaps) <= 2.0 and min(gaps) >= 0.5, gaps  # 2 intervals: as the hostile-load tests allow
    # numbered behind batch events still in their 100 ms burst, a heartbeat carries the last of them
    before = (0, 0)
    for e in events:
        if e.type == "heartbeat":
            assert (e.step, e.epoch) == before, e
        before = (e.step, e.epoch)


def test_a_vote_holds_the_kernel_at_end_epoch_boundedly_and_a_stop_before_the_ack_lands_there(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C54] after an event a peer votes at, the kernel waits for its ack, at most vote_timeout_s: a silent voter
    costs that much once, and is not waited for again until it acks the vote it missed; [C55] a stop sent before
    the ack lands at that epoch's boundary."""
    cfg = config(short_runs, epochs=8, step_sleep_s=0.03)
    cfg.vote_timeout_s = 4.0
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    client = Client(kernel.run_dir)
    try:
        client.drain_events(60.0)
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["stop"], votes=["end_epoch"])
        client.wait_reply("welcome")
        ready = client.wait_event(lambda e: e["type"] == "plugin_ready" and e["data"]["plugin"] == NAME)
        silent = client.wait_event(lambda e: e["type"] == "end_epoch" and e["seq"] > ready["seq"], timeout_s=120)
        # say nothing but heartbeats: the kernel waits vote_timeout_s, then trains on, and at the next boundary
        # does not wait for a voter still behind the vote it missed
        skipped = client.wait_event(lambda e: e["type"] == "end_epoch" and e["epoch"] == silent["epoch"] + 1,
                                    timeout_s=120)
        client.wait_event(lambda e: e["type"] == "start_epoch" and e["epoch"] == skipped["epoch"] + 1, timeout_s=120)
        client.send("ack", seq=silent["seq"])  # the missed vote, answered late: waited for again from here
        voted = client.wait_event(lambda e: e["type"] == "end_epoch" and e["epoch"] == skipped["epoch"] + 1,
                                  timeout_s=120)
        time.sleep(1.0)  # a slow voter: the kernel waits for it
        client.send("stop", reason="conformance: stop at this epoch")
        client.send("ack", seq=voted["seq"])
        final = client.wait_event(lambda e: e["type"] == "end_training_session", timeout_s=120)
    finally:
        client.close()
    result = kernel.result(timeout_s=120)
    assert result["status"] == "stopped", result
    events = read_events(kernel.run_dir)
    starts = {e.epoch: e for e in of(events, "start_epoch")}
    waited = starts[silent["epoch"] + 1].ts - silent["ts"]
    assert 3.5 <= waited <= 4.0 + 2.0, f"a silent voter held the boundary {waited:.2f} s (vote_timeout_s 4)"
    waited_again = starts[skipped["epoch"] + 1].ts - skipped["ts"]
    assert waited_again < 3.5, f"a voter behind the vote it missed held the next boundary {waited_again:.2f} s"
    assert voted["epoch"] + 1 not in starts, "the stop sent before the ack must land at that epoch's end"
    assert final["data"]["epochs_completed"] == voted["epoch"] and final["data"]["stopped_early"] is True
    assert final["data"]["stop_reasons"] == [f"{NAME}: stop: conformance: stop at this epoch"], final["data"]
    assert (kernel.run_dir / "kernel.log").read_text().count(f"no vote from {NAME} at end_epoch") == 1
    # and in the journal, where the console and `runs show` read it: kernel.log alone is no one's console
    missed = [e.data for e in of(events, "vote_missed")]
    assert missed == [{"plugins": [NAME], "at": "end_epoch", "seq": silent["seq"], "timeout_s": 4.0}], missed
    # a peer attached by hand has no entry in the supervisor's summary: `runs show` counts it from the journal
    shown = Command("runs", "show", kernel.run_id, "--runs-dir", str(short_runs), "--json")
    details = json.loads(shown.communicate(120)[0])
    assert details["plugins"][NAME]["votes_missed"] == 1, details["plugins"]


class EnvProbe(Plugin):
    """A spawned plugin that writes down the environment it was given (the secret: only whether it is left)."""

    settings = {"path": ""}

    def setup(self):
        names = ("TRAINBUS_RUN_ID", "TRAINBUS_RUN_DIR", "TRAINBUS_KERNEL_PID", "TRAINBUS_PLUGIN_NAME", "RUN_ID",
                 "RUN_DIR", "TRAINBUS_EVENTS", "TRAINBUS_CONTROL")
        seen = {name: os.environ.get(name) for name in names}
        seen.update(secret_left=os.environ.get("TRAINBUS_SECRET"), ppid=os.getppid(), pgid=os.getpgid(0), pid=os.getpid())
        with open(self.settings["path"], "w") as f:
            json.dump(seen, f)


def test_a_spawned_plugin_gets_the_environment_of_section_2_and_the_reference_client_drops_its_secret(
        short_runs, tmp_path):  # noqa: F811
    """[C2, C8] the environment a spawned plugin gets; [C4] the reference client takes TRAINBUS_SECRET out of its
    environment once read (and its hello, proved by it, was welcomed); [C59] fast heartbeats while it starts."""
    out = tmp_path / "env.json"
    cfg = config(short_runs, plugins=[PluginConfig("probe", "test_protocol_conformance:EnvProbe", {"path": str(out)})],
                 epochs=1, step_sleep_s=0.0)
    result = run_training(cfg)
    assert result.status == "completed", result
    seen = json.loads(out.read_text())
    run_dir = str(Path(result.run_dir).resolve())
    assert seen["TRAINBUS_RUN_ID"] == seen["RUN_ID"] == result.run_id
    assert str(Path(seen["TRAINBUS_RUN_DIR"]).resolve()) == str(Path(seen["RUN_DIR"]).resolve()) == run_dir
    assert Path(seen["TRAINBUS_RUN_DIR"]).is_absolute()
    assert seen["TRAINBUS_KERNEL_PID"] == str(os.getpid()) == str(seen["ppid"]), seen  # the kernel is the parent
    assert seen["pgid"] == seen["pid"] != os.getpgid(0), "a process group of its own"
    assert seen["TRAINBUS_PLUGIN_NAME"] == "probe"
    assert seen["TRAINBUS_EVENTS"].startswith("ipc://") and seen["TRAINBUS_CONTROL"].startswith("ipc://")
    assert seen["secret_left"] is None, "the reference client must drop TRAINBUS_SECRET once read"
    events = read_events(result.run_dir)
    assert [e.data["plugin"] for e in of(events, "plugin_ready")] == ["probe"]  # its hello was proved
    assert all(e.run == result.run_id for e in events)
    # [C59] heartbeats every 0.1 s while the spawned plugin starts (slow joiners), then every interval_s
    start = of(events, "start_training_session")[0].seq
    early = [e.ts for e in of(events, "heartbeat") if e.seq < start]
    assert len(early) >= 3, "the plugin's start must take a few startup heartbeats"
    assert max(b - a for a, b in zip(early, early[1:])) <= 0.5, early


def test_optional_fields_added_within_v1_default_and_unknown_envelope_fields_are_ignored():
    """[C56] a hello without votes, capabilities and secret means [], [] and ""; [C18] a receiver ignores an
    envelope field it does not know."""
    hello = decode_control(pack({"v": 1, "type": "hello", "name": "old", "pid": 1, "subscriptions": [""],
                                 "replies": [], "delivery": "best_effort"}))
    assert (hello["votes"], hello["capabilities"], hello["secret"]) == ([], [], "")
    event = decode_event(pack({"v": 1, "seq": 3, "run": "r", "type": "log", "ts": 1.0, "step": 0, "epoch": 0,
                               "data": {}, "added_in_v1_9": "x"}))
    assert (event.seq, event.type, event.data) == (3, "log", {})


def test_durable_resume_from_is_one_past_the_last_ack_in_a_kernel_process_and_1_in_a_new_one(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C74] a durable name that comes back to the same kernel is welcomed with resume_from = 1 + its last ack,
    and at once after its bye [C94];
    [C75] a new kernel process (the run resumed after kill -9) answers resume_from = 1."""
    cfg = config(short_runs, plugins=[resolve_plugin("checkpoint", {})], epochs=1, step_sleep_s=0.0,
                 every_n_steps=10)
    # Training goes as far as the gate says, however slow the box: not a batch before the first welcome (the
    # client sees step 5 live), then to held_at_step in the killed kernel and again in the resumed one (it
    # reads the same gate), which both wait there while the client talks to them, then to the end.
    gate, held_at_step = tmp_path / "gate", 12
    open_gate(gate, 0)
    cfg.hyperparameters["gate"] = str(gate)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)

    def durable_hello(first_try: bool = False) -> tuple[Client, dict]:
        """Welcomed as NAME, durable. An attached name is free once its holder's bye was handled [C94], or its
        holder was silent for the liveness window: a refused hello is tried again on a new connection, unless
        `first_try` (the bye is known to be handled)."""
        end = time.monotonic() + 30.0
        while True:
            client = Client(kernel.run_dir)
            client.drain_events(60.0)
            client.hello(NAME, attach_credential(kernel.run_dir), delivery="durable")
            answer = None
            deadline = time.monotonic() + 10.0
            while answer is None and time.monotonic() < deadline:
                msg = client.receive(0.1)
                if msg is not None and msg["type"] in ("welcome", "refused"):
                    answer = msg
            if answer is not None and answer["type"] == "welcome":
                return client, answer
            client.close()
            assert answer is not None and "live peer holds" in answer["reason"], answer
            assert not first_try, f"refused though the holder's bye was handled: {answer}"
            assert time.monotonic() < end, "the name was never freed"
            time.sleep(1.0)

    client, welcome = durable_hello()
    try:
        assert welcome["resume_from"] == 1, welcome  # a new name
        open_gate(gate, held_at_step)  # a checkpoint at step 10, then both kernels wait
        acked = client.wait_event(lambda e: e["type"] == "end_training_batch" and e["step"] >= 5, timeout_s=120)["seq"]
        client.send("ack", seq=acked)
        client.send("bye", reason="back soon")
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == NAME, timeout_s=60)
    finally:
        client.close()
    client, welcome = durable_hello(first_try=True)  # the same name, a new connection, the same kernel
    try:
        assert welcome["resume_from"] == acked + 1, (welcome, acked)
        client.send("bye", reason="back after the kernel")
    finally:
        client.close()
    kernel.wait_event("checkpoint_saved", timeout_s=120)
    kernel.kill()

    # `trainbus run --resume`, forked with torch loaded (kernel_process.Command): a new kernel process all the same
    resumed = Command("run", "--resume", kernel.run_id, "--runs-dir", str(short_runs), cwd=tmp_path)
    try:
        def restarted():
            assert resumed.poll() is None, resumed.communicate()[1]
            return [e for e in kernel.journal.of("start_training_session") if e.seq > acked]
        wait_until(restarted, 120, "the resumed run's start_training_session")
        client, welcome = durable_hello()
        try:
            assert welcome["resume_from"] == 1, welcome  # [C75] acks live in the kernel process's memory
            client.send("bye", reason="done")
        finally:
            client.close()
        open_gate(gate, STEPS_PER_EPOCH)
        _, stderr = resumed.communicate(timeout=180)
        assert resumed.returncode == 0, stderr
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()


def _held_kernel_and_client(runs: Path, tmp_path: Path, kernels: list, plugins=(),
                            steps: int = 0) -> tuple[KernelProcess, Path, Client]:
    """A one-epoch run held after `steps` batches (open_gate(gate, ...) lets it go on), its `plugins` said ready, and
    a raw client of it whose subscription is live."""
    cfg = config(runs, plugins=plugins, epochs=1, step_sleep_s=0.0)
    gate = tmp_path / "gate"
    cfg.hyperparameters["gate"] = str(gate)
    if steps:
        open_gate(gate, steps)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    for plugin in plugins:
        kernel.wait_event("plugin_ready", lambda e, name=plugin.name: e.data["plugin"] == name, timeout_s=120)
    wait_sockets(kernel)
    client = Client(kernel.run_dir)
    try:
        client.drain_events(60.0)  # the first event: our subscription is live
    except BaseException:
        client.close()
        raise
    return kernel, gate, client


def _recorder(tmp_path: Path) -> PluginConfig:
    """A durable plugin of the run's (fixture_plugins.Recorder), recording into tmp_path/recorded."""
    return PluginConfig("recorder", "fixture_plugins:Recorder", {"path": str(tmp_path / "recorded")})


def _bye(client: Client) -> None:
    """The client says bye and sees its plugin_exited: the kernel has let go of NAME."""
    client.send("bye", reason="done")
    client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == NAME)


def test_a_hello_name_of_no_or_over_200_characters_is_dropped_and_counted(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C71a] a hello's name rides in every event of its peer (a metric's or log's `plugin`): one of 250,000
    characters was welcomed, and each of its 400 burst metrics became a 250 KB event. A name of 1 to 200 characters
    is welcomed; an empty or longer one is a malformed hello: dropped, counted, not answered."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        for name in ("", "n" * 201, "n" * 250_000):
            client.hello(name, attach_credential(kernel.run_dir), replies=["metric"])
        client.hello("n" * 200, attach_credential(kernel.run_dir), replies=["metric"])
        assert client.wait_reply("welcome")["type"] == "welcome" and [m["type"] for m in client.replies] == ["welcome"]
        client.send("bye", reason="done")
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == "n" * 200)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["bus"]["malformed"] == 3, result["bus"]
    assert [e.data["plugin"] for e in of(read_events(kernel.run_dir), "plugin_ready")] == ["n" * 200]


def test_a_second_hello_under_another_name_on_one_connection_ends_the_first_name(
        short_runs, tmp_path, kernels):  # noqa: F811
    """A peer attached by hand that said hello as A, then hello as B on the same DEALER, was welcomed as B, but A
    was journaled `plugin_ready` and never gone: `runs show` listed it "gone with the run (no bye journaled)". The
    first name now leaves as with a bye: `plugin_exited` (exit code 0), its name free at once."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        client.hello("first-name", attach_credential(kernel.run_dir), replies=["metric"])
        assert client.wait_reply("welcome")["type"] == "welcome"
        client.replies.clear()
        client.hello("second-name", attach_credential(kernel.run_dir), replies=["metric"])
        assert client.wait_reply("welcome")["type"] == "welcome"
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == "first-name", 20.0)
        client.send("bye", reason="done")
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == "second-name")
    finally:
        client.close()
    open_gate(gate, 10**6)
    kernel.result(timeout_s=120)
    exits = [e.data for e in of(read_events(kernel.run_dir), "plugin_exited")]
    assert exits == [{"plugin": "first-name", "exit_code": 0}, {"plugin": "second-name", "exit_code": 0}], exits


def test_a_metric_of_a_negative_or_over_int64_step_or_epoch_or_of_no_name_is_dropped_and_counted(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C46a] a raw peer's metric at step -1, epoch -1 or step 2**64-1, or named "", was journaled as sent: a
    `metric` event at a step no run has, which every subscriber (metrics_log's CSV, TensorBoard, `attach`) took
    as given. Each breaks a Constraint of §7.1 on the message itself: dropped, counted `malformed`, not answered;
    the metric beside them that keeps them is journaled."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    bad = [dict(name="loss", value=1.0, step=-1), dict(name="loss", value=1.0, step=3, epoch=-1),
           dict(name="loss", value=1.0, step=2**63), dict(name="loss", value=1.0, step=2**64 - 1),
           dict(name="loss", value=1.0, step=3, epoch=2**63), dict(name="", value=1.0, step=3)]
    try:
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["metric"])
        client.wait_reply("welcome")
        for fields in bad:
            client.send("metric", **fields)
        client.send("metric", name="loss", value=2.0, step=2**63 - 1, epoch=0)
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["bus"]["malformed"] == len(bad), result["bus"]
    metrics = [(e.data["name"], e.data["value"], e.data["step"], e.data["epoch"])
               for e in of(read_events(kernel.run_dir), "metric") if e.data["plugin"] == NAME]
    assert metrics == [("loss", 2.0, 2**63 - 1, 0)]
    # the one line a peer's author finds in kernel.log names the field, its constraint and the value sent
    assert "metric.step must be nil or 0 to 2**63-1, got -1" in (kernel.run_dir / "kernel.log").read_text()


def test_a_hello_refused_on_a_welcomed_connection_loses_its_welcome_as_the_refusal_says(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C53] `refused` with `welcome_lost` true means nothing the connection sends is acted on (§7.2). A peer
    welcomed as A that said hello as B, a name another live peer holds, was told so (`hello_name_taken`,
    `welcome_lost` true), yet its next metric was journaled as A's: a client that read the refusal as the spec says
    (not welcome: exit, or hello again) had a name left behind that went on speaking for it. The connection is now
    welcome no more: A leaves as with a bye (`plugin_exited`, exit code 0), and what it sends next is refused."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    holder = Client(kernel.run_dir)
    try:
        holder.hello("held-name", attach_credential(kernel.run_dir))
        holder.wait_reply("welcome")
        client.hello("first-name", attach_credential(kernel.run_dir), replies=["metric"])
        client.wait_reply("welcome")
        client.replies.clear()
        client.hello("held-name", attach_credential(kernel.run_dir), replies=["metric"])
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("hello_name_taken", True), refused
        client.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == "first-name", 20.0)
        client.replies.clear()
        client.send("metric", name="after_refusal", value=1.0, step=None)
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("unknown_peer", True), refused
        holder.send("bye", reason="done")
        holder.wait_event(lambda e: e["type"] == "plugin_exited" and e["data"]["plugin"] == "held-name")
    finally:
        client.close()
        holder.close()
    open_gate(gate, 10**6)
    kernel.result(timeout_s=120)
    events = read_events(kernel.run_dir)
    assert [e.data for e in of(events, "metric")] == []
    exits = [e.data for e in of(events, "plugin_exited")]
    assert exits == [{"plugin": "first-name", "exit_code": 0}, {"plugin": "held-name", "exit_code": 0}], exits


def test_a_checkpoint_saved_whose_path_no_file_system_takes_is_refused_not_a_bus_error(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C50] a settlement's `path` outside the checkpoint directories is answered `refused` (§7.1, §11). A raw
    persister's checkpoint_saved whose path held a NUL byte (a valid msgpack str, a C string cut short) raised
    ValueError in the bus thread instead: an ERROR traceback in kernel.log, `bus_errors` in the summary, the
    bus's round cut short, and no answer. It is refused `settle_path` (welcome_lost false), and the run goes on."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["checkpoint_now"], capabilities=["checkpoint"])
        client.wait_reply("welcome")
        client.send("checkpoint_now", reason="a snapshot to settle")
        open_gate(gate, 1)  # one batch: its step boundary takes the checkpoint
        save = client.wait_event(lambda e: e["type"] == "save_checkpoint", 120.0)
        client.replies.clear()
        # seq 0 is no save_checkpoint: refused as any seq it was not sent, not dropped unanswered as an earlier
        # session's replayed one is
        client.send("checkpoint_failed", seq=0, reason="no such snapshot")
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("settle_seq", False), refused
        path = str(kernel.run_dir / "checkpoints" / "a\x00b.pt")
        client.send("checkpoint_saved", seq=save["seq"], path=path, step=1, epoch=1, sha256="0" * 64, size=1)
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("settle_path", False), refused
        client.send("checkpoint_failed", seq=save["seq"], reason="could not write it")  # still welcome: settled
        client.wait_event(lambda e: e["type"] == "checkpoint_failed" and e["data"]["plugin"] == NAME)
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    assert "bus_errors" not in result["bus"] and result["bus"].get("refused_settle_path") == 1, result["bus"]
    assert result["bus"].get("refused_settle_seq") == 1, result["bus"]
    assert "Traceback" not in (kernel.run_dir / "kernel.log").read_text()


def test_votes_at_a_type_the_kernel_never_waits_at_are_said_once_in_kernel_log(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C54] §7.3: the kernel waits for votes at `end_epoch` only. A raw peer whose hello voted at
    `end_training_batch` (any event type, as §7.1 read) was welcomed and never waited for, silently: its author saw
    stops land batches late with no word why. The welcome is unchanged, and kernel.log says once which of its
    votes are never waited for."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        for _ in range(2):  # a second hello on the same connection: said once, not per hello
            client.hello(NAME, attach_credential(kernel.run_dir), votes=["end_training_batch", "end_epoch"])
            client.wait_reply("welcome")
        open_gate(gate, 3)  # three batches go by without a wait for our vote, which never comes
        client.wait_event(lambda e: e["type"] == "end_training_batch" and e["data"]["batch_index"] == 2, 120.0)
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=120)["status"] == "completed"
    said = [line for line in (kernel.run_dir / "kernel.log").read_text().splitlines() if "never waited for" in line]
    assert len(said) == 1 and f"[{NAME}]" in said[0] and "end_training_batch" in said[0], said
    assert "end_epoch," not in said[0] and "end_epoch only" in said[0], said


def test_a_hello_said_again_on_a_welcomed_connection_under_its_name_is_one_plugin_ready(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C36] §7.1: `plugin_ready` says a peer became ready. A client saying hello again on the connection welcomed
    under that same name (a retry of a welcome it did not see in time) is welcomed again, and was journaled ready
    again: `runs show`, the console and the run's state saw one peer come up twice and leave once. One that says
    another pid or delivery is news, and is journaled (the run's state shows a plugin as its last ready says)."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        for delivery in ("best_effort", "best_effort", "durable"):
            client.hello(NAME, attach_credential(kernel.run_dir), delivery=delivery)
            client.wait_reply("welcome")  # each hello is answered: the retrying client needs its welcome
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=120)["status"] == "completed"
    events = read_events(kernel.run_dir)
    assert [e.data["delivery"] for e in of(events, "plugin_ready") if e.data["plugin"] == NAME] == [
        "best_effort", "durable"]
    assert [e.data["plugin"] for e in of(events, "plugin_exited")].count(NAME) == 1


def test_a_hello_whose_secret_is_not_ascii_is_refused_as_a_wrong_secret(short_runs, tmp_path, kernels):  # noqa: F811
    """[C34] a hello whose secret does not prove its name is refused (§7.1). A raw client's secret with a character
    outside ASCII (a credential read with a byte-order mark, a typo'd paste) raised TypeError in the bus thread
    (hmac.compare_digest takes ASCII strings only): an ERROR traceback in kernel.log, `bus_errors`, and no answer, so
    the client waited out its timeout instead of hearing "wrong secret"."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        client.hello(NAME, "\ufeff" + attach_credential(kernel.run_dir))
        client.said_hello = False  # not welcome: no heartbeat, whose refusal (unknown_peer) would come first
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("hello_secret", True), refused
        client.replies.clear()
        client.hello(NAME, attach_credential(kernel.run_dir))  # the right one is welcome
        client.wait_reply("welcome")
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert "bus_errors" not in result["bus"] and result["bus"].get("refused_hello_secret") == 1, result["bus"]


def test_an_attached_plugins_dirpath_outside_the_run_or_unresolvable_names_no_checkpoint_directory(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C50, C97] a persister's checkpoint_saved must name a path inside `<run_dir>/checkpoints` or a `dirpath` the run
    gave a plugin, inside the run directory (the run's config is checked so). An `attach_plugin` whose settings held a
    `dirpath` took it unchecked: with a NUL byte the bus thread raised (a traceback, `bus_errors`, no command_result);
    pointing outside the run, it made any path there one a persister's checkpoint_saved could name."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    try:
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["checkpoint_now"], capabilities=["checkpoint"])
        client.wait_reply("welcome")
        for plugin, dirpath in (("metrics_log", "a\x00b"), ("cpu", os.path.relpath(outside, kernel.run_dir))):
            client.send("attach_plugin", name=plugin, settings={"dirpath": dirpath}, id=plugin)
            client.wait_reply("command_result")
        client.send("checkpoint_now", reason="a snapshot to settle")
        open_gate(gate, 1)
        # a skip ends the wait too, saying why (a full suite beside two CPU burners once waited out 120 s here)
        save = client.wait_event(lambda e: e["type"] in ("save_checkpoint", "checkpoint_skipped"), 100.0)
        assert save["type"] == "save_checkpoint", save
        client.replies.clear()
        client.send("checkpoint_saved", seq=save["seq"], path=str(outside / "stolen.pt"), step=1, epoch=1,
                    sha256="0" * 64, size=1)
        refused = client.wait_reply("refused")
        assert (refused["code"], refused["welcome_lost"]) == ("settle_path", False), refused
        client.send("checkpoint_failed", seq=save["seq"], reason="done with it")
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=180)
    assert "bus_errors" not in result["bus"], result["bus"]
    assert not [e for e in of(read_events(kernel.run_dir), "checkpoint_saved") if e.data["plugin"] == NAME]


# §3: a DEALER without a routing id of its own, dropped by libzmq for a message over the ROUTER's MAXMSGSIZE,
# comes back under a new one; the kernel answers `refused` and the plugin says hello again. Raw pyzmq + msgpack.
RECONNECTING_PLUGIN = r'''
import os, sys, time, msgpack, zmq
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.LINGER, 0)
sub.connect(os.environ["TRAINBUS_EVENTS"])
dealer = ctx.socket(zmq.DEALER)  # no ROUTING_ID: libzmq picks one, and another after each reconnect
dealer.setsockopt(zmq.LINGER, 1000)
dealer.connect(os.environ["TRAINBUS_CONTROL"])
def send(type_, **fields):
    dealer.send(msgpack.packb({"v": 1, "type": type_, **fields}, use_bin_type=True))
def hello():
    send("hello", name=os.environ["TRAINBUS_PLUGIN_NAME"], pid=os.getpid(), subscriptions=[""], replies=["log"],
         delivery="best_effort", secret=os.environ["TRAINBUS_SECRET"])
welcomes, said_again, beat, last_hello = 0, False, 0.0, 0.0
while True:
    if sub.poll(100):
        event = msgpack.unpackb(sub.recv_multipart()[1], raw=False)
        if not last_hello:
            hello()
            last_hello = time.monotonic()
        if event["type"] in ("end_training_session", "run_failed"):
            break
    while dealer.poll(0):
        answer = msgpack.unpackb(dealer.recv(), raw=False)
        print("answer", answer["type"], answer.get("code", ""), flush=True)
        if answer["type"] == "welcome":
            welcomes += 1
            if welcomes == 1:  # over the kernel's 256 KiB: libzmq drops the connection and reconnects
                send("log", level="info", text="x" * 300_000)
        elif answer["type"] == "refused" and answer["welcome_lost"] and time.monotonic() - last_hello > 0.5:
            hello()  # section 3: the kernel does not know the new routing id; say hello again
            last_hello = time.monotonic()
    if last_hello and time.monotonic() > beat:
        send("heartbeat")
        beat = time.monotonic() + 0.3
print("welcomed", welcomes, "times", flush=True)
send("bye", reason="run ended")
ctx.destroy(linger=1000)
'''


def test_a_spawned_plugin_whose_connection_comes_back_under_a_new_routing_id_is_welcomed_again(
        short_runs, tmp_path):  # noqa: F811
    """[C35a] §3: libzmq drops a DEALER that sends over the ROUTER's MAXMSGSIZE and reconnects it, under a new routing
    id unless the plugin set its own; the kernel answers `refused` and the plugin says hello again. For a spawned
    plugin that hello was refused `hello_name_taken` for as long as it lived (its old connection, the same living
    process, "held" the name): silent to the kernel, it was declared hung, killed and restarted, each restart the
    same, until `plugin_failed`. Its secret and pid prove it is the process the kernel started: welcomed again."""
    script = tmp_path / "reconnecting.py"
    script.write_text(RECONNECTING_PLUGIN)
    cfg = config(short_runs, plugins=[PluginConfig("reconnecting", "", {}, [sys.executable, str(script)])],
                 epochs=2, step_sleep_s=0.05)
    result = run_training(cfg)
    assert result.status == "completed", result
    printed = (Path(result.run_dir) / "plugins" / "reconnecting.log").read_text()
    assert "answer refused unknown_peer" in printed and "welcomed 2 times" in printed, printed
    events = read_events(result.run_dir)
    trouble = [e.type for e in events if e.type in ("plugin_hung", "plugin_crashed", "plugin_restarted",
                                                    "plugin_failed")]
    assert trouble == [], (trouble, printed)
    assert [e.data["exit_code"] for e in of(events, "plugin_exited", "reconnecting")] == [0]


def test_a_voter_welcomed_while_the_kernel_waits_at_an_end_epoch_is_waited_for_from_the_next_one(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C54a] §7.3, §8: a peer receives what is published after its hello, so a voter whose hello came while the kernel
    waited at an end_epoch (another voter slow) never had that event to ack. It was waited for there all the same,
    named late, and so not waited for at the next end_epoch either: the stop it sent before acking that one landed
    an epoch late. The vote it could not see is not its to answer."""
    cfg = config(short_runs, epochs=3, step_sleep_s=0.03)
    cfg.vote_timeout_s = 3.0
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    holder, latecomer = Client(kernel.run_dir), None
    beating, quiet = None, threading.Event()
    try:
        holder.drain_events(60.0)
        holder.hello("holder", attach_credential(kernel.run_dir), votes=["end_epoch"])  # never acks: holds each wait
        holder.wait_reply("welcome")
        ready = holder.wait_event(lambda e: e["type"] == "plugin_ready" and e["data"]["plugin"] == "holder")
        first = holder.wait_event(lambda e: e["type"] == "end_epoch" and e["seq"] > ready["seq"], timeout_s=120)
        # The holder talks on while the test drives the latecomer: silent for the liveness window (3 s, the vote's
        # timeout too) it was forgotten as the kernel's wait for it ended, on a busy box, and never named late.
        def keep_talking() -> None:  # the holder's socket is this thread's alone from here to the end
            while not quiet.wait(0.2):
                holder.drain_events()
        beating = threading.Thread(target=keep_talking, daemon=True)
        beating.start()
        latecomer = Client(kernel.run_dir)  # connected after that end_epoch went out: it never receives it
        latecomer.drain_events(60.0)  # a heartbeat, while the kernel still waits for the holder
        latecomer.hello("latecomer", attach_credential(kernel.run_dir), replies=["stop"], votes=["end_epoch"])
        latecomer.wait_reply("welcome")
        assert not [e for _, e in latecomer.events if e["seq"] <= first["seq"]], "it must not have seen that event"
        voted = latecomer.wait_event(lambda e: e["type"] == "end_epoch" and e["epoch"] == first["epoch"] + 1,
                                     timeout_s=120)
        time.sleep(1.0)  # a slow voter: the kernel waits for it
        latecomer.send("stop", reason="conformance: stop at this epoch")
        latecomer.send("ack", seq=voted["seq"])
        latecomer.wait_event(lambda e: e["type"] == "end_training_session", timeout_s=120)
    finally:
        quiet.set()
        if beating is not None:
            beating.join()
        holder.close()
        if latecomer is not None:
            latecomer.close()
    result = kernel.result(timeout_s=120)
    events = read_events(kernel.run_dir)
    assert voted["epoch"] + 1 not in {e.epoch for e in of(events, "start_epoch")}, \
        "the stop sent before the ack must land at that epoch's end"
    assert result["status"] == "stopped", result
    text = (kernel.run_dir / "kernel.log").read_text()
    # what else the run left is in the message: this once found kernel.log holding its `sockets:` line alone
    assert "no vote from holder at end_epoch" in text and "latecomer at end_epoch" not in text, \
        (text, sorted(p.name for p in kernel.run_dir.iterdir()), kernel.stderr())


def test_a_peer_saying_hello_under_hundreds_of_names_forgets_no_plugin_of_the_run(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C91f] §9: the kernel remembers the 256 names seen last, forgetting the oldest. The oldest were the run's own
    plugins, which said hello first: a peer saying hello and bye under 300 names (a monitor key may, over TCP) made the
    kernel forget them while they ran, connection and durable position both; their next acks were refused
    (`unknown_peer`), the reference client exited 1, and each was restarted and replayed the run from seq 1. Forgetting
    a name also dropped whatever connection now had its routing id: the churning peer's own current name."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels, [_recorder(tmp_path)], steps=5)
    try:
        for i in range(300):
            client.hello(f"churn{i}", attach_credential(kernel.run_dir))
            client.wait_reply("welcome")
            client.send("bye", reason="the next name")
        kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "churn299", timeout_s=60)
        time.sleep(2.0)  # the recorder acks with its next heartbeat (an interval): refused, were it forgotten
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    assert "refused_unknown_peer" not in result["bus"], result["bus"]
    events = read_events(kernel.run_dir)
    trouble = [(e.type, e.data) for e in events if e.type in ("plugin_crashed", "plugin_restarted", "plugin_hung")]
    assert trouble == [], trouble


STOPS, STOPPED_S = 3, 1.0


def test_a_kernel_stopped_while_reading_a_burst_answers_soon_after_and_declares_no_plugin_hung(
        short_runs, tmp_path, kernels):  # noqa: F811
    """The bus thread reads the ipc control socket for 5 % of its time, each round charged on the wall clock. A round
    the thread was stalled in (here: the kernel stopped for a second while it read a burst of heartbeats; on a busy
    box, the thread descheduled) was owed in full: the socket was left unread for ~19 s, a hello went
    unanswered, and the run's own plugin, its heartbeats unread, was declared hung, killed and restarted. A round
    now owes at most one bucket (2.2 s unread at most), and silence counts only while the socket is read. A stop
    lands in a round about half the time (the burst is read for ~0.1 s; 3 of 6 in a probe), hence three."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels, [_recorder(tmp_path)], steps=5)
    answered_in = []
    try:
        client.hello(NAME, attach_credential(kernel.run_dir))
        client.wait_reply("welcome")
        for _ in range(STOPS):
            for _ in range(3000):  # ~0.1 s of the bus thread's reading: the burst its bucket holds
                client.send("heartbeat")
            time.sleep(0.01)
            os.kill(kernel.pid, signal.SIGSTOP)
            time.sleep(STOPPED_S)
            os.kill(kernel.pid, signal.SIGCONT)
            asked = time.monotonic()
            client.send("replay", from_seq=1)  # any request the kernel answers: its answer says it read again
            client.wait_reply("replay_batch", timeout_s=60.0)
            answered_in.append(time.monotonic() - asked)
        _bye(client)
    finally:
        client.close()
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    # 2.2 s unread at most, then the burst's rest at the socket's pace (~19 s unread before, the peer forgotten)
    assert max(answered_in) < 15.0, answered_in
    trouble = [(e.type, e.data) for e in read_events(kernel.run_dir)
               if e.type in ("plugin_crashed", "plugin_restarted", "plugin_hung")]
    assert trouble == [], trouble


def test_a_malformed_message_from_a_welcomed_peer_is_logged_naming_the_peer(
        short_runs, tmp_path, kernels):  # noqa: F811
    """kernel.log said `dropped a malformed control message: metric.value: expected float, got str`, and nothing of
    who sent it: an author running three plugins (or a run's several remote monitors) could not tell whose message
    it was. A welcomed peer's is now said with its name; one from a connection never welcomed says so."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    stranger = Client(kernel.run_dir)
    try:
        log_path = kernel.run_dir / "kernel.log"
        said = lambda: log_path.read_text().count("dropped a malformed control message")  # noqa: E731
        stranger.send("metric", name="loss", value=[1], step=None)
        wait_until(lambda: said() == 1, 30, "the stranger's logged")  # two connections: one at a time, in order
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["metric"])
        client.wait_reply("welcome")
        client.send("metric", name="loss", value="1.5", step=None)
        wait_until(lambda: said() == 2, 30, "the peer's logged")
        _bye(client)
    finally:
        stranger.close()
        client.close()
    open_gate(gate, 10**6)
    kernel.result(timeout_s=120)
    lines = [line.split(" WARNING trainbus.kernel: ", 1)[1] for line in (kernel.run_dir / "kernel.log").read_text()
             .splitlines() if "dropped a malformed control message" in line]
    assert lines == ["dropped a malformed control message from a connection not welcomed: metric.value: expected "
                     "float, got list holding int",
                     f"dropped a malformed control message from [{NAME}]: metric.value: expected float, got str"], lines


def _section_6_rows(spec: str) -> dict[str, str]:
    """Each event type's row of PROTOCOL.md §6.1 and §6.2 (the text of its cells), by type."""
    section = spec[spec.index("### 6.1"):spec.index("### 6.3")]
    return {m.group(1): m.group(2) for m in re.finditer(r"(?m)^\| `(\w+)` \|(.*)$", section)}


def test_every_data_key_a_real_run_sends_is_named_in_its_events_row(short_runs):  # noqa: F811
    """[C110] An author in another language reads §6 for what `data` holds: every key the kernel sends in an event's
    data, and in `start_training_session`'s `cluster` map, is named in that event's row (`end_epoch`'s row names
    `end_training_loop`'s and `end_validation_loop`'s keys as theirs)."""
    spec = (Path(__file__).resolve().parents[1] / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
    rows = _section_6_rows(spec)
    rows["end_epoch"] += rows["end_training_loop"] + rows["end_validation_loop"]
    result = run_training(config(short_runs, epochs=1, step_sleep_s=0.0))
    unnamed = set()
    for event in read_events(Path(result.run_dir)):
        assert event.type in rows, f"{event.type} has no row in PROTOCOL.md §6"
        unnamed |= {f"{event.type}.{key}" for key in event.data if f"`{key}`" not in rows[event.type]}
        if event.type == "start_training_session":
            unnamed |= {f"{event.type}.cluster.{key}" for key in event.data["cluster"]
                        if f"`{key}`" not in rows[event.type]}
    assert not unnamed, f"PROTOCOL.md §6 does not name: {sorted(unnamed)}"


def test_every_refusal_code_a_local_peer_meets_is_named_in_the_protocol(short_runs, tmp_path, kernels):  # noqa: F811
    """[C112] §2 and §7.2 tell a client to match `refused.code`, not the reason (which quotes a name that may say
    anything): each code a local peer can be refused with is named in PROTOCOL.md, so a client in another language
    knows what to match. A wrong secret, a spawned plugin's name, a reply not declared, a persister's message
    without the capability, a settlement of no save_checkpoint, a peer never welcomed."""
    spec = (Path(__file__).resolve().parents[1] / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
    cfg = config(short_runs, plugins=[resolve_plugin("metrics_log", {})], epochs=1, step_sleep_s=0.0)
    gate = tmp_path / "gate"
    open_gate(gate, 0)  # held before its first batch while the peers are refused
    cfg.hyperparameters["gate"] = str(gate)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    credential = attach_credential(kernel.run_dir)
    kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "metrics_log", timeout_s=120)
    peers = [Intruder(kernel.run_dir, f"codes-{i}") for i in range(4)]
    try:
        codes = []

        def refused(peer: Intruder) -> None:
            codes.append(peer.wait_reply("refused")["code"])

        peers[0].hello("codes-a", "00" * 32)
        refused(peers[0])
        peers[1].hello("metrics_log", credential)
        refused(peers[1])
        peers[2].send("heartbeat")
        refused(peers[2])
        peers[3].hello("codes-d", credential, replies=[])
        peers[3].wait_reply("welcome")
        peers[3].send("log", level="info", text="not declared")
        refused(peers[3])
        settlement = dict(seq=1, path=str(kernel.run_dir / "checkpoints" / "x.pt"), step=0, epoch=0,
                          sha256="0" * 64, size=1)
        peers[3].send("checkpoint_saved", **settlement)
        refused(peers[3])
        peers[3].hello("codes-d", credential, replies=[], capabilities=["checkpoint"])
        peers[3].wait_reply("welcome")
        peers[3].send("checkpoint_saved", **settlement)
        refused(peers[3])
        assert len(set(codes)) == 6, codes
        unnamed = [code for code in codes if f"`{code}`" not in spec]
        assert not unnamed, f"PROTOCOL.md does not name the refusal codes {unnamed} (of {codes})"
        peers[3].send("bye", reason="done")
        peers[3].wait_reply("farewell")
    finally:
        for peer in peers:
            peer.close()
        open_gate(gate, 10**6)
    assert kernel.result(timeout_s=180)["status"] == "completed"


def test_commands_whose_ids_differ_only_past_their_first_128_characters_are_each_acted_on(
        short_runs, tmp_path, kernels):  # noqa: F811
    """[C113] §7.1: the kernel acts once per (sender, id). It remembered ids cut to 128 characters, so two commands
    whose ids shared those (an id made of a long name and a counter) were one, the second dropped as a duplicate
    unanswered; every checkpoint_now is answered (§7.1), each distinct id's included."""
    kernel, gate, client = _held_kernel_and_client(short_runs, tmp_path, kernels)
    try:
        client.hello(NAME, attach_credential(kernel.run_dir), replies=["checkpoint_now"])
        client.wait_reply("welcome")
        prefix = "n" * 200 + "-command-"
        answers = []
        for step, n in ((2, 1), (4, 2)):
            client.send("checkpoint_now", reason=f"number {n}", id=f"{prefix}{n}")
            open_gate(gate, step)
            answers.append(client.wait_event(lambda e: e["type"] in ("checkpoint_skipped", "save_checkpoint")
                                             and e["seq"] > max([a["seq"] for a in answers], default=0),
                                             timeout_s=60))
        client.send("checkpoint_now", reason="number 2 again", id=f"{prefix}2")  # the same id: acted on once
        client.send("bye", reason="done")
        client.wait_reply("farewell")
    finally:
        client.close()
        open_gate(gate, 10**6)
    result = kernel.result(timeout_s=180)
    assert result["status"] == "completed" and result["bus"].get("duplicate_command") == 1, result["bus"]
