"""`trainbus runs delete`: an ended run's directory and its registry row removed, never a run a kernel still holds."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from trainbus.proto import JOURNAL_NAME

from . import registry
from .kernel_pid import KERNEL_PID
from .run_json import CONFIG, SUMMARY
from .run_overview import run_overview
from .runs import runs_dir_option


class RemovalError(Exception):
    """The run cannot be deleted (still running, or the files would not go); the message says why and the fix."""


def check_ended(run_dir: Path, runs_dir: Path) -> None:
    """RemovalError unless run_dir is a run the kernel made and has ended: its kernel is gone, nothing holds its
    journal and the daemon does not have it queued to be resumed."""
    check_made_by_a_kernel(run_dir, runs_dir)
    status = run_overview(run_dir)["status"]
    if status == "running":
        raise RemovalError(_running(run_dir.name, runs_dir))
    check_not_submitted(run_dir.parent, run_dir.name)
    with _journal_locked(run_dir):  # a kernel whose pid file says otherwise (one continuing the run) holds it
        pass
    if registry.read_only_mount(run_dir):  # an archive: said before any run is touched, not as half a removal
        raise RemovalError(f"cannot delete run {Path(run_dir).name}: {Path(run_dir).resolve().parent} is on a "
                           f"read-only filesystem; nothing deleted")


def check_made_by_a_kernel(run_dir: Path, runs_dir: Path) -> None:
    """RemovalError unless run_dir holds what a kernel writes beside its config.json, and not the runs directory:
    a run is looked up by path too, and a project folder with a config.json of its own (`runs delete ..`) must not
    pass for one and go with everything in it."""
    run_dir, runs = Path(run_dir).resolve(), Path(runs_dir).resolve()
    if run_dir == runs or run_dir in runs.parents:
        raise RemovalError(f"{run_dir} holds the runs directory {runs}: it is not a run; nothing deleted")
    if not any((run_dir / name).exists() for name in (JOURNAL_NAME, KERNEL_PID, SUMMARY)):
        raise RemovalError(f"{run_dir} is not a run directory: it has a {CONFIG} but none of what a kernel writes "
                           f"beside it ({JOURNAL_NAME}, {KERNEL_PID}, {SUMMARY}); nothing deleted (if it is what "
                           f"you mean, remove it yourself)")


def check_not_submitted(runs_dir: Path, run_id: str) -> None:
    """RemovalError when the daemon of runs_dir holds run_id: queued (to be started or resumed) or started, even
    before its kernel made or locked the run's directory."""
    if not registry.has_registry(runs_dir):
        return
    try:
        with registry.Registry(runs_dir) as rows:
            job = rows.job(run_id, registry.JOB_ACTIVE)
    except (sqlite3.Error, OSError, registry.RegistryError) as exc:
        from .daemon_client import daemon_lives

        # The queue unknown (a full disk: SQLite cannot make its -shm file): with no daemon alive nothing can start
        # or resume the run meanwhile, and a full disk is when a run must be deletable. With one, keep the run.
        if daemon_lives(runs_dir):
            raise RemovalError(f"cannot tell whether the daemon holds run {run_id}: "
                               f"{Path(runs_dir) / registry.REGISTRY_NAME}: {exc}; stop the daemon "
                               f"(`trainbus daemon stop{runs_dir_option(runs_dir)}`) and delete again") from None
        return
    if job is None or not registry.job_holds_run(job):
        return
    if job["state"] == "queued":
        raise RemovalError(f"run {run_id} is queued for the daemon; take it off the queue first with "
                           f"`trainbus runs stop {run_id}{runs_dir_option(runs_dir)}`")
    raise RemovalError(_running(run_id, runs_dir))


def delete_record(runs_dir: Path, run_id: str, output: Path) -> None:
    """Remove a daemon's run that never had a directory (it failed before its kernel made one): its registry
    row and its output file."""
    check_not_submitted(runs_dir, run_id)
    try:
        with registry.Registry(runs_dir) as rows:
            _forget(rows, run_id)
    except (sqlite3.Error, OSError, registry.RegistryError) as exc:
        raise RemovalError(f"cannot delete run {run_id} from {Path(runs_dir) / registry.REGISTRY_NAME}: {exc} "
                           f"(is the runs directory yours and writable?)") from None
    try:
        Path(output).unlink(missing_ok=True)
    except OSError as exc:
        raise RemovalError(f"cannot delete {output}: {exc.strerror or exc}") from None


def _forget(rows: registry.Registry, run_id: str) -> None:
    """The run's row gone; a daemon's job of it still started, whose process is gone (check_not_submitted let the run
    be deleted: its daemon stopped or killed first), ended first, as deleted: else the next daemon would settle the
    job and record the run again, as one that never had a directory. (A queued job holds its run: never here.)"""
    rows.move_job(run_id, ["starting", "running"], state="ended", ended_ts=time.time(), env=None,
                  detail="deleted (`trainbus runs delete`) after its process ended, while no daemon watched it")
    rows.forget([run_id])


def delete_run(run_dir: Path) -> None:
    """Remove run_dir with everything in it and the daemon's output of it, then its row in the runs directory's
    registry.

    The journal's lock is held while the files go: a kernel continuing this run at that moment is refused
    (its journal is in use) instead of writing into a directory that is going away. A registry that cannot be
    written costs a warning: `runs list` forgets a row whose directory is gone the next time it reads."""
    run_dir = Path(run_dir)
    with _journal_locked(run_dir):
        try:
            shutil.rmtree(run_dir)
        except OSError as exc:
            raise RemovalError(f"cannot delete run {run_dir.name}: {exc.filename or run_dir}: "
                               f"{exc.strerror or exc} (some of its files may be gone)") from None
    runs_dir = run_dir.parent
    from .daemon_files import output_file

    try:  # the daemon's copy of its process's output, when the daemon started it, and the older part of it (capped)
        output = output_file(runs_dir, run_dir.name)
        output.unlink(missing_ok=True)
        output.with_name(output.name + ".1").unlink(missing_ok=True)
    except OSError as exc:
        raise RemovalError(f"deleted run {run_dir.name}, but not the daemon's output of it: "
                           f"{output_file(runs_dir, run_dir.name)}: {exc.strerror or exc}") from None
    if not (runs_dir / registry.REGISTRY_NAME).exists():  # no registry there: none is made just to forget in
        return
    try:
        with registry.Registry(runs_dir) as rows:
            _forget(rows, run_dir.name)
    except (sqlite3.Error, OSError, registry.RegistryError) as exc:
        registry.warn(runs_dir, exc)


@contextlib.contextmanager
def _journal_locked(run_dir: Path) -> Iterator[None]:
    """The run's journal locked as a kernel locks it (kernel/journal.py), and its directory as a kernel continuing
    it locks that until it holds the journal (run_dir.check_not_running); RemovalError when another process holds
    either. A run without a journal (it failed before its first event) has no journal to lock."""
    with contextlib.ExitStack() as held:
        for path in (Path(run_dir), Path(run_dir) / JOURNAL_NAME):
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                continue
            held.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its status said ended: the holder is a kernel continuing it, or another delete
                raise RemovalError(f"run {Path(run_dir).name} is in use by another process (a kernel continuing it, "
                                   f"or another `trainbus runs delete`); nothing deleted: try again once that is "
                                   f"done") from None
            except OSError:  # a filesystem that locks no directory: the journal's lock stands alone, as before
                if path != Path(run_dir):
                    raise
        yield


def _running(run_id: str, runs_dir: Path) -> str:
    return f"run {run_id} is running; stop it first with `trainbus runs stop {run_id}{runs_dir_option(runs_dir)}`"
