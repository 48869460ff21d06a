"""A run's history as its journal tells it, event by event: epochs, training sessions, checkpoints, plugins and
the latest failure: what `runs show` reads that summary.json does not hold (or holds only once the run ended)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Iterable

from trainbus.proto import Event
from trainbus.proto import events as ev

# A plugin that crashes now and then but never 6 times within a minute is restarted for as long as the run trains:
# its summary (the supervisor's, and runs show's account from the journal) keeps the newest causes and counts the
# rest (one every 13 s is ~6,600 a day, each up to ~400 bytes).
CRASHES_KEPT = 20
LIVE_PLUGIN_STATES = ("starting", "running", "backoff", "hung")  # _plugin_event's, of a peer that has not ended


def iso_time(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


class JournalHistory:
    """Fed a run's events in journal order (`read`), what they told: each epoch's row, each training session, the
    checkpoints saved (and how many failed or were skipped), each plugin's state, and the latest session's failure.
    `plugin_names`: the run's configured plugins, listed even if the journal never names them."""

    def __init__(self, plugin_names: Iterable[str]):
        self.epochs: dict[int, dict[str, Any]] = {}
        self.sessions: list[dict[str, Any]] = []
        self.plugins: dict[str, dict[str, Any]] = {name: _not_started() for name in plugin_names}
        self.saved: list[dict[str, Any]] = []
        self.checkpoint_counts = {"failed": 0, "skipped": 0}
        # save_checkpoint seqs no persister answered (checkpoint_saved or checkpoint_failed name the seq they answer)
        self.unanswered_saves: dict[int, None] = {}
        self.error: str | None = None
        self._epoch_started: dict[int, float] = {}
        self._handlers: dict[str, Callable[[Event], None]] = {
            ev.START_EPOCH: self._on_start_epoch, ev.END_EPOCH: self._on_end_epoch,
            ev.START_TRAINING_SESSION: self._on_start_training_session, ev.LOAD_CHECKPOINT: self._on_load_checkpoint,
            ev.RUN_FAILED: self._on_run_failed, ev.SAVE_CHECKPOINT: self._on_save_checkpoint,
            ev.CHECKPOINT_SAVED: self._on_checkpoint_saved,
            ev.CHECKPOINT_FAILED: self._on_checkpoint_failed, ev.CHECKPOINT_SKIPPED: self._on_checkpoint_skipped,
            ev.VOTE_MISSED: self._on_vote_missed}

    def read(self, e: Event) -> None:
        handler = self._handlers.get(e.type)
        if handler is not None:
            handler(e)
        elif e.type.startswith("plugin_") and isinstance(e.data.get("plugin"), str):
            _plugin_event(self.plugins.setdefault(e.data["plugin"], _not_started()), e.type, e.data)

    def _on_start_epoch(self, e: Event) -> None:
        self._epoch_started[e.epoch] = e.ts

    def _on_end_epoch(self, e: Event) -> None:
        self.epochs[e.epoch] = _epoch_row(e, self._epoch_started.get(e.epoch))

    def _on_start_training_session(self, e: Event) -> None:
        self.error = None  # a continued run: an earlier session's failure is not this one's
        data = e.data
        self.sessions.append({"started_at": iso_time(e.ts), "epochs": data.get("epochs"), "device": data.get("device"),
                              "precision": data.get("precision"), "compile": data.get("compile"),
                              "accumulate_grad_batches": data.get("accumulate_grad_batches"),
                              "gradient_clip_val": data.get("gradient_clip_val"),
                              "model": data.get("model"), "parameters": data.get("parameters"),
                              "hyperparameters": data.get("hyperparameters"), "cluster": data.get("cluster"),
                              "resumed_from": None})

    def _on_load_checkpoint(self, e: Event) -> None:
        if self.sessions:
            self.sessions[-1]["resumed_from"] = e.data.get("path")

    def _on_run_failed(self, e: Event) -> None:
        self.error = e.data.get("error")

    def _on_save_checkpoint(self, e: Event) -> None:
        self.unanswered_saves[e.seq] = None

    def _on_checkpoint_saved(self, e: Event) -> None:
        self.unanswered_saves.pop(e.data.get("seq"), None)
        self.saved.append({"path": e.data.get("path"), "epoch": e.data.get("epoch", e.epoch),
                           "step": e.data.get("step", e.step), "at": iso_time(e.ts)})

    def _on_checkpoint_failed(self, e: Event) -> None:
        self.unanswered_saves.pop(e.data.get("seq"), None)
        self.checkpoint_counts["failed"] += 1

    def _on_checkpoint_skipped(self, e: Event) -> None:
        self.checkpoint_counts["skipped"] += 1

    def _on_vote_missed(self, e: Event) -> None:
        names = e.data.get("plugins")
        for name in names if isinstance(names, list) else ():  # a peer attached by hand's too
            if isinstance(name, str):
                p = self.plugins.setdefault(name, _not_started())
                p["votes_missed"] = p.get("votes_missed", 0) + 1


def _not_started() -> dict[str, Any]:
    return {"state": "not started", "restarts": 0, "crashes": []}


def _epoch_row(e: Event, started: float | None) -> dict[str, Any]:
    data = e.data
    return {"epoch": e.epoch, "step": e.step, "training_loss": data.get("training_loss"),
            "validation_loss": data.get("validation_loss"),
            "training_metrics": data.get("training_metrics") or {},
            "validation_metrics": data.get("validation_metrics") or {}, "lr": data.get("lr"),
            "duration_s": round(e.ts - started, 3) if started is not None else None, "ended_at": iso_time(e.ts),
            "partial": data.get("partial") is True}  # a stop cut its training short: its losses are over part of it


def _plugin_event(p: dict[str, Any], type_: str, data: dict[str, Any]) -> None:
    """A plugin's state as the supervisor's events tell it (for a run with no summary to say so)."""
    if type_ == ev.PLUGIN_STARTED:
        p["state"], p["pid"] = "starting", data.get("pid")
    elif type_ == ev.PLUGIN_READY:
        p["state"] = "running"
    elif type_ == ev.PLUGIN_RESTARTED:
        p["state"], p["pid"], p["restarts"] = "starting", data.get("pid"), data.get("restarts", p["restarts"] + 1)
    elif type_ in (ev.PLUGIN_CRASHED, ev.PLUGIN_HUNG):
        p["state"] = "hung" if type_ == ev.PLUGIN_HUNG else "backoff"
        if type_ == ev.PLUGIN_CRASHED and not data.get("hung"):
            _crashed(p, str(data.get("cause")))
        elif type_ == ev.PLUGIN_HUNG:
            _crashed(p, f"hung ({data.get('reason')})")
    elif type_ == ev.PLUGIN_FAILED:
        p["state"], p["reason"] = "failed", data.get("reason")
    elif type_ == ev.PLUGIN_EXITED:
        p["state"] = "exited"


def _crashed(p: dict[str, Any], cause: str) -> None:
    """The newest CRASHES_KEPT causes, and once older ones are forgotten a count of them all, as the supervisor's
    summary keeps them."""
    count = p.get("crash_count", len(p["crashes"])) + 1
    p["crashes"] = (p["crashes"] + [cause])[-CRASHES_KEPT:]
    if count > len(p["crashes"]):
        p["crash_count"] = count
