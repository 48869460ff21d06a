"""The daemon's queue as its clients see and change it: submit and cancel a run, find the runs an id names, and say
why a run cannot be resumed, for the CLI on the host and the daemon's remote endpoint (kernel/daemon_serve.py).

They read and write the registry (kernel/registry.py) themselves, so they work whether or not a daemon serves: the
daemon (kernel/daemon.py) starts what is queued at its next round, at once when a submission wakes it, and shares
the lookups here (named, ids_starting, kernel_since, the options of a submitted command line).
"""

from __future__ import annotations

import getpass
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from .checkpointing import has_checkpoints, no_checkpoints
from .daemon_client import request
from .daemon_files import make_daemon_dir, output_file, unwatched_tail
from .registry import (JOB_ACTIVE, JobError, Registry, RegistryError, as_started, cannot_read,
                       has_registry, queued_resume, resume_started, unreadable_row)
from .kernel_pid import KERNEL_PID
from .run_json import CONFIG
from .run_overview import run_overview
from .runs import RunLookupError, find_runs, resolve_run, runs_dir_option

RESUME_FAILED = "its resume ended before training"  # how a job's detail says so (`daemon status` shows it)
RESUMED_STATUSES = ("died", "interrupted")  # what a run submitted with --max-resumes is continued from by itself
STATUS_ENDED = 10  # `status` lists this many of the runs it ended last (a remote key has no `runs list`)


# -- resuming: whether a run can be now, and whether the daemon would by itself --------------------------

def why_not_resumable(run_dir: Path, epochs: int | None, rank: bool = False, remote: bool = False,
                      detach: bool = False) -> str | None:
    """Why the run in run_dir cannot be resumed now, in one line with the fix; None when it can: it is still going
    (unless `rank`: a rank of --nproc sees rank 0's kernel, its own run), its resume waits in the queue, or it
    has trained every epoch it planned and `epochs` asks for no more. `remote`: said to a key's `daemon submit`,
    whose fixes are the remote commands (it has no `runs stop` or `run` on the daemon's host); `detach`: asked of
    `run --resume --detach`, whose fix queues it for the daemon too."""
    run = run_overview(run_dir)
    stop = (f"trainbus daemon cancel {run_dir.name} --remote ..." if remote
            else f"trainbus runs stop {run_dir.name}{_runs_dir_option(run_dir)}")
    if run["status"] == "running" and not rank:
        return (f"run {run_dir.name} is still going" + (f" (kernel pid {run['pid']})" if run.get("pid") else "")
                + f": wait for it to end, or stop it with `{stop}`")
    try:
        queued = queued_job(run_dir.parent, run_dir.name) == run_dir.name
    except (sqlite3.Error, RegistryError, OSError):  # an unreadable queue: the journal's lock stands
        queued = False
    if queued:  # resumed now, the daemon would resume it again afterwards (and fail: nothing left to resume)
        return (f"run {run_dir.name} is queued for the daemon to resume: take it off the queue first "
                f"(`{stop}`), or let the daemon resume it")
    checkpointed = has_checkpoints(run_dir)
    done = run.get("epochs_completed") or 0
    longer = (f"trainbus daemon submit --remote ... -- --resume {run_dir.name} --epochs N" if remote
              else f"trainbus run --resume {run_dir.name}{_runs_dir_option(run_dir)}{' --detach' * detach} --epochs N")
    if run["status"] == "completed" and (epochs is None or epochs <= done):
        return (f"run {run_dir.name} has completed ({done} epoch{'s' * (done != 1)}); nothing to resume " + (
            f"(to train it longer: `{longer}` with N above {done})" if checkpointed
            else "(it has no checkpoint to train on from: run it again, with more epochs)"))
    if not checkpointed:  # what its kernel would refuse with, once started: said at submission
        return no_checkpoints(run_dir.name, run_dir)
    if epochs is not None and epochs <= done and not rank:  # it would "complete" having trained nothing
        return (f"run {run_dir.name} has trained {done} epochs; --epochs {epochs} would train none: give more than "
                f"{done}, or leave --epochs out to train the epochs it planned")
    return None


def _runs_dir_option(run_dir: Path) -> str:
    """` --runs-dir DIR` for a command suggested about a run outside the default ./runs; else ""."""
    return runs_dir_option(Path(run_dir).parent)


def resumed_when_settled(runs_dir: Path, job: dict[str, Any]) -> int | None:
    """The resumes left to a started job of runs_dir whose process is gone when a daemon started now would resume it
    as it settles it (Daemon._settle: its run died or was interrupted, it has a checkpoint, it was submitted with
    --max-resumes and has some left); None when that daemon records it as ended."""
    left, run_dir = job.get("resumes_left") or 0, Path(runs_dir) / job["id"]
    if not left or not (run_dir / CONFIG).is_file() or not has_checkpoints(run_dir) \
            or not kernel_since(run_dir, job.get("pid_started")):  # a resume refused before it trained: not again
        return None
    return left if run_overview(run_dir, time.time())["status"] in RESUMED_STATUSES else None


def ended_jobs(registry: Registry) -> list[dict[str, Any]]:
    """The STATUS_ENDED jobs that ended last, each with how it went: its run's status and error, except for a resume
    refused before training, whose run is still as it last ended (failed, with the job's detail as the error)."""
    return [{**job, "status": "failed", "error": job["detail"]} if str(job.get("detail")).startswith(RESUME_FAILED)
            else job for job in registry.ended_jobs(STATUS_ENDED)]


def kernel_since(run_dir: Path, ts: float | None) -> bool:
    """A kernel started in run_dir at or after ts (each kernel writes its kernel.pid as it starts)."""
    try:
        return ts is None or (run_dir / KERNEL_PID).stat().st_mtime >= ts - 1.0
    except OSError:
        return False


def last_option(argv: list[str], flag: str) -> str | None:
    """The value the last `FLAG VALUE` or `FLAG=VALUE` among a submitted command line's words gives; None if none."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(f"{flag}="):
            value = word.split("=", 1)[1]
    return value


def without_option(argv: list[str], flag: str) -> list[str]:
    """A submitted command line's words less each `FLAG VALUE` and `FLAG=VALUE`."""
    words, left = iter(argv), []
    for word in words:
        if word == flag:
            next(words, None)
        elif not word.startswith(f"{flag}="):
            left.append(word)
    return left


def epochs_of(argv: list[str]) -> int | None:
    epochs = last_option(argv, "--epochs")
    return int(epochs) if epochs is not None and epochs.isdigit() else None


def resumed_run(argv: list[str], runs_dir: Path) -> Path | str | None:
    """The run directory `--resume RUN` names in runs_dir (None: no --resume, or a checkpoint file, which starts a
    new run), or why it cannot be (a str)."""
    resume = last_option(argv, "--resume")
    if resume is None or resume.endswith(".pt"):
        return None
    try:
        return resolve_run(resume, runs_dir)
    except RunLookupError as exc:
        return str(exc)


# -- the queue, as the CLI and the daemon change it ------------------------------------------------------

def submit(runs_dir: Path, run_id: str, argv: list[str], gpus: int | None, target: str | None,
           flags: dict[str, Any], resumes: Path | None, env: dict[str, str] | None = None, cwd: str | None = None,
           wake: bool = True, by: str | None = None, max_resumes: int = 0) -> bool:
    """Queue a run for the daemon of runs_dir (running or not), to be started as `trainbus run ARGV` in `cwd`
    with `env` (default: this process's; None from a remote peer: the daemon's own). `by`: who asked (a remote
    peer's key; default this process's user). max_resumes: how many times the daemon continues the run by itself
    when its kernel dies or is killed (Daemon._resume_dead). True when a running daemon was told at once."""
    runs_dir = Path(runs_dir).resolve()
    now = time.time()
    by = by or local_user()
    # the interpreter with the environment: a submitter's virtual environment is its python's, not only its PATH
    job = {"id": run_id, "state": "queued", "submitted_ts": now, "argv": argv, "cwd": cwd or os.getcwd(),
           "env": env, "gpus": gpus, "submitted_by": by, "resumes_left": max_resumes,
           "python": sys.executable if env is not None else None}
    if resumes is not None:
        run = queued_resume(run_overview(resumes, now), by)
    else:
        run = {"id": run_id, "dir": None, "status": "queued", "target": target, "flags": flags, "started_ts": None,
               "detail": f"submitted {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))} by {by}"}
    make_daemon_dir(runs_dir)
    with Registry(runs_dir) as registry:
        registry.submit(job, run, now)
    if not wake:
        return False
    return request(runs_dir, "wake") is not None


def local_user() -> str:
    """This process's user, as a submission by the owner is recorded."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def named(ids: Iterable[str], run: str) -> list[str]:
    """The ids `run` names: itself when it is one, else those it is the start of (none for "", the start of all)."""
    ids = list(ids)
    return [run] if run in ids else [i for i in ids if run and i.startswith(run)]


def ids_starting(runs_dir: Path, run: str) -> list[str]:
    """Every run id of runs_dir that `run` starts (its directories, and the queue's jobs, those that never had one),
    as `trainbus runs stop` on the host weighs a start of an id."""
    ids = {p.name for p in find_runs(runs_dir) if p.name.startswith(run)}
    try:
        with Registry(runs_dir) as registry:
            ids.update(named(registry.job_ids(), run))
    except (sqlite3.Error, RegistryError, OSError):  # unreadable: the directories still name the runs
        pass
    return sorted(ids)


def several_runs(run: str, ids: list[str]) -> str:
    return f"{run} is the start of several runs' ids: {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''} " \
           f"(give more of the id)"


def queued_job(runs_dir: Path, run: str) -> str | None:
    """The id of the queued run `run` names (its id or a unique start of it); None when it names none."""
    if not has_registry(runs_dir):
        return None
    try:
        with Registry(runs_dir) as registry:
            ids = registry.job_ids(["queued"])
    except (sqlite3.Error, OSError):  # a full disk: SQLite cannot open it; `runs stop` of a live run must still work
        return None
    matches = named(ids, run)
    return matches[0] if len(matches) == 1 else None


def unreadable_queue(runs_dir: Path) -> str | None:
    """Why the queue of runs_dir's registry cannot be read, with the fix (a full disk: SQLite cannot open it); None
    when it can, or there is none."""
    if not has_registry(runs_dir):
        return None
    try:
        with Registry(runs_dir) as registry:
            registry.job_ids(["queued"])
    except RegistryError as exc:
        return str(exc)
    except (sqlite3.Error, OSError) as exc:
        return cannot_read(runs_dir, exc)
    return None


def as_queued(runs_dir: Path, run: dict[str, Any]) -> dict[str, Any]:
    """`run` (a run directory's details) as queued when its resume waits in the daemon's queue of runs_dir, as
    running while the daemon starts it (registry.resume_started); as it is when none does, or when the registry
    cannot be read (the directory still tells the run)."""
    if Path(run["dir"]) != (Path(runs_dir) / run["id"]).resolve() or not has_registry(runs_dir):
        return run
    try:
        with Registry(runs_dir) as registry:
            job = registry.job(run["id"], JOB_ACTIVE)
    except (sqlite3.Error, RegistryError, OSError):
        return run
    if job is None:
        return run
    return queued_resume(run, job["submitted_by"]) if job["state"] == "queued" else resume_started(run, job)


def run_without_directory(runs_dir: Path, run_id: str) -> dict[str, Any] | None:
    """A submitted run that has no run directory (queued, or failed before its kernel made one), as the registry
    has it, with its command and its output file; None when run_id names none."""
    if not has_registry(runs_dir):
        return None
    now = time.time()
    try:
        with Registry(runs_dir) as registry:
            rows = {i: unreadable_row(row) if "unreadable_row" in row else row  # garbled by hand: said so
                    for i, row in registry.runs(now).items() if row.get("dir") is None}
            jobs = {run_id: job for run_id in rows if (job := registry.job(run_id)) is not None}
    except (sqlite3.Error, OSError):  # as queued_job: the run directories still answer for the runs that have one
        return None
    matches = named(jobs, run_id)
    if len(matches) != 1 or (run_id not in jobs and any(p.name.startswith(run_id) for p in find_runs(runs_dir))):
        return None  # none, or a prefix other runs share (resolve_run said which)
    job = jobs[matches[0]]
    row = as_started(rows[matches[0]], job, lambda: unwatched_tail(runs_dir, job["id"]))
    return {**row, "argv": job["argv"], "submitted_ts": job["submitted_ts"], "submitted_by": job["submitted_by"],
            "job": job["state"], "pid": job["pid"], "pid_started": job["pid_started"],
            "output": str(output_file(runs_dir, row["id"]))}


def _not_queued(job: dict[str, Any] | None, run_id: str, runs_dir: Path, remote: bool = False) -> str:
    """Why `daemon cancel` cannot take run_id off the queue, when it is not running either (remote: said to a key,
    which has the daemon's status, not the host's `runs show`)."""
    if job is None:
        return f"run {run_id} is not queued: the daemon's queue never held a run of that id (or start of one)"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["ended_ts"])) if job.get("ended_ts") else "earlier"
    if job["state"] == "cancelled":
        return f"run {run_id} is not queued: it was cancelled already ({when})"
    how = "trainbus daemon status --remote ..." if remote else f"trainbus runs show {run_id}{runs_dir_option(runs_dir)}"
    return f"run {run_id} is not queued: it ran and ended ({when}); `{how}` says how"


def cancel(runs_dir: Path, run_id: str, by: str | None = None, remote: bool = False) -> str:
    """Take a queued run off the queue: its id, or a unique start of it (JobError when it names no queued run).
    `by`: who asked (a remote peer's key; default this process's user). Returns the id. A new run stays listed,
    cancelled; a queued resume's run is again what its directory says."""
    runs_dir = Path(runs_dir).resolve()
    if not run_id:  # the start of every id
        raise JobError("no run id given: name the run (its id, or a unique start of it)")
    queued = queued_job(runs_dir, run_id)
    if queued not in (None, run_id) and len(shared := ids_starting(runs_dir, run_id)) > 1:  # an ended run's too
        raise JobError(several_runs(run_id, shared))
    run_id = queued or run_id
    run_dir = runs_dir / run_id
    now = time.time()
    resumed = run_overview(run_dir, now) if (run_dir / CONFIG).is_file() else None
    with Registry(runs_dir) as registry:
        if not registry.cancel_job(run_id, now, f"taken off the daemon's queue by {by or local_user()} before it "
                                                f"started", resumed):
            running = named(registry.job_ids(["starting", "running"]), run_id)
            if len(running) == 1:
                raise JobError(f"run {running[0]} is not queued: it is running; `trainbus runs stop {running[0]}"
                               f"{runs_dir_option(runs_dir)}` stops it")
            held = named(registry.job_ids(), run_id)  # a start of ids names the runs it held, as a whole id does
            if len(held) > 1:
                raise JobError(f"run {run_id} is not queued: no queued run's id starts with it ({len(held)} runs "
                               f"whose id does have ended or were cancelled: `trainbus daemon status"
                               f"{runs_dir_option(runs_dir)}` shows the queue)")
            raise JobError(_not_queued(registry.job(held[0]) if held else None, held[0] if held else run_id,
                                       runs_dir, remote))
    return run_id
