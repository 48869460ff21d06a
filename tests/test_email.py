"""E-mail, end to end against a real SMTP server (aiosmtpd on 127.0.0.1): success, failure, a plugin given up, the
kernel killed (the run died), server down."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import signal
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from trainbus.kernel import supervisor
from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.daemon_files import daemon_dir
from trainbus.kernel.registry import Registry, list_runs
from trainbus.kernel.kernel_pid import KERNEL_PID
from trainbus.kernel.session import run_training
from trainbus.plugins.email_alert import EmailAlertPlugin, stalled_message
from trainbus.proto import JOURNAL_NAME, Event, events as ev
from trainbus.sdk import Harness, SettingsError

from conftest import TESTS_DIR, start_daemon
from fixture_targets import open_gate
from helpers import free_port
from kernel_process import Command, JournalTail, process_gone, wait_until

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"
FAILING = f"{TESTS_DIR / 'specs.py'}:failing"
TIMED = f"{TESTS_DIR / 'fixture_targets.py'}:digits_for_seconds"
PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"
RECIPIENT = "ops@example.com"


class Inbox:
    """An aiosmtpd handler that keeps every message it is given, parsed."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[email.message.EmailMessage]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


def start_server(port: int, **options) -> tuple[Controller, Inbox]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    return controller, inbox


@pytest.fixture
def smtp():
    controller, inbox = start_server(free_port())
    yield controller.port, inbox
    controller.stop()


def email_plugin(port: int, **overrides) -> PluginConfig:
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "recipients": [RECIPIENT],
                "min_interval_s": 0.0, "retry_initial_s": 0.2, "retry_max_s": 0.5}
    return resolve_plugin("email", {**settings, **overrides})


def fields(message) -> dict[str, str]:
    """`Name: value` lines of the plain-text body."""
    body = message.get_body(preferencelist=("plain",)).get_content()
    return dict(line.split(": ", 1) for line in body.splitlines() if ": " in line and not line.startswith(" "))


def test_end_of_training_mail_has_the_summary_and_the_loss_plot(smtp, runs_dir):
    port, inbox = smtp
    result = run_training(RunConfig(target=TINY, epochs=3, runs_dir=str(runs_dir), plugins=[email_plugin(port)]))
    assert result.status == "completed"
    [message] = inbox.wait_for(1)
    assert message["Subject"] == (f"[trainbus] run {result.run_id} completed: validation loss "
                                  f"{result.outcome['validation_loss']:.6g} after 3 epochs")
    assert message["To"] == RECIPIENT
    body = fields(message)
    assert body["Run"] == result.run_id and body["Status"] == "completed"
    assert body["Epochs"] == "3 of 3"
    assert float(body["Final validation loss"]) == pytest.approx(result.outcome["validation_loss"], rel=1e-5)
    assert float(body["Best validation loss"].split()[0]) <= float(body["Final validation loss"])
    assert "epoch" in body["Best validation loss"]
    assert float(body["Duration"].split()[0]) >= 0
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "loss.png" and attachment.get_content_type() == "image/png"
    png = attachment.get_content()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (960, 600)
    outbox = Path(result.run_dir) / "plugins" / "email.outbox"
    assert not list(outbox.glob("*.eml")) and len(list((outbox / "sent").glob("*.eml"))) == 1
    assert not list(outbox.rglob("*-died.eml")), "a run that ended is no run that died"


def test_run_failure_mail_has_the_error_and_the_traceback_tail(smtp, runs_dir):
    port, inbox = smtp
    result = run_training(RunConfig(target=FAILING, epochs=3, runs_dir=str(runs_dir), plugins=[email_plugin(port)]))
    assert result.status == "failed"
    [message] = inbox.wait_for(1)
    assert message["Subject"].startswith(f"[trainbus] run {result.run_id} FAILED: FloatingPointError: loss exploded")
    body = message.get_body(preferencelist=("plain",)).get_content()
    error = fields(message)["Error"]  # where in the user's code it was raised, then the tail of the whole traceback
    assert error.startswith("FloatingPointError: loss exploded (in your code: ") and "specs.py, line " in error
    assert "Traceback (last lines):" in body and "in loss_fn" in body and body.rstrip().endswith("loss exploded")


def test_a_run_that_stands_still_is_mailed_with_where_its_training_waits(smtp, runs_dir, tmp_path):
    port, inbox = smtp
    gate = tmp_path / "gate"
    open_gate(gate, 3)  # batch 4 waits in the user's loader until the stalled mail is in
    threading.Thread(target=lambda: (inbox.wait_for(1, timeout_s=60), open_gate(gate, 10**6)), daemon=True).start()
    result = run_training(RunConfig(target=PACED, epochs=1, runs_dir=str(runs_dir), plugins=[email_plugin(port)],
                                    stalled_after_s=1.0, hyperparameters={"gate": str(gate), "step_sleep_s": 0.0}))
    assert result.status == "completed"
    stalled, ended = inbox.wait_for(2)
    assert stalled["Subject"] == f"[trainbus] run {result.run_id} STALLED at step 3"
    body = fields(stalled)
    assert body["Status"].startswith("training has stood still (no batch, no epoch's end) for ")
    assert body["Status"].endswith("after end_training_batch") and body["At"] == "epoch 1, step 3"
    assert body["In your code"].startswith(f"{TESTS_DIR / 'fixture_targets.py'}, line ")
    assert "in _wait_for_gate" in stalled.get_body(preferencelist=("plain",)).get_content()
    assert "completed" in ended["Subject"]



def test_a_stalled_mail_under_torchrun_says_where_each_rank_of_the_machine_waits():
    """training_stalled's `ranks` (kernel/rank_stacks.py; the run itself in test_distributed.py): each other rank of
    rank 0's machine, where the user's code holds it and its frames, or why it did not answer."""
    frame = '  File "/home/u/train.py", line 40, in __iter__\n'
    event = Event(9, "run-1", ev.TRAINING_STALLED, 0.0, 3, 1, {
        "stalled_s": 700.0, "after": ev.END_TRAINING_BATCH, "where": "", "stack": [], "ranks": [
            {"rank": 1, "where": "/home/u/train.py, line 40", "stack": [frame]},
            {"rank": 2, "error": "no answer within 1 s"}]})
    body = stalled_message(event, "/runs/run-1").get_content()
    assert "\nRank 1: in your code at /home/u/train.py, line 40\n" + frame in body, body
    assert body.endswith("\nRank 2: no answer within 1 s\n"), body


CRASHER = "raise SystemExit(3)  # dies on import, every time: the supervisor gives it up\n"
STOP_WHEN_GIVEN_UP = '''
from trainbus.sdk import Plugin


class StopWhenGivenUp(Plugin):
    """Ends the run once the supervisor has given a plugin up, so the test need not wait for all epochs."""

    def on_plugin_failed(self, event):
        self.stop(f"plugin {event.data['plugin']} was given up")
'''


def test_a_plugin_given_up_is_mailed_and_training_goes_on(smtp, runs_dir, tmp_path, monkeypatch):
    port, inbox = smtp
    (tmp_path / "crasher.py").write_text(CRASHER)
    (tmp_path / "stop_when_given_up.py").write_text(STOP_WHEN_GIVEN_UP)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{TESTS_DIR}")
    # given up after its second failure, not its sixth (the full backoff costs ~8 s): how many failures it takes
    # is the supervisor's to test (test_supervisor_clock.py); what is mailed then is this test's
    monkeypatch.setattr(supervisor, "MAX_RESTARTS", 1)
    plugins = [email_plugin(port), PluginConfig("crasher", "crasher:Anything"),
               PluginConfig("stopper", "stop_when_given_up:StopWhenGivenUp")]
    result = run_training(RunConfig(target=TIMED, epochs=100, runs_dir=str(runs_dir), plugins=plugins,
                                    hyperparameters={"epoch_s": 0.3}))
    assert result.status == "stopped" and result.plugins["crasher"]["state"] == "failed"
    messages = inbox.wait_for(2)
    given_up = [m for m in messages if "given up" in m["Subject"]]
    assert [m["Subject"] for m in given_up] == [f"[trainbus] run {result.run_id}: plugin crasher given up"]
    body = fields(given_up[0])
    assert body["Plugin"] == "crasher" and "failures within" in body["Reason"]
    assert body["Plugin log"].endswith("crasher.log")
    ended = [m for m in messages if "stopped early" in m["Subject"]]
    assert len(ended) == 1 and "was given up" in fields(ended[0])["Stopped by"]


@pytest.mark.parametrize("started_by", ["trainbus run", "the daemon"])
def test_a_killed_kernel_is_mailed_as_a_died_run_and_listed_as_died(started_by, smtp, runs_dir, tmp_path, daemons):
    """[C102] A run held at its third step (the target's gate), its kernel killed with SIGKILL: started by a plain
    `trainbus run`, and by the daemon (`run --detach`)."""
    port, inbox = smtp
    gate = tmp_path / "gate"
    open_gate(gate, 3)
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "recipients": json.dumps([RECIPIENT]),
                "min_interval_s": 0}
    sets = [f"gate={gate}", "step_sleep_s=0"] + [f"email.{key}={value}" for key, value in settings.items()]
    args = ["run", PACED, "--plugins", "email", "--epochs", "5", "--device", "cpu", "--runs-dir", str(runs_dir)] + [
        word for s in sets for word in ("--set", s)]
    if started_by == "the daemon":
        start_daemon(daemons, runs_dir)
        args.append("--detach")  # the submitting process returns at once; the daemon starts the kernel
    proc = Command(*args)
    if started_by == "the daemon":
        assert proc.wait(60) == 0, proc.communicate()[1]

    def alive() -> bool:
        assert started_by == "the daemon" or proc.poll() is None, proc.communicate()[1][-3000:]
        return True

    try:
        pid_file = wait_until(lambda: alive() and next(runs_dir.glob(f"*/{KERNEL_PID}"), None), 120, "the run")
        run_dir = pid_file.parent
        journal = JournalTail(run_dir / JOURNAL_NAME)
        wait_until(lambda: alive() and journal.step() >= 3, 120, "3 training steps")
        plugin_pid = wait_until(lambda: journal.running_pid("email"), 120, "the e-mail plugin's hello")
        # beside two CPU burners the kernel was once killed before the plugin had handled one event ("Last step:
        # none"): it has, once the kernel's snapshot shows it acked one
        wait_until(lambda: acked_by(run_dir, "email") >= 1, 120, "the e-mail plugin to handle an event", poll_s=0.5)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        proc.wait(30)
        if started_by == "the daemon":  # it noticed, and says how to continue the run
            wait_until(lambda: "the kernel died" in (daemon_dir(runs_dir) / "daemon.log").read_text(), 30,
                       "the daemon's word")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()  # its output files, read and removed

    # after the kill: the plugin notices, then connects and sends; beside two CPU burners 30 s was not enough
    [message] = inbox.wait_for(1, timeout_s=120)
    body = fields(message)
    step, seq = int(body["Last step"]), int(body["Last seq"])
    assert message["Subject"] == f"[trainbus] run {run_dir.name} DIED at step {step}: the kernel process exited"
    assert body["Status"] == "died" and body["Reason"] == "the kernel process exited"
    assert Path(body["Run directory"]) == run_dir.resolve()
    text = " ".join(message.get_body(preferencelist=("plain",)).get_content().split())
    assert f"`trainbus runs resume {run_dir.name}` continues it from the newest one" in text  # in place
    seen = {e.seq: e for e in journal.poll()}
    assert seen[seq].step == step, "the last event the plugin handled, as the journal has it"
    wait_until(lambda: process_gone(plugin_pid), 30, "the e-mail plugin to exit")

    [died] = [r for r in list_runs(runs_dir) if r["id"] == run_dir.name]
    assert died["status"] == "died" and died["steps"] == 3 and died["last_seq"] == max(seen) >= seq
    with Registry(runs_dir) as registry:  # written back: the next list need not read the directory again
        assert registry.runs(time.time())[run_dir.name]["status"] == "died"


def acked_by(run_dir: Path, plugin: str) -> int:
    """The last seq a durable `plugin` acked, as the kernel's snapshot (trainbus attach's) says; 0 for none."""
    from trainbus.sdk.attach import Attachment, target_of

    for _, item in zip(range(100), Attachment(target_of(str(run_dir)))):  # None: nothing yet, each ~0.1 s
        if item is not None and item[0] == "snapshot":
            return item[1].plugins.get(plugin, {}).get("acked") or 0
    return 0


def test_mail_goes_out_once_the_server_is_back(runs_dir):
    port = free_port()  # nothing listens here yet
    result = run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir), plugins=[email_plugin(port)]))
    assert result.status == "completed"  # an unreachable server costs the run nothing
    # ... but the run's summary says its mail did not go out (it said nothing: the mail looked sent)
    assert result.plugins["email"]["errors_logged"] == 1, result.plugins["email"]
    logged = (Path(result.run_dir) / "kernel.log").read_text()
    assert "email: 1 message(s) not sent yet; background sender pid" in logged, logged[-2000:]
    assert re.search(r"the SMTP server did not take them \(127\.0\.0\.1:\d+ refused the connection", logged), \
        logged[-2000:]
    outbox = Path(result.run_dir) / "plugins" / "email.outbox"
    assert len(list(outbox.glob("*.eml"))) == 1
    pid = int((outbox / "sender.pid").read_text())  # the background sender the plugin left behind
    controller, inbox = start_server(port)
    try:
        [message] = inbox.wait_for(1, timeout_s=15)
        assert message["Subject"].startswith(f"[trainbus] run {result.run_id} completed")
        _wait_gone(pid, timeout_s=10)
    finally:
        controller.stop()
    assert not list(outbox.glob("*.eml")) and len(list((outbox / "sent").glob("*.eml"))) == 1
    assert "outbox empty" in (outbox / "sender.log").read_text()


def test_a_server_that_never_answers_is_counted_as_an_error_in_the_runs_summary(runs_dir):
    """A server that takes the connection and says nothing (a hung relay, a firewall's black hole): the first try was
    still waiting for its greeting when the plugin ended (timeout_s 10 s against a 2 s flush), so the run's summary
    counted no error and the run said nothing of a mail that had not gone out."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever answers them
        result = run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir),
                                        plugins=[email_plugin(silent.getsockname()[1], timeout_s=10.0)]))
        outbox = Path(result.run_dir) / "plugins" / "email.outbox"
        os.kill(int((outbox / "sender.pid").read_text()), signal.SIGTERM)  # it would try for six hours
    assert result.status == "completed"
    assert result.plugins["email"]["errors_logged"] == 1, result.plugins["email"]
    logged = (Path(result.run_dir) / "kernel.log").read_text()
    assert "the SMTP server did not take them (no answer from 127.0.0.1:" in logged, logged[-2000:]


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"background sender {pid} still running")


# without a kernel: settings, durability, idempotence


def _end_event(seq: int = 40) -> Event:
    return Event(seq=seq, run="r1", type="end_training_session", ts=time.time(), step=10, epoch=2,
                 data={"epochs_completed": 2, "steps": 10, "stopped_early": False, "stop_reasons": [],
                       "training_loss": 0.5, "validation_loss": 0.4, "validation_metrics": {"accuracy": 0.9}})


def test_a_replayed_event_is_not_mailed_twice_and_a_restart_sends_what_is_pending(tmp_path):
    port = free_port()
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "recipients": [RECIPIENT],
                "min_interval_s": 0.0, "retry_initial_s": 0.1, "retry_max_s": 0.2}
    first = EmailAlertPlugin(settings, run_id="r1", run_dir=str(tmp_path))
    first.setup()
    first.handle(_end_event())
    first.handle(_end_event())  # the same seq again, as a replay after a crash brings it
    outbox = tmp_path / "plugins" / "email.outbox"
    assert len(list(outbox.glob("*.eml"))) == 1
    first._stopping.set()  # "crash": the sender thread stops, the file stays
    first._wake.set()
    first._thread.join(2)
    first.mail.unlock()
    controller, inbox = start_server(port)
    try:
        second = EmailAlertPlugin(settings, run_id="r1", run_dir=str(tmp_path))
        second.setup()
        second.handle(_end_event())  # replayed once more: still one mail
        [message] = inbox.wait_for(1)
        second.teardown()
    finally:
        controller.stop()
    assert "completed" in message["Subject"]
    assert len(list((outbox / "sent").glob("*.eml"))) == 1 and not list(outbox.glob("*.eml"))


def test_an_interrupted_run_is_mailed_as_interrupted_with_how_to_continue_it(tmp_path):
    """A run SIGTERM stopped (preempted, `kill`) ends `interrupted`, exit 130, to be continued with `runs resume`; its
    mail said `stopped early`, as if early stopping had ended it for good."""
    plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": free_port(), "security": "none",
                               "recipients": [RECIPIENT], "retry_initial_s": 60.0, "retry_max_s": 60.0},
                              run_id="r1", run_dir=str(tmp_path))
    h = Harness(plugin, run_id="r1", run_dir=str(tmp_path))
    h.feed("end_training_session", epochs_completed=4, steps=183, stopped_early=True,
           stop_reasons=["kernel: stop: interrupted (SIGTERM)"], training_loss=0.5, validation_loss=0.4,
           validation_metrics={})
    plugin._stopping.set()
    plugin._wake.set()
    [path] = (tmp_path / "plugins" / "email.outbox").glob("*-end.eml")
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["Subject"].startswith("[trainbus] run r1 interrupted: "), message["Subject"]
    body = fields(message)
    assert body["Status"] == "interrupted" and body["Stopped by"] == "kernel: stop: interrupted (SIGTERM)"
    assert body["Continue it with"] == "trainbus runs resume r1"


@pytest.mark.parametrize("first_epoch_ended", [True, False], ids=["an epoch", "cut short in its first epoch"])
def test_the_end_mail_of_a_continued_run_says_its_training_time_over_its_sessions_and_this_ones(tmp_path,
                                                                                              first_epoch_ended):
    """A run interrupted and continued with `runs resume` days later was mailed `Duration` from its first start to its
    end, the days between included, as if it had trained all that time (runs list says the last session's)."""
    plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": free_port(), "security": "none",
                               "recipients": [RECIPIENT], "retry_initial_s": 60.0, "retry_max_s": 60.0},
                              run_id="r1", run_dir=str(tmp_path))
    plugin.setup()
    day = 86400.0

    def event(seq: int, type_: str, ts: float, epoch: int, **data) -> Event:
        return Event(seq=seq, run="r1", type=type_, ts=ts, step=10 * epoch, epoch=epoch, data=data)
    # the first session, as the SDK replays it to a continued run's plugin: all but its final event (seq 4 is
    # the next kernel's plugins starting, before its session starts)
    plugin.handle(event(1, "start_training_session", 1000.0, 0, epochs=3))
    if first_epoch_ended:
        plugin.handle(event(2, "end_epoch", 1100.0, 1, training_loss=0.9, validation_loss=0.8))
    plugin.handle(event(3, "stop_requested", 1120.0, 1, reasons=["kernel: stop: interrupted (SIGTERM)"]))
    plugin.handle(event(4, "plugin_started", 1000.0 + 2 * day - 5, 1, plugin="console"))  # the next kernel's
    plugin.handle(event(5, "start_training_session", 1000.0 + 2 * day, 1, epochs=3))
    plugin.handle(event(6, "end_epoch", 1000.0 + 2 * day + 100, 2, training_loss=0.5, validation_loss=0.4))
    plugin.handle(event(7, "end_training_session", 1000.0 + 2 * day + 200, 2, epochs_completed=3, steps=30,
                        stopped_early=False, stop_reasons=[], training_loss=0.5, validation_loss=0.4))
    plugin._stopping.set()
    plugin._wake.set()
    [path] = (tmp_path / "plugins" / "email.outbox").glob("*-end.eml")
    body = fields(email.message_from_bytes(path.read_bytes(), policy=email.policy.default))
    assert body["Duration"] == "200.00 s (0:03:20) this session; 320.00 s (0:05:20) of training over 2 sessions, " \
                               "2 days, 0:03:20 since the run began", body["Duration"]


def test_the_end_mail_of_a_run_without_validation_names_its_training_loss(tmp_path):
    """A run with no validation loader was mailed `completed: validation loss none after 3 epochs`."""
    plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": free_port(), "security": "none",
                               "recipients": [RECIPIENT], "retry_initial_s": 60.0, "retry_max_s": 60.0},
                              run_id="r1", run_dir=str(tmp_path))
    h = Harness(plugin, run_id="r1", run_dir=str(tmp_path))
    h.feed("end_training_session", epochs_completed=3, steps=30, stopped_early=False, stop_reasons=[],
           training_loss=0.25, validation_loss=None, validation_metrics={})
    plugin._stopping.set()
    plugin._wake.set()
    [path] = (tmp_path / "plugins" / "email.outbox").glob("*-end.eml")
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "[trainbus] run r1 completed: training loss 0.25 after 3 epochs", message["Subject"]


def _given_up_lines(tmp_path, port: int, **overrides) -> list[str]:
    """What the plugin logged as it tried its end mail against the server at `port` till the mail was given up."""
    settings = {"host": "127.0.0.1", "port": port, "security": "none", "recipients": [RECIPIENT],
                "min_interval_s": 0.0, "retry_initial_s": 0.1, "retry_max_s": 0.2,
                "retry_window_s": 30.0, **overrides}  # a mail not given up (the test fails): its sender ends soon
    plugin = EmailAlertPlugin(settings, run_id="r1", run_dir=str(tmp_path))
    said: list[str] = []
    plugin.log = lambda text, level="info": said.append(text)
    plugin.setup()
    plugin.handle(_end_event())
    failed = tmp_path / "plugins" / "email.outbox" / "failed"
    deadline = time.monotonic() + 30
    while not list(failed.glob("*.eml")) and time.monotonic() < deadline:
        time.sleep(0.05)
    plugin.teardown()
    assert len(list(failed.glob("*.eml"))) == 1, said  # given up at once: retrying cannot help
    return said


def test_a_host_that_does_not_resolve_is_said_naming_it_and_the_setting_while_the_mail_waits(tmp_path):
    """A typo in `host` said `e-mail ... not sent (gaierror: [Errno -2] Name or service not known); retrying with
    backoff for up to 21600 s`, and the run's end `the SMTP server did not take them (gaierror: ...)`: no word of
    which name, nor of the setting. A name that does not resolve may be a resolver down for a while, so the mail
    still waits and is tried again (nothing is lost); the lines say which name and what to check."""
    plugin = EmailAlertPlugin({"host": "smtp.nosuch.invalid", "port": free_port(), "security": "none",
                               "recipients": [RECIPIENT], "min_interval_s": 0.0, "retry_initial_s": 0.5,
                               "retry_max_s": 0.5, "retry_window_s": 2.0},  # its background sender ends soon
                              run_id="r1", run_dir=str(tmp_path))
    said: list[tuple[str, str]] = []
    plugin.log = lambda text, level="info": said.append((level, text))
    plugin.setup()
    try:
        plugin.handle(_end_event())
        deadline = time.monotonic() + 30
        while not [text for _, text in said if "not sent" in text] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((tmp_path / "plugins" / "email.outbox").glob("*.eml")), "the mail was not kept for the next try"
    finally:
        plugin.teardown()
    lines = [text for _, text in said if "not sent (" in text or "not sent yet" in text]
    assert lines and all("smtp.nosuch.invalid does not resolve" in line and "check `host`" in line
                         for line in lines), lines
    assert "retrying" in lines[0], lines


def test_starttls_against_a_server_without_it_is_given_up_at_once_naming_the_setting(tmp_path):
    """The default security = starttls against a relay that offers none was retried for six hours as if the server
    were down: it is the settings, and says which."""
    controller, inbox = start_server(free_port())
    try:
        said = _given_up_lines(tmp_path, controller.port, security="starttls")
    finally:
        controller.stop()
    assert not inbox.messages
    assert any('does not support what `security` asks' in line and '"none" for a server' in line for line in said), said


def test_a_username_for_a_server_that_offers_no_login_is_given_up_naming_username_not_security(tmp_path, monkeypatch):
    """A username set for a server that offers no AUTH (aiosmtpd's default: AUTH over TLS only) said `does not support
    what security asks: set security = "none"`, with security already "none": the fix it named was the setting given."""
    controller, inbox = start_server(free_port())
    monkeypatch.setenv("TRAINBUS_SMTP_PASSWORD", "secret")
    try:
        said = _given_up_lines(tmp_path, controller.port, username="me")
    finally:
        controller.stop()
    assert not inbox.messages
    [line] = [line for line in said if "given up" in line]
    assert f"127.0.0.1:{controller.port} offers no login (SMTP AUTH)" in line and "username" in line, line
    assert "`security` asks" not in line, line


class RefusesOne(Inbox):
    """Takes mail for every address but one, which it refuses as a server refuses an unknown mailbox."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == "nobody@example.com":
            return "550 5.1.1 nobody@example.com: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_a_recipient_the_server_refuses_while_it_takes_the_others_is_said_naming_it(tmp_path):
    """With two recipients, one a mailbox the server does not know (a typo), the mail went to the other and the
    refusal was dropped without a word: the user never learnt that one address gets nothing."""
    inbox = RefusesOne()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": controller.port, "security": "none",
                               "recipients": [RECIPIENT, "nobody@example.com"], "min_interval_s": 0.0},
                              run_id="r1", run_dir=str(tmp_path))
    said: list[tuple[str, str]] = []
    plugin.log = lambda text, level="info": said.append((level, text))
    try:
        plugin.setup()
        plugin.handle(_end_event())
        assert len(inbox.wait_for(1)) == 1
        plugin.teardown()
    finally:
        controller.stop()
    [line] = [text for level, text in said if "nobody@example.com" in text]
    assert "550" in line and "mailbox unavailable" in line and "recipients" in line, line
    assert ("error", line) in said, said  # counted as an error logged: `runs list` shows it


@pytest.mark.parametrize("source", ["password_env", "password_file"])
def test_a_login_the_server_refuses_is_given_up_naming_where_the_password_came_from(tmp_path, monkeypatch, source):
    """A 535 said `refused by the server: 535 (535, b'5.7.8 Authentication credentials invalid')`: not which
    username was tried, nor whether the password came from an environment variable (which one) or a file."""
    def refuse(server, session, envelope, mechanism, auth_data):
        return AuthResult(success=False, handled=False)  # handled=False: aiosmtpd says the 535 itself
    controller, inbox = start_server(free_port(), authenticator=refuse, auth_require_tls=False)
    settings = {"username": "me"}
    if source == "password_env":
        monkeypatch.setenv("MY_SMTP_SECRET", "wrong")
        settings["password_env"] = "MY_SMTP_SECRET"
        where = "the environment variable MY_SMTP_SECRET"
    else:
        secret = tmp_path / "smtp-password"
        secret.write_text("wrong\n")
        secret.chmod(0o600)
        settings.update(password_file=str(secret), password_env="")
        where = f"password_file {secret}"
    try:
        said = _given_up_lines(tmp_path / "run", controller.port, **settings)
    finally:
        controller.stop()
    assert not inbox.messages
    [line] = [line for line in said if "given up" in line]
    assert "535" in line and "username 'me'" in line and where in line, line


def test_ssl_against_a_server_that_speaks_no_tls_is_given_up_at_once_naming_the_setting(tmp_path):
    """security = "ssl" at a port that starts in plain text (25, 587) was retried for six hours (WRONG_VERSION_NUMBER,
    as if the server were down), a background sender left behind for all of it: it is the settings, and says which."""
    controller, inbox = start_server(free_port())
    try:
        said = _given_up_lines(tmp_path, controller.port, security="ssl")
    finally:
        controller.stop()
    [line] = [line for line in said if "given up" in line]
    assert "speaks no TLS" in line and 'security = "starttls"' in line, line
    assert not inbox.messages


SELF_SIGNED = TESTS_DIR / "fixture_smtp_tls.pem"  # key and certificate (CN trainbus test, for 127.0.0.1, till 2126)


def test_a_certificate_this_machine_does_not_trust_is_given_up_at_once_naming_the_fix(tmp_path, monkeypatch):
    """A server whose certificate does not verify (self-signed, another host's name) was retried for six hours as if
    it were down, a background sender left behind for all of it: no retry makes it trusted. With the fix it names
    (SSL_CERT_FILE, the server's CA), the mail goes."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(SELF_SIGNED)
    controller, inbox = start_server(free_port(), tls_context=context)
    try:
        said = _given_up_lines(tmp_path / "untrusted", controller.port, security="starttls")
        [line] = [line for line in said if "given up" in line]
        assert f"127.0.0.1:{controller.port}" in line and "certificate" in line and "SSL_CERT_FILE" in line, line
        monkeypatch.setenv("SSL_CERT_FILE", str(SELF_SIGNED))
        plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": controller.port, "security": "starttls",
                                   "recipients": [RECIPIENT], "min_interval_s": 0.0}, run_id="r1",
                                  run_dir=str(tmp_path / "trusted"))
        plugin.setup()
        plugin.handle(_end_event())
        assert len(inbox.wait_for(1)) == 1
        plugin.teardown()
    finally:
        controller.stop()


def test_a_password_never_comes_from_the_config(tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="password_env"):
        EmailAlertPlugin({"password": "hunter2", "recipients": [RECIPIENT]})
    secret = tmp_path / "smtp-password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    loose = {"username": "me", "password_file": str(secret), "recipients": [RECIPIENT], "password_env": ""}
    with pytest.raises(SettingsError, match="chmod 600"):
        Harness(EmailAlertPlugin(loose), run_dir=str(tmp_path))
    secret.chmod(0o600)
    plugin = EmailAlertPlugin(loose, run_dir=str(tmp_path))
    Harness(plugin, run_dir=str(tmp_path)).close()
    assert plugin.smtp.password() == "hunter2"
    monkeypatch.delenv("TRAINBUS_SMTP_PASSWORD", raising=False)
    with pytest.raises(SettingsError, match="no password"):
        Harness(EmailAlertPlugin({"username": "me", "recipients": [RECIPIENT]}), run_dir=str(tmp_path))
    monkeypatch.setenv("TRAINBUS_SMTP_PASSWORD", "from-env")
    plugin = EmailAlertPlugin({"username": "me", "recipients": [RECIPIENT]}, run_dir=str(tmp_path))
    Harness(plugin, run_dir=str(tmp_path)).close()
    assert plugin.smtp.password() == "from-env"
    saved = (tmp_path / "plugins" / "email.outbox" / "smtp.json").read_text()
    assert "from-env" not in saved and "hunter2" not in saved


@pytest.mark.parametrize("make, said", [
    (lambda path: path.mkdir(mode=0o700), "is not a file"),
    (lambda path: path.write_bytes(b"\xff\xfe\x00"), "is not UTF-8 text"),
    (lambda path: path.write_text("\n"), "is empty"),
], ids=["a directory", "binary", "empty"])
def test_a_password_file_that_holds_no_password_is_one_line_naming_it(tmp_path, make, said):
    """A password_file that was a directory (0700) said `checking its settings raised .../pathlib.py, line 1044:
    IsADirectoryError`; a binary one raised UnicodeDecodeError; an empty one passed, and every mail's login failed."""
    secret = tmp_path / "smtp-password"
    make(secret)
    secret.chmod(0o700 if secret.is_dir() else 0o600)
    settings = {"username": "me", "password_file": str(secret), "recipients": [RECIPIENT], "password_env": ""}
    with pytest.raises(SettingsError, match=f"email password_file {re.escape(str(secret))} {said}; "):
        EmailAlertPlugin(settings)


@pytest.mark.parametrize("setting, value, named", [
    ("recipients", ["ops@example.com", "not an address @"], "'not an address @'"),
    ("recipients", ["ops@example.com\nBcc: someone@example.org"], "a line break"),
    ("sender", "me@example.com\nBcc: someone@example.org", "a line break"),
    ("sender", "me at example.com", "'me at example.com'"),
], ids=["not an address", "a line break", "a line break in sender", "sender not an address"])
def test_an_address_no_mail_can_carry_is_refused_before_the_run_naming_the_setting(setting, value, named):
    """These passed the settings' check, and the end handler raised at the run's end (IndexError: string index out
    of range; ValueError: Header values may not contain linefeed): no mail, a dead letter, and nothing said before."""
    settings = {"recipients": [RECIPIENT], setting: value}
    with pytest.raises(SettingsError, match=f"^plugin email: {setting} = ") as raised:
        EmailAlertPlugin(settings)
    assert named in str(raised.value) and "name@domain" in str(raised.value), raised.value


@pytest.mark.parametrize("host", ["smtp.example.com:587", "127.0.0.1:2525"])
def test_a_host_with_a_port_in_it_is_refused_before_the_run_naming_the_port_setting(host):
    """host = "smtp.example.com:587" passed the check, and every mail's connection failed to resolve that name
    (`gaierror: Name or service not known`), retried for six hours as if the server were down."""
    name, port = host.rsplit(":", 1)
    with pytest.raises(SettingsError, match=f"^plugin email: email host {re.escape(repr(host))} ") as raised:
        EmailAlertPlugin({"recipients": [RECIPIENT], "host": host})
    assert f'host = "{name}"' in str(raised.value) and f"port = {port}" in str(raised.value), raised.value
    assert EmailAlertPlugin({"recipients": [RECIPIENT], "host": "::1"}).settings["host"] == "::1"  # IPv6: no port


def test_a_retry_max_below_retry_initial_is_refused_naming_both_values_and_the_fix():
    """It said "email retry_initial_s must be > 0 and retry_max_s >= retry_initial_s": the rule, not which values
    broke it (the first half could not: retry_initial_s is at least 0.001)."""
    with pytest.raises(SettingsError, match=r"^plugin email: email retry_max_s = 1 is below retry_initial_s = 100:") \
            as raised:
        EmailAlertPlugin({"recipients": [RECIPIENT], "retry_initial_s": 100, "retry_max_s": 1})
    assert "set retry_max_s >= retry_initial_s" in str(raised.value), raised.value
    assert EmailAlertPlugin({"recipients": [RECIPIENT], "retry_initial_s": 5, "retry_max_s": 5}).settings


@pytest.mark.parametrize("security", ["starttls", "none"])
def test_port_465_without_ssl_is_refused_before_the_run_naming_both_fixes(security):
    """port = 465 (the TLS port providers list first) with the default security = "starttls": the client waited for
    a greeting the server never sends before TLS, each try timed out (timeout_s), and the mail was retried for six
    hours as if the server were down."""
    with pytest.raises(SettingsError, match="^plugin email: email port 465 ") as raised:
        EmailAlertPlugin({"recipients": [RECIPIENT], "port": 465, "security": security})
    assert 'security = "ssl"' in str(raised.value) and "port = 587" in str(raised.value), raised.value
    assert EmailAlertPlugin({"recipients": [RECIPIENT], "port": 465, "security": "ssl"}).settings["port"] == 465


def test_a_login_in_plain_text_to_another_machine_is_refused_before_the_run(monkeypatch):
    """username with security = "none" logged in over plain text: the password crossed the network for anyone on the
    path to read. Refused before the run, naming the two settings that encrypt it; a relay on this machine (the
    loopback, which never leaves it) still takes a plain-text login."""
    monkeypatch.setenv("MAIL_PASSWORD", "secret")
    login = {"recipients": [RECIPIENT], "security": "none", "username": "me", "password_env": "MAIL_PASSWORD"}
    for host in ("smtp.example.com", "10.0.0.5", "2001:db8::1"):
        with pytest.raises(SettingsError, match=f"would send its password to {re.escape(host)} in plain text") as no:
            EmailAlertPlugin({**login, "host": host})
        assert 'security = "starttls" (port 587) or "ssl" (465)' in str(no.value), no.value
    for host in ("localhost", "127.0.0.1", "::1"):
        assert EmailAlertPlugin({**login, "host": host}).settings["host"] == host
    assert EmailAlertPlugin({**login, "host": "smtp.example.com", "security": "starttls"})


def test_plugin_failed_mails_are_capped_but_the_end_mail_always_goes(tmp_path):
    plugin = EmailAlertPlugin({"host": "127.0.0.1", "port": free_port(), "security": "none",
                               "recipients": [RECIPIENT], "max_messages": 2, "retry_initial_s": 60.0,
                               "retry_max_s": 60.0}, run_id="r1", run_dir=str(tmp_path))
    h = Harness(plugin, run_id="r1", run_dir=str(tmp_path))
    for name in ("a", "b", "c", "d"):
        h.feed("plugin_failed", plugin=name, reason="5 failures within 60 s", log="/nonexistent.log")
    h.feed("end_training_session", epochs_completed=1, steps=3, stopped_early=False, stop_reasons=[],
           training_loss=1.0, validation_loss=1.0, validation_metrics={})
    plugin._stopping.set()
    plugin._wake.set()
    names = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "plugins" / "email.outbox").glob("*.eml"))
    assert names == ["end.eml", "plugin-failed.eml", "plugin-failed.eml"]
    assert len([r for r in h.replies_of("log") if "max_messages" in r["text"]]) == 1
