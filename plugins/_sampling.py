"""A clock of a monitor's own: a daemon thread samples at an interval and publishes readings as metrics.

A plugin's handler thread runs only when an event arrives, so a monitor that must read the machine
every few seconds cannot live there. `SamplingPlugin` starts a thread in setup and stops it in
teardown; each tick calls `sample()` and sends every finite reading as a metric reply, which the
SDK hands straight to its I/O thread (Plugin.bind_sender), so readings flow during long stretches
with no events, such as a validation loop.

When: once as the training session starts, then after FIRST_READING_AFTER_S, the gap doubling up
to interval_s (`reading_gaps`), and a last time as the plugin stops at the run's end. A run of a
few seconds so has a curve to plot, and a long one is read at its interval.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Any, Iterator

import psutil

from trainbus.proto import Event
from trainbus.proto.process import KERNEL_PID_ENV
from trainbus.sdk import Plugin, Setting

MIN_INTERVAL_S = 0.05  # below this a monitor measures mostly itself
# psutil's CPU % is a difference between two calls: over less than ~0.1 s it is mostly noise.
FIRST_READING_AFTER_S = 0.2
# A sample that raises is reported once per kind of error, then counted: a monitor never spams.

# The settings every monitor (or those watching a process) declares.
INTERVAL_S = Setting(5.0, "seconds between readings, once the first few (0.2 s apart, doubling) are taken",
                     min=MIN_INTERVAL_S, max=86400)  # a day: a bound the platform's timed waits take
PID = Setting(0, "the process watched, with its children (0: the kernel's)", min=0)


class SamplingPlugin(Plugin):
    """Base class of the resource monitors: override `prepare` and `sample`; `interval_s` is the clock."""

    settings: dict[str, Any] = {"interval_s": INTERVAL_S}

    # methods to override.

    def prepare(self) -> str | None:
        """Open what sampling needs (on the handler thread); return why the monitor must stay idle, or None."""
        return None

    def prime(self) -> None:
        """Take the readings that only start a measurement, on the sampler thread, before the first reading."""

    def sample(self) -> dict[str, float]:
        """One reading per metric name; called on the sampler thread (when: the module's docstring)."""
        return {}

    # the clock

    def setup(self) -> None:
        self._stopping = threading.Event()
        # Wakes the sampler before its gap is up: the session started (handler thread), or teardown.
        self._wake = threading.Event()
        self._errors_seen: set[str] = set()
        self.samples_taken = 0
        self._last_reading_s = -math.inf  # monotonic time of the last tick
        self._thread: threading.Thread | None = None
        why_idle = self.prepare()
        if why_idle:
            self.say_once(f"{self.name} monitor idle: {why_idle}")
            return
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-sampler", daemon=True)
        self._thread.start()

    def teardown(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None:
            self._stopping.set()
            self._wake.set()  # for its last reading
            thread.join(timeout=max(2.0, self.settings["interval_s"]))

    def on_start_training_session(self, event: Event) -> None:
        self._wake.set()  # a reading now, and the quick first gaps again from here

    def watched_process(self) -> psutil.Process | None:
        """training_process of the `pid` setting, saying so when a pid given is no process (its readings are left
        out, the machine's still taken)."""
        process = training_process(self.settings["pid"])
        if process is None and self.settings["pid"]:
            self.say_once(f"{self.name} monitor: no process {self.settings['pid']} to watch (pid); its process "
                          f"readings are left out, the machine's are taken")
        return process

    def say_once(self, line: str, level: str = "warning") -> None:
        """One line in the plugin's own log and one in the kernel's: for things said once per run."""
        print(line, file=sys.stderr, flush=True)
        self.log(line, level=level)

    def _run(self) -> None:
        try:
            self.prime()
        except Exception as exc:
            self._report(exc)
        gaps = reading_gaps(self.settings["interval_s"])
        while True:
            woken = self._wake.wait(next(gaps))
            if self._stopping.is_set():
                break
            if woken:
                self._wake.clear()
                gaps = reading_gaps(self.settings["interval_s"])
                if time.monotonic() - self._last_reading_s < MIN_INTERVAL_S:
                    continue  # just read: a second reading now would measure nothing
            self.tick()
        if time.monotonic() - self._last_reading_s >= MIN_INTERVAL_S:
            self.tick()  # the run's end: published after its final event, so in the journal (trainbus runs show)

    def tick(self) -> dict[str, float]:
        """Take one sample and publish it; errors are reported once per kind and never escape."""
        try:
            readings = self.sample()
        except Exception as exc:  # a monitor that raises must not stop sampling, nor the run
            self._report(exc)
            return {}
        self.samples_taken += 1
        self._last_reading_s = time.monotonic()
        for name, value in readings.items():
            if value is not None and math.isfinite(value):
                self.metric(name, float(value))
        return readings

    def _report(self, exc: Exception) -> None:
        kind = type(exc).__name__
        if kind not in self._errors_seen:
            self._errors_seen.add(kind)
            self.say_once(f"{self.name} sample failed ({kind}: {exc}); sampling goes on, repeats not reported")


def reading_gaps(interval_s: float) -> Iterator[float]:
    """Seconds between readings: FIRST_READING_AFTER_S (or interval_s if shorter), doubling up to interval_s.

    zguide's doubling backoff run the other way: quick readings while a run is young, the configured rate
    once it is under way (0.2, 0.4, 0.8, 1.6, 3.2, 5, 5, ... for the default 5 s)."""
    gap_s = min(FIRST_READING_AFTER_S, interval_s)
    while True:
        yield gap_s
        gap_s = min(2 * gap_s, interval_s)


def training_process(pid: int) -> psutil.Process | None:
    """The process to watch: `pid` when given, else the kernel's (TRAINBUS_KERNEL_PID); None when neither.

    On another machine than the kernel there is no training process to see, only the machine itself.
    """
    if not pid:
        pid = int(os.environ.get(KERNEL_PID_ENV) or 0)
    if not pid:
        return None
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
