"""Stops training when a monitored metric stops improving (monitor, mode, patience, min_delta)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainbus.proto import DURABLE, JOURNAL_NAME, Event, events as ev
from trainbus.proto.journal_format import read_journal
from trainbus.sdk import METRIC, Plugin, Setting, SettingsError
from trainbus.sdk.runner import NotRetryable

from ._history import PROGRESS_EVERY_EVENTS

MODES = ("min", "max")
# "validation_accuracy" is looked up as end_epoch's validation_metrics["accuracy"] when it is not a key itself.
METRIC_GROUPS = ("validation", "training")


class MonitorMissing(SettingsError, NotRetryable):
    """The monitored value is not in end_epoch: reported once, as an error (`trainbus run` refuses such a monitor
    before it starts when the run's metrics can be known then; this is for the runs where they cannot)."""


@dataclass
class Tracking:
    """What the plugin knows about the monitored value; saved after every epoch so a restart resumes it."""

    seq: int = 0  # the last end_epoch counted; a replay of it after a restart is skipped
    epoch: int = 0  # its epoch: one at or below it comes again in a run continued from an earlier checkpoint
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best, reset by an improvement
    # what `best` is a best of: a plugin attached again watching another metric (or the other way) starts over
    monitor: str = ""  # "": a state saved before these were (taken as the same)
    mode: str = ""


class EarlyStoppingPlugin(Plugin):
    """Stops training when a monitored metric stops improving (monitor, mode, patience, min_delta).

    Example settings: {"monitor": "validation_accuracy", "mode": "max", "patience": 5, "min_delta": 0.001}.
    An epoch improves on the best by more than min_delta, or it counts towards patience; a NaN never improves,
    and with check_finite (the default) a NaN or infinite value stops training at once.
    """

    # Durable: a decision-maker that misses an epoch stops late. Its counts survive a restart through
    # <run_dir>/plugins/<name>.state.json, because a replay starts at the last ack, not at seq 1.
    delivery = DURABLE
    votes = ("end_epoch",)  # the kernel waits for the verdict, so a stop lands at this epoch's end
    settings = {
        "monitor": Setting("validation_loss", "the end_epoch value watched: validation_loss, validation_<metric>, "
                                              "training_loss, training_<metric>", kind=METRIC),
        "mode": Setting("min", "min: lower is better; max: higher is better", choices=MODES),
        "patience": Setting(3, "epochs without improvement before training stops", min=1),
        "min_delta": Setting(0.0, "how much an epoch must beat the best by to count as an improvement", min=0),
        "check_finite": Setting(True, "stop at once when the monitored value is NaN or infinite (training "
                                      "diverged), as Lightning's EarlyStopping does; false: such an epoch counts "
                                      "as no improvement"),
    }

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        if not settings["monitor"]:
            raise SettingsError("monitor = '' is not allowed; it must name a value of end_epoch, "
                                "e.g. 'validation_loss'")

    def setup(self) -> None:
        self.state_path = Path(self.run_dir) / "plugins" / f"{self.name}.state.json"
        monitor, mode = self.settings["monitor"], self.settings["mode"]
        self.tracking = _load(self.state_path)
        saved = self.tracking
        if (saved.monitor, saved.mode) not in ((monitor, mode), ("", "")):
            self.log(f"early_stopping watched {saved.monitor} ({saved.mode}) before; watching {monitor} ({mode}) "
                     f"now, its counts start over", level="info")
            self.tracking = Tracking()
        self.tracking.monitor, self.tracking.mode = monitor, mode
        self.stop_sent = False  # by this process, in this session: a replay past patience asks once, not per epoch

    def on_end_epoch(self, event: Event) -> None:
        t, monitor, patience = self.tracking, self.settings["monitor"], self.settings["patience"]
        if event.seq <= t.seq:
            return
        value = resolve(event.data, monitor)
        if value is None:
            raise MonitorMissing(f"early_stopping monitor {monitor!r} is not in this run's end_epoch; set monitor to "
                                 f"one of: {', '.join(available(event.data)) or 'nothing'}")
        if event.epoch <= t.epoch:  # a continued run trains the epochs after its checkpoint again: the counts
            self.tracking = t = self._rewound(event)  # are those of the epochs before this one, as the run has them
        self._count(value, event.epoch)
        t.seq, t.epoch = event.seq, event.epoch
        _save(self.state_path, t)
        if self.settings["check_finite"] and not math.isfinite(value):
            best = "no finite value before" if t.best is None else f"best {t.best:.6g} at epoch {t.best_epoch}"
            self._stop(event, f"{monitor} is {value} at epoch {event.epoch}: training diverged ({best})")
        elif t.bad_epochs >= patience:
            best = "no finite value yet" if t.best is None else f"best {t.best:.6g} at epoch {t.best_epoch}"
            epochs = "epoch" if t.bad_epochs == 1 else "epochs"
            self._stop(event, f"no improvement in {monitor} for {t.bad_epochs} {epochs} ({best})")

    def _count(self, value: float, epoch: int) -> None:
        t = self.tracking
        if self._improves(value):
            t.best, t.best_epoch, t.bad_epochs = value, epoch, 0
        else:
            t.bad_epochs += 1

    def _rewound(self, event: Event) -> Tracking:
        """The counts over the epochs before `event`'s, each as it was last trained, from the run's journal (each
        end_epoch there replaces those of its epoch and later: what a continued run trained again). Without a
        readable journal they start over, which can only delay a stop."""
        monitor = self.settings["monitor"]
        values: dict[int, tuple[int, float]] = {}  # epoch -> (seq, value), in the order trained
        journal = Path(self.run_dir) / JOURNAL_NAME
        for read, past in enumerate(read_journal(journal) if journal.is_file() else (), start=1):
            if read % PROGRESS_EVERY_EVENTS == 0:  # a run of days: millions of events
                self.still_working()
            if past.seq >= event.seq:
                break
            value = resolve(past.data, monitor) if past.type == ev.END_EPOCH else None
            if value is not None:
                if values and past.epoch <= next(reversed(values)):  # a continuation only: 10^5 epochs stay O(n)
                    values = {epoch: kept for epoch, kept in values.items() if epoch < past.epoch}
                values[past.epoch] = (past.seq, value)
        self.tracking = Tracking(monitor=monitor, mode=self.settings["mode"])
        for epoch, (seq, value) in sorted(values.items()):
            if epoch < event.epoch:
                self._count(value, epoch)
                self.tracking.seq, self.tracking.epoch = seq, epoch
        if not journal.is_file():  # a plugin on another machine
            self.log(f"epoch {event.epoch} is trained again (a run continued from an earlier checkpoint) and the "
                     f"run's journal is not here to count the epochs before it: early stopping's counts start over",
                     level="info")
        return self.tracking

    def _stop(self, event: Event, reason: str) -> None:
        """Once per process: a restarted one asks again (a crash may have eaten the first). An earlier session's
        epoch (a resumed run's catch-up) sends nothing (the SDK drops it), so it does not count as asked."""
        if self.stop_sent:
            return
        self.stop(reason)
        self.stop_sent = event.seq >= self.session_seq

    def _improves(self, value: float) -> bool:
        best, min_delta = self.tracking.best, self.settings["min_delta"]
        if math.isnan(value):
            return False
        if best is None:
            return True
        return value < best - min_delta if self.settings["mode"] == "min" else value > best + min_delta


def resolve(data: dict[str, Any], monitor: str) -> float | None:
    """The monitored number in an end_epoch's data: a top-level key, or a metric in its group's dict."""
    value = data.get(monitor)
    for group in METRIC_GROUPS:
        metrics = data.get(f"{group}_metrics")
        if value is None and monitor.startswith(f"{group}_") and isinstance(metrics, dict):
            value = metrics.get(monitor.removeprefix(f"{group}_"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def available(data: dict[str, Any]) -> list[str]:
    """Every name `resolve` would find in this end_epoch, for the warning that says what to monitor."""
    names = [key for key in data if resolve(data, key) is not None]
    for group in METRIC_GROUPS:
        metrics = data.get(f"{group}_metrics")
        if isinstance(metrics, dict):
            names += [f"{group}_{name}" for name in metrics if resolve(data, f"{group}_{name}") is not None]
    return sorted(set(names))


def _load(path: Path) -> Tracking:
    try:
        return Tracking(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # none yet, or unreadable: start over, which can only delay a stop
        return Tracking()


def _save(path: Path, tracking: Tracking) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(tracking)))
    os.replace(temporary, path)  # atomic: a crash leaves the old state or the new one, never half
