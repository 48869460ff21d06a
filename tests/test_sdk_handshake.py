"""The SDK's handshake against a stand-in kernel on real sockets: nothing published after hello is lost; a plugin
run by hand says hello with the name and settings its command line gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import zmq
from stand_in_kernel import StandInKernel
from trainbus.sdk.plugin_exit import FINISH_ON_TERM_S
from trainbus.sdk.replay import REPLAY_RESEND_S

from trainbus.proto import Event, control, encode_control, encode_replay_batch
from trainbus.sdk.plugin import Plugin
from trainbus.proto.messages import HEARTBEAT_LIVENESS
from trainbus.sdk.plugin_io import FAREWELL_WAIT_S, PluginIO


def test_an_event_that_arrives_before_the_welcome_is_handled(tmp_path):
    # The kernel answers hello with welcome on its ROUTER and, once every plugin said hello, publishes
    # start_training_session on its PUB: two sockets, so the event can reach the plugin first. The
    # stand-in kernel makes sure it does; a best-effort plugin gets no replay, so a dropped event is lost.
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(record)}, tmp_path)
    try:
        hello = _hello(kernel)
        resume_from = kernel.seq + 1
        kernel.publish("start_training_session", epochs=3)
        time.sleep(0.5)  # the plugin's I/O thread has it queued before the welcome exists
        kernel.welcome(hello[0], resume_from)
        kernel.publish("end_training_session")
        output = _exited(proc)
    finally:
        _close(proc, kernel)
    handled = [line.split()[1] for line in record.read_text().splitlines()]
    assert handled == ["start_training_session", "end_training_session"], (handled, output)


def test_a_durable_plugin_that_missed_the_event_a_vote_waits_for_replays_it_on_the_next_heartbeat(tmp_path):
    # The race CI met: a durable plugin's first replay was in flight when end_epoch went by live, so it was
    # dropped (replay covers it, except this replay was served before end_epoch existed). The kernel then
    # publishes nothing but heartbeats while it waits for the vote: a heartbeat past the expected seq is the
    # plugin's only sign of the gap, even for a plugin that does not handle heartbeats.
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:EpochVoter", "voter", {"path": str(record)}, tmp_path)
    try:
        hello = _hello(kernel)
        identity = hello[0]
        kernel.welcome(identity, 1)
        request = _next(kernel, "replay")
        kernel.publish("end_epoch", live=False, epoch=0)  # went by while the replay was in flight
        end_epoch = kernel.seq
        kernel.router.send_multipart([identity, encode_replay_batch(
            end_epoch - request["from_seq"], b"".join(kernel.journal[request["from_seq"] - 1:end_epoch - 1]), True)])
        _acked(kernel, end_epoch - 1)  # the first replay is done, and the plugin is back on the live stream
        kernel.publish("heartbeat", interval_s=1.0)  # what the kernel sends while it waits for the vote
        assert _next(kernel, "replay")["from_seq"] == end_epoch
        kernel.replay(identity, end_epoch)
        _acked(kernel, end_epoch)
        kernel.publish("end_training_session")
        output = _exited(proc)
    finally:
        _close(proc, kernel)
    assert record.read_text().split() == [str(end_epoch), "end_epoch"]


def test_a_replay_whose_answer_was_lost_is_asked_for_again(tmp_path):
    """A replay_batch lost on its way (the connection dropped with it in flight: a network drop under a remote
    plugin, the kernel cutting an oversized message's connection, or the kernel unable to route it) left a durable
    plugin waiting for it for ever, taking no live event meanwhile: the run ended with it undrained."""
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:EpochVoter", "voter", {"path": str(record)}, tmp_path)
    try:
        identity = _hello(kernel)[0]
        kernel.publish("end_epoch", live=False, epoch=0)
        end_epoch = kernel.seq
        kernel.welcome(identity, 1)
        first = _next(kernel, "replay")  # not answered: lost
        asked_at = time.monotonic()
        again = None
        while again is None and time.monotonic() < asked_at + 3 * REPLAY_RESEND_S:  # the kernel's heartbeats go on
            kernel.publish("heartbeat", interval_s=1.0)
            got = kernel.receive(100)
            again = got[1] if got is not None and got[1]["type"] == "replay" else None
        assert again is not None and again["from_seq"] == first["from_seq"] == 1, again
        kernel.replay(identity, 1)
        _acked(kernel, kernel.seq)
        kernel.publish("end_training_session")
        _exited(proc)
    finally:
        _close(proc, kernel)
    assert record.read_text().split() == [str(end_epoch), "end_epoch"]


def test_a_plugin_run_by_hand_takes_its_name_and_settings_from_the_command_line(tmp_path):
    # --name and --set win over the environment a spawned plugin gets (TRAINBUS_PLUGIN_NAME, _SETTINGS); each
    # value is read as `trainbus run --set` reads it ("0" for a number setting is 0.0) and checked
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(tmp_path / "not-here.txt")},
                               tmp_path, args=["--name", "by_hand", "--set", f"path={record}", "--set", "sleep_s=0"])
    try:
        identity, hello = _hello(kernel)
        assert hello["name"] == "by_hand"
        kernel.welcome(identity, kernel.seq + 1)
        kernel.publish("end_training_session")
        output = _exited(proc)
    finally:
        _close(proc, kernel)
    assert [line.split()[1] for line in record.read_text().splitlines()] == ["end_training_session"]
    endpoints = {"TRAINBUS_EVENTS": f"ipc://{tmp_path}/events", "TRAINBUS_CONTROL": f"ipc://{tmp_path}/control"}
    bad = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:LiveRecorder", "--set",
                          "sleep_s=fast"], env={**os.environ, **endpoints}, capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stderr) == (2, "error: plugin live_recorder: sleep_s = 'fast' is not allowed; it must "
                                               "be a number\n")


@pytest.mark.parametrize("reason", ["hello as 'rec1' refused: a live peer holds that name",
                                    "hello as 'rec1' refused: that name is in use"], ids=["as said", "reworded"])
def test_a_plugin_restarted_under_a_name_its_killed_predecessor_still_holds_says_hello_again_until_welcome(
        tmp_path, reason):
    # PROTOCOL.md §2: the name is free once the old peer has been silent for the liveness window; until then each
    # hello is refused (told at most once a second), and the client says hello again an interval later. The client
    # knows the refusal by its code, as PROTOCOL.md tells raw clients: a reason is text for people, worded at will
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(record)}, tmp_path,
                               args=["--name", "rec1"])
    try:
        identity, _ = _hello(kernel)
        refused_at = time.monotonic()
        kernel.router.send_multipart([identity, encode_control(control(
            "refused", reason=reason, welcome_lost=True, code="hello_name_taken"))])
        again = None  # events go on meanwhile, every 0.1 s: the next hello waits an interval all the same
        while again is None or again[1]["type"] != "hello":
            assert time.monotonic() - refused_at < 20, "no second hello"
            kernel.publish("heartbeat", interval_s=1.0)
            again = kernel.receive(100)
            # the kernel refuses a heartbeat before the welcome as from a stranger (welcome_lost), which ended the
            # client: none is sent before it
            assert again is None or again[1]["type"] == "hello", again
        assert again[1]["name"] == "rec1" and time.monotonic() - refused_at >= 0.9
        kernel.welcome(again[0], kernel.seq + 1)
        kernel.publish("end_training_session")
        _exited(proc)
    finally:
        _close(proc, kernel)
    assert [line.split()[1] for line in record.read_text().splitlines()] == ["end_training_session"]


def test_a_refused_hello_whose_reason_only_quotes_the_name_held_text_ends_the_client(tmp_path):
    # a reason quotes the name, which is any string: a refusal of another code must not be taken for a name held
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    name = "a live peer holds that name"
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(tmp_path / "r.txt")}, tmp_path,
                               args=["--name", name])
    try:
        identity, _ = _hello(kernel)
        kernel.router.send_multipart([identity, encode_control(control(
            "refused", reason=f"hello as {name!r} refused: wrong secret", welcome_lost=True, code="hello_secret"))])
        refused_at = time.monotonic()
        while proc.poll() is None:  # heartbeats go on, as from a live kernel: a client retrying says hello again
            assert time.monotonic() - refused_at < 10, "the client did not end at its refusal"
            kernel.publish("heartbeat", interval_s=1.0)
            again = kernel.receive(100)
            assert again is None, f"took the refusal for a name held and said hello again: {again}"
    finally:
        _close(proc, kernel)


@pytest.mark.parametrize("finishes", [True, False], ids=["handler finishes", "handler cut short"])
def test_a_sigterm_in_a_handler_lets_it_finish_then_tears_down_and_takes_no_next_event(tmp_path, finishes):
    """SIGTERM (a detach, the kernel's end-of-run cleanup) during a handler: no next event is handled; the handler
    finishes if it can within FINISH_ON_TERM_S, else it is cut short and the log says so (it used to run teardown in
    the middle of the handler, then say the handler had called sys.exit); teardown runs after it, either way."""
    record, go = tmp_path / "record.txt", tmp_path / "go"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:FinishesWhenLet", "slow", {"path": str(record), "go": str(go)},
                               tmp_path)
    try:
        kernel.welcome(_hello(kernel)[0], kernel.seq + 1)
        kernel.publish("end_epoch", epoch=1)
        first = kernel.seq
        kernel.publish("end_epoch", epoch=2)  # waits in the plugin's inbox behind the first
        deadline = time.monotonic() + 30
        while not (record.exists() and record.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        if finishes:
            go.touch()
        output = _exited(proc)
        sent = []
        while (got := kernel.receive(100)) is not None:
            sent.append(got[1])
    finally:
        _close(proc, kernel)
    done = [f"done {first}"] if finishes else []
    assert record.read_text().splitlines() == [f"start {first}", *done, "teardown"], output
    assert "sys.exit" not in output, output
    assert ("cut short" in output) is not finishes, output
    # the kernel is told too (an error logged: trouble the run's summary names), not only the plugin's own log
    errors = [m["text"] for m in sent if m["type"] == "log" and m["level"] == "error"]
    assert (errors == [f"the handler for end_epoch (seq {first}) was still running {FINISH_ON_TERM_S} s after "
                       f"SIGTERM and was cut short (a best-effort plugin is not sent it again); plugins/slow.log has "
                       f"where"]) is not finishes, sent


def test_ctrl_c_stops_a_plugin_run_by_hand_as_sigterm_does(tmp_path):
    """A plugin run by hand (`python -m trainbus.sdk`, no kernel pid) is stopped from its terminal with Ctrl-C: it
    tears down and exits 0. It used to ignore SIGINT, as a plugin the kernel spawns does, so Ctrl-C did nothing."""
    record, go = tmp_path / "record.txt", tmp_path / "go"
    go.touch()
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:FinishesWhenLet", "by_hand", {"path": str(record), "go": str(go)},
                               tmp_path)
    try:
        kernel.welcome(_hello(kernel)[0], kernel.seq + 1)
        kernel.publish("end_epoch", epoch=1)
        deadline = time.monotonic() + 30
        while "done" not in (record.read_text() if record.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        output = _exited(proc)
        sent = []
        while (got := kernel.receive(100)) is not None:
            sent.append(got[1])
    finally:
        _close(proc, kernel)
    assert record.read_text().splitlines() == [f"start {kernel.seq}", f"done {kernel.seq}", "teardown"], output
    assert "interrupted (Ctrl-C)" in output, output
    # it leaves on purpose, saying bye: without it the run took its user's Ctrl-C for a hang (`runs show`: trouble
    # "hung (silent for 7 s without a bye ...)"), as it does a plugin killed outright
    assert [m["type"] for m in sent if m["type"] == "bye"] == ["bye"], sent


def test_a_setup_that_raises_tells_the_kernel_with_the_authors_frames_and_exits_1(tmp_path):
    """The kernel's log and the console see why (they saw only "crashed (exit code 1)"); runpy's and the SDK's own
    frames are left out of the traceback."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:FailsInSetup", "db", {}, tmp_path)
    try:
        kernel.welcome(_hello(kernel)[0], kernel.seq + 1)
        said = _next(kernel, "log")
        output = proc.communicate(timeout=20)[0].decode()
        after = [message["type"] for _, message in iter(lambda: kernel.receive(200), None)]
    finally:
        _close(proc, kernel)
    assert proc.returncode == 1, output
    assert "bye" not in after, after  # a bye says it left on purpose: the kernel would not restart it
    assert said["level"] == "error" and said["text"].startswith(
        "setup failed: RuntimeError: setup cannot find its database\nTraceback (most recent call last):\n"), said
    assert "fixture_plugins.py" in said["text"] and "in _connect" in said["text"], said
    assert "runner.py" not in said["text"] and "runpy" not in said["text"], said
    assert "runner.py" not in output and "in _connect" in output, output


def test_a_reply_the_sdk_refuses_ends_the_handlers_traceback_at_the_authors_line(tmp_path):
    """`self.metric("ratio", nan)`: its traceback went on through the SDK's metric() into trainbus.proto's checks,
    four frames of ours after the author's line (the console named codec.py in an editable install); README: the
    traceback ends at the author's last frame, the SDK line that raised what it asked of it left out."""
    said, _ = _first_log(tmp_path, "fixture_plugins:NanMetricAtEpochEnd")
    text = said["text"]
    assert said["level"] == "error" and "metric.value must be finite" in text, text
    frames = [line.split('"')[1] for line in text.splitlines() if line.startswith('  File "')]
    assert frames and all(f.endswith("fixture_plugins.py") for f in frames), text


@pytest.mark.parametrize("answers_bye", [True, False])
def test_a_plugin_that_leaves_keeps_its_socket_until_the_kernel_says_farewell(answers_bye, tmp_path):
    """A plugin that said its last lines and left closed its socket at once: over TCP the kernel reads 16 messages of
    a connection at a time and the rest wait in its socket's buffers, which the kernel's next write to the closed
    connection empties (a reset). It now waits for the kernel's answer to its bye, `farewell` (PROTOCOL.md §7.1),
    for at most FAREWELL_WAIT_S; an older kernel, whose welcome does not say it answers, is not waited for."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LogsThenLeaves", "leaver", {"lines": 300}, tmp_path)
    try:
        identity = _hello(kernel)[0]
        kernel.router.send_multipart([identity, encode_control(control(
            "welcome", run=kernel.run_id, heartbeat_interval_s=1.0, resume_from=1, farewell=answers_bye))])
        kernel.publish("end_training_batch")  # it logs its lines and calls sys.exit(0)
        said = _heard(kernel, 1.0, 20, lambda said: "bye" in said)
        assert said.count("log") == 300 and said[-1] == "bye", said
        if answers_bye:
            time.sleep(1.0)
            assert proc.poll() is None, "it left without waiting for the kernel's farewell"
            kernel.router.send_multipart([identity, encode_control(control("farewell"))])
        started = time.monotonic()
        _exited(proc)
        assert time.monotonic() - started < FAREWELL_WAIT_S - 1, "it waited for a farewell that was said or never comes"
    finally:
        _close(proc, kernel)


def _first_log(tmp_path: Path, target: str, end_epoch: bool = True) -> tuple[dict, int]:
    """The first log line a plugin started against a stand-in kernel says, once welcomed (and sent an end_epoch);
    with the seq of that end_epoch."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin(target, "plugin", {}, tmp_path)
    try:
        kernel.welcome(_hello(kernel)[0], kernel.seq + 1)
        if end_epoch:
            kernel.publish("end_epoch", epoch=1)
        return _next(kernel, "log"), kernel.seq
    finally:
        _close(proc, kernel)


def test_a_handler_past_its_timeout_says_which_and_where_before_its_heartbeats_stop(tmp_path):
    said, seq = _first_log(tmp_path, "fixture_plugins:StuckInHandler")
    text = said["text"]
    assert said["level"] == "error" and text.startswith(f"the handler for end_epoch (seq {seq}) has run "), text
    assert "past handler_timeout_s (1 s)" in text and "self.still_working()" in text, text
    assert 'fixture_plugins.py", line' in text and "in on_end_epoch" in text and "runner.py" not in text, text


def test_a_setup_past_its_timeout_says_so_and_where_before_its_heartbeats_stop(tmp_path):
    """A setup() that never returns handled nothing all run while its heartbeats went on: the kernel took it for a
    live plugin and nothing said why it did nothing. It is timed as a handler is."""
    said, _ = _first_log(tmp_path, "fixture_plugins:StuckInSetup", end_epoch=False)
    text = said["text"]
    assert said["level"] == "error" and text.startswith("setup() has run "), text
    assert "past handler_timeout_s (1 s)" in text and "self.still_working()" in text, text
    assert 'fixture_plugins.py", line' in text and "in setup" in text and "runner.py" not in text, text

def test_heartbeats_stop_only_while_a_handler_runs_past_its_handler_timeout_s(tmp_path):
    """PROTOCOL.md §8 [C63]: the reference client heartbeats every interval while idle and while a handler runs
    within handler_timeout_s (60 s by default: a slow handler is not hung); once one runs past it, it says so once and
    sends nothing more, so the kernel's liveness window (3 intervals) declares the stuck plugin hung and restarts it;
    a handler that returns brings the heartbeats back. The real I/O thread against a stand-in kernel on real sockets,
    driven by the state the main thread sets around a handler (Runner._dispatch's busy_since), set 61 s in the past
    for one that has run that long: no wall-clock race on the timeout itself. The stand-in publishes its heartbeat
    all along, so the silence is not the client taking the kernel for gone (checked at the end)."""
    interval = 0.5
    assert Plugin.handler_timeout_s == 60.0
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    hello = control("hello", name="slow", pid=os.getpid(), subscriptions=[""], replies=["log"],
                    delivery="best_effort", votes=[], capabilities=[], secret="")
    io = PluginIO(kernel.pub.getsockopt_string(zmq.LAST_ENDPOINT), kernel.router.getsockopt_string(zmq.LAST_ENDPOINT),
                  [""], hello, Plugin.handler_timeout_s, None, log_not_acted=False)
    io.start()
    try:
        kernel.welcome(_hello(kernel)[0], kernel.seq + 1)
        idle = _heard(kernel, interval, 20, lambda said: "heartbeat" in said)
        assert "heartbeat" in idle, idle
        kernel.publish("end_epoch", epoch=1)
        io.busy_with, io.busy_since = Event(kernel.seq, kernel.run_id, "end_epoch", time.time(), 0, 1), time.monotonic()
        within = _heard(kernel, interval, 20, lambda said: said.count("heartbeat") >= 2 or "log" in said)
        assert within == ["heartbeat", "heartbeat"], within  # slow is not hung: a heartbeat every interval still
        io.busy_since = time.monotonic() - Plugin.handler_timeout_s - 1
        # at most one heartbeat already on its way; the next one due is held back and the log says why instead
        told = _heard(kernel, interval, 20, lambda said: "log" in said or said.count("heartbeat") >= 2)
        silent = _heard(kernel, interval, HEARTBEAT_LIVENESS * interval)  # the kernel's window
        assert told[-1:] == ["log"] and told.count("heartbeat") <= 1 and silent == [], (told, silent)
        io.busy_since = None  # the handler returned
        back = _heard(kernel, interval, 20, lambda said: "heartbeat" in said)
        assert "heartbeat" in back, back
        assert io.gone is None and io.is_alive(), io.gone
    finally:
        io.close()
        io.join(10)
        kernel.close()


def test_help_says_what_it_runs_its_options_and_the_environment_it_reads():
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m trainbus.sdk module:Class"), proc.stderr
    for word in ("--name NAME", "--set SETTING=VALUE", "--connect", "--key", "--server-key", "TRAINBUS_EVENTS",
                 "TRAINBUS_CONTROL", "TRAINBUS_RUN_DIR", "TRAINBUS_PLUGIN_NAME", "TRAINBUS_PLUGIN_SETTINGS"):
        assert word in proc.stdout, word


def _exited(proc: subprocess.Popen) -> str:
    """What the plugin printed, once it exited 0 by itself (20 s at most)."""
    output = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, output
    return output


def _close(proc: subprocess.Popen, kernel: StandInKernel) -> None:
    if proc.poll() is None:
        proc.kill()
    kernel.close()


def _hello(kernel: StandInKernel) -> tuple[bytes, dict]:
    """(routing id, hello) of the plugin, once a heartbeat has released it (its subscription is live); 30 s at most."""
    deadline, hello = time.monotonic() + 30, None
    while hello is None and time.monotonic() < deadline:
        kernel.publish("heartbeat", interval_s=1.0)
        hello = kernel.receive(100)
    assert hello is not None and hello[1]["type"] == "hello", hello
    return hello


def _next(kernel: StandInKernel, kind: str) -> dict:
    """The next control message of this kind from the plugin (heartbeats and others skipped); 20 s at most."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = kernel.receive(100)
        if got is not None and got[1]["type"] == kind:
            return got[1]
    raise AssertionError(f"no {kind} from the plugin within 20 s")


def _heard(kernel: StandInKernel, interval_s: float, seconds: float,
           enough: Callable[[list[str]], bool] = lambda said: False) -> list[str]:
    """The types of the plugin's control messages over `seconds`, or until `enough` of them; the stand-in publishes
    its heartbeat (saying `interval_s`) at least every 0.05 s meanwhile, so the plugin never takes it for gone."""
    said: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not enough(said):
        kernel.publish("heartbeat", interval_s=interval_s)
        got = kernel.receive(50)
        if got is not None:
            said.append(got[1]["type"])
    return said


def _acked(kernel: StandInKernel, seq: int) -> None:
    acked = 0
    while acked < seq:  # bounded by _next's 20 s
        acked = _next(kernel, "ack")["seq"]
    assert acked == seq


def test_event_messages_of_the_wrong_frame_count_or_garbled_are_counted_and_the_next_one_is_read(tmp_path):
    """The I/O thread reads frames one by one: a message of 1 or 3 frames, or a garbled envelope, is dropped and
    counted without taking a frame of the next message with it."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    hello = control("hello", name="p", pid=1, subscriptions=[""], replies=[], delivery="durable")
    io = PluginIO(kernel.pub.getsockopt_string(zmq.LAST_ENDPOINT), kernel.router.getsockopt_string(zmq.LAST_ENDPOINT),
             [""], hello, 5.0, None)  # not started: this thread reads, as the I/O thread would
    try:
        for _ in range(200):  # until the subscription is live (a slow joiner misses what came before)
            kernel.publish("heartbeat", interval_s=1.0)
            if io.sub.poll(50):
                break
        io._read_events()
        io.inbox.clear()
        kernel.pub.send(b"end_epoch")
        kernel.pub.send_multipart([b"end_epoch", b"\x81", b"extra"])
        kernel.pub.send_multipart([b"end_epoch", b"\xc1 not msgpack"])
        kernel.publish("end_epoch", training_loss=0.5)
        deadline = time.monotonic() + 10
        while not io.inbox and time.monotonic() < deadline:
            io.sub.poll(100)
            io._read_events()
        assert io.malformed == 3
        assert [(kind, e.type, e.seq, e.data) for kind, e in io.inbox] == \
            [("event", "end_epoch", kernel.seq, {"training_loss": 0.5})]
    finally:
        io.sub.close()
        io.dealer.close()
        io.ctx.term()
        kernel.close()


def test_a_plugin_run_by_hand_says_what_is_likely_a_mistake_in_its_class_as_trainbus_run_does(tmp_path):
    """`on_end_epok` (a handler named for no event), said by `trainbus run` before a run as a warning, was said
    nowhere when the plugin was run by hand (`python -m trainbus.sdk`) or attached live: its author saw a plugin
    that handled nothing. The runner says the class's warnings once welcomed, on its own output and in kernel.log,
    as it says a subscription naming no event (and as a bz plugin says its own)."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:MisspeltHandler", "misspelt", {}, tmp_path)
    try:
        identity, _ = _hello(kernel)
        kernel.welcome(identity, kernel.seq + 1)
        said = _next(kernel, "log")
        kernel.publish("end_training_session")
        output = _exited(proc)
    finally:
        _close(proc, kernel)
    assert said["level"] == "warning" and "MisspeltHandler.on_end_epok" in said["text"] and \
        "did you mean on_end_epoch?" in said["text"], said
    assert "[misspelt] warning: MisspeltHandler.on_end_epok" in output, output
