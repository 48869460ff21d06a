"""The registry's two tables as columns, and a row written and read back: each value as SQLite takes it, and a
row edited or damaged by hand checked column by column, so that no reader meets a traceback."""

from __future__ import annotations

import json
import math
from typing import Any

from .journal_history import iso_time
from .run_json import STATUSES as RUN_STATUSES

QUEUED = "queued"  # a run the daemon has not started: it has no directory yet
CANCELLED = "cancelled"  # a queued run taken off the queue before it started: it never had a directory
STATUSES = (QUEUED, *RUN_STATUSES, CANCELLED)

# The columns, and which of them hold JSON (dicts and lists); every other value is a plain SQL value.
COLUMNS = {
    "id": "TEXT PRIMARY KEY", "dir": "TEXT", "status": "TEXT NOT NULL", "detail": "TEXT", "pid": "INTEGER",
    "target": "TEXT", "flags": "TEXT", "started_ts": "REAL", "ended_ts": "REAL", "duration_s": "REAL",
    "epochs_completed": "INTEGER", "epochs": "INTEGER", "steps": "INTEGER", "last_seq": "INTEGER",
    "training_loss": "REAL", "validation_loss": "REAL", "validation_metrics": "TEXT",
    "best_validation_loss": "REAL", "best_epoch": "INTEGER", "stop_reasons": "TEXT", "error": "TEXT",
    "plugin_trouble": "TEXT", "last_event": "TEXT", "observed_ts": "REAL NOT NULL", "hyperparameters": "TEXT",
    "training_metrics": "TEXT", "last_epoch_partial": "INTEGER",
}
# SQLite stores a NaN as NULL, which `runs list` shows as nothing measured: a diverged run's NaN losses are kept as
# this text instead (a REAL column keeps text that is no number as text) and read back as NaN.
NAN_TEXT = "NaN"
_REAL_COLUMNS = tuple(name for name, kind in COLUMNS.items() if kind.startswith("REAL"))
JSON_COLUMNS = ("flags", "validation_metrics", "stop_reasons", "plugin_trouble", "last_event", "hyperparameters",
                "training_metrics")

# The daemon's queue (submitted by kernel/daemon_queue.py, started by kernel/daemon.py): how to start each submitted
# run, and where its process is. A job's run also has a row in `runs` from the moment it is queued (status queued,
# no dir), which its kernel's own record replaces once it has a directory.
JOB_COLUMNS = {
    "id": "TEXT PRIMARY KEY", "state": "TEXT NOT NULL", "submitted_ts": "REAL NOT NULL", "argv": "TEXT NOT NULL",
    "cwd": "TEXT NOT NULL", "env": "TEXT", "gpus": "INTEGER", "devices": "TEXT", "pid": "INTEGER",
    "pid_started": "REAL", "started_ts": "REAL", "ended_ts": "REAL", "exit_code": "INTEGER", "detail": "TEXT",
    "submitted_by": "TEXT",  # who queued it: the owner's user name, or a remote peer's key (`key NAME`)
    "resumes_left": "INTEGER",  # `--max-resumes`: how many more times the daemon continues the run if it dies
    "python": "TEXT",  # the submitter's interpreter (its virtual environment's); NULL: the daemon's (a remote peer's)
}
JOB_JSON_COLUMNS = ("argv", "env", "devices")


def text_list(stored: str | None) -> list[str]:
    """A JSON list-of-text column as the list of its text items ([] for NULL, or a value damaged by hand)."""
    try:
        value = json.loads(stored) if stored else []
    except ValueError:
        return []
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def to_row(run: dict[str, Any], observed_ts: float) -> tuple:
    best = run.get("best") or {}
    values = {**run, "best_validation_loss": best.get("validation_loss"), "best_epoch": best.get("epoch"),
              "observed_ts": observed_ts}
    return tuple(json.dumps(values.get(n), default=str) if n in JSON_COLUMNS else storable(values.get(n))
                 for n in COLUMNS)


# What each job column must hold, for a row written by hand or damaged: the daemon fails such a job with the reason
# instead of stalling its queue on it, and status and `runs list` show it instead of raising.
_JOB_CHECKS = {
    "argv": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
    "env": lambda v: v is None or isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                             for k, x in v.items()),
    "devices": lambda v: v is None or isinstance(v, list) and all(isinstance(d, str) for d in v),
    "gpus": lambda v: v is None or isinstance(v, int) and v >= 0,
    "cwd": lambda v: isinstance(v, str),
    "resumes_left": lambda v: v is None or isinstance(v, int) and v >= 0,
    "python": lambda v: v is None or isinstance(v, str),
}
_JOB_FALLBACK = {"argv": [], "env": None, "devices": None, "gpus": None, "cwd": ".", "resumes_left": None,
                 "python": None}


def _checked_row(row: tuple, columns, json_columns, checks: dict, fallback: dict) -> tuple[dict[str, Any], list[str]]:
    """A row by column name, its JSON decoded, and the columns that are not what trainbus writes (each then its
    fallback: a row edited or damaged by hand must not cost every reader a traceback)."""
    values, bad = {}, []
    for name, value in zip(columns, row):
        if name in json_columns and value is not None:
            try:
                value = json.loads(value)
            except (TypeError, ValueError):
                value = fallback.get(name)
                bad.append(name)
        if name in checks and name not in bad and not checks[name](value):
            value = fallback.get(name)
            bad.append(name)
        values[name] = value
    return values, bad


def job_from_row(row: tuple) -> dict[str, Any]:
    """A job as the queue holds it; `unreadable` says why when a column is not what the daemon wrote."""
    job, bad = _checked_row(row, JOB_COLUMNS, JOB_JSON_COLUMNS, _JOB_CHECKS, _JOB_FALLBACK)
    if bad:
        job["unreadable"] = f"its queue row's {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not what " \
                            f"trainbus writes"
    return job


def job_row(job: dict[str, Any]) -> tuple:
    return tuple(json.dumps(job.get(n)) if n in JOB_JSON_COLUMNS and job.get(n) is not None else storable(job.get(n))
                 for n in JOB_COLUMNS)


def storable(value: Any) -> Any:
    """A value SQLite takes, where it would fail the whole write, and every `runs list` after it: a lone surrogate
    (a file name that is not UTF-8, in a run's error as an older summary.json holds it) escaped, an integer past
    SQLite's 64 bits (a run's files from elsewhere, or from before epochs had a bound) as a float."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        return float(value)
    if isinstance(value, float) and math.isnan(value):
        return NAN_TEXT
    return value


def _number(value: Any) -> bool:
    return value is None or value == NAN_TEXT or isinstance(value, (int, float)) and not isinstance(value, bool)


# What each runs column must hold, for a row written by hand or damaged: such a row is read again from its run
# directory (`runs list`), or, for a run that has none, listed unreadable; never a traceback for every run.
_ROW_CHECKS = {
    "status": lambda v: v in STATUSES, "observed_ts": lambda v: isinstance(v, (int, float)),
    **{n: lambda v: v is None or isinstance(v, str) for n in ("dir", "detail", "target", "error")},
    **{n: lambda v: v is None or isinstance(v, int) for n, kind in COLUMNS.items() if kind == "INTEGER"},
    **{n: _number for n in _REAL_COLUMNS if n != "observed_ts"},
    **{n: lambda v: v is None or isinstance(v, dict) for n in ("flags", "validation_metrics", "hyperparameters",
                                                                "training_metrics", "last_event")},
    **{n: lambda v: v is None or isinstance(v, list) and all(isinstance(i, str) for i in v)
       for n in ("stop_reasons", "plugin_trouble")},
}
_ROW_FALLBACK = {"status": "unreadable", "observed_ts": 0.0}


def from_row(row: tuple, now: float) -> dict[str, Any]:
    """A row as run_overview's dict; `unreadable_row` names the columns that are not what trainbus writes."""
    run, bad = _checked_row(row, COLUMNS, JSON_COLUMNS, _ROW_CHECKS, _ROW_FALLBACK)
    for name in _REAL_COLUMNS:
        if run[name] == NAN_TEXT:
            run[name] = math.nan
    run["training_metrics"] = run["training_metrics"] or {}  # a row from before the column: none known
    run["last_epoch_partial"] = bool(run["last_epoch_partial"])  # 0/1 in SQL; NULL before the column: not known
    best, epoch = run.pop("best_validation_loss"), run.pop("best_epoch")
    run["best"] = {"validation_loss": best, "epoch": epoch} if best is not None else None
    run["started_at"] = iso_time(run["started_ts"])
    if run["last_event"] and run["status"] == "died" and run["ended_ts"] is not None:
        run["last_event"]["age_s"] = round(max(0.0, now - run["ended_ts"]), 1)  # the age as of now
    run.pop("observed_ts")
    run["stalled"] = None  # only a running run's, which every list reads anew from its journal
    if bad:
        run["unreadable_row"] = bad
    return run


def unreadable_row(run: dict[str, Any]) -> dict[str, Any]:
    """A run the registry alone holds whose row is damaged, as `runs list` shows it: what it is and the fix."""
    bad = run.pop("unreadable_row")
    return {**run, "status": "unreadable", "detail": f"its row in the run registry ({', '.join(bad)}) is not what "
                                                     f"trainbus writes: `trainbus runs delete {run['id']}` removes it"}
