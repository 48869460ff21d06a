"""E-mail when training ends (with the loss plot), fails, dies or stands still, and when a plugin is given up.

Handlers never touch the network: each writes its message into a durable outbox on disk
(<run_dir>/plugins/<name>.outbox) and returns, so the event is acknowledged only once the mail is
safe. A sender thread delivers from there, rate-limited and retried with backoff. If mail is still
unsent when the run ends (the server is down), the plugin leaves a background sender behind,
`python -m trainbus.plugins.email_alert --deliver OUTBOX`, which keeps trying within the retry window.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from trainbus.proto import DURABLE, Event, events as ev
from trainbus.sdk import HOST_PATH, KernelGoneInfo, Plugin, Setting, SettingsError

from ._history import History
from ._outbox import SECURITY_MODES, Outbox, SmtpConfig, SmtpConfigError, deliver_until_empty
from ._plots import PlotSize, loss_figure, png_bytes

TEARDOWN_FLUSH_S = 2.0  # at the end, unsent mail gets this long in the plugin before a background sender takes it
LOCK_RETRY_S = 1.0  # another sender (a previous incarnation's background one) holds the outbox: look again
IDLE_POLL_S = 5.0
DELIVERER_LOCK_WAIT_S = 30.0  # a background sender waits this long for the plugin process to let go
TRACEBACK_TAIL_LINES = 30
PLUGIN_LOG_TAIL_LINES = 20
SUBJECT_MAX_CHARS = 150
PLOT_STEP_EVERY = 10
SENDER_PID_FILE = "sender.pid"
FINAL_KINDS = ("end", "failure", "died")  # always sent, whatever max_messages says
# The stop reason the kernel gives a Ctrl-C or SIGTERM (kernel/loop.py, _apply): that run ends `interrupted`, to be
# continued with `runs resume`, not stopped for good as a plugin's stop (early stopping) ends it.
INTERRUPTED_REASON = "kernel: stop: interrupted"


class EmailAlertPlugin(Plugin):
    """E-mail when training ends (with the loss plot), fails, dies or stands still, or a plugin is given up; durable.

    SMTP settings: host, port (0: 587 for starttls, 465 for ssl, 25 for none), security, username. The
    password comes from the environment variable named by password_env, or from password_file (mode
    0600), never from the config. At most max_messages per run (the end, failure or died mail always goes),
    at least min_interval_s apart; a message the server cannot take is retried with backoff from
    retry_initial_s up to retry_max_s for retry_window_s.
    """

    name = "email"
    delivery = DURABLE  # a mail is written before its event is acked: a crash loses none
    settings = {
        "host": Setting("localhost", "the SMTP server"),
        "port": Setting(0, "its port (0: 587 for starttls, 465 for ssl, 25 for none)", min=0, max=65535),
        "security": Setting("starttls", "how the connection is encrypted", choices=SECURITY_MODES),
        "username": Setting("", "SMTP login ('': none)"),
        "password_env": Setting("TRAINBUS_SMTP_PASSWORD", "the environment variable holding the password"),
        "password_file": Setting("", "or a file holding it, mode 0600", kind=HOST_PATH),
        "sender": Setting("", "the From address ('': trainbus@<hostname>)"),
        "recipients": Setting([], "the addresses mail goes to", items=str, rule="one or more e-mail addresses"),
        "subject_prefix": Setting("[trainbus]", "put before every subject"),
        "on_end": Setting(True, "mail when training ends, with the loss plot"),
        "on_failure": Setting(True, "mail when the run fails"),
        "on_died": Setting(True, "mail when the run dies: its kernel killed (kill -9, out of memory) mid-run"),
        "on_plugin_failed": Setting(True, "mail when a plugin is given up"),
        "on_stalled": Setting(True, "mail when training stands still for [run] stalled_after_s (a hang), with where"),
        "attach_loss_plot": Setting(True, "attach loss.png to the end-of-training mail"),
        "max_messages": Setting(10, "at most this many per run (the end, failure or died mail always goes)", min=0),
        "min_interval_s": Setting(5.0, "at least this long between two messages", min=0),
        "retry_initial_s": Setting(2.0, "first wait before retrying a message the server did not take", min=0.001),
        "retry_max_s": Setting(300.0, "the retry wait doubles up to this", min=0.001),
        "retry_window_s": Setting(6 * 3600.0, "a message not sent this long after it was written is given up",
                                  min=1, max=30 * 86400),  # 0 gave each message up before its first try
        "timeout_s": Setting(10.0, "SMTP connection timeout", min=0.001, max=3600),
    }

    # said in place of "no setting 'password'", by the check of --set and the config (sdk/plugin.py, merge_settings)
    refused_settings = {"password": "a password never goes in the config or on the command line (config.json and "
                                    "the process list would keep it); set password_env (the name of an environment "
                                    "variable holding it) or password_file (a file only you can read, mode 0600)"}

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        recipients = settings["recipients"]
        if not recipients or not all(isinstance(r, str) and "@" in r for r in recipients):
            raise SettingsError(f"recipients = {recipients!r} is not allowed; it must be a list of one or more "
                                f"addresses, e.g. [\"you@example.com\"]")
        # what the message's headers will not take failed the end handler at the run's end: said before the run
        for key, texts in (("recipients", recipients), ("sender", [settings["sender"]] if settings["sender"] else [])):
            for text in texts:
                problem = _address_problem(text)
                if problem:
                    raise SettingsError(f"{key} = {settings[key]!r} is not allowed: {problem}; give each address as "
                                        f"name@domain, or \"Your Name <name@domain>\"")
        try:
            smtp_config(settings).check()
        except SmtpConfigError as exc:
            raise SettingsError(str(exc)) from None

    def setup(self) -> None:
        self.smtp = smtp_config(self.settings)
        self.mail = Outbox(Path(self.run_dir) / "plugins" / f"{self.name}.outbox")
        self.mail.save_config(self.smtp)
        self.history = History(every_n_steps=PLOT_STEP_EVERY)
        self.started = False
        self.said_limit = False
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._deliver, name="email-sender", daemon=True)
        self._thread.start()

    def teardown(self) -> None:
        if not hasattr(self, "_thread"):
            return
        deadline = time.monotonic() + TEARDOWN_FLUSH_S
        self._wake.set()
        while self.mail.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            self.mail.unlock()  # else it is mid-send; our exit releases the lock for the background sender
        if self.mail.pending():
            pid = start_background_sender(self.mail.path)
            said = (f"email: {len(self.mail.pending())} message(s) not sent yet; background sender pid {pid} "
                    f"keeps trying for up to {self.smtp.retry_window_s:g} s (log: {self.mail.path / 'sender.log'})")
            _say(said)
            failure = self.mail.last_failure()
            if failure:  # the server did not take them (not just rate-limited): the run's summary names it
                self.log(f"{said}; the SMTP server did not take them ({failure})", level="error")

    # events

    def on_event(self, event: Event) -> None:
        if not self.started:
            self.started = True
            if event.seq > 1:  # a restart: the journal, where readable, has the epochs before our replay
                self.history.backfill(self.run_dir, before_seq=event.seq,
                                      progress=lambda _seq: self.still_working())
        self.history.update(event)
        s = self.settings
        if event.type == ev.END_TRAINING_SESSION and s["on_end"]:
            message = end_message(self.history, event, self.run_dir, s["attach_loss_plot"])
            self._queue(event.seq, event.ts, "end", message)
        elif event.type == ev.RUN_FAILED and s["on_failure"]:
            self._queue(event.seq, event.ts, "failure", failure_message(self.history, event, self.run_dir))
        elif event.type == ev.PLUGIN_FAILED and s["on_plugin_failed"]:
            self._queue(event.seq, event.ts, "plugin-failed", plugin_failed_message(event))
        elif event.type == ev.TRAINING_STALLED and s["on_stalled"]:
            self._queue(event.seq, event.ts, "stalled", stalled_message(event, self.run_dir))

    def on_kernel_gone(self, info: KernelGoneInfo) -> None:
        """Queued like the others; teardown, which the SDK runs right after, sends it or leaves it to a
        background sender, so it goes out although this process is about to exit."""
        if self.settings["on_died"]:
            self._queue(info.last_seq or 0, time.time(), "died", died_message(info))

    def _queue(self, seq: int, ts: float, kind: str, message: EmailMessage) -> None:
        """Write the message for the event at `seq` (at `ts`) into the outbox, once, and wake the sender."""
        name = f"{seq:010d}-{kind}.eml"
        if self.mail.known(name):
            return  # written before a restart; the replay brought its event again
        if kind not in FINAL_KINDS and self.mail.count() >= self.settings["max_messages"]:
            if not self.said_limit:
                self.said_limit = True
                self.log(f"email: max_messages {self.settings['max_messages']} reached; "
                         f"only the end-of-run mail goes out from now on", level="warning")
            return
        s = self.settings
        subject = message["Subject"]
        del message["Subject"]  # assigning a header adds one; the builder's goes, the prefixed one comes
        message["Subject"] = _one_line(f"{s['subject_prefix']} {subject}".strip())[:SUBJECT_MAX_CHARS]
        message["From"] = s["sender"] or f"trainbus@{socket.gethostname()}"
        message["To"] = ", ".join(s["recipients"])
        message["Date"] = formatdate(ts, localtime=True)
        message["Message-ID"] = make_msgid(idstring=f"{self.run_id}.{seq}", domain=socket.gethostname())
        self.mail.put(name, message.as_bytes())
        self._wake.set()

    # the sender thread

    def _deliver(self) -> None:
        while not self._stopping.is_set():
            if not self.mail.try_lock():
                self._wake.wait(LOCK_RETRY_S)
                continue
            self._wake.clear()
            wait = self.mail.deliver_due(self.smtp, self._report)
            self._wake.wait(IDLE_POLL_S if wait is None else min(wait, IDLE_POLL_S))

    def _report(self, text: str, level: str) -> None:
        _say(text)
        self.log(text, level=level)


# messages


def end_message(history: History, event: Event, run_dir: str, attach_plot: bool) -> EmailMessage:
    data = event.data
    reasons = [str(r) for r in data.get("stop_reasons") or []]
    interrupted = any(reason.startswith(INTERRUPTED_REASON) for reason in reasons)
    status = "interrupted" if interrupted else "stopped early" if data.get("stopped_early") else "completed"
    best = history.best_validation()
    epochs = data.get("epochs_completed")
    final_loss = data.get("validation_loss")
    lines = [
        f"Run: {event.run}",
        f"Status: {status}",
        f"Duration: {_run_duration(history)}",
        f"Epochs: {epochs}" + (f" of {history.epochs_total}" if history.epochs_total else ""),
        f"Steps: {data.get('steps')}",
        f"Best validation loss: {_fmt(best.validation_loss)} (epoch {best.epoch})" if best else
        "Best validation loss: none",
        f"Final validation loss: {_fmt(final_loss)}",
        f"Final training loss: {_fmt(data.get('training_loss'))}",
    ]
    lines += [f"Final training {name}: {_fmt(value)}" for name, value in (data.get("training_metrics") or {}).items()]
    lines += [f"Final validation {name}: {_fmt(value)}"
              for name, value in (data.get("validation_metrics") or {}).items()]
    if data.get("stopped_early"):
        lines.append("Stopped by: " + "; ".join(reasons))
    if interrupted:
        lines.append(f"Continue it with: trainbus runs resume {event.run}")
    lines.append(f"Run directory: {run_dir}")
    message = EmailMessage()
    # a run that validates nothing has its training loss to say (as `runs list` says its training metrics)
    said = f"validation loss {_fmt(final_loss)}" if final_loss is not None else \
        f"training loss {_fmt(data.get('training_loss'))}"
    message["Subject"] = f"run {event.run} {status}: {said} after {epochs} epochs"
    message.set_content("\n".join(lines) + "\n")
    if attach_plot:
        fig = loss_figure(history, PlotSize())
        if fig is not None:
            message.add_attachment(png_bytes(fig, PlotSize()), maintype="image", subtype="png", filename="loss.png")
    return message


def failure_message(history: History, event: Event, run_dir: str) -> EmailMessage:
    data = event.data
    error = str(data.get("error") or "unknown error")
    tail = "\n".join(str(data.get("traceback") or "").splitlines()[-TRACEBACK_TAIL_LINES:])
    lines = [
        f"Run: {event.run}",
        "Status: failed",
        f"Error: {error}",
        f"At: epoch {event.epoch}, step {event.step}",
        f"Duration: {_run_duration(history)}",
        f"Run directory: {run_dir}",
        "",
        "Traceback (last lines):",
        tail or "(none recorded)",
    ]
    message = EmailMessage()
    message["Subject"] = f"run {event.run} FAILED: {error}"
    message.set_content("\n".join(lines) + "\n")
    return message


def died_message(info: KernelGoneInfo) -> EmailMessage:
    lines = [
        f"Run: {info.run_id}",
        "Status: died",
        f"Reason: {info.reason}",
        f"Last step: {_fmt(info.last_step)}",
        f"Last seq: {_fmt(info.last_seq)}",
        f"Last epoch: {_fmt(info.last_epoch)}",
        f"Run directory: {info.run_dir}",
        "",
        "The kernel ended without finishing the run (killed, out of memory, the machine went down), so it wrote",
        "no summary.json; `trainbus runs list` shows the run as died. Its kernel.log and plugins/ are in the run",
        f"directory; with checkpoints, `trainbus runs resume {info.run_id}` continues it from the newest one.",
    ]
    message = EmailMessage()
    message["Subject"] = f"run {info.run_id} DIED at step {_fmt(info.last_step)}: {info.reason}"
    message.set_content("\n".join(lines) + "\n")
    return message


def plugin_failed_message(event: Event) -> EmailMessage:
    data = event.data
    plugin = data.get("plugin") or "?"
    lines = [
        f"Run: {event.run}",
        f"Plugin: {plugin}",
        f"Reason: {data.get('reason')}",
        f"Plugin log: {data.get('log')}",
        f"At: epoch {event.epoch}, step {event.step}",
        "Training goes on without this plugin.",
    ]
    tail = _tail(data.get("log"), PLUGIN_LOG_TAIL_LINES)
    if tail:
        lines += ["", "Plugin log (last lines):", tail]
    message = EmailMessage()
    message["Subject"] = f"run {event.run}: plugin {plugin} given up"
    message.set_content("\n".join(lines) + "\n")
    return message


def stalled_message(event: Event, run_dir: str) -> EmailMessage:
    data = event.data
    stalled_s = data.get("stalled_s")
    where = data.get("where") or "none of your code is on its stack"
    stack = data.get("stack") if isinstance(data.get("stack"), list) else []
    lines = [
        f"Run: {event.run}",
        f"Status: training has stood still (no batch, no epoch's end) for "
        f"{_duration(stalled_s if isinstance(stalled_s, (int, float)) else None)}, after {data.get('after')}",
        f"At: epoch {event.epoch}, step {event.step}",
        f"In your code: {where}",
        f"Its kernel is alive: `trainbus attach {event.run}` shows whether it moves again, `trainbus runs stop "
        f"{event.run}` ends it.",
        f"Run directory: {run_dir}",
        "",
        "The training thread's stack (innermost last):",
        "".join(str(frame) for frame in stack).rstrip() or "(not found)",
    ]
    for rank in [r for r in data.get("ranks") or [] if isinstance(r, dict)]:  # under torchrun: this machine's others
        frames = rank.get("stack") if isinstance(rank.get("stack"), list) else []
        lines += ["", f"Rank {rank.get('rank')}: " + (str(rank["error"]) if rank.get("error") else
                                                      f"in your code at {rank.get('where') or '(none of it)'}")]
        lines += ["".join(str(frame) for frame in frames).rstrip()] if frames else []
    message = EmailMessage()
    message["Subject"] = f"run {event.run} STALLED at step {event.step}"
    message.set_content("\n".join(lines) + "\n")
    return message


# the background sender


def smtp_config(settings: dict[str, Any]) -> SmtpConfig:
    keys = ("host", "port", "security", "username", "password_env", "password_file", "timeout_s",
            "min_interval_s", "retry_initial_s", "retry_max_s", "retry_window_s")
    return SmtpConfig(**{key: settings[key] for key in keys})


def start_background_sender(outbox_dir: Path) -> int:
    """A detached process (its own session, so the supervisor's cleanup of our group spares it) that empties
    the outbox."""
    log = open(outbox_dir / "sender.log", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "trainbus.plugins.email_alert", "--deliver", str(outbox_dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    (outbox_dir / SENDER_PID_FILE).write_text(f"{proc.pid}\n")  # written here, so it exists once teardown is over
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainbus.plugins.email_alert",
                                     description="Send what an e-mail plugin's outbox still holds, then exit.")
    parser.add_argument("--deliver", metavar="OUTBOX", required=True,
                        help="the outbox folder (<run_dir>/plugins/email.outbox)")
    args = parser.parse_args(argv)
    outbox = Outbox(Path(args.deliver))
    try:
        config = outbox.load_config()
        deadline = time.monotonic() + DELIVERER_LOCK_WAIT_S
        while not outbox.try_lock():
            if time.monotonic() > deadline:
                _say("email sender: another sender holds the outbox; leaving it to that one")
                return 0
            time.sleep(0.2)
        deliver_until_empty(outbox, config, lambda text, level: _say(f"email sender: {text}"))
        _say("email sender: outbox empty; exiting")
        return 0
    finally:
        pid_file = outbox.path / SENDER_PID_FILE
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink(missing_ok=True)


# formatting


def _address_problem(text: str) -> str:
    """Why `text` is no address a mail header can carry ("" when it is one or more)."""
    if "\n" in text or "\r" in text:
        return f"{text!r} holds a line break"
    header = EmailMessage()
    try:
        header["To"] = text
        addresses = header["To"].addresses
    except (ValueError, IndexError, TypeError):  # the email package's parser raises these on some garbage
        addresses = ()
    if not addresses or not all(a.username and a.domain for a in addresses):
        return f"{text!r} is not an e-mail address"
    return ""


def _say(text: str) -> None:
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {text}", file=sys.stderr, flush=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.2f} s ({datetime.timedelta(seconds=round(seconds))})"


def _run_duration(history: History) -> str:
    """The run's time; a run continued in place (`runs resume`): this session's, all of them together, and the
    time since it began (the days between sessions trained nothing)."""
    times = history.session_times()
    if history.sessions < 2 or times is None:
        return _duration(history.duration_s())
    session_s, training_s, since_s = times
    return (f"{_duration(session_s)} this session; {_duration(training_s)} of training over {history.sessions} "
            f"sessions, {datetime.timedelta(seconds=round(since_s))} since the run began")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "none" if value is None else str(value)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _tail(path: Any, lines: int) -> str:
    try:
        with open(str(path), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except (OSError, TypeError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
