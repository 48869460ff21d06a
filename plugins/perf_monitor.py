"""Training speed from the event stream: steps/s, samples/s, step-time percentiles, data wait vs compute."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from trainbus.proto import Event

from ._sampling import INTERVAL_S, SamplingPlugin

MS_PER_S = 1000.0
# The step times a reading's percentiles come from: a uniform random sample of at most this many (a reservoir) of the
# interval's steps. Every step was kept: a long interval_s of a fast run held millions in this process. The rates and
# shares are sums over every step; a random sample, not every k-th step, as step times repeat with a period
# (accumulate_grad_batches, a slow batch every N).
WINDOW_STEPS_MAX = 100_000


@dataclass
class Step:
    """One training step, timed by the kernel's own event timestamps (so a remote monitor's clock is irrelevant)."""

    end_ts: float
    batch_size: int | None
    duration_s: float | None  # end of the previous step -> end of this one, within one training loop
    compute_s: float | None  # start_training_batch -> end_training_batch: to device, forward, backward, update
    data_wait_s: float | None  # end of the previous step -> start of this one: waiting for the loader


@dataclass
class Window:
    """The steps between two readings: sums over every one of them, and a random sample of their step times."""

    steps: int = 0
    timed: int = 0  # steps whose duration is known
    elapsed_s: float = 0.0  # their durations' sum
    samples: int = 0  # their batch sizes' sum
    sized: bool = True  # every timed step said its batch_size
    compute_s: float = 0.0  # over the steps split into compute and data wait
    data_wait_s: float = 0.0
    durations: list[float] = field(default_factory=list)  # a reservoir of the timed steps' durations
    _random: random.Random = field(default_factory=random.Random)

    def add(self, step: Step) -> None:
        self.steps += 1
        if step.duration_s is not None:
            self.timed += 1
            self.elapsed_s += step.duration_s
            if step.batch_size is None:
                self.sized = False
            else:
                self.samples += step.batch_size
            if len(self.durations) < WINDOW_STEPS_MAX:
                self.durations.append(step.duration_s)
            else:  # Algorithm R: each of the `timed` steps is in the sample with the same chance
                slot = self._random.randrange(self.timed)
                if slot < WINDOW_STEPS_MAX:
                    self.durations[slot] = step.duration_s
        if step.compute_s is not None and step.data_wait_s is not None:
            self.compute_s += step.compute_s
            self.data_wait_s += step.data_wait_s


class PerfMonitorPlugin(SamplingPlugin):
    """Training speed every interval_s from the events: steps/s, samples/s, step time p50/p95, data-wait vs
    compute share.

    start_training_batch is published before the batch moves to the device and end_training_batch after
    the optimizer step, so compute is start -> end of a batch and data wait is the end of one batch to
    the start of the next. Metrics: perf/steps_per_s, perf/samples_per_s (when the loop says its
    batch_size), perf/step_time_p50_ms, perf/step_time_p95_ms, perf/data_wait_share and
    perf/compute_share (of the step time, summing to 1). Nothing is published for an interval with no
    training steps (validation, or the end of the run).
    """

    name = "perf"
    settings = {"interval_s": INTERVAL_S}

    def prepare(self) -> str | None:
        self._lock = threading.Lock()  # handlers add steps, the sampler thread takes them
        self._window = Window()
        self._started: tuple[int, float] | None = None  # (batch_index, ts) of the batch in progress
        self._last_end: tuple[int, float] | None = None  # (batch_index, ts) of the last finished batch
        self._said_no_batch_size = False
        return None

    # events

    def on_start_training_loop(self, event: Event) -> None:
        self._started = self._last_end = None  # no data wait across epochs or validation

    def on_start_training_batch(self, event: Event) -> None:
        self._started = (event.data.get("batch_index"), event.ts)

    def on_end_training_batch(self, event: Event) -> None:
        index = event.data.get("batch_index")
        compute_s = data_wait_s = duration_s = None
        if self._started is not None and self._started[0] == index:
            compute_s = event.ts - self._started[1]
        previous = self._last_end
        if previous is not None and isinstance(index, int) and previous[0] == index - 1:
            duration_s = event.ts - previous[1]
            if compute_s is not None:
                data_wait_s = max(0.0, duration_s - compute_s)
        batch_size = event.data.get("batch_size")
        step = Step(event.ts, batch_size if isinstance(batch_size, int) else None, duration_s, compute_s, data_wait_s)
        with self._lock:
            self._window.add(step)
        self._last_end = (index, event.ts)
        self._started = None

    # the clock

    def sample(self) -> dict[str, float]:
        with self._lock:
            window, self._window = self._window, Window()
        if not window.steps:
            return {}
        readings = window_stats(window)
        if "perf/steps_per_s" in readings and "perf/samples_per_s" not in readings and not self._said_no_batch_size:
            self._said_no_batch_size = True
            self.say_once("perf: end_training_batch carries no batch_size, so samples/s is not measured", "info")
        return readings


def window_stats(window: Window) -> dict[str, float]:
    """Rates and percentiles of one interval's steps.

    Rates are over the steps' own durations, not the interval's wall time, so an interval that spans a
    validation loop reports how fast training ran, not how much of the interval it ran.
    """
    readings: dict[str, float] = {}
    if window.elapsed_s > 0:
        readings["perf/steps_per_s"] = window.timed / window.elapsed_s
        if window.sized:
            readings["perf/samples_per_s"] = window.samples / window.elapsed_s
    durations = sorted(window.durations)
    if durations:
        readings["perf/step_time_p50_ms"] = percentile(durations, 50) * MS_PER_S
        readings["perf/step_time_p95_ms"] = percentile(durations, 95) * MS_PER_S
    total_s = window.compute_s + window.data_wait_s
    if total_s > 0:
        wait_share = window.data_wait_s / total_s
        readings["perf/data_wait_share"] = wait_share
        readings["perf/compute_share"] = 1.0 - wait_share
    return readings


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (no interpolation: every value is a real step)."""
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]
