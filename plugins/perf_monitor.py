"""Training speed from the event stream: steps/s, samples/s, step-time percentiles, data wait vs compute."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from trainbus.proto import Event

from ._sampling import INTERVAL_S, SamplingPlugin

MS_PER_S = 1000.0


@dataclass
class Step:
    """One training step, timed by the kernel's own event timestamps (so a remote monitor's clock is irrelevant)."""

    end_ts: float
    batch_size: int | None
    duration_s: float | None  # end of the previous step -> end of this one, within one training loop
    compute_s: float | None  # start_training_batch -> end_training_batch: to device, forward, backward, update
    data_wait_s: float | None  # end of the previous step -> start of this one: waiting for the loader


class PerfMonitorPlugin(SamplingPlugin):
    """Training speed every interval_s from the events: steps/s, samples/s, step time p50/p95, data-wait vs compute share.

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
        self._steps: list[Step] = []
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
            self._steps.append(step)
        self._last_end = (index, event.ts)
        self._started = None

    # the clock

    def sample(self) -> dict[str, float]:
        with self._lock:
            steps, self._steps = self._steps, []
        if not steps:
            return {}
        readings = window_stats(steps)
        if "perf/steps_per_s" in readings and "perf/samples_per_s" not in readings and not self._said_no_batch_size:
            self._said_no_batch_size = True
            self.say_once("perf: end_training_batch carries no batch_size, so samples/s is not measured", "info")
        return readings


def window_stats(steps: list[Step]) -> dict[str, float]:
    """Rates and percentiles of one interval's steps.

    Rates are over the steps' own durations, not the interval's wall time, so an interval that spans a
    validation loop reports how fast training ran, not how much of the interval it ran.
    """
    readings: dict[str, float] = {}
    timed_steps = [s for s in steps if s.duration_s is not None]
    elapsed_s = sum(s.duration_s for s in timed_steps)
    if elapsed_s > 0:
        readings["perf/steps_per_s"] = len(timed_steps) / elapsed_s
        if all(s.batch_size is not None for s in timed_steps):
            readings["perf/samples_per_s"] = sum(s.batch_size for s in timed_steps) / elapsed_s
    durations = sorted(s.duration_s for s in timed_steps)
    if durations:
        readings["perf/step_time_p50_ms"] = percentile(durations, 50) * MS_PER_S
        readings["perf/step_time_p95_ms"] = percentile(durations, 95) * MS_PER_S
    split = [s for s in steps if s.compute_s is not None and s.data_wait_s is not None]
    total_s = sum(s.compute_s + s.data_wait_s for s in split)
    if total_s > 0:
        wait_share = sum(s.data_wait_s for s in split) / total_s
        readings["perf/data_wait_share"] = wait_share
        readings["perf/compute_share"] = 1.0 - wait_share
    return readings


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (no interpolation: every value is a real step)."""
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]
