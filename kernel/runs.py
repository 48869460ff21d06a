"""`trainbus runs list` and `trainbus runs show`: what a runs directory holds, read without touching a live run.

A run's status comes from its `summary.json` (completed, stopped, failed, interrupted), written when the
kernel is done. Without one the run is `running` while the kernel named in `kernel.pid` is alive (and is this
run's: a copy of a live run's directory names the original's), and `died` once it is gone (killed, out of memory,
power loss: it never got to write its summary).

`list` reads, per run, only small files and a bounded part of the journal: summary.json, config.json, the
journal's head (when the run started, how many epochs it plans) and, for a run without a summary, its tail
(where it is now). A journal of many GB costs list no more than one of a few KB. `show` reads the whole
journal, streamed, for the per-epoch table and the plugins' history.

Nothing here writes into a run directory except `write_kernel_pid`, which the kernel calls.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from trainbus.proto import JOURNAL_NAME, Event
from trainbus.proto import events as ev
from trainbus.proto import kept_files
from trainbus.proto.run_state import CLIENT_PREFIX
from trainbus.proto.text import duration_text
from trainbus.proto.journal_format import (FREQUENT_TYPES, as_event, closed_segments, journal_first, journal_head,
                                          journal_tail, last_event_of, stream_journal)

from .config import PLUGIN_NAME
from .journal_history import LIVE_PLUGIN_STATES, JournalHistory, iso_time

KERNEL_LOG = "kernel.log"  # the kernel's log, open while it runs
KERNEL_PID = "kernel.pid"  # the kernel's process id, written as the run directory is made (0600)
KERNEL_HOST = "kernel.host"  # the host it runs on (socket.gethostname()), written just before it
SUMMARY = "summary.json"
CONFIG = "config.json"
STATUSES = ("running", "completed", "stopped", "failed", "interrupted", "died")

# summary.json's fields as the kernel writes them (run_end.py RunResult), each of them may be null. One of another
# type (an edit by hand) makes the summary unreadable, as torn JSON does: what shows it would raise on it.
NUMBER = (float, int)
SUMMARY_FIELDS = {"duration_s": NUMBER, "outcome": dict, "plugins": dict, "undrained": dict, "bus": dict, "error": str}
OUTCOME_FIELDS = {"epochs_completed": int, "steps": int, "stop_reasons": list, "training_loss": NUMBER,
                  "validation_loss": NUMBER, "validation_metrics": dict, "training_metrics": dict,
                  "best_validation_loss": NUMBER, "best_epoch": int, "last_epoch_partial": bool}
PLUGIN_FIELDS = {"state": str, "reason": str, "restarts": int, "crashes": list, "crash_count": int,
                 "errors_logged": int, "checkpoints_failed": int}
TEXT_LISTS = ("stop_reasons", "crashes")  # shown joined: text items only

# An ended run's last event: in this many bytes from the end (a few dozen events, each ~150 bytes), else in
# SMALL_TAIL_BYTES (one large event last). Parsing is most of a listed run's cost: not 400 events for one.
LAST_EVENT_BYTES = 8 * 1024
SMALL_TAIL_BYTES = 64 * 1024
STALE_S = 10.0  # no kernel.pid (a run from before there was one): heartbeats every second, or it is gone


class RunLookupError(Exception):
    """No such run, or no runs directory: a mistake the user can fix (the CLI prints one line, exit 2)."""


class AmbiguousRunError(RunLookupError):
    """A start of a run id that more than one run has; the message lists them."""


# -- the kernel's pid file -----------------------------------------------------------------------

def write_kernel_pid(run_dir: Path) -> None:
    """Record this process as the run's kernel (owner-only; replaced whole when a run is continued)."""
    # The host first, in kernel.host: a reader elsewhere (a runs directory on a shared filesystem, a connection.json
    # read in place) must not take another machine's pid for one of its own. kernel.pid stays the bare pid.
    for name, text in ((KERNEL_HOST, socket.gethostname()), (KERNEL_PID, str(os.getpid()))):
        path = Path(run_dir) / name
        temporary = path.with_name(f".{name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.write(fd, f"{text}\n".encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)


def kernel_elsewhere(run_dir: Path) -> bool:
    """The run's kernel.host names another machine than this one."""
    try:
        return (Path(run_dir) / KERNEL_HOST).read_text().strip() not in ("", socket.gethostname())
    except OSError:  # none: a run from before kernel.host, taken as this host's
        return False


def kernel_process(run_dir: Path) -> tuple[int | None, bool | None]:
    """(pid, alive) of the run's kernel per its kernel.pid; (None, None) when there is no readable one.

    A process with that pid that started after the file was written is someone else (the pid was reused). A
    kernel of another host (a runs directory on a shared filesystem) is (None, None) too: its pid means nothing
    here, and the journal's heartbeats tell instead.
    """
    path = Path(run_dir) / KERNEL_PID
    try:
        text, written = path.read_text(), path.stat().st_mtime
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None, None
    if kernel_elsewhere(run_dir):
        return None, None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.create_time() > written + 1.0:
            return pid, False
    except psutil.NoSuchProcess:
        return pid, False
    except psutil.AccessDenied:
        pass  # it exists; whose it is cannot be told: alive
    return pid, not another_runs_kernel(pid, run_dir)


def another_runs_kernel(pid: int, run_dir: Path) -> bool:
    """The process keeps another run directory's kernel.log open: the run's kernel.pid came with a copy of that
    directory (`cp -r` of a live run), whose kernel is alive, but not this run's. One with no kernel.log open (the
    moments before it opens it, a process it cannot read) may be this run's."""
    import psutil

    try:
        logs = {Path(f.path) for f in psutil.Process(pid).open_files() if Path(f.path).name == KERNEL_LOG}
    except psutil.Error:
        return False
    return bool(logs) and Path(run_dir).resolve() / KERNEL_LOG not in logs


# -- finding runs --------------------------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    """A folder with a config.json or a journal; one that cannot be looked into (someone else's, 0700; a disk error)
    counts as one, which `runs list` lists unreadable, saying why, rather than failing on it: but for the
    lost+found of a runs directory at a filesystem's root (root's, 0700), which no run is."""
    try:
        return (path / CONFIG).is_file() or (path / JOURNAL_NAME).is_file()
    except OSError:
        return path.name != "lost+found"


def find_runs(runs_dir: Path) -> list[Path]:
    """The run directories in runs_dir (folders with a config.json or a journal), in name order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunLookupError(no_runs_dir(runs_dir))
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p))


def no_runs_dir(runs_dir: Path) -> str:
    """Why runs_dir holds no runs: a file where the directory should be is a different mistake from a typo."""
    if runs_dir.exists():
        return f"the runs directory {runs_dir.resolve()} is a file, not a directory (is --runs-dir right?)"
    return f"the runs directory {runs_dir.resolve()} does not exist (is --runs-dir right?)"


def resolve_run(run: str, runs_dir: Path) -> Path:
    """The run directory `run` names: a folder of runs_dir, a run directory's path, or a unique id prefix."""
    runs_dir = Path(runs_dir)
    if not run.strip():  # runs_dir / "" is the runs directory itself
        raise RunLookupError("no run given (an empty id): give a run id, a unique start of one, or a run directory "
                             "(`trainbus runs list` shows them)")
    path_like = os.sep in run or run.startswith(".")
    for candidate in (runs_dir / run, Path(run)) if path_like else (runs_dir / run,):
        if candidate.is_dir() and is_run_dir(candidate):
            return _readable(candidate.resolve())
    if not runs_dir.is_dir():
        raise RunLookupError(f"no run {run!r}: {no_runs_dir(runs_dir)}")
    if run and not path_like:
        from .registry import runs_without_directory  # the registry reads runs (this module)

        matches = [p for p in find_runs(runs_dir) if p.name.startswith(run)]
        # a queued run, or one that failed before it had a directory, shares the prefix too: `runs delete` of the
        # prefix must not pick the one with a directory
        pending = runs_without_directory(runs_dir, run)
        names = [p.name for p in matches]
        names += [i for i, _, _ in pending if i not in names]
        if len(names) > 1:
            raise AmbiguousRunError(f"run {run!r} is ambiguous in {runs_dir.resolve()}: "
                                    f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''} (give more of the id)")
        if matches:
            return _readable(matches[0].resolve())
        if pending:  # queued, or failed before its kernel made a directory: there, but with nothing to read
            run_id, status, detail = pending[0]
            raise RunLookupError(f"run {run_id} is {status} and has no run directory"
                                 + (" yet" if status == "queued" else "" if status == "cancelled"
                                    else " (it ended before its kernel made one)")
                                 + (f" ({detail})" if detail else "")
                                 + ("; it has one once the daemon starts it (`trainbus daemon status` shows the "
                                    "queue)" if status == "queued" else "")
                                 + ("; submit it again to train it" if status == "cancelled" else ""))
    if path_like and Path(run).resolve() == (runs_dir / run).resolve():  # an absolute path: one place looked at
        looked = f"{Path(run).resolve()} is not a run directory (no {CONFIG}, no journal)"
    elif path_like:
        looked = f"neither {Path(run).resolve()} nor {(runs_dir / run).resolve()} is a run directory"
    elif (runs_dir / run).is_dir():  # made, but nothing a run writes first is in it (a kernel still starting)
        looked = f"{(runs_dir / run).resolve()} holds neither a {CONFIG} nor a journal"
    else:
        looked = f"{(runs_dir / run).resolve()} does not exist, and no run id there starts with {run!r}"
    raise RunLookupError(f"no run {run!r}: {looked} {RUNS_DIR_HINT}")


# what the host's user checks when no run has that id (a remote key has neither: kernel/daemon_serve.py says its own)
RUNS_DIR_HINT = "(is --runs-dir right? `trainbus runs list` shows the runs)"


def _readable(run_dir: Path) -> Path:
    """run_dir, when this user can look into it; else RunLookupError in one line (it was a traceback from whatever
    read it first)."""
    try:
        with os.scandir(run_dir):
            return run_dir
    except OSError as exc:
        raise RunLookupError(f"run {run_dir.name} cannot be read: {run_dir}: {exc.strerror or exc} (another user's "
                             f"run directory, or a disk error); `trainbus runs list --status unreadable` lists "
                             f"such runs") from None


# -- what a run is -------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's contents; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# config.json's fields that reading a run goes by, as the kernel writes them (run_dir.py effective_config). One of
# another type (an edit by hand) is read as missing, as in a run from before trainbus recorded it: what shows it
# would raise on it, and one such run would hide every other run of the directory.
CONFIG_FIELDS = {"target": str, "epochs": int, "flags": dict, "hyperparameters": dict, "plugins": list,
                 "metrics": list, "launch": dict, "cwd": str}


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, less each CONFIG_FIELDS field of another type; {} when it is missing, unreadable or
    not an object."""
    config = read_json(Path(run_dir) / CONFIG) or {}
    return {key: value for key, value in config.items()
            if key not in CONFIG_FIELDS or isinstance(value, CONFIG_FIELDS[key]) and not isinstance(value, bool)}


def config_problem(run_dir: Path) -> str | None:
    """What reading a run's config.json leaves out (read_config), as runs show warns of it; None when it is whole or
    there is none."""
    try:
        config = json.loads((Path(run_dir) / CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{CONFIG} is unreadable ({exc}): runs show leaves out its target, flags and hyperparameters"
    if not isinstance(config, dict):
        return f"{CONFIG} holds {_json_kind(config)}, not an object: runs show leaves out its target, flags and " \
               f"hyperparameters"
    wrong = [f"{key} is {_json_kind(config[key])}, not {_json_kind(kind)}" for key, kind in CONFIG_FIELDS.items()
             if config.get(key) is not None and key not in read_config(run_dir)]
    return f"{CONFIG}'s {'; its '.join(wrong)}: runs show leaves them out" if wrong else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json's contents when it holds a run status and each field the kernel writes has its type; None
    otherwise (_unreadable says why)."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary if summary is not None and _summary_problem(summary) is None else None


def _summary_problem(summary: Any) -> str | None:
    """What is wrong with a summary.json's contents, as "holds no run status" or "is unreadable (its
    outcome.steps is text, not a number)"; None for a summary as the kernel writes them."""
    if not isinstance(summary, dict) or summary.get("status") not in STATUSES:
        return "holds no run status"
    checks = [("", summary, SUMMARY_FIELDS)]
    if isinstance(summary.get("outcome"), dict):
        checks.append(("outcome.", summary["outcome"], OUTCOME_FIELDS))
    for name, p in (summary["plugins"] if isinstance(summary.get("plugins"), dict) else {}).items():
        if not isinstance(p, dict):
            return f"is unreadable (its plugins.{name} is {_json_kind(p)}, not an object)"
        checks.append((f"plugins.{name}.", p, PLUGIN_FIELDS))
    for prefix, fields, types in checks:
        for key, kind in types.items():
            value = fields.get(key)
            if value is not None and not isinstance(value, kind):
                return f"is unreadable (its {prefix}{key} is {_json_kind(value)}, not {_json_kind(kind)})"
            if key in TEXT_LISTS and value and not all(isinstance(item, str) for item in value):
                return f"is unreadable (its {prefix}{key} holds an item that is not text)"
    duration = summary.get("duration_s")
    if isinstance(duration, float) and not math.isfinite(duration):  # json reads Infinity; no clock says it
        return f"is unreadable (its duration_s is {duration}, not a number of seconds)"
    return None


def _json_kind(value: Any) -> str:
    """What JSON calls a value's type, or a type's (NUMBER's too)."""
    kind = value[0] if isinstance(value, tuple) else value if isinstance(value, type) else type(value)
    return {dict: "an object", list: "a list", str: "text", bool: "true or false", int: "a whole number",
            float: "a number"}.get(kind, kind.__name__)


def _event_brief(event: Event | None, now: float) -> dict[str, Any] | None:
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
            _from_journal_tail(info, journal, tail, pid, alive, started, now, _unreadable(run_dir / SUMMARY),
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


def kept_summary(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The summary this run's kernel kept in the temporary directory because the run directory's disk refused it
    (proto/kept_files.py), with its path, when it reads as a summary.json does; else None. A run whose disk filled
    up was listed `died`."""
    kept = kept_files.kept_summary(run_dir.name)
    return kept if kept is not None and _summary_problem(kept[1]) is None else None


def _unreadable(path: Path) -> str | None:
    """Why a summary.json that is there says nothing (torn, emptied, edited by hand); None when there is none."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{path.name} is unreadable ({exc})"
    problem = _summary_problem(value)
    return f"{path.name} {problem}" if problem else None


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
    info.update(status=status, detail=detail, pid=pid, last_event=_event_brief(last, now))
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


def list_runs(runs_dir: Path, now: float | None = None) -> list[dict[str, Any]]:
    """Every run of runs_dir in brief (run_overview), newest first."""
    now = time.time() if now is None else now
    return newest_first([overview_or_unreadable(run_dir, now) for run_dir in find_runs(runs_dir)])


def overview_or_unreadable(run_dir: Path, now: float) -> dict[str, Any]:
    """run_overview, or for a run that cannot be read (someone else's, 0700; a disk error) a row that says so."""
    try:
        return run_overview(run_dir, now)
    except OSError as exc:  # every key a readable run's has (a script reads --json's entries by key), none known
        return {"id": run_dir.name, "dir": str(run_dir.resolve()), "status": "unreadable",
                "detail": f"{exc.strerror or exc}", "pid": None, "target": None, "started_at": None,
                "started_ts": None, "duration_s": None, "epochs_completed": None, "epochs": None, "steps": None,
                "training_loss": None, "validation_loss": None, "validation_metrics": {}, "training_metrics": {},
                "last_epoch_partial": False, "stop_reasons": [], "error": None, "plugin_trouble": [],
                "last_event": None, "flags": {}, "hyperparameters": {}, "ended_ts": None, "last_seq": None,
                "best": None, "stalled": None}


def newest_first(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest start first; runs that have not started (queued for the daemon) above them, by id (submission)."""
    return sorted(runs, key=lambda r: (r.get("started_ts") is None and r.get("status") == "queued",
                                       r.get("started_ts") or _cancelled_ts(r), r["id"]), reverse=True)


def _cancelled_ts(run: dict[str, Any]) -> float:
    """Where a run that never started is listed: a cancelled one when it was taken off the queue, not last."""
    return (run.get("ended_ts") or 0.0) if run.get("status") == "cancelled" else 0.0


PROGRESS_EVERY_RECORDS = 65_536  # run_details's progress: a call per this many records read


def run_details(run_dir: Path, now: float | None = None, progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
    """run_overview plus what only the whole journal (streamed) holds: epochs, plugins, checkpoints; and files.

    Added keys: sessions (one per start_training_session: a continued run has several), device, model,
    parameters, cluster (the latest session's: where it trained), hyperparameters, epoch_table (one row per epoch;
    a repeated epoch's latest row), best
    (the lowest validation loss and its epoch), plugins ({name: state, restarts, crashes, log, ...}),
    checkpoints (saved paths, and counts of failed, skipped and unwritten: taken, never answered), undrained, bus,
    files. `progress`: called with the seq reached every PROGRESS_EVERY_RECORDS records (a run of days: 10^7).
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir).resolve()
    info = run_overview(run_dir, now)
    summary = read_summary(run_dir) or {}
    config = read_config(run_dir)
    history = JournalHistory(p["name"] for p in config.get("plugins") or []
                             if isinstance(p, dict) and isinstance(p.get("name"), str))
    journal = run_dir / JOURNAL_NAME
    last_record: dict[str, Any] | None = None
    damage: list[str] = []
    for read, record in enumerate(stream_journal(journal, damage) if journal.is_file() else (), start=1):
        last_record = record
        if progress is not None and read % PROGRESS_EVERY_RECORDS == 0:
            progress(record["seq"])
        if record["type"] not in FREQUENT_TYPES:
            history.read(as_event(record))
    plugins, sessions, saved = history.plugins, history.sessions, history.saved
    for name, p in (summary.get("plugins") or {}).items():  # the supervisor's own account wins where there is one
        if isinstance(p, dict):
            plugins.setdefault(name, {}).update({k: p[k] for k in ("state", "restarts", "crashes", "crash_count",
                                                                  "errors_logged", "checkpoints_failed", "left_early",
                                                                  "greeted", "detached", "hello_trouble",
                                                                  "metric_dropped", "log_dropped", "votes_missed")
                                                   if k in p})
    if info["status"] != "running":  # over: what the journal last said of a peer is no longer what it does
        told = summary.get("plugins") or {}  # a peer attached by hand whose bye came late or never, or a died run's
        for name, p in plugins.items():
            if name not in told and p.get("state") in LIVE_PLUGIN_STATES:
                died = info["status"] == "died"
                p["state"] = "gone with the kernel" if died else "gone with the run (no bye journaled)"
    undrained = summary.get("undrained") or {}
    # `trainbus attach` clients come and go as peers too: views of the run, listed apart from its plugins
    attached = sorted(name for name in plugins if name.startswith(CLIENT_PREFIX))
    for name in attached:
        del plugins[name]
    for name, p in plugins.items():
        # only a plugin the run spawned has a log, under a name its config checked; a peer attached by hand says hello
        # under any string (300 characters, "../kernel"), which names no file of ours, or one too long to stat
        log_file = run_dir / "plugins" / f"{name}.log"
        p["log"] = str(log_file) if PLUGIN_NAME.fullmatch(name) and log_file.is_file() else None
        if name in undrained:
            p["undrained_acked_seq"] = undrained[name]
    for c in saved:  # the checkpoint plugin's retention (save_top_k, max_total) removes most as the run goes
        c["path"] = _where_now(c["path"], run_dir)
        c["present"] = isinstance(c["path"], str) and os.path.isfile(c["path"])
    session = sessions[-1] if sessions else {}
    rows = [history.epochs[k] for k in sorted(history.epochs)]
    # the best of whole epochs, as the loop's (summary.json's) is: a partial epoch's validation is not comparable
    losses = [(row["validation_loss"], row["epoch"]) for row in rows
              if isinstance(row.get("validation_loss"), float) and not row["partial"]]
    losses = [pair for pair in losses if not math.isnan(pair[0])] or losses  # NaN, less than nothing, is no best
    best = dict(zip(("validation_loss", "epoch"), min(losses))) if losses else None
    journal_lost = damage or not journal.is_file()
    if journal_lost and info.get("best"):  # epochs the journal lost: the loop's own best (summary.json) saw them all
        best = info["best"]
    if not journal.is_file() and info["status"] != "running":  # a kernel starting has not made it yet
        # deleted (an `rm`, a cleanup script): what only the journal held is left out, which must not pass for none
        damage.append(f"the journal {journal} is not there (deleted?): the run's per-epoch metrics, its plugins' "
                      f"history and its checkpoints are in it")
    info.update(
        sessions=sessions, device=session.get("device"), model=session.get("model"), cluster=session.get("cluster"),
        parameters=session.get("parameters"),
        hyperparameters=session.get("hyperparameters", config.get("hyperparameters")),
        epoch_table=rows, best=best, plugins=plugins, attached=attached,
        checkpoints={"saved": saved, **history.checkpoint_counts, "unwritten": len(history.unanswered_saves)},
        undrained=undrained,
        bus=summary.get("bus") or {}, files=_files(run_dir), journal_damage=damage,
        journal_compacted=_compacted(journal),
        config_damage=config_problem(run_dir))
    if info["error"] is None and history.error is not None:
        info["error"] = history.error
    last = as_event(last_record) if last_record is not None else None
    if last is not None and info["status"] in ("running", "died"):
        info["last_event"] = _event_brief(last, now)
        if info["status"] == "running":  # the streamed read went further than the overview's tail
            info["steps"] = last.step
    if info["status"] in ("running", "died") and rows:
        info["epochs_completed"] = max(info["epochs_completed"] or 0, rows[-1]["epoch"])
    return info


def _where_now(path: Any, run_dir: Path) -> Any:
    """A path the journal holds of a file inside the run's directory as it was then, inside run_dir now: a runs
    directory moved or copied elsewhere keeps its checkpoints, under the path they were saved at no longer."""
    if not isinstance(path, str):
        return path
    parts = Path(path).parts
    if Path(path).is_relative_to(run_dir) or run_dir.name not in parts:
        return path
    return str(run_dir.joinpath(*parts[parts.index(run_dir.name) + 1:]))


def _compacted(journal: Path) -> dict[str, int]:
    """How much of the journal compaction thinned (PROTOCOL.md §13): its closed segments, those compacted, and the
    last seq of the newest compacted one (0: none)."""
    segments = closed_segments(journal)
    compacted = [s for s in segments if s.compacted]
    return {"segments": len(segments), "compacted": len(compacted),
            "through_seq": compacted[-1].last if compacted else 0}


def _files(run_dir: Path) -> list[dict[str, Any]]:
    """What the run directory holds: its files and folders at the top, and each plugin's files."""
    found = []
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return found
    for path in entries:
        try:
            if path.is_dir():
                files = [p for p in path.rglob("*") if p.is_file()]
                found.append({"path": str(path), "kind": "folder", "files": len(files),
                              "bytes": sum(p.stat().st_size for p in files)})
                if path.name == "plugins":
                    found += [{"path": str(p), "kind": "file", "bytes": p.stat().st_size} for p in sorted(files)]
            elif path.is_file():
                found.append({"path": str(path), "kind": "file", "bytes": path.stat().st_size})
        except OSError:
            continue
    return found
