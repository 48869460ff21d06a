"""A runs directory's runs: found by folder, path or a unique start of an id, and listed in brief (run_overview).

`trainbus runs list` and `trainbus runs show` read what a runs directory holds without touching a live run:
kernel/run_overview.py reads a run in brief, kernel/run_details.py in full, from its files
(kernel/run_json.py, kernel/kernel_pid.py).
"""

from __future__ import annotations

import os
import secrets
import shlex
import time
from pathlib import Path
from typing import Any

from trainbus.proto import JOURNAL_NAME

from .run_json import CONFIG
from .run_overview import run_overview


def new_run_id() -> str:
    """A new run's id: when it started, then 6 random hex digits (sorted, the runs list in the order they began)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


class RunLookupError(Exception):
    """No such run, or no runs directory: a mistake the user can fix (the CLI prints one line, exit 2)."""


class AmbiguousRunError(RunLookupError):
    """A start of a run id that more than one run has; the message lists them."""


def runs_dir_option(runs_dir: Path) -> str:
    """` --runs-dir DIR` for a command suggested about runs_dir when it is not the default ./runs, else "": quoted as
    a shell takes it (`~/My Experiments/runs` pasted bare is two words)."""
    from .config import RunConfig

    if Path(runs_dir).resolve() == Path(RunConfig.runs_dir).resolve():
        return ""
    return f" --runs-dir {shlex.quote(str(runs_dir))}"


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
    try:
        return sorted(p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p))
    except OSError as exc:  # someone else's runs directory (0700), or a disk error: was a traceback
        raise RunLookupError(unreadable_runs_dir(runs_dir, exc)) from None


def unreadable_runs_dir(runs_dir: Path, exc: OSError) -> str:
    """Why runs_dir's runs cannot be listed though it is there."""
    return (f"cannot read the runs directory {Path(runs_dir).resolve()}: {exc.strerror or exc} (another user's, or a "
            f"disk error; is --runs-dir right?)")


def check_readable(runs_dir: Path) -> None:
    """RunLookupError for a runs directory this user cannot read: said so, not a traceback from whatever looks in it
    first (its registry, a run's directory)."""
    try:
        os.scandir(runs_dir).close()
    except OSError as exc:
        raise RunLookupError(unreadable_runs_dir(runs_dir, exc)) from None


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
    if not path_like and runs_dir.is_dir():
        check_readable(runs_dir)
    for candidate in (runs_dir / run, Path(run)) if path_like else (runs_dir / run,):
        try:
            if candidate.is_dir() and is_run_dir(candidate):
                return _readable(candidate.resolve())
        except OSError:  # a folder on its path this user cannot search: not there for them (the error below)
            continue
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
            if status == "unreadable":  # its row garbled by hand: the detail says which columns, and the fix
                raise RunLookupError(f"run {run_id} has no run directory, and {detail}")
            raise RunLookupError(f"run {run_id} is {status} and has no run directory"
                                 + (" yet" if status == "queued" else "" if status == "cancelled"
                                    else " (it ended before its kernel made one)")
                                 + (f" ({detail})" if detail else "")
                                 + ("; it has one once the daemon starts it (`trainbus daemon status"
                                    f"{runs_dir_option(runs_dir)}` shows the queue)" if status == "queued" else "")
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
