"""A run's live state as `trainbus attach` shows it: folded from events, bounded, and sent whole as a snapshot.

The kernel folds every event it numbers into one RunState (on its bus thread) and answers a `snapshot`
request with `to_map()` as of seq S; a client rebuilds it with `from_map` and folds the live events after S
the same way (zguide's Clone pattern). Both sides fold with this one function, so the client's view is the
kernel's. Everything is bounded: a fixed number of series, points per series and plugins, so a snapshot
stays far under MAX_MESSAGE_BYTES however long the run (worst case ~0.5 MiB, checked by a test).
"""

from __future__ import annotations

import collections
import math
from typing import Any

from . import events as ev
from .messages import Event

HISTORY_POINTS = 60  # values kept per series: what a sparkline shows
MAX_SERIES = 256  # metric names followed; later names are counted (`series_dropped`), not kept
MAX_PLUGINS = 64  # plugin rows (the kernel welcomes at most 64 peers at once, kernel/peers.py)
RATE_POINTS = 30  # (ts, step) samples for the step rate, one a RATE_SAMPLE_S: a 30 s window
RATE_SAMPLE_S = 1.0
MAX_STOP_REASONS = 8
TEXT_MAX_CHARS = 1000  # a plugin's reason, an error: as the kernel caps them (kernel/control.py)
FINAL_EVENTS = frozenset({ev.END_TRAINING_SESSION, ev.RUN_FAILED})
# the peer names `trainbus attach` clients take (sdk/attach.py client_name): views, not plugins
CLIENT_PREFIX = "attach-"
PLUGIN_STATES = {  # what each supervisor event says about a plugin
    ev.PLUGIN_STARTED: "starting", ev.PLUGIN_READY: "running", ev.PLUGIN_RESTARTED: "starting",
    ev.PLUGIN_CRASHED: "crashed", ev.PLUGIN_HUNG: "hung", ev.PLUGIN_FAILED: "failed", ev.PLUGIN_EXITED: "exited",
}


class RunState:
    """Run info, progress, metric series and plugin health as of event `seq`. `fold` never raises."""

    def __init__(self, run_id: str = "", seq: int = 0):
        self.seq = seq  # the last event folded
        self.run: dict[str, Any] = {"id": run_id, "target": None, "device": None, "model": None,
                                    "parameters": None, "epochs": None, "started_ts": None}
        self.progress: dict[str, Any] = {"epoch": 0, "step": 0, "batches_done": 0, "batches_planned": None,
                                         "ts": None}
        self.rate: collections.deque = collections.deque(maxlen=RATE_POINTS)  # [ts, step]
        self.series: dict[str, dict[str, Any]] = {}  # name -> value, step, ts, plugin, history
        self.plugins: dict[str, dict[str, Any]] = {}  # name -> state, pid, restarts, delivery, errors, reason, acked
        self.stop_reasons: list[str] = []
        self.checkpoint: dict[str, Any] | None = None  # the latest checkpoint_saved: path, step, epoch
        self.ended: dict[str, Any] | None = None  # the final event: type, seq, ts, error, stopped_early
        self.stalled: dict[str, Any] | None = None  # the loop standing still (training_stalled): since_ts, after, where
        self.dropped = collections.Counter()  # series_dropped, plugins_dropped, fold_errors

    # -- folding one event ------------------------------------------------------------------------

    def fold(self, event: Event) -> None:
        """Apply one event (in seq order). Odd data is counted and skipped: the kernel's bus must not stop."""
        try:
            self._fold(event)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
            self.dropped["fold_errors"] += 1
        self.seq = max(self.seq, event.seq)

    def _fold(self, e: Event) -> None:
        if e.type != ev.HEARTBEAT:
            self.progress.update(epoch=e.epoch, step=e.step, ts=e.ts)
        fold = self._FOLDS.get(e.type)
        if fold is not None:
            fold(self, e)
        if e.type in FINAL_EVENTS:
            self.stalled = None
            self.ended = {"type": e.type, "seq": e.seq, "ts": e.ts, "error": _text(e.data.get("error")),
                          "stopped_early": bool(e.data.get("stopped_early", False))}

    def _on_end_training_batch(self, e: Event) -> None:
        progress = self.progress
        progress["batches_done"] = int(e.data.get("training_batch_count", progress["batches_done"] + 1))
        self._put("loss", e.data.get("loss"), e)
        if not self.rate or e.ts - self.rate[-1][0] >= RATE_SAMPLE_S:
            self.rate.append([e.ts, e.step])

    def _on_start_epoch(self, e: Event) -> None:
        self.progress.update(batches_done=0, batches_planned=_int(e.data.get("batches_planned")))

    def _on_end_epoch(self, e: Event) -> None:
        for key in ("training_loss", "validation_loss", "lr"):
            self._put(key, e.data.get(key), e)
        for prefix in ("training", "validation"):
            for name, value in _map(e.data.get(f"{prefix}_metrics")).items():
                self._put(f"{prefix}_{name}", value, e)

    def _on_metric(self, e: Event) -> None:
        self._put(_text(e.data.get("name")), e.data.get("value"), e, plugin=_text(e.data.get("plugin")))

    def _on_start_training_session(self, e: Event) -> None:
        data = e.data
        self.run.update(device=_text(data.get("device")), model=_text(data.get("model")),
                        parameters=_int(data.get("parameters")), epochs=_int(data.get("epochs")), started_ts=e.ts)
        self.ended, self.stop_reasons, self.stalled = None, [], None  # a continued run goes on

    def _on_log(self, e: Event) -> None:
        if e.data.get("level") == "error" and e.data.get("plugin") in self.plugins:
            self.plugins[e.data["plugin"]]["errors"] += 1

    def _on_stop_requested(self, e: Event) -> None:
        reasons = [_text(r) for r in e.data.get("reasons") or []]
        self.stop_reasons = (self.stop_reasons + reasons)[-MAX_STOP_REASONS:]

    def _on_training_stalled(self, e: Event) -> None:
        self.stalled = {"since_ts": e.ts - float(e.data.get("stalled_s") or 0), "after": _text(e.data.get("after")),
                        "where": _text(e.data.get("where"))}

    def _on_training_resumed(self, e: Event) -> None:
        self.stalled = None

    def _on_checkpoint_saved(self, e: Event) -> None:
        self.checkpoint = {"path": _text(e.data.get("path")), "step": _int(e.data.get("step")),
                           "epoch": _int(e.data.get("epoch")), "ts": e.ts}

    def _put(self, name: str | None, value: Any, e: Event, plugin: str | None = None) -> None:
        if not name or not _is_number(value):
            return
        series = self.series.get(name)
        if series is None:
            if len(self.series) >= MAX_SERIES:
                self.dropped["series_dropped"] += 1
                return
            series = self.series[name] = {"plugin": plugin, "history": collections.deque(maxlen=HISTORY_POINTS)}
        series.update(value=float(value), step=e.step, ts=e.ts)
        series["history"].append(float(value))

    def _plugin_event(self, e: Event) -> None:
        name = _text(e.data.get("plugin"))
        if not name:
            return
        if name not in self.plugins:
            if len(self.plugins) >= MAX_PLUGINS and not self._forget_a_client_gone():
                self.dropped["plugins_dropped"] += 1
                return
            self.plugins[name] = {"state": None, "pid": None, "restarts": 0, "delivery": None, "errors": 0,
                                  "reason": None, "acked": None, "lag": None}
        p, data = self.plugins[name], e.data
        p["state"] = PLUGIN_STATES[e.type]
        if _int(data.get("pid")) is not None:
            p["pid"] = data["pid"]
        if e.type == ev.PLUGIN_RESTARTED:
            p["restarts"] = _int(data.get("restarts")) or p["restarts"] + 1
        elif e.type == ev.PLUGIN_READY:
            p["delivery"] = _text(data.get("delivery"))
        elif e.type in (ev.PLUGIN_CRASHED, ev.PLUGIN_HUNG, ev.PLUGIN_FAILED):
            p["reason"] = _text(data.get("cause") or data.get("reason"))

    def _forget_a_client_gone(self) -> bool:
        """Room for a new row: the oldest row of a client that has gone (`trainbus attach`, `runs stop`, `plugins
        attach`: each a peer of its own name, exited or gone silent) is forgotten, and counted. Without it, once 64
        had come and gone in a run of days, a plugin attached later, or any peer after them, was never shown."""
        for name, p in self.plugins.items():
            if name.startswith(CLIENT_PREFIX) and p["state"] in ("exited", "hung"):
                del self.plugins[name]
                self.dropped["clients_forgotten"] += 1
                return True
        return False

    # -- what a dashboard derives -----------------------------------------------------------------

    def steps_per_s(self) -> float | None:
        """Optimizer steps a second over the last RATE_POINTS seconds of training; None before two samples."""
        points = list(self.rate)
        if self.progress["ts"] is not None and (not points or self.progress["ts"] > points[-1][0]):
            points.append([self.progress["ts"], self.progress["step"]])
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])

    def eta_s(self) -> float | None:
        """Seconds until the planned epochs are done at the current rate; None when not known."""
        rate, epochs, p = self.steps_per_s(), self.run["epochs"], self.progress
        if not rate or not epochs or not p["batches_planned"] or self.ended:
            return None
        epoch = max(p["epoch"], 1)
        left = (epochs - epoch) * p["batches_planned"] + max(0, p["batches_planned"] - p["batches_done"])
        return max(0, left) / rate

    # -- the snapshot: plain data for the wire -----------------------------------------------------

    def to_map(self, acked: dict[str, int] | None = None) -> dict[str, Any]:
        """The snapshot's `state` (PROTOCOL.md §7.4); `acked`: durable plugins' positions (only the kernel knows)."""
        acked = acked or {}
        plugins = {name: dict(p) for name, p in self.plugins.items()}
        for name, seq in acked.items():
            if name in plugins:
                plugins[name].update(acked=seq, lag=max(0, self.seq - seq))
        return {"run": dict(self.run), "progress": dict(self.progress), "rate": [list(r) for r in self.rate],
                "series": {n: {**s, "history": list(s["history"])} for n, s in self.series.items()},
                "plugins": plugins, "stop_reasons": list(self.stop_reasons), "checkpoint": self.checkpoint,
                "ended": self.ended, "stalled": self.stalled, "dropped": dict(self.dropped)}

    @classmethod
    def from_map(cls, seq: int, m: dict[str, Any]) -> "RunState":
        """A snapshot as received; its bounds applied again (it came over the wire)."""
        state = cls(seq=seq)
        state.run.update(_map(m.get("run")))
        state.progress.update(_map(m.get("progress")))
        state.rate.extend(r for r in m.get("rate") or [] if isinstance(r, list) and len(r) == 2)
        for name, s in list(_map(m.get("series")).items())[:MAX_SERIES]:
            if isinstance(s, dict) and _is_number(s.get("value")):
                history = [float(v) for v in s.get("history") or [] if _is_number(v)]
                state.series[name] = {**s, "history": collections.deque(history, maxlen=HISTORY_POINTS)}
        state.plugins = {n: p for n, p in list(_map(m.get("plugins")).items())[:MAX_PLUGINS] if isinstance(p, dict)}
        for p in state.plugins.values():
            p["errors"] = _int(p.get("errors")) or 0
            p["restarts"] = _int(p.get("restarts")) or 0
        state.stop_reasons = [_text(r) for r in m.get("stop_reasons") or []][-MAX_STOP_REASONS:]
        state.checkpoint = m.get("checkpoint") if isinstance(m.get("checkpoint"), dict) else None
        state.ended = m.get("ended") if isinstance(m.get("ended"), dict) else None
        stalled = m.get("stalled")
        state.stalled = stalled if isinstance(stalled, dict) and _is_number(stalled.get("since_ts")) else None
        state.dropped.update(_map(m.get("dropped")))
        return state

    # event type -> what it changes; a PLUGIN_STATES type changes that plugin's row
    _FOLDS = {ev.END_TRAINING_BATCH: _on_end_training_batch, ev.START_EPOCH: _on_start_epoch,
              ev.END_EPOCH: _on_end_epoch, ev.METRIC: _on_metric, ev.START_TRAINING_SESSION: _on_start_training_session,
              ev.LOG: _on_log, ev.STOP_REQUESTED: _on_stop_requested, ev.TRAINING_STALLED: _on_training_stalled,
              ev.TRAINING_RESUMED: _on_training_resumed, ev.CHECKPOINT_SAVED: _on_checkpoint_saved,
              **dict.fromkeys(PLUGIN_STATES, _plugin_event)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value[:TEXT_MAX_CHARS] if isinstance(value, str) else None


def _map(value: Any) -> dict:
    return value if isinstance(value, dict) else {}
