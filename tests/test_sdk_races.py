"""Races between the SDK's two threads (sdk/plugin_io.py, sdk/runner.py) and its signal handling, each made to
happen every time: the real PluginIO on real sockets against the stand-in kernel, or a real plugin process, with one
thread held at the critical point by a function the code calls there anyway (monkeypatched to wait on an Event)."""

from __future__ import annotations

import os
import signal
import threading
import time

import zmq
from stand_in_kernel import StandInKernel

from trainbus.proto import control
from trainbus.sdk import kernel_liveness, plugin_io
from trainbus.sdk.plugin import Plugin
from trainbus.sdk.plugin_io import PluginIO
from trainbus.sdk.runner import Runner

WAIT_S = 10.0  # every wait on another thread or process is bounded by this (or by what a test says)


def _endpoints(kernel: StandInKernel) -> tuple[str, str]:
    return kernel.pub.getsockopt_string(zmq.LAST_ENDPOINT), kernel.router.getsockopt_string(zmq.LAST_ENDPOINT)


def _io(kernel: StandInKernel, name: str = "p", handler_timeout_s: float = 60.0) -> PluginIO:
    hello = control("hello", name=name, pid=os.getpid(), subscriptions=[""], replies=["log"],
                    delivery="best_effort", votes=[], capabilities=[], secret="")
    return PluginIO(*_endpoints(kernel), [""], hello, handler_timeout_s, None, log_not_acted=False)


def _hello(kernel: StandInKernel) -> tuple[bytes, dict]:
    """(routing id, hello) once a published heartbeat has released it; WAIT_S * 3 at most."""
    deadline, got = time.monotonic() + 3 * WAIT_S, None
    while got is None and time.monotonic() < deadline:
        kernel.publish("heartbeat", interval_s=1.0)
        got = kernel.receive(100)
    assert got is not None and got[1]["type"] == "hello", got
    return got


def _welcomed_io(kernel: StandInKernel) -> PluginIO:
    """A started PluginIO the stand-in has welcomed, and heard heartbeat once: from here the kernel reads nothing
    unless the test does."""
    io = _io(kernel)
    io.start()
    try:
        identity, _ = _hello(kernel)
        kernel.welcome(identity, kernel.seq + 1)
        assert _next(kernel, "heartbeat", publish=True) is not None
    except BaseException:
        _stop(io, kernel)
        raise
    return io


def _next(kernel: StandInKernel, kind: str, within_s: float = WAIT_S, publish: bool = False) -> dict | None:
    """The next control message of this kind (others skipped), or None after within_s; with `publish`, the
    stand-in keeps publishing its heartbeat meanwhile, so the client never takes it for gone."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if publish:
            kernel.publish("heartbeat", interval_s=1.0)
        got = kernel.receive(50)
        if got is not None and got[1]["type"] == kind:
            return got[1]
    return None


def _stop(io: PluginIO, kernel: StandInKernel) -> None:
    """End the I/O thread even where a lost wake-up would leave it asleep: an event wakes it too."""
    io.close()
    deadline = time.monotonic() + 3 * WAIT_S
    while io.is_alive() and time.monotonic() < deadline:
        kernel.publish("heartbeat", interval_s=1.0)
        io.join(0.1)
    kernel.close()


# -- the wake pipe: a poke during the I/O thread's drain -------------------------------------------------------------

def _reap(proc, kernel: StandInKernel) -> None:
    """What a test leaves: its plugin process, killed if it still runs; the stand-in kernel, closed."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(WAIT_S)
    kernel.close()


def test_a_send_while_the_io_thread_drains_its_wake_pipe_does_not_lose_the_wake_ups_after_it(tmp_path, monkeypatch):
    """PluginIO._run cleared `_poked` and then drained the pipe: a send between the two wrote its byte, the drain ate
    it, and `_poked` stayed True with the pipe empty, so every later send (a vote's ack, a replay pull) and close()
    wrote nothing and waited for the next thing to arrive or the poll's timeout. Here nothing arrives and the timeout
    is a minute: the third message must still go at once."""
    monkeypatch.setattr(plugin_io, "MAX_POLL_S", 60.0)
    monkeypatch.setattr(kernel_liveness, "CONNECT_TIMEOUT_S", 60.0)  # not welcomed: no heartbeat of ours is due either
    held, release = threading.Event(), threading.Event()
    drain = plugin_io.drain

    def held_drain(fd: int) -> None:
        if not held.is_set():  # the first wake-up: hold the I/O thread at its drain
            held.set()
            release.wait(WAIT_S)
        drain(fd)

    monkeypatch.setattr(plugin_io, "drain", held_drain)
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    io = _io(kernel)
    io.start()
    try:
        io.send(control("log", level="info", text="first"))
        assert held.wait(WAIT_S), "the I/O thread never woke for the first send"
        io.send(control("log", level="info", text="second"))  # while the I/O thread drains the pipe
        release.set()
        assert [(_next(kernel, "log") or {}).get("text") for _ in range(2)] == ["first", "second"]
        io.send(control("log", level="info", text="third"))
        third = _next(kernel, "log")  # WAIT_S; a lost wake-up takes the whole minute
        assert third is not None and third["text"] == "third", "the send after the race woke nothing"
    finally:
        release.set()
        _stop(io, kernel)


# -- still_working from a plugin's own thread as the handler returns --------------------------------------------------

class HelperSaysStillWorking(Plugin):
    """Its end_epoch handler has a thread of its own report progress (Plugin.still_working), as a handler that hands
    the work to helpers and waits does; the handler returns while the helper's report is on its way."""

    handler_timeout_s = 1.0
    helper: threading.Thread | None = None
    helper_held = threading.Event()

    def on_end_epoch(self, event):
        type(self).helper = threading.Thread(target=self.still_working, name="progress-helper", daemon=True)
        self.helper.start()
        self.helper_held.wait(WAIT_S)  # the helper has seen the handler busy and reads the clock


def test_a_progress_report_from_a_plugins_thread_as_its_handler_returns_does_not_stop_the_heartbeats(tmp_path,
                                                                                                   monkeypatch):
    """PluginIO.still_working checked busy_since, then set it: a report from another thread that checked while the
    handler ran and set after Runner._dispatch cleared it left busy_since set with no handler running, and
    handler_timeout_s later the I/O thread said the handler was stuck and stopped heartbeating, so the kernel
    restarts a plugin that is idle. The helper is held at its clock read, between the check and the set."""
    release = threading.Event()

    class HeldClock:
        def __getattr__(self, name):
            return getattr(time, name)

        def monotonic(self):
            if threading.current_thread().name == "progress-helper" and not release.is_set():
                HelperSaysStillWorking.helper_held.set()
                release.wait(WAIT_S)
            return time.monotonic()

    monkeypatch.setattr(plugin_io, "time", HeldClock())
    HelperSaysStillWorking.helper_held.clear()
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    runner = Runner(HelperSaysStillWorking(run_dir=str(tmp_path)), *_endpoints(kernel))
    codes: list[int] = []
    main = threading.Thread(target=lambda: codes.append(runner.run()), name="runner", daemon=True)
    main.start()
    try:
        identity, _ = _hello(kernel)
        kernel.welcome(identity, kernel.seq + 1)
        kernel.publish("end_epoch", epoch=1)
        assert HelperSaysStillWorking.helper_held.wait(WAIT_S), "the handler never ran"
        deadline = time.monotonic() + WAIT_S
        while runner.io.busy_since is not None and time.monotonic() < deadline:  # the handler returned
            time.sleep(0.01)
        assert runner.io.busy_since is None
        release.set()
        HelperSaysStillWorking.helper.join(WAIT_S)
        # idle from here on: heartbeats every interval (1 s), and no word of a stuck handler; the stuck one is told
        # handler_timeout_s (1 s) after the report, well inside this window
        said = []
        end = time.monotonic() + 4.0
        while time.monotonic() < end and "stuck" not in said:
            kernel.publish("heartbeat", interval_s=1.0)
            got = kernel.receive(50)
            if got is not None:
                stuck = got[1]["type"] == "log" and "past handler_timeout_s" in got[1]["text"]
                said.append("stuck" if stuck else got[1]["type"])
        assert "stuck" not in said and said.count("heartbeat") >= 2, said
        kernel.publish("end_training_session")
        main.join(3 * WAIT_S)
        assert codes == [0]
    finally:
        release.set()
        if main.is_alive():
            runner.io.close()
            main.join(WAIT_S)
        kernel.close()


# -- a kernel that does not read us ------------------------------------------------------------------------------------

def test_a_heartbeat_the_kernel_cannot_take_yet_does_not_end_the_io_thread(tmp_path, monkeypatch):
    """The heartbeat went with NOBLOCK and nothing caught zmq.Again: with the kernel's queue for us full (it reads
    slower than a plugin sends, kernel/remote.py CONTROL_RCVHWM), the I/O thread died "failed: Again", and the plugin
    exited 0 mid-run, which the kernel takes for leaving on purpose (no restart). The outbox keeps what the kernel did
    not take (_flush_outbox); the heartbeat after it must not end the thread. Held nowhere: the heartbeat attempts
    are counted by the check the I/O thread makes before each one (_handler_stuck)."""
    attempts: list[int] = []
    stuck = PluginIO._handler_stuck

    def counted(self, now):
        if self.outbox:  # the kernel did not take everything: the heartbeat goes onto a full queue
            attempts.append(len(self.outbox))
        return stuck(self, now)

    monkeypatch.setattr(PluginIO, "_handler_stuck", counted)
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    io = _welcomed_io(kernel)
    try:
        for _ in range(5000):  # past the DEALER's and the ROUTER's queues (1000 each) and the socket's buffers
            io.send(control("log", level="info", text="x" * 1000))
        deadline = time.monotonic() + 3 * WAIT_S
        while len(attempts) < 3 and io.is_alive() and time.monotonic() < deadline:
            kernel.publish("heartbeat", interval_s=1.0)  # the kernel lives: it just does not read
            time.sleep(0.05)
        assert io.is_alive() and io.gone is None, io.gone
        assert len(attempts) >= 3, attempts
    finally:
        _stop(io, kernel)


def test_replies_a_kernel_does_not_take_are_held_up_to_a_bound_and_a_stop_after_them_still_goes(tmp_path, capfd):
    """A plugin thread reporting a metric in a loop while its kernel reads slower than it sends (a remote plugin: the
    kernel reads TCP at a share of its time, kernel/control_reading.py REMOTE_CONTROL_SHARE): the outbox kept every
    message, and the plugin's memory grew without bound. Metrics and logs past OUTBOX_MAX_REPLIES are dropped now,
    counted and said once; a stop behind them still goes, and once the kernel reads again it gets what was held."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    io = _welcomed_io(kernel)
    try:
        sent = 3 * plugin_io.OUTBOX_MAX_REPLIES
        for i in range(sent):  # past the DEALER's and the ROUTER's queues (1000 each) and the bound
            io.send(control("metric", name="spam", value=float(i), step=None, epoch=None))
        io.send(control("stop", reason="diverged"))
        assert len(io.outbox) <= plugin_io.OUTBOX_MAX_REPLIES + 1, len(io.outbox)
        dropped = io.replies_dropped.get("metric", 0)
        assert 0 < dropped <= sent - plugin_io.OUTBOX_MAX_REPLIES, io.replies_dropped
        err = capfd.readouterr().err
        assert err.count("waiting are dropped, metrics and logs first") == 1, err
        metrics, deadline = 0, time.monotonic() + 3 * WAIT_S  # the kernel reads again: all that was held comes
        while (got := kernel.receive(50)) is None or got[1]["type"] != "stop":
            assert time.monotonic() < deadline, f"{metrics} metrics and no stop"
            kernel.publish("heartbeat", interval_s=1.0)
            metrics += got is not None and got[1]["type"] == "metric"
        assert got[1]["reason"] == "diverged" and metrics == sent - dropped, (metrics, sent, dropped)
    finally:
        _stop(io, kernel)


# -- SIGTERM before the welcome ------------------------------------------------------------------------------------

def test_a_sigterm_before_the_welcome_exits_0_as_after_it(tmp_path):
    """The kernel stops a plugin still waiting for its welcome (a run aborted while it starts, a detach): a SIGTERM
    from a live kernel is no failure, and after the welcome it exits 0. Before it, Runner._run took the SIGTERM's
    empty inbox for a kernel that never answered: exit 1 ("crashed" in the run's summary) and "kernel unreachable"
    in its log. Held by the stand-in, which never answers the hello."""
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(tmp_path / "record.txt")}, tmp_path)
    try:
        _hello(kernel)  # it waits for the welcome now
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=3 * WAIT_S)[0].decode()
    finally:
        _reap(proc, kernel)
    assert proc.returncode == 0, output
    assert "unreachable" not in output and "terminated (SIGTERM)" in output, output


# -- the SIGTERM's timer firing as teardown begins ----------------------------------------------------------------------

class AlarmAtDisarm(Plugin):
    """Records its setup and teardown. Runner._finish's disarm of the SIGTERM's timer (signal.setitimer) is held until
    the timer has fired, as when the main thread reaches _finish just as FINISH_ON_TERM_S runs out (a handler that
    returns at the end of its grace)."""

    settings = {"path": ""}

    def setup(self):
        setitimer = signal.setitimer

        def held(which, seconds, *interval):
            if which == signal.ITIMER_REAL and seconds == 0:
                deadline = time.monotonic() + WAIT_S
                while signal.getitimer(signal.ITIMER_REAL)[0] > 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.05)  # the timer's signal handler runs here
            return setitimer(which, seconds, *interval)

        signal.setitimer = held
        self._append("setup")

    def teardown(self):
        self._append("teardown")

    def _append(self, line: str) -> None:
        with open(self.settings["path"], "a") as f:
            f.write(line + "\n")


def test_the_sigterms_timer_firing_as_teardown_begins_does_not_skip_teardown(tmp_path):
    """Runner._finish set `_ended`, then disarmed the timer terminate armed: an alarm in between (or already pending)
    raised CutShort out of _finish, and Runner.run's second _finish returned at once, since `_ended` was set: no
    teardown (a logger's last flush), no last ack, no close. Once teardown has begun there is nothing to cut short."""
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("test_sdk_races:AlarmAtDisarm", "alarm", {"path": str(record)}, tmp_path)
    try:
        identity, _ = _hello(kernel)
        kernel.welcome(identity, kernel.seq + 1)
        deadline = time.monotonic() + 3 * WAIT_S
        while not (record.exists() and record.read_text()) and time.monotonic() < deadline:
            kernel.publish("heartbeat", interval_s=1.0)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # idle: the main thread goes to _finish at once, and is held at the disarm
        output = proc.communicate(timeout=3 * WAIT_S)[0].decode()
    finally:
        _reap(proc, kernel)
    assert proc.returncode == 0, output
    assert record.read_text().splitlines() == ["setup", "teardown"], output
