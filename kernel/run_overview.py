"""One run in brief, as `trainbus runs list` shows it: its status and how far it got, read without touching a
live run.

A run's status comes from its `summary.json` (completed, stopped, failed, interrupted), written when the
kernel is done. Without one the run is `running` while the kernel named in `kernel.pid` is alive (and is this
run's: a copy of a live run's directory names the original's), and `died` once it is gone (killed, out of memory,
power loss: it never got to write its summary).

`list` reads, per run, only small files and a bounded part of the journal: summary.json, config.json, the
journal's head (when the run started, how many epochs it plans) and, for a run without a summary, its tail
(where it is now). A journal of many GB costs list no more than one of a few KB.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from trainbus.proto import JOURNAL_NAME, Event
from trainbus.proto import events as ev
from trainbus.proto.text import duration_text
from trainbus.proto.journal_format import journal_first, journal_head, journal_tail, last_event_of

from .journal_history import iso_time
from .kernel_pid import KERNEL_PID, another_runs_kernel, kernel_process
from .run_json import CONFIG, SUMMARY, kept_summary, read_config, read_summary, summary_file_problem

# An ended run's last event: in this many bytes from the end (a few dozen events, each ~150 bytes), else in
# SMALL_TAIL_BYTES (one large event last). Parsing is most of a listed run's cost: not 400 events for one.
LAST_EVENT_BYTES = 8 * 1024
SMALL_TAIL_BYTES = 64 * 1024
STALE_S = 10.0  # no kernel.pid (a run from before there was one): heartbeats every second, or it is gone


def event_brief(event: Event | None, now: float) -> dict[str, Any] | None:
    """An event as `runs list --json` and `runs show --json` name the last one seen: where, when, and how long ago."""
    if event is None:
        return None
    return {"type": event.type, "seq": event.seq, "epoch": event.epoch, "step": event.step, "at": iso_time(event.ts),
            "age_s": round(max(0.0, now - event.ts), 1)}


def _plugin_trouble(plugins: dict[str, Any], undrained: dict[str, Any]) -> list[str]:
    trouble = []
    for name, p in sorted(plugins.items()):
        if not isinstance(p, dict):
            continue
        if p.get("state") == "failed":
            trouble.append(f"{name} failed" + (f" ({p['restarts']} restarts)" if p.get("restarts") else ""))
        elif p.get("restarts"):
            trouble.append(f"{name} {p['restarts']} restart{'s' if p['restarts'] != 1 else ''}")
        elif p.get("crashes"):  # crashed late in the run, and it ended before the restart
            trouble.append(f"{name} crashed ({p['crashes'][-1]})")
        if p.get("left_early"):  # exited 0 (or said bye) mid-run: on purpose, so not restarted, but the run lost it
            trouble.append(f"{name} left before the run ended")
        if p.get("greeted") is False and not p.get("detached"):  # it took no event: not a plugin (a command that
            # speaks no PROTOCOL.md), or hung; one its owner detached while it still started was asked to go
            trouble.append(f"{name} never said hello")
        dropped = [f"{p[f'{kind}_dropped']:,} {kind}{'s' * (p[f'{kind}_dropped'] != 1)}" for kind in ("metric", "log")
                   if isinstance(p.get(f"{kind}_dropped"), int) and p[f"{kind}_dropped"] > 0]
        if dropped:  # past its [limits]: what it reported is not all in the journal
            trouble.append(f"{name} {' and '.join(dropped)} dropped")
        if p.get("errors_logged"):  # handlers that raised, or errors it logged itself: the plugin went on
            trouble.append(f"{name} {p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged")
        if p.get("checkpoints_failed"):
            trouble.append(f"{name} {p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} failed")
        if p.get("votes_missed"):
            trouble.append(f"{name} missed {votes_missed(p['votes_missed'])}")
    trouble += [f"{name} undrained (acked to seq {acked})" for name, acked in sorted(undrained.items())]
    return trouble


def votes_missed(count: int) -> str:
    """`N vote(s)` as the trouble lines say it."""
    return f"{count} vote{'s' * (count != 1)} (training went on without them)"


def run_overview(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """One run in brief, from summary.json, config.json and a bounded head and tail of its journal.

    Keys: id, dir, status (one of STATUSES), detail (why a run without a summary has its status), pid,
    target, started_at (ISO 8601) and started_ts (seconds since 1970), duration_s (of the latest session
    when the run was continued in place), epochs_completed,
    epochs (planned), steps, training_loss, validation_loss, validation_metrics and training_metrics (the last
    epoch's),
    stop_reasons, error, plugin_trouble, last_event (for a run without a summary: where the journal ends),
    flags (what the spec function was called with, kernel/flags.py), hyperparameters (the built spec's, its
    build()'s defaults included: what trained), ended_ts (when the kernel ended, or the
    last event of one that died), last_seq, best (the lowest whole-epoch validation loss and its epoch), stalled (a
    running run whose training stands still: since_ts, stalled_s, step, where in the user's code; else None).
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir).resolve()
    journal = run_dir / JOURNAL_NAME
    config = read_config(run_dir)
    first = journal_first(journal)

    def session_starts() -> list[Event]:  # the head's parse is most of a listed run's cost: only where needed
        return [e for e in journal_head(journal) if e.type == ev.START_TRAINING_SESSION]

    if first is not None:
        started = first.ts
    else:
        try:
            started = (run_dir / CONFIG).stat().st_mtime
        except OSError:
            started = None
    info: dict[str, Any] = {
        "id": run_dir.name, "dir": str(run_dir), "status": None, "detail": None, "pid": None,
        "target": config.get("target"), "started_at": iso_time(started), "started_ts": started, "duration_s": None,
        # planned: config.json's, rewritten by each session (a continued run's --epochs 20 extends it); the head
        # of the journal holds only the first sessions' starts
        "epochs_completed": None,
        "epochs": config["epochs"] if config.get("epochs") is not None else next(
            (e.data.get("epochs") for e in reversed(session_starts())), None),
        "steps": None, "training_loss": None, "validation_loss": None, "validation_metrics": {}, "training_metrics": {},
        "last_epoch_partial": False, "stop_reasons": [], "error": None, "plugin_trouble": [], "last_event": None,
        "flags": config.get("flags") or {}, "hyperparameters": config.get("hyperparameters") or {},
        "ended_ts": None, "last_seq": None, "best": None, "stalled": None,
    }
    summary, summary_path = read_summary(run_dir), run_dir / SUMMARY
    if summary is None:
        pid, alive = kernel_process(run_dir)
        tail = journal_tail(journal)
        summary = read_summary(run_dir)  # the kernel may have ended meanwhile
        if summary is None and not alive and (kept := kept_summary(run_dir)) is not None:
            summary_path, summary = kept
            info["detail"] = (f"its disk was full: its summary is kept in {summary_path}; move it into {run_dir} "
                              f"once there is room")
        if summary is None:
            _from_journal_tail(info, journal, tail, pid, alive, started, now, summary_file_problem(run_dir / SUMMARY),
                               [e.ts for e in session_starts()])
            return info
    outcome = summary.get("outcome") or {}
    # a failed run's outcome says 0 steps (the loop counts them at its end): the journal's last event knows
    last = journal_tail(journal, LAST_EVENT_BYTES)[-1:] or journal_tail(journal, SMALL_TAIL_BYTES)[-1:]
    steps = max([outcome.get("steps") or 0] + [e.step for e in last])
    best = outcome.get("best_validation_loss")
    try:
        ended = summary_path.stat().st_mtime  # written last, as the kernel ended
    except OSError:
        ended = None
    info.update(
        ended_ts=ended, last_seq=last[0].seq if last else None,
        best={"validation_loss": best, "epoch": outcome.get("best_epoch")} if best is not None else None,
        status=summary["status"], duration_s=summary.get("duration_s"),
        epochs_completed=outcome.get("epochs_completed"), steps=steps,
        training_loss=outcome.get("training_loss"), validation_loss=outcome.get("validation_loss"),
        validation_metrics=outcome.get("validation_metrics") or {}, stop_reasons=outcome.get("stop_reasons") or [],
        training_metrics=outcome.get("training_metrics") or {},
        last_epoch_partial=outcome.get("last_epoch_partial") is True,
        error=summary.get("error"),
        plugin_trouble=_plugin_trouble(summary.get("plugins") or {}, summary.get("undrained") or {}))
    return info


def _from_journal_tail(info: dict[str, Any], journal: Path, tail: list[Event], pid: int | None, alive: bool | None,
                       started: float | None, now: float, summary_problem: str | None = None,
                       session_starts: list[float] = ()) -> None:
    """A run without a (readable) summary: running or died, and how far it got, from the journal's tail. Its
    duration is its latest session's, as a summary's is (session_starts: those the journal's head holds)."""
    last = tail[-1] if tail else None
    age = None if last is None else max(0.0, now - last.ts)
    if alive:
        status, detail = "running", f"kernel pid {pid} is alive"
    elif summary_problem:  # not a kernel that died before writing one: say what is wrong with what it wrote
        # how far the run got: its last event that is not a heartbeat (the bus beats on while plugins drain) nor
        # the bus's closing
        reached = next((e for e in reversed(tail) if e.type not in (ev.HEARTBEAT, ev.BUS_CLOSING)), last)
        status, detail = "died", summary_problem + (f"; the journal ends with {reached.type} (seq {reached.seq})"
                                                    if reached is not None else "")
    elif pid is not None:
        how = ("trains another run (this one is a copy of it?)" if another_runs_kernel(pid, journal.parent)
               else "is gone")
        status, detail = "died", f"kernel pid {pid} {how} and wrote no {SUMMARY}"
    elif age is not None and age < STALE_S:  # no kernel.pid of this host: heartbeats say it is going
        status, detail = "running", f"no {KERNEL_PID} of this host; the journal grew {age:.0f} s ago"
    else:
        status, detail = "died", f"no {SUMMARY} and no {KERNEL_PID} of this host" + (
            f"; the journal last grew {duration_text(age)} ago" if age is not None else "; no events")
    stall = _standing_still(journal, tail) if status == "running" else None
    if stall is not None:
        where = stall.data.get("where") if isinstance(stall.data.get("where"), str) else ""
        since = stall.ts - (stall.data["stalled_s"] if isinstance(stall.data.get("stalled_s"), (int, float)) else 0)
        info["stalled"] = {"since_ts": since, "stalled_s": round(now - since, 1), "step": stall.step,
                           "where": where or None}
        detail += (f"; training has stood still for {duration_text(now - since)} at step {stall.step}"
                   f"{f', in your code at {where}' if where else ''} (its stack: kernel.log)")
    info.update(status=status, detail=detail, pid=pid, last_event=event_brief(last, now))
    if last is None:
        return
    info["last_seq"] = last.seq
    if status == "died":
        info["ended_ts"] = last.ts
    end = now if status == "running" else last.ts
    begun = latest_session_start(journal.parent, started, end, [*session_starts, *(
        e.ts for e in tail if e.type == ev.START_TRAINING_SESSION)])
    info["duration_s"] = round(end - begun, 3) if begun is not None else None
    info["steps"] = last.step
    starts = [e for e in tail if e.type == ev.START_TRAINING_SESSION]
    if starts:
        info["epochs"] = starts[-1].data.get("epochs")
    epoch_end = next((e for e in reversed(tail) if e.type == ev.END_EPOCH), None)
    if epoch_end is None and last.epoch > 1:
        epoch_end = last_event_of(journal, ev.END_EPOCH)
    info["epochs_completed"] = max(epoch_end.epoch if epoch_end else 0, last.epoch - 1, 0)
    if epoch_end is not None:
        info["training_loss"] = epoch_end.data.get("training_loss")
        info["validation_loss"] = epoch_end.data.get("validation_loss")
        info["validation_metrics"] = epoch_end.data.get("validation_metrics") or {}
        info["training_metrics"] = epoch_end.data.get("training_metrics") or {}
    failed = next((e for e in reversed(tail) if e.type == ev.RUN_FAILED), None)
    if failed is not None:
        info["error"] = failed.data.get("error")
    stop = next((e for e in reversed(tail) if e.type == ev.STOP_REQUESTED), None)
    if stop is not None:
        info["stop_reasons"] = list(stop.data.get("reasons") or [])
    # plugin trouble in the tail only: list stays bounded (show counts the whole journal)
    plugins: dict[str, dict[str, Any]] = {}
    for e in tail:
        name = e.data.get("plugin") if isinstance(e.data.get("plugin"), str) else None
        if name and e.type == ev.PLUGIN_RESTARTED:
            plugins.setdefault(name, {"restarts": 0})["restarts"] = e.data.get("restarts", 0)
        elif name and e.type == ev.PLUGIN_FAILED:
            plugins.setdefault(name, {"restarts": 0})["state"] = "failed"
    info["plugin_trouble"] = _plugin_trouble(plugins, {})


def latest_session_start(run_dir: Path, started: float | None, end: float, session_starts) -> float | None:
    """When a run's latest session began: its last start_training_session known, or where neither the journal's
    head nor its tail holds that one (a long session), its kernel.pid's time, written as each session starts (one
    from after the run's end is a copy's, `cp -r`: no session's)."""
    known = [ts for ts in session_starts if isinstance(ts, (int, float))]
    try:
        written = (Path(run_dir) / KERNEL_PID).stat().st_mtime
        if started is not None and started <= written <= end:
            known.append(written)
    except OSError:
        pass
    return max([started, *known]) if started is not None else None


_LOOP_MOVES = frozenset(ev.LIFECYCLE_EVENTS) | {ev.TRAINING_STALLED, ev.TRAINING_RESUMED}


def _standing_still(journal: Path, tail: list[Event]) -> Event | None:
    """A running run's training_stalled not followed by its loop moving; the tail holds only heartbeats (a stall
    longer than it spans): the journal's last one."""
    moved = next((e for e in reversed(tail) if e.type in _LOOP_MOVES), None)
    if moved is None:
        moved = last_event_of(journal, ev.TRAINING_STALLED)
    return moved if moved is not None and moved.type == ev.TRAINING_STALLED else None
