"""`trainbus runs`: list, show, compare, plot, stop, resume and delete the runs of a runs directory."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import typer
from rich.markup import escape

from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import READ_PROGRESS

from .cli_common import (RUNS_DIR_OPTION, UserError, _attach_client, _run_and_status, _wide, journal_progress, out,
                         reason_text)
from .pids import process_alive

runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Runs: what a runs directory holds.")


def _out_dir_path(text: str) -> Path:
    """--out's value. An empty one (`--out "$UNSET"`) would be the current directory: the PNGs drawn there."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a directory, or leave --out out for RUN_DIR/plots")
    return Path(text)


@runs_app.command("plot")
def runs_plot(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run "
                                        "directory."),
    runs_dir: Path = RUNS_DIR_OPTION,
    out_dir: Optional[Path] = typer.Option(None, "--out", parser=_out_dir_path,
                                           help="Where the PNGs go (default RUN_DIR/plots)."),
) -> None:
    """Draw a run's plots (loss, metrics, resources) from its journal alone."""
    from . import runs

    try:
        run_dir = runs.resolve_run(run, runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if not (run_dir / JOURNAL_NAME).is_file():
        raise UserError(f"run {run_dir.name} has no journal to plot: {run_dir / JOURNAL_NAME} does not exist")
    if out_dir is not None:
        _make_out_dir(out_dir)
    # The visualization plugin's code draws them, in its own process: the kernel imports no plugin. As long as it
    # takes (a run of days: minutes; a time limit here cut such a plot short with a traceback), saying how far.
    cmd = [sys.executable, "-m", "trainbus.plugins.visualization", "--plot", str(run_dir), "--progress"]
    with tempfile.TemporaryFile("w+") as written, \
            journal_progress(run_dir / JOURNAL_NAME, f"plotting run {run_dir.name}") as progress:
        proc = subprocess.Popen(cmd + (["--out", str(out_dir)] if out_dir else []), stdout=written,
                                stderr=subprocess.PIPE, text=True)
        said = []
        for line in proc.stderr:
            if line.startswith(READ_PROGRESS):
                progress(int(line.removeprefix(READ_PROGRESS)))
            else:
                said.append(line.rstrip("\n"))
        proc.wait()
        written.seek(0)
        paths = written.read()
    if proc.returncode != 0:
        raise UserError(said[-1].removeprefix("error: ") if said else f"plotting failed (exit {proc.returncode})")
    for line in said:
        if line.startswith("warning: "):
            print(f"trainbus: {line}", file=sys.stderr)
    out.print(paths.rstrip(), markup=False)


def _make_out_dir(out_dir: Path) -> None:
    """runs plot's --out, made before anything is drawn: one line naming it when it cannot be."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory: name a directory (it is made if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot make that directory ({exc.strerror or exc}); name a directory "
                        f"you can write, or leave --out out for RUN_DIR/plots") from None


@runs_app.command("list")
def runs_list(
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON array of runs instead of a table."),
    status: Optional[str] = typer.Option(None, "--status", help="Only runs of these statuses (comma-separated)."),
    target: Optional[str] = typer.Option(None, "--target", help="Only runs whose target contains this text."),
    last: Optional[int] = typer.Option(None, "--last", min=1, help="Only the newest N runs (of those the filters "
                                                                    "keep)."),
) -> None:
    """Every run, newest first: status, target, flags, start, duration, epochs, last validation, plugin trouble,
    error."""
    from . import registry, runs, runs_view

    statuses = tuple(s.strip() for s in (status or "").split(",") if s.strip())
    listed = (*registry.STATUSES, "unreadable")  # a run whose directory or registry row cannot be read is listed so
    unknown = [s for s in statuses if s not in listed]
    if unknown:
        raise UserError(f"--status {unknown[0]!r} is not a status; statuses: {', '.join(listed)}")
    try:
        found = registry.list_runs(runs_dir, statuses, target)[:last]
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(runs_view.as_json(found))
        return
    every = len(registry.list_runs(runs_dir)) if not found and (statuses or target) else 0
    if every:  # "no runs in DIR" would be false: the filter left none of them
        given = [f"--status {','.join(statuses)}"] * bool(statuses) + [f"--target {target}"] * bool(target)
        out.print(f"no run matched {escape(' '.join(given))}; {escape(str(Path(runs_dir).resolve()))} has {every} "
                  f"run{'s' * (every != 1)} (`trainbus runs list` alone lists every run)")
    else:
        runs_view.print_list(_wide(), found, runs_dir)


@runs_app.command("compare")
def runs_compare(
    run_ids: Optional[list[str]] = typer.Argument(None, metavar="[RUN]...", help="Runs to compare (ids, unique "
                                                                                "starts of ids, run directories); "
                                                                                "default: every run."),
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON array, a run's flags and metrics each."),
) -> None:
    """Runs side by side, one a row: their flags, then their final (and best) metrics, as `guild compare`."""
    import time

    from . import registry, runs, runs_view

    try:
        if run_ids:
            now = time.time()
            run_dirs: dict[Path, Path] = {}  # a run named twice (its id, a start of it, its directory) is one row
            for run in run_ids:
                run_dir = runs.resolve_run(run, runs_dir)
                run_dirs.setdefault(run_dir.resolve(), run_dir)
            found = [runs.overview_or_unreadable(run_dir, now) for run_dir in run_dirs.values()]
        else:
            found = registry.list_runs(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    rows = runs_view.comparison(found)
    if as_json:
        print(runs_view.as_json(rows))
    else:
        runs_view.print_comparison(_wide(), rows, runs_dir)


@runs_app.command("reindex")
def runs_reindex(
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Rebuild the run registry (RUNS_DIR/registry.sqlite) from the run directories, which hold the truth."""
    from . import registry, runs

    try:
        found, set_aside = registry.reindex(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    except (registry.sqlite3.Error, registry.RegistryError, OSError) as exc:
        raise UserError(f"cannot write {Path(runs_dir).resolve() / registry.REGISTRY_NAME} ({exc}); is the runs "
                        f"directory yours and writable?") from None
    if set_aside is not None:
        out.print(f"the old registry was no SQLite database it could read: kept as {escape(str(set_aside))} (the "
                  f"daemon's queue was in it: queued runs need submitting again)")
    out.print(f"{len(found)} run{'s' * (len(found) != 1)} indexed in "
              f"{escape(str(Path(runs_dir).resolve() / registry.REGISTRY_NAME))}")


@runs_app.command("show")
def runs_show(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run "
                                        "directory."),
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """One run in detail: status, per-epoch metrics, plugins and their state, the error, where its files are."""
    from . import daemon_queue, runs, runs_view
    from .run_details import run_details

    try:
        run_dir = runs.resolve_run(run, runs_dir)
        with journal_progress(run_dir / JOURNAL_NAME, f"run {run_dir.name}") as progress:
            details = daemon_queue.as_queued(runs_dir, run_details(run_dir, progress=progress))
    except runs.RunLookupError as exc:
        details = daemon_queue.run_without_directory(runs_dir, run)  # queued, or failed before its kernel made one
        if details is None:
            raise UserError(str(exc)) from None
        if not as_json:
            why = _why_ended(details)
            out.print(f"run {details['id']}: {details['status']}" + (f" ({escape(why)})" if why else ""))
            out.print(f"  command: {escape(shlex.join(['trainbus', 'run', *details['argv']]))}")  # as a shell takes it
            out.print(f"  submitted: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(details['submitted_ts']))}"
                      + (f" by {escape(details['submitted_by'])}" if details["submitted_by"] else ""))
            if Path(details["output"]).exists():
                out.print(f"  output: {escape(details['output'])}")
            else:  # queued, or failed at placement: no process has written any
                out.print("  output: none yet (it is queued)" if details["job"] == "queued"
                          else "  output: none (the daemon never started a process for it)")
            return
    if details.get("config_damage"):  # on stderr: --json stays one JSON object (a queued run has no config.json)
        print(f"trainbus: warning: {details['config_damage']}", file=sys.stderr)
    for line in details.get("journal_damage") or []:
        print(f"trainbus: warning: {line}; what this shows leaves those events out", file=sys.stderr)
    if as_json:
        print(runs_view.as_json(details))
    else:
        runs_view.print_show(_wide(), details)


@runs_app.command("stop")
def runs_stop(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run "
                                        "directory."),
    reason: str = typer.Option("trainbus runs stop", "--reason", parser=reason_text,
                               help="Why: journaled with who sent the stop."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Stop a running run at its next step boundary, as `trainbus attach RUN --stop REASON` does; exits once the
    kernel journaled the stop. A run queued for the daemon is taken off the queue. A run that has ended: one
    line, exit 1."""
    from . import daemon_queue
    from .registry import JobError

    queued = daemon_queue.queued_job(runs_dir, run)  # before the directory lookup: a queued run may have none yet
    if queued is not None:
        try:  # refused when an ended run's id starts as the queued one's does
            queued = daemon_queue.cancel(runs_dir, run)
        except JobError as exc:
            raise UserError(str(exc)) from None
        resumed = (Path(runs_dir) / queued / "config.json").is_file()  # a queued resume: the run itself stays
        out.print(f"cancelled the queued resume of {queued}; the run stays as it was" if resumed
                  else f"cancelled {queued}: it was queued and never started")
        return
    unmade = daemon_queue.run_without_directory(runs_dir, run)  # the daemon started it, or failed to, before its kernel
    if unmade is not None:                                  # made the run directory
        if unmade["job"] not in ("starting", "running") or unmade["status"] != "running" \
                or not _kernel_listens(runs_dir, unmade):
            why = _why_ended(unmade)
            print(f"error: run {unmade['id']} has already ended ({unmade['status']}: {why or '-'}); "
                  f"there is nothing to stop", file=sys.stderr)
            raise typer.Exit(code=1)
        run = str(Path(runs_dir) / unmade["id"])
    try:
        run_dir, status = _run_and_status(run, runs_dir)
    except UserError:  # no run directory of that name: it may be queued in a queue that cannot be read (a full disk)
        unread = daemon_queue.unreadable_queue(runs_dir)
        if unread is not None:
            raise UserError(f"cannot take run {run} off the queue: {unread}") from None
        raise
    if status != "running" and _resumed_by_the_daemon(runs_dir, run_dir):
        status = "running"
    if status != "running":
        print(f"error: run {run_dir.name} has already ended ({status}); there is nothing to stop", file=sys.stderr)
        raise typer.Exit(code=1)
    _stop_running_run(run_dir, reason)


KERNEL_START_WAIT_S = 600.0  # `runs stop` of a run whose kernel is still building its spec (loading data, ...)


def _kernel_listens(runs_dir: Path, unmade: dict) -> bool:
    """A run the daemon started whose kernel has no directory or sockets yet (it builds the spec first): wait, while
    its process lives, until its kernel.log names its sockets. False when the process ended first."""
    kernel_log = Path(runs_dir) / unmade["id"] / "kernel.log"

    def listens() -> bool | None:
        try:
            with open(kernel_log, "rb") as f:
                if b" sockets: " in f.read(1 << 16):
                    return True
        except OSError:
            pass
        if unmade["pid"] is not None and not process_alive(unmade["pid"], unmade["pid_started"]):
            return kernel_log.parent.is_dir()  # it made its directory and ended: the run says how
        return None

    return _wait_for_kernel(unmade["id"], "is starting", listens)


def _resumed_by_the_daemon(runs_dir: Path, run_dir: Path) -> bool:
    """A run whose directory says how its last session ended while the daemon resumes it (--max-resumes, a queued
    `runs resume`) and the new kernel builds the spec: wait, while the daemon's process for it lives, until that
    kernel runs. False when the resume ended first."""
    from .daemon_queue import as_queued
    from .run_overview import run_overview

    def runs() -> bool | None:
        run = run_overview(run_dir)
        if run["status"] == "running":
            return True
        return None if as_queued(runs_dir, run)["status"] == "running" else False  # registry.resume_started

    now = runs()
    return now if now is not None else _wait_for_kernel(run_dir.name, "is being resumed by the daemon", runs)


def _wait_for_kernel(run_id: str, state: str, ready: Callable[[], bool | None]) -> bool:
    """Poll ready() (None: not yet) at most KERNEL_START_WAIT_S for the kernel a stop must wait for; said first."""
    deadline = time.monotonic() + KERNEL_START_WAIT_S
    try:  # from the line on: a Ctrl-C as soon as it is read may land while print() still returns
        print(f"trainbus: run {run_id} {state} (its kernel builds the spec first); the stop goes in once it listens",
              file=sys.stderr)
        while time.monotonic() < deadline:
            if (answer := ready()) is not None:
                return answer
            time.sleep(0.2)
    except KeyboardInterrupt:  # the line above said a stop would go in: say that none did
        print(f"trainbus: Ctrl-C: no stop was sent; run {run_id} goes on", file=sys.stderr)
        raise typer.Exit(code=130) from None
    raise UserError(f"run {run_id}'s kernel did not start listening within {KERNEL_START_WAIT_S:.0f} s; "
                    f"`trainbus runs show {run_id}` says where it is")


def _stop_running_run(run_dir: Path, reason: str) -> NoReturn:
    """Stop the live run in run_dir: the attach client sends stop (journaled under its peer name) and exits once
    the kernel journaled it."""
    _attach_client(str(run_dir), ["--stop", reason])


@runs_app.command("delete")
def runs_delete(
    run_ids: list[str] = typer.Argument(..., metavar="RUN...", help="Runs to delete (ids, unique starts of ids, "
                                                                    "run directories)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (needed when stdin is not a terminal)."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Delete ended runs: each run directory, with every file in it, and its row in the run registry. A running
    run, or one the daemon has queued, is refused (stop it first with `trainbus runs stop`); nothing is deleted
    unless every run named can be."""
    from . import daemon_queue, run_removal, runs
    from .daemon_files import output_file
    from .registry import runs_without_directory

    run_dirs: dict[Path, None] = {}  # in the order named, once each
    records: dict[str, Path] = {}  # the daemon's runs that failed before they had a directory: their output
    try:
        for run in run_ids:
            try:
                run_dir = runs.resolve_run(run, runs_dir)
            except runs.RunLookupError as exc:
                record = daemon_queue.run_without_directory(runs_dir, run)
                if record is None:
                    # a row the registry alone holds with no queue job beside it (garbled or written by hand):
                    # `runs list` names this command as what removes it
                    pending = [] if isinstance(exc, runs.AmbiguousRunError) else runs_without_directory(runs_dir, run)
                    if len(pending) != 1:
                        raise
                    record = {"id": pending[0][0], "output": output_file(runs_dir, pending[0][0])}
                run_removal.check_not_submitted(runs_dir, record["id"])
                records[record["id"]] = Path(record["output"])
            else:
                run_removal.check_ended(run_dir, runs_dir)
                run_dirs[run_dir] = None
    except (runs.RunLookupError, run_removal.RemovalError) as exc:
        raise UserError(str(exc)) from None
    names = ", ".join([*(d.name for d in run_dirs), *records])
    count = len(run_dirs) + len(records)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"deleting {names} needs a yes: add --yes (stdin is not a terminal to ask on)")
        if not typer.confirm(f"Delete {count} run{'s' * (count != 1)} ({names}) with every file "
                             f"in {'them' if count != 1 else 'it'}?"):
            out.print("nothing deleted")
            raise typer.Exit(code=1)
    left = [*(d.name for d in run_dirs), *records]
    try:
        with _ctrl_c_between_runs() as asked:
            for run_dir in run_dirs:
                run_removal.delete_run(run_dir)
                out.print(f"deleted run {run_dir.name} ({escape(str(run_dir))})")
                _unless_asked_to_stop(asked, left)
            for run_id, output in records.items():
                had_output = output.exists()  # none for a run that failed at placement: it never had a process
                run_removal.delete_record(runs_dir, run_id, output)
                out.print(f"deleted run {run_id} (it never had a directory"
                          + (f"; its output {escape(str(output))})" if had_output else ")"))
                _unless_asked_to_stop(asked, left)
    except run_removal.RemovalError as exc:
        raise UserError(str(exc)) from None


@contextlib.contextmanager
def _ctrl_c_between_runs() -> Iterator[list]:
    """A Ctrl-C while runs are deleted takes effect once the run being deleted is gone: each goes whole or not at
    all (cut inside its rmtree, one was left half there, its config.json gone and its checkpoints not). Yields the
    list a Ctrl-C appends to."""
    asked: list = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: asked.append(signum))
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, previous)


def _unless_asked_to_stop(asked: list, left: list[str]) -> None:
    """The run just deleted is off `left`; after a Ctrl-C, the ones not deleted are said and the command ends."""
    left.pop(0)
    if asked:
        print(f"trainbus: Ctrl-C: stopped; {'not deleted: ' + ', '.join(left) if left else 'every run was deleted'}",
              file=sys.stderr)
        raise typer.Exit(code=130)


@runs_app.command("resume", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def runs_resume(
    ctx: typer.Context,
    run: str = typer.Argument(..., help="Run id (or a unique start of one), or a run directory."),
    runs_dir: Path = RUNS_DIR_OPTION,
    detach: bool = typer.Option(False, "--detach", help="Queue it for the daemon instead of training here."),
) -> None:
    """Continue a run in place from its newest verified checkpoint: `trainbus run --resume RUN`, which takes any
    other option given (--epochs N to train it longer, --nproc N, ...)."""
    run_dir, status = _run_and_status(run, runs_dir)
    if status == "running":
        raise UserError(f"run {run_dir.name} is running; nothing to resume (`trainbus runs stop` stops it)")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "trainbus.kernel.cli", "run", "--resume", str(run_dir),
                              *ctx.args, *(["--detach"] if detach else [])])


def _why_ended(run: dict) -> str | None:
    """Why a run with no directory ended: its error, or who took it off the queue (a cancelled one's detail)."""
    return run.get("error") or (run.get("detail") if run["status"] == "cancelled" else None)
