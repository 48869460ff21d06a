"""Plugins the tests attach to real runs: recorders, and hostile ones that raise, exit, hang or die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainbus.sdk import DURABLE, Plugin


def _append_fsynced(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class Recorder(Plugin):
    """Appends `seq type` of every event it handles to a file, fsynced, so a kill -9 loses nothing it saw."""

    delivery = DURABLE
    settings = {"path": "", "sleep_s": 0.0, "kill_at_steps": [], "marker_dir": ""}

    def on_event(self, event):
        _append_fsynced(self.settings["path"], f"{event.seq} {event.type}")
        if self.settings["sleep_s"]:
            time.sleep(self.settings["sleep_s"])
        if event.type == "end_training_batch" and event.step in self.settings["kill_at_steps"]:
            marker = os.path.join(self.settings["marker_dir"], f"killed-{event.step}")
            if not os.path.exists(marker):  # die once per step, not again on replay
                _append_fsynced(marker, str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)


class SubsetRecorder(Recorder):
    """Recorder, durable, but sent only one per-batch type (end_training_batch; and every type that is not
    per-batch): what it misses it must see by the envelope's `n`, not by seq alone. `inbox` shrinks the SDK's
    bound on live events held for a slow handler (`sleep_s`), so that some are dropped and must be replayed."""

    settings = {**Recorder.settings, "inbox": 0}
    TYPES = ("end_training_batch", "end_epoch")

    def setup(self):
        if self.settings["inbox"]:
            from trainbus.sdk import plugin_io
            plugin_io.INBOX_MAX_EVENTS = self.settings["inbox"]

    def subscriptions(self):
        return list(self.TYPES)


class EpochVoter(Plugin):
    """Durable, votes at end_epoch and handles nothing else: heartbeats are not for it."""

    delivery = DURABLE
    votes = ("end_epoch",)
    settings = {"path": ""}

    def on_end_epoch(self, event):
        _append_fsynced(self.settings["path"], f"{event.seq} {event.type}")


class SlowVoter(Plugin):
    """Votes at end_epoch and answers the first one `sleep_s` late (early stopping that thinks too long)."""

    votes = ("end_epoch",)
    settings = {"sleep_s": 2.0}
    answered = 0

    def on_end_epoch(self, event):
        if not self.answered:
            time.sleep(self.settings["sleep_s"])
        self.answered += 1


class LiveRecorder(Recorder):
    """The best-effort twin of Recorder: what it misses it does not get back."""

    delivery = "best_effort"


class Raiser(Plugin):
    """Raises in every handler."""

    def on_event(self, event):
        raise RuntimeError(f"hostile plugin refuses {event.type}")


class SamplerThreadFails(Plugin):
    """A sampler on a thread of its own, started in setup, whose first reading is refused (a NaN metric): the thread
    dies, the plugin goes on handling events."""

    def setup(self):
        import threading

        threading.Thread(target=self.sample, name="sampler", daemon=True).start()

    def sample(self):
        self.metric("sampler/reading", float("nan"))

    def on_end_epoch(self, event):
        pass


class FloodsAtEpochEnd(Plugin):
    """Reports far more metrics and logs at each end_epoch than its [limits] let through (200 and 50 a second)."""

    votes = ("end_epoch",)  # its replies land before the run's final event

    def on_end_epoch(self, event):
        for i in range(1000):
            self.metric(f"flood/{i % 10}", float(i))
        for i in range(200):
            self.log(f"flood {i}")


class NonDaemonPoller(Plugin):
    """Polls on a thread that is not a daemon and that teardown never stops: Python's exit waits for it for good."""

    def setup(self):
        import threading

        threading.Thread(target=self.poll, name="poller").start()

    def poll(self):
        while True:
            time.sleep(0.1)

    def on_end_epoch(self, event):
        pass


class ExitAtStart(Plugin):
    """Exits with an error before handling anything."""

    def setup(self):
        sys.exit(3)


class DiesAtTheEnd(Plugin):
    """Exits with code 4 in its last handler, as a logger that fails writing its final lines would."""

    def on_end_training_session(self, event):
        os._exit(4)


class HangsAtTheEnd(Plugin):
    """Never returns from its last handler, and ignores SIGTERM: only SIGKILL ends it."""

    def on_end_training_session(self, event):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)


class HeldAtTheEnd(Plugin):
    """Durable, its last handler held until the file `release` exists: the kernel waits for it (its drain) after
    the run's final event, alive meanwhile."""

    delivery = DURABLE
    settings = {"release": ""}

    def on_end_training_session(self, event):
        while not os.path.exists(self.settings["release"]):
            time.sleep(0.05)


class StuckAtStep(Plugin):
    """At a given step its handler never returns and SIGTERM is ignored (code stuck in a C call, which no Python
    signal handler interrupts, looks the same to the SDK); writes `marker` once stuck."""

    settings = {"step": 5, "marker": ""}

    def on_end_training_batch(self, event):
        if event.step >= self.settings["step"]:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _append_fsynced(self.settings["marker"], str(os.getpid()))
            while True:
                time.sleep(1)


class SlowToLeave(Plugin):
    """Takes 60 s over its last handler, but stops when asked (SIGTERM): a slow teardown, not a hang."""

    def on_end_training_session(self, event):
        time.sleep(60)


class FinishesWhenLet(Plugin):
    """Its end_epoch handler writes `start`, waits for the file `go` (at most `wait_s`), writes `done`; teardown writes
    `teardown`: what a SIGTERM in the middle of a handler lets run, and in which order."""

    settings = {"path": "", "go": "", "wait_s": 60.0}

    def on_end_epoch(self, event):
        self._append(f"start {event.seq}")
        deadline = time.monotonic() + self.settings["wait_s"]
        while not os.path.exists(self.settings["go"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._append(f"done {event.seq}")  # no fsync: inside the SIGTERM's grace on a busy disk too

    def teardown(self):
        self._append("teardown")

    def _append(self, line: str) -> None:
        with open(self.settings["path"], "a") as f:
            f.write(line + "\n")


class FailsInSetup(Plugin):
    def setup(self):
        self._connect()

    def _connect(self):
        raise RuntimeError("setup cannot find its database")


class FailsInInit(Plugin):
    """Raises in its constructor: before it has any socket to say why on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raise RuntimeError("cannot open its database")


class ForgetsSuperInit(Plugin):
    """Its constructor never calls super().__init__: the SDK's state (outbox, handlers, settings) is missing."""

    def __init__(self, *args, **kwargs):
        self.count = 0

    def on_end_epoch(self, event):
        self.count += 1


class HeldBeforeHello(Plugin):
    """Says no hello until the file its `gate` setting names exists: a plugin still starting (importing, loading
    a model) when its owner detaches it."""

    settings = {"gate": ""}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        while not os.path.exists(self.settings["gate"]):
            time.sleep(0.05)


class PersisterHeldBeforeHello(HeldBeforeHello):
    """HeldBeforeHello, declaring the checkpoint capability: a persister still starting."""

    capabilities = ("checkpoint",)


class StuckInHandler(Plugin):
    """Its end_epoch handler sleeps far past its handler_timeout_s, without saying still_working()."""

    handler_timeout_s = 1.0

    def on_end_epoch(self, event):
        time.sleep(60)


class StuckInSetup(Plugin):
    """Its setup() never returns (a server it waits for that never answers), without saying still_working()."""

    handler_timeout_s = 1.0

    def setup(self):
        time.sleep(60)

    def on_end_epoch(self, event):
        pass


class NanMetricAtEpochEnd(Plugin):
    """Its end_epoch handler reports a metric that is not finite, which the SDK refuses (ProtocolError)."""

    def on_end_epoch(self, event):
        self.metric("ratio", float("nan"))


class BusyAtEpochEnd(Plugin):
    """Its end_epoch handler says so in `marker` (a file), then works for a minute: a handler SIGTERM cuts short."""

    settings = {"marker": ""}
    handler_timeout_s = 600.0  # working, not hung

    def on_end_epoch(self, event):
        Path(self.settings["marker"]).write_text(str(event.seq))
        time.sleep(60)


class SaysGoodbye(Plugin):
    """Reports a last metric and a log line from its teardown, as a plugin summing up a run would."""

    def teardown(self):
        self.metric("goodbye/events", 42.0)
        self.log("goodbye from teardown")


class LateEpochMetric(Plugin):
    """Reports a metric about each end_epoch after `lag_s`: by then the kernel is in the next epoch."""

    settings = {"lag_s": 0.5}

    def on_end_epoch(self, event):
        time.sleep(self.settings["lag_s"])
        self.metric("late/epoch_seen", float(event.epoch))


class SelfKill(Plugin):
    """SIGKILLs itself at a given step (mid-epoch)."""

    settings = {"step": 20}

    def on_end_training_batch(self, event):
        if event.step >= self.settings["step"]:
            os.kill(os.getpid(), signal.SIGKILL)


class PrintsThenIsKilled(Plugin):
    """Prints a line at the first epoch's end, then is SIGKILLed (as the kernel kills a plugin hung in C code, or the
    out-of-memory killer does) at the next epoch's start."""

    def on_end_epoch(self, event):
        print(f"printed at the end of epoch {event.epoch}")

    def on_start_epoch(self, event):
        if event.epoch >= 2:
            os.kill(os.getpid(), signal.SIGKILL)


def _running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie (/proc/<pid>/stat's state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


class LeavesAChild(Plugin):
    """Starts a child in its own process group (a worker, a helper program) that outlives it, writes the child's
    pid to a file, then dies: by SIGKILL at a given step (once; its restart starts none), or with exit code 0
    (leaves on purpose) when `exit_code` is 0; goes on (any other exit_code) with the child left running."""

    settings = {"step": 3, "pid_file": "", "exit_code": -9, "seen_file": ""}

    def setup(self):
        # restarted: is the child its predecessor left running? Looked at once welcomed, not at a next step, which a
        # restart starved of CPU (importing torch beside busy cores) may come too late for, the run over
        if os.path.exists(self.settings["pid_file"]) and self.settings["seen_file"]:
            pid = int(open(self.settings["pid_file"]).read())
            _append_fsynced(self.settings["seen_file"], "running" if _running(pid) else "gone")

    def on_end_training_batch(self, event):
        if os.path.exists(self.settings["pid_file"]) or event.step != self.settings["step"]:
            return
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _append_fsynced(self.settings["pid_file"], str(child.pid))
        if self.settings["exit_code"] == 0:
            os._exit(0)
        if self.settings["exit_code"] == -signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)


class LeavesAChildThenSticks(LeavesAChild):
    """LeavesAChild (its child left running), then StuckAtStep: a handler that ignores SIGTERM and never returns."""

    settings = {**LeavesAChild.settings, "exit_code": 1, "marker": ""}

    def on_end_training_batch(self, event):
        if event.step > self.settings["step"]:
            StuckAtStep.on_end_training_batch(self, event)
        super().on_end_training_batch(event)


class Stopper(Plugin):
    """Replies stop at the end of a given epoch; it votes there, so the stop lands at that boundary (PROTOCOL.md
    §7.3) however short the epochs are."""

    settings = {"epoch": 1}
    votes = ("end_epoch",)

    def on_end_epoch(self, event):
        if event.epoch >= self.settings["epoch"]:
            self.stop(f"enough after epoch {event.epoch}")


class VotesWithoutHandler(Plugin):
    """Best-effort, votes at end_epoch but handles only start_epoch (its end_epoch handler misspelt, or left out of
    subscriptions() by its settings): the SDK must still be sent end_epoch, to ack the vote the kernel waits for."""

    votes = ("end_epoch",)

    def on_start_epoch(self, event):
        pass


class DurableStopper(Stopper):
    """Stopper, durable, recording the final events it is handed: in a continued run it is replayed the earlier
    session, whose epochs it must not stop on, and whose end it must not be handed."""

    delivery = DURABLE
    settings = {**Stopper.settings, "path": ""}

    def on_end_training_session(self, event):
        _append_fsynced(self.settings["path"], f"{event.seq} {event.type}")


class StopAtStep(Plugin):
    """Replies stop once, at a given step: a stop in the middle of an epoch. Durable: on a busy box a
    best-effort plugin may start after that step, or have it dropped, and never stop the run."""

    delivery = DURABLE
    settings = {"step": 8, "then_log": False}

    def on_end_training_batch(self, event):
        if event.step == self.settings["step"]:
            self.stop(f"enough at step {event.step}")
            if self.settings["then_log"]:  # journaled as it arrives, after the stop on the same socket: a test holding
                self.log("stop sent")  # training at a gate knows from it that the kernel has the stop


class CheckpointAtStep(Plugin):
    """Replies checkpoint_now once, at a given step (durable, as StopAtStep)."""

    delivery = DURABLE
    settings = {"step": 8}

    def on_end_training_batch(self, event):
        if event.step == self.settings["step"]:
            self.checkpoint_now(f"now, at step {event.step}")


class Poison(Plugin):
    """Durable; its handler always fails on one event type, and records the rest."""

    delivery = DURABLE
    settings = {"path": "", "poison_type": "end_training_loop"}

    def on_event(self, event):
        if event.type == self.settings["poison_type"]:
            raise ValueError(f"poison {event.seq}")
        _append_fsynced(self.settings["path"], f"{event.seq} {event.type}")


class FullDiskPoison(Poison):
    """Poison (durable, its handler fails on one event type) whose log (stderr) and dead-letter folder are on
    a full disk: what a plugin meets when the run directory's disk fills while events still reach it
    (test_disk_full.py; here, not there, so that its process does not import torch with that test module)."""

    settings = {**Poison.settings, "full_dir": ""}

    def setup(self):
        full = Path(self.settings["full_dir"])
        self.run_dir = str(full)  # the SDK writes dead letters to <run_dir>/plugins/
        fd = os.open(full / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)


class LaggingLiveRecorder(LiveRecorder):
    """A slow best-effort Recorder with a small inbox, so it really misses events in a short run.

    The SDK holds up to INBOX_MAX_EVENTS (10,000) live events for a slow handler; a test run of a few
    seconds never fills that, so this plugin shrinks it in its own process to reach the drop path.
    """

    settings = {**LiveRecorder.settings, "inbox_max_events": 20}

    def setup(self):
        from trainbus.sdk import plugin_io

        plugin_io.INBOX_MAX_EVENTS = self.settings["inbox_max_events"]


class LeavesAtStep(Plugin):
    """Exits 0 at its setting `step`: on purpose, as far as the kernel can tell (not restarted)."""

    settings = {"step": 1}

    def on_end_training_batch(self, event):
        if event.step >= self.settings["step"]:
            sys.exit(0)


class LogsThenLeaves(Plugin):
    """At the first training batch it sees, logs `lines` lines and exits 0: what it said last is in flight as it
    leaves."""

    settings = {"lines": 300}

    def on_end_training_batch(self, event):
        for number in range(self.settings["lines"]):
            self.log(f"{number:05d} said before leaving " + "x" * 200)
        sys.exit(0)


class DurableExitAtStart(ExitAtStart):
    """ExitAtStart as a durable plugin: the kernel keeps supervising it through the final drain."""

    delivery = DURABLE


class CountingPoison(Poison):
    """Poison that also appends `seq` to attempts_path on every try, so the retry count is visible."""

    settings = {**Poison.settings, "attempts_path": ""}

    def on_event(self, event):
        if event.type == self.settings["poison_type"]:
            _append_fsynced(self.settings["attempts_path"], str(event.seq))
        super().on_event(event)


class EnvelopeRecorder(Plugin):
    """Durable; appends every event's whole envelope as one JSON line, fsynced: what the subscriber received."""

    delivery = DURABLE
    settings = {"path": ""}

    def on_event(self, event):
        import json

        from trainbus.proto import event_to_map

        _append_fsynced(self.settings["path"], json.dumps(event_to_map(event)))


class Usurper(Plugin):
    """A plugin of the run that asks the kernel to attach another plugin at a given step: only the run's owner
    may, so the kernel refuses it (and the SDK logs the refusal to this plugin's log)."""

    settings = {"step": 5, "plugin": "metrics_log"}

    def on_end_training_batch(self, event):
        if event.step == self.settings["step"]:
            from trainbus.proto import control

            self.outbox.append(control("attach_plugin", name=self.settings["plugin"], settings={}))


class Lifecycle(Plugin):
    """Appends "setup" and "teardown" to a file as each runs: whether they ran at all, and in which order."""

    settings = {"path": ""}

    def setup(self):
        _append_fsynced(self.settings["path"], "setup")

    def teardown(self):
        _append_fsynced(self.settings["path"], "teardown")


class ChattyLogger(Plugin):
    """Sends a `log` reply of `chars` characters at every training batch, as a plugin reporting each step does."""

    settings = {"chars": 100}

    def on_end_training_batch(self, event):
        self.log(f"step {event.step} " + "x" * self.settings["chars"])


class FailsEveryBatch(Plugin):
    """A durable plugin whose handler raises at every training batch: each is dead-lettered, its file kept small."""

    delivery = DURABLE
    dead_letters_max_bytes = 20_000

    def on_end_training_batch(self, event):
        raise ValueError(f"cannot handle step {event.step}")


class MisspeltHandler(Plugin):
    """`on_end_epok`: a handler named for no event, never called."""

    def on_end_epok(self, event):
        pass

    def on_end_training_session(self, event):
        pass
