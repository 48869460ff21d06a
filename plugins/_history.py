"""A run's record for plots and reports, built from its events: live from the bus or afterwards from its journal.

The same `History.update` reads both, so the plots drawn during a run and the ones `trainbus runs
plot` draws from the journal later come out the same. Events after the run's final one (a monitor's
last reading, plugin exits) are not part of the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from trainbus.proto import JOURNAL_NAME, Event, events as ev
from trainbus.proto.journal_format import read_journal


FINAL_EVENTS = frozenset({ev.END_TRAINING_SESSION, ev.RUN_FAILED})
# What a session publishes while it trains: its time ends at the last of them (plugins' exits and monitor readings
# come after, and before the next session starts, plugins say hello: none of that is training time)
SESSION_EVENTS = frozenset(ev.LIFECYCLE_EVENTS) | {ev.STOP_REQUESTED, ev.RUN_FAILED}
# A curve's points kept (the per-step loss, each monitor reading): past this many, every other one is dropped and the
# curve keeps one in twice as many from then on, so a multi-day run's record stays a few MB and a redraw costs what
# an hour's did (10^7 steps kept 10^6 points, 137 MB, and each redraw took 2.4 s of CPU). Even, so that the point
# that overflows is one the halved curve keeps. A figure is ~1,000 pixels wide: 4,096 points still draw every wiggle.
CURVE_POINTS_MAX = 4096
# A restarted plugin rebuilds its record from the journal in one handler: 10^6 events took 19 s here, so a run of
# days took longer than handler_timeout_s (60 s) and the plugin was killed as hung, again at every restart. Reading
# says it is getting somewhere (still_working) every this many events.
PROGRESS_EVERY_EVENTS = 10_000
READING_SERIES_MAX = 256  # monitor metric names kept (as the attach snapshot's RunState); later names are not drawn


@dataclass
class EpochRecord:
    epoch: int
    step: int
    training_loss: float | None
    validation_loss: float | None
    training_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    lr: float | None
    partial: bool = False  # a stop cut its training short: its numbers are over `batches` batches only
    batches: int | None = None
    batches_planned: int | None = None


@dataclass
class History:
    """What happened in a run, in the order it happened; `every_n_steps` thins the per-step loss curve, and every
    curve is thinned further to at most CURVE_POINTS_MAX points (`_add_point`)."""

    every_n_steps: int = 1
    run_id: str = ""
    started_ts: float | None = None  # wall time of start_training_session (or the first event seen)
    ended_ts: float | None = None
    # a run continued in place has sessions; the days between them are no training time (session_times)
    sessions: int = 0  # start_training_session events taken
    first_session_ts: float | None = None  # the first one's
    session_started_ts: float | None = None  # the latest one's
    earlier_sessions_s: float = 0.0  # each earlier session from its start to the last of its SESSION_EVENTS taken
    last_ts: float | None = None  # of the latest of SESSION_EVENTS
    epochs_total: int | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    epochs: list[EpochRecord] = field(default_factory=list)
    step_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    readings: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # tag -> [(wall time, value)]
    end: dict[str, Any] | None = None  # end_training_session's data
    failure: dict[str, Any] | None = None  # run_failed's data
    last_seq: int = 0
    last_step: int = 0
    last_epoch: int = 0
    step_thinning: int = 1  # the per-step loss is kept at steps that are multiples of every_n_steps * this
    # a monitor reading's (keep one in this many, readings offered so far), by tag (_add_reading)
    thinning: dict[str, tuple[int, int]] = field(default_factory=dict)
    # curve -> whether a finite value came for it: a NaN or infinity is left out of the curve (matplotlib draws none),
    # so a curve whose every value was one (a diverged run's losses) is drawn as empty axes, to be said
    finite_seen: dict[str, bool] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.end is not None or self.failure is not None

    def curves_with_no_finite_value(self) -> list[str]:
        """The curves that had values, every one of them NaN or infinite: drawn, they are empty axes."""
        return [curve for curve, finite in self.finite_seen.items() if not finite]

    def _seen(self, curve: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.finite_seen[curve] = self.finite_seen.get(curve, False) or _number(value) is not None

    def update(self, event: Event) -> None:
        """Take one event into the record; a seq already seen, or anything after the final event, is ignored.

        A run continued in place (`--resume RUN_ID`) starts a new session in the same journal: the record
        goes on, and what the earlier process trained after its last checkpoint (done again) is dropped."""
        if event.type == ev.START_TRAINING_SESSION and event.seq > self.last_seq:
            self.end = self.failure = None
        if event.seq <= self.last_seq or self.finished:
            return
        self.last_seq, self.last_step, self.last_epoch = event.seq, event.step, event.epoch
        self.run_id = self.run_id or event.run
        previous_ts = self.last_ts
        if event.type in SESSION_EVENTS:
            self.last_ts = event.ts
        if self.started_ts is None:
            self.started_ts = event.ts
        if event.type == ev.START_TRAINING_SESSION:
            self._session_started(event, previous_ts)
        elif (fold := _FOLDS.get(event.type)) is not None:
            fold(self, event)

    def _session_started(self, event: Event, previous_ts: float | None) -> None:
        if not self.epochs and not self.step_losses:  # the run's first session: when it started
            self.started_ts = event.ts
        if self.session_started_ts is not None and previous_ts is not None:
            self.earlier_sessions_s += max(0.0, previous_ts - self.session_started_ts)
        self.sessions += 1
        self.session_started_ts = event.ts
        if self.first_session_ts is None:
            self.first_session_ts = event.ts
        self.epochs_total = _int(event.data.get("epochs"))
        self.hyperparameters = dict(event.data.get("hyperparameters") or {})

    def _checkpoint_loaded(self, event: Event) -> None:
        resumed = _int(event.data.get("epoch")) or 0
        self.epochs = [e for e in self.epochs if e.epoch < resumed]
        self.step_losses = [(step, loss) for step, loss in self.step_losses if step <= event.step]

    def _batch_ended(self, event: Event) -> None:
        loss = _number(event.data.get("loss"))
        kept = self.every_n_steps and event.step % (self.every_n_steps * self.step_thinning) == 0
        if kept:
            self._seen("training loss per step", event.data.get("loss"))
        if loss is not None and kept:
            self.step_losses.append((event.step, loss))
            if len(self.step_losses) > CURVE_POINTS_MAX:  # by step, not count: a step with no loss shifts nothing
                self.step_thinning *= 2
                spacing = self.every_n_steps * self.step_thinning
                self.step_losses = [(step, loss) for step, loss in self.step_losses if step % spacing == 0]

    def _epoch_ended(self, event: Event) -> None:
        data = event.data
        self._seen("training loss per epoch", data.get("training_loss"))
        self._seen("validation loss per epoch", data.get("validation_loss"))
        for group in ("training", "validation"):
            metrics = data.get(f"{group}_metrics")
            for name, value in (metrics.items() if isinstance(metrics, dict) else ()):
                self._seen(f"{group} {name}", value)
        self._seen("learning rate", data.get("lr"))
        self.epochs.append(EpochRecord(
            epoch=event.epoch, step=event.step,
            training_loss=_number(data.get("training_loss")), validation_loss=_number(data.get("validation_loss")),
            training_metrics=_numbers(data.get("training_metrics")),
            validation_metrics=_numbers(data.get("validation_metrics")), lr=_number(data.get("lr")),
            partial=data.get("partial") is True, batches=_int(data.get("training_batch_count")),
            batches_planned=_int(data.get("batches_planned"))))

    def _metric(self, event: Event) -> None:
        value = _number(event.data.get("value"))
        tag = metric_tag(str(event.data.get("plugin") or "plugin"), str(event.data.get("name") or "value"))
        if tag in self.readings or len(self.readings) < READING_SERIES_MAX:
            self._seen(tag, event.data.get("value"))
            if value is not None:
                self._add_reading(tag, (event.ts, value))

    def _ended(self, event: Event) -> None:
        self.end, self.ended_ts = dict(event.data), event.ts

    def _failed(self, event: Event) -> None:
        self.failure, self.ended_ts = dict(event.data), event.ts

    def _add_reading(self, tag: str, point: tuple[float, float]) -> None:
        """Keep one reading in `keep_every` offered; past CURVE_POINTS_MAX, halve the points kept and double that.
        The points kept are always the readings offered at 0, k, 2k, ... (k = keep_every), so the live plugin, a
        restarted one and `runs plot`, offered the same events, keep the same points."""
        points = self.readings.setdefault(tag, [])
        keep_every, offered = self.thinning.get(tag, (1, 0))
        if offered % keep_every == 0:
            points.append(point)
            if len(points) > CURVE_POINTS_MAX:
                del points[1::2]
                keep_every *= 2
        self.thinning[tag] = (keep_every, offered + 1)

    # derived facts

    def best_validation(self) -> EpochRecord | None:
        """The whole epoch with the lowest validation loss (an epoch cut short is not a candidate)."""
        scored = [e for e in self.epochs if e.validation_loss is not None and not e.partial]
        return min(scored, key=lambda e: e.validation_loss) if scored else None

    def duration_s(self) -> float | None:
        """From the run's start to its end: a continued run's days between sessions included."""
        if self.started_ts is None or self.ended_ts is None:
            return None
        return self.ended_ts - self.started_ts

    def session_times(self) -> tuple[float, float, float] | None:
        """(the latest session's time, every session's together, the time since the first began) once the run has
        ended; None without a start."""
        if self.session_started_ts is None or self.first_session_ts is None or self.ended_ts is None:
            return None
        latest = max(0.0, self.ended_ts - self.session_started_ts)
        return latest, self.earlier_sessions_s + latest, max(0.0, self.ended_ts - self.first_session_ts)

    # from a journal

    @classmethod
    def from_journal(cls, run_dir: str | Path, every_n_steps: int = 1, before_seq: int | None = None,
                     damage: list[str] | None = None, progress: Callable[[int], None] | None = None) -> "History":
        history = cls(every_n_steps=every_n_steps)
        history.backfill(run_dir, before_seq, damage, progress)
        return history

    def backfill(self, run_dir: str | Path, before_seq: int | None = None, damage: list[str] | None = None,
                 progress: Callable[[int], None] | None = None) -> int:
        """Read the events this record lacks from the run's journal (a restarted plugin's past); return how many.
        `damage`: a line for each stretch of the journal that could not be read (read_journal's); `progress`: called
        with the seq reached every PROGRESS_EVERY_EVENTS events read (a plugin's still_working, runs plot's line)."""
        path = Path(run_dir) / JOURNAL_NAME
        if not path.is_file():
            return 0
        taken = 0
        for read, event in enumerate(read_journal(path, damage), start=1):
            if progress is not None and read % PROGRESS_EVERY_EVENTS == 0:
                progress(event.seq)
            if before_seq is not None and event.seq >= before_seq:
                break
            # past a session's final event too: a continued run's next start_training_session goes on (update)
            if event.seq > self.last_seq:
                before = self.last_seq
                self.update(event)
                taken += self.last_seq != before
        return taken


# What each event type adds to a History (a run's start, which also needs the time before it, is update's own).
_FOLDS: dict[str, Callable[[History, Event], None]] = {
    ev.LOAD_CHECKPOINT: History._checkpoint_loaded,
    ev.END_TRAINING_BATCH: History._batch_ended,
    ev.END_EPOCH: History._epoch_ended,
    ev.METRIC: History._metric,
    ev.END_TRAINING_SESSION: History._ended,
    ev.RUN_FAILED: History._failed,
}


def metric_tag(plugin: str, name: str) -> str:
    """A metric's name for TensorBoard and plots: monitors name theirs `cpu/...`; others get their plugin's prefix."""
    return name if "/" in name else f"{plugin}/{name}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {str(k): v for k, v in ((k, _number(v)) for k, v in values.items()) if v is not None}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
