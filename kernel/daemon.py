"""The kernel daemon: a queue of runs for one runs directory that outlives its own crashes.

The queue is the run registry's `jobs` table (kernel/registry.py): `trainbus run ... --detach` writes a job
(the `trainbus run` arguments, working directory and environment it was given) and the daemon starts it as
`python -m trainbus.kernel.cli run ...` in its own session, so that killing the daemon never stops a run.
Every state change is one registry transaction, so a daemon killed at any moment leaves a queue the next one
reads as it was: a job still `queued` is started, a `running` one whose process is alive is adopted (watched
by pid and start time, as it is no longer our child) and one whose process is gone is settled from its run
directory (completed, failed, ... or died: its kernel vanished; `trainbus runs resume ID` continues it).

One daemon per runs directory: it holds an flock on `.daemon/daemon.pid` for as long as it lives, and the kernel
drops the lock with the process however it ends. Its control endpoint is an ipc socket in the owner-only
`.daemon` directory (only the owner's processes can connect), answering status, wake and stop
(kernel/daemon_serve.py: the process, its endpoints and the loop that serves them).

Which queued runs start each round, and on which GPUs, is kernel/placement.py's to say.
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from trainbus.proto.remote import CONNECTION_FILE, KeyFileError, read_connection_file

from .buffer_files import remove_dead_runs_buffers
from .checkpointing import has_checkpoints, no_checkpoints
from .daemon_files import (OUTPUT_DIR, DaemonError, make_daemon_dir, open_output, output_file, output_tail,
                           unwatched_tail)
from .kernel_log import cap_log
from .pids import killed_by, process_alive
from .placement import place
from .registry import (JOB_ACTIVE, REGISTRY_NAME, JobError, Registry, RegistryError, as_started, cannot_read,
                       ended_without_directory, queued_resume, record_run, resume_started, unreadable_row)
from .runs import CONFIG, KERNEL_PID, RunLookupError, find_runs, kernel_process, resolve_run, run_overview

log = logging.getLogger("trainbus.daemon")

RESUME_FAILED = "its resume ended before training"  # how a job's detail says so (`daemon status` shows it)
RESUMED_STATUSES = ("died", "interrupted")  # what a run submitted with --max-resumes is continued from by itself
STATUS_ENDED = 10  # `status` lists this many of the runs it ended last (a remote key has no `runs list`)
TICK_S = 1.0  # the queue is looked at this often without a wake-up (submit wakes the daemon at once)
OUTPUT_FREE_MIN = 1 << 20  # below this free on the output files' disk, queued runs wait (see Daemon.tick)
# A run's output file (what its `trainbus run` prints: the console's lines, and whatever the user's code prints) is
# capped as a plugin's log is: past OUTPUT_MAX_BYTES, checked every OUTPUT_CHECK_S, it is copied to RUN_ID.log.1 and
# emptied in place. Code printing a line a step would otherwise fill the disk in a multi-day run.
OUTPUT_MAX_BYTES = 64 * 1024 * 1024
OUTPUT_CHECK_S = 5.0


@dataclass
class Watched:
    """A job whose process runs: our child (popen) or adopted from a previous daemon (pid and start time)."""
    job_id: str
    pid: int
    pid_started: float | None
    devices: list[str]
    popen: subprocess.Popen | None = None
    resumes_left: int = 0  # --max-resumes: how many more times the daemon continues it if it dies (status says)

    def exit_code(self) -> int | None:
        """None while it runs; its exit code (or -1 when it was not our child and the code is unknown)."""
        if self.popen is not None:
            return self.popen.poll()
        return None if process_alive(self.pid, self.pid_started) else -1


def process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def launched_for(run_id: str) -> int | None:
    """The pid of a live process started for run_id (its TRAINBUS_LAUNCH_RUN_ID), among this user's; None.
    Only asked after a daemon died mid-start: a scan of every process is fine then, not per tick."""
    import psutil

    for process in psutil.process_iter(["uids"]):
        try:
            if process.info["uids"] and process.info["uids"].real == os.getuid() \
                    and process.environ().get("TRAINBUS_LAUNCH_RUN_ID") == run_id and process.pid != os.getpid():
                return process.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


class Daemon:
    """The queue's owner for one runs directory. `tick(now)` does one round: settle what ended, start what can."""

    def __init__(self, runs_dir: Path, devices: list[str], max_concurrent: int = 1,
                 python: str = sys.executable):
        self.runs_dir = Path(runs_dir).resolve()
        self.devices = devices
        self.max_concurrent = max_concurrent
        self.python = python
        self.watched: dict[str, Watched] = {}
        self.adopted = False
        self.woken = False  # a submission asked for a round now
        self.remote_endpoint: str | None = None  # `--listen`'s TCP endpoint, as bound
        self.trouble = ""  # what the last round failed with ("": it did not)
        self.stoppers: dict[str, subprocess.Popen] = {}  # `runs stop` of a running run, for a remote cancel: by run
        self.output_max_bytes = OUTPUT_MAX_BYTES
        self._next_output_check = float("-inf")
        # the runs queued as the last round read the registry: one deleted or replaced under the daemon (`rm`, a
        # cleanup script) comes back empty as the next round opens it, its queue lost unsaid
        self._queued: list[str] = []
        self.registry_lost = ""  # said on `daemon status`'s trouble line once that happened

    # -- one round ------------------------------------------------------------------------------------

    def tick(self, now: float, start: bool = True) -> None:
        """One round: adopt (the first), settle the runs that ended, start what the queue lets (not with `start`
        false: the daemon's first round, before it serves and logs that it does)."""
        with Registry(self.runs_dir) as registry:
            if self.adopted:
                self._check_registry_file(registry)
            if not self.adopted:
                self._adopt(registry, now)
                self.adopted = True
            for watched in list(self.watched.values()):
                code = watched.exit_code()
                if code is not None:
                    self._settle(registry, watched, code, now)
            for run_id, stopper in list(self.stoppers.items()):
                if stopper.poll() is not None:  # reaped; what it said is in the run's output
                    del self.stoppers[run_id]
            if now >= self._next_output_check:
                self._next_output_check = now + OUTPUT_CHECK_S
                for run_id in self.watched:
                    cap_log(output_file(self.runs_dir, run_id), self.output_max_bytes, "run output")
            busy = {d for w in self.watched.values() for d in w.devices}
            self._queued = registry.job_ids(["queued"])
            with closing(registry.each_job(["queued"])) as queued:  # read as far as place looks: the queue's head
                starts, never = place(queued, busy, len(self.watched), self.devices, self.max_concurrent)
            for job, why in never:
                self._fail_unstarted(registry, job, why, now)
            starts = starts if start else []
            if starts:
                self._check_output_disk()
            for job, devices in starts:
                self._start(registry, job, devices, now)

    def _check_registry_file(self, registry: Registry) -> None:
        """Said once (log, `daemon status`) when the registry holds none of the jobs the last round saw (queued, or
        started and watched): deleted or replaced under the daemon, its queue is lost, and those runs must be
        submitted again. (Job rows are never deleted: a cancel or an end changes their state.)"""
        known = [*self.watched, *self._queued]
        if not known:
            return
        # rows are never deleted: one of them found is this file's (each round, so not the whole table every time)
        if any(registry.job(run_id) is not None for run_id in known[:16]):
            return
        present = set(registry.job_ids())
        if any(run_id in present for run_id in known):
            return
        lost = [run_id for run_id in self._queued if run_id not in present]
        self._queued = []
        self.registry_lost = (f"{self.runs_dir / REGISTRY_NAME} was deleted or replaced while the daemon served "
                              f"({time.strftime('%Y-%m-%d %H:%M', time.localtime())}): the queue it held is lost: "
                              f"{len(lost)} run(s){', ' if lost else ''}{', '.join(lost)}; submit them again")
        log.warning("%s", self.registry_lost)

    def _check_output_disk(self) -> None:
        """DaemonError when the disk of the runs' output files is (nearly) full: a kernel started now would fail
        at its first line of output (ENOSPC on stderr), its run lost to a full log disk. The runs stay queued,
        the round's trouble says why (log and `daemon status`), and they start once space is freed."""
        directory = make_daemon_dir(self.runs_dir) / OUTPUT_DIR
        try:
            stat = os.statvfs(directory)
        except OSError:
            return  # cannot tell: the start says what is wrong, as it did
        if stat.f_bavail * stat.f_frsize < OUTPUT_FREE_MIN:
            raise DaemonError(f"queued runs wait: {directory} has under {OUTPUT_FREE_MIN >> 20} MiB free and a run "
                              f"started now would fail writing its output there; free space there and they start")

    def safe_tick(self, now: float, fatal: tuple[type[Exception], ...] = (), start: bool = True) -> None:
        """tick, surviving what a round can meet (the registry locked by another writer for long, a full disk, a
        bug): said in the log, once per kind in a row, and tried again at the next round. The runs train on, and
        status and stop keep answering. `fatal`: raised as they are."""
        try:
            self.tick(now, start)
        except fatal:
            raise
        except Exception as exc:
            kind = f"{type(exc).__name__}: {exc}"
            if kind != self.trouble:
                log.error("a round of the queue failed (tried again every %.0f s): %s", TICK_S, kind,
                          exc_info=not isinstance(exc, (sqlite3.Error, OSError, RegistryError, DaemonError)))
            self.trouble = kind
        else:
            if self.trouble:
                log.info("the queue's rounds work again")
            self.trouble = ""

    def stop_run(self, run: str, who: str) -> str:
        """A running run of this daemon's (its id or a unique start of it), stopped at its next step boundary as
        `trainbus runs stop` stops it (which waits for a kernel still building its spec), in a process of its own
        so the queue never waits on it: its stop reason names who asked. JobError when no run of ours is running."""
        matches = named(self.watched, run)
        if len(matches) != 1:
            raise JobError(f"run {run} is neither queued nor running under this daemon" if not matches
                           else f"{run} is the start of several running runs' ids: {', '.join(sorted(matches))}")
        run_id = matches[0]
        if run != run_id and len(shared := ids_starting(self.runs_dir, run)) > 1:  # one ended run's start: stop none
            raise JobError(several_runs(run, shared))
        if run_id not in self.stoppers:  # asked twice: the first stop is on its way
            with open_output(output_file(self.runs_dir, run_id)) as out:
                self.stoppers[run_id] = subprocess.Popen(
                    [self.python, "-m", "trainbus.kernel.cli", "runs", "stop", run_id, "--runs-dir", str(self.runs_dir),
                     "--reason", f"cancelled by {who}"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
        return run_id

    def _adopt(self, registry: Registry, now: float) -> None:
        """A previous daemon's jobs: watch the ones still running, settle the ones that ended meanwhile."""
        for job in registry.jobs(["starting", "running"]):
            pid, started = job["pid"], job["pid_started"]
            if pid is None:  # the previous daemon died between taking the job and recording its process
                run_dir = self.runs_dir / job["id"]
                kernel, alive = kernel_process(run_dir) if run_dir.is_dir() else (None, None)
                found = kernel if alive else launched_for(job["id"])  # started, its directory not made yet
                if found is not None:
                    pid, started = found, process_start_time(found)
                elif not (run_dir / CONFIG).is_file() or not _kernel_since(run_dir, job["started_ts"]):
                    # never got as far as a kernel of its own (a queued resume's directory is the run's, older)
                    registry.move_job(job["id"], ["starting"], state="queued")
                    log.info("%s: was being started when the daemon went down; queued again", job["id"])
                    continue
            watched = Watched(job["id"], pid or -1, started, job["devices"] or [], None, job["resumes_left"] or 0)
            if pid is not None and process_alive(pid, started):
                self.watched[job["id"]] = watched
                log.info("%s: still running (pid %d); adopted", job["id"], pid)
            else:
                self._settle(registry, watched, -1, now)

    def _start(self, registry: Registry, job: dict[str, Any], devices: list[str], now: float) -> None:
        if not registry.move_job(job["id"], ["queued"], state="starting", devices=devices, started_ts=now):
            return  # cancelled meanwhile
        env = dict(job["env"] or os.environ)
        env.update(TRAINBUS_LAUNCH_RUN_ID=job["id"], CUDA_VISIBLE_DEVICES=",".join(devices))
        make_daemon_dir(self.runs_dir)
        output = output_file(self.runs_dir, job["id"])
        try:
            with open_output(output) as out:
                popen = subprocess.Popen([job.get("python") or self.python, "-m", "trainbus.kernel.cli", "run",
                                          *job["argv"]],
                                         cwd=job["cwd"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:  # the working directory is gone, the python moved, ...
            self._fail_unstarted(registry, job, f"could not start: {exc}", now, from_states=["starting"])
            return
        started = process_start_time(popen.pid)
        # the environment (a token in it, maybe) is kept no longer than needed: until the run starts, or, while the
        # daemon may resume it by itself (--max-resumes), until it has ended for good
        keep_env = job["env"] if job.get("resumes_left") else None
        registry.move_job(job["id"], ["starting"], state="running", pid=popen.pid, pid_started=started, env=keep_env)
        self.watched[job["id"]] = Watched(job["id"], popen.pid, started, devices, popen, job["resumes_left"] or 0)
        log.info("%s: started (pid %d%s); output %s", job["id"], popen.pid,
                 f", CUDA_VISIBLE_DEVICES={','.join(devices)}" if devices else "", output)

    def _settle(self, registry: Registry, watched: Watched, code: int, now: float) -> None:
        """A job's process is gone: the job ends, and its run's registry row says what the directory says."""
        self.watched.pop(watched.job_id, None)
        run_dir = self.runs_dir / watched.job_id
        kernel, alive = kernel_process(run_dir) if watched.popen is not None else (None, None)
        if alive and kernel != watched.pid:
            # `run --nproc` killed alone: its ranks take their launcher's end as a SIGTERM and rank 0's kernel is
            # still ending the run; it is watched until it has, so the job ends as the run did, not `running`. Only
            # our child's: a kernel found by a daemon started later may be one the user started by hand meanwhile
            self._watch_kernel(registry, watched, kernel)
            return
        if (run_dir / CONFIG).is_file():
            record_run(run_dir)  # a kernel killed by SIGKILL wrote nothing: its directory says died
            status = run_overview(run_dir, now)["status"]
            if code > 0 and not _kernel_since(run_dir, watched.pid_started):
                # a resume refused before its kernel took the run over: the directory still says how it last ended
                detail = (f"{RESUME_FAILED} (exit code {code}): {output_tail(self.runs_dir, watched.job_id)}; "
                          f"the run is still {status}")
            else:
                detail = f"run {status}" + (f", exit code {code}" if code >= 0 else "")
            if status == "died":  # SIGKILL, the OOM killer: its snapshot buffers hold memory until removed
                remove_dead_runs_buffers(run_dir)
            resume = status in RESUMED_STATUSES and not detail.startswith(RESUME_FAILED) and has_checkpoints(run_dir)
            job = self._job(registry, watched.job_id) if resume else None
            if job is not None and job.get("resumes_left"):
                try:
                    self._resume_dead(registry, watched.job_id, job, detail, now)
                except BaseException:  # the registry locked past its timeout, a full disk: settled again next round
                    self.watched[watched.job_id] = watched
                    raise
                return
            if status == "died" and not detail.startswith(RESUME_FAILED):
                log.warning("%s: the kernel died (no summary); %s", watched.job_id,
                            f"`trainbus runs resume {watched.job_id} --runs-dir {shlex.quote(str(self.runs_dir))}` "
                            f"continues it from its newest checkpoint"
                            if has_checkpoints(run_dir) else
                            "it had no checkpoint yet: submit it again to train it")
        else:
            # killed (the OOM killer, kill -9) while its target was still built: died, as a kernel killed later
            # is, unless its output says why it failed; gone while no daemon watched it (-1): the same
            how = (f"killed by {killed_by(-code)}" if code < -1 else
                   "its process was gone when the daemon came back" if code == -1 else f"exit code {code}")
            status, detail = ended_without_directory(how, output_tail(self.runs_dir, watched.job_id),
                                                     killed=code < -1, exit_code=code if code >= 0 else None)
            self._record_unstarted(registry, watched.job_id, status, detail, now)
        registry.move_job(watched.job_id, JOB_ACTIVE, state="ended", ended_ts=now, exit_code=code, detail=detail,
                          env=None)
        log.info("%s: %s", watched.job_id, detail)

    def _watch_kernel(self, registry: Registry, watched: Watched, kernel: int) -> None:
        """Watch the run's kernel in place of the job's process, which is gone; recorded, so that a daemon started
        meanwhile adopts the kernel."""
        started = process_start_time(kernel)
        registry.move_job(watched.job_id, JOB_ACTIVE, pid=kernel, pid_started=started)
        self.watched[watched.job_id] = Watched(watched.job_id, kernel, started, watched.devices, None,
                                               watched.resumes_left)
        log.info("%s: its process (pid %d) is gone, its kernel (pid %d) ends the run; watched", watched.job_id,
                 watched.pid, kernel)

    @staticmethod
    def _job(registry: Registry, job_id: str) -> dict[str, Any] | None:
        return registry.job(job_id, JOB_ACTIVE)

    def _resume_dead(self, registry: Registry, run_id: str, job: dict[str, Any], detail: str, now: float) -> None:
        """A run submitted with --max-resumes whose kernel died (the OOM killer, kill -9, a reboot) or was killed
        (SIGTERM: `interrupted`), with a checkpoint: its resume is queued at once in the job's place, as
        `trainbus runs resume RUN --detach` would queue it, with one resume fewer left. A stop (`runs stop`,
        `daemon cancel`) ends a run `stopped`, which is never resumed."""
        left = job["resumes_left"] - 1
        # the command it was submitted with, continued in place: its own --resume (a checkpoint file it started
        # from, a `runs resume`'s path) gives way, as an option given twice with two values is refused
        # A config file too: `--resume RUN` with `--config` is a new run from RUN's checkpoint, which under RUN's own
        # id fails at once (its directory exists); the run continued in place reads its config.json, the file's
        # settings included
        argv = _without_option(_without_option(job["argv"], "--config"), "-c")
        argv = [word for word in argv if not (word.startswith("-c") and len(word) > 2)]  # -cFILE, click's short form
        if _last_option(argv, "--resume") != run_id or _last_option(argv, "--runs-dir") != str(self.runs_dir):
            argv = [*_without_option(argv, "--resume"), "--resume", run_id, "--runs-dir", str(self.runs_dir)]
        # its submission time kept: the queue's order is by it, and the run holds its place before the runs submitted
        # after it (a power cut's daemon came back to start a night's queue first and the run that trained last)
        resume = {**job, "state": "queued", "argv": argv, "resumes_left": left, "devices": None,
                  "pid": None, "pid_started": None, "started_ts": None, "ended_ts": None, "exit_code": None,
                  "detail": None}
        run = queued_resume(run_overview(self.runs_dir / run_id, now), f"the daemon (--max-resumes: {left} left "
                                                                            f"after this)")
        # the job's row becomes its resume's, with the run's, in one transaction: a daemon killed meanwhile leaves
        # the job running with its process gone, which the next one settles (and resumes) again
        registry.submit(resume, run, now, replacing=True)
        log.warning("%s: %s; resumed from its newest checkpoint (--max-resumes: %d left after this)", run_id, detail,
                    left)

    def _fail_unstarted(self, registry: Registry, job: dict[str, Any], why: str, now: float,
                        from_states: list[str] | None = None) -> None:
        if registry.move_job(job["id"], from_states or ["queued"], state="ended", ended_ts=now, detail=why, env=None):
            self._record_unstarted(registry, job["id"], "failed", why, now)
            log.warning("%s: not started: %s", job["id"], why)

    def _record_unstarted(self, registry: Registry, run_id: str, status: str, error: str, now: float) -> None:
        rows = registry.runs(now)
        row = rows.get(run_id) or {"id": run_id}
        if row.get("dir") is None:  # a run that has a directory is described by it
            job = registry.job(run_id, JOB_ACTIVE + ("ended",)) or {}
            started = job.get("started_ts") or now  # listed where it ran, among the others (newest first)
            registry.record([{**row, "status": status, "error": error, "started_ts": started, "ended_ts": now}], now)

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "runs_dir": str(self.runs_dir), "devices": self.devices,
                "max_concurrent": self.max_concurrent, "remote": self.remote_endpoint,
                "running": {w.job_id: {"pid": w.pid, "devices": w.devices, "resumes_left": w.resumes_left,
                                       **self._listening(w)} for w in self.watched.values()},
                # why the last round failed: the log may be on the disk that is full
                "trouble": "; ".join(t for t in (self.trouble, self.registry_lost) if t)}

    def _listening(self, watched: Watched) -> dict[str, str]:
        """{"listen": its control endpoint} for a run whose kernel listens on TCP (`--listen`, a free port maybe):
        the endpoint is in its connection.json, on this host, where a remote key that submitted the run to watch it
        cannot look. A file older than the process is an earlier session's (a resume that does not listen)."""
        path = self.runs_dir / watched.job_id / CONNECTION_FILE
        try:
            if watched.pid_started is not None and path.stat().st_mtime < watched.pid_started - 1:
                return {}
            return {"listen": read_connection_file(path)["control"]}
        except (OSError, KeyFileError):
            return {}


def why_not_resumable(run_dir: Path, epochs: int | None, rank: bool = False, remote: bool = False) -> str | None:
    """Why the run in run_dir cannot be resumed now, in one line with the fix; None when it can: it is still going
    (unless `rank`: a rank of --nproc sees rank 0's kernel, its own run), its resume waits in the queue, or it
    has trained every epoch it planned and `epochs` asks for no more. `remote`: said to a key's `daemon submit`,
    whose fixes are the remote commands (it has no `runs stop` or `run` on the daemon's host)."""
    run = run_overview(run_dir)
    stop = f"trainbus daemon cancel {run_dir.name} --remote ..." if remote else f"trainbus runs stop {run_dir.name}"
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
              else f"trainbus run --resume {run_dir.name}{_runs_dir_option(run_dir)} --epochs N")
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


def runs_dir_option(runs_dir: Path) -> str:
    """` --runs-dir DIR` for a command suggested about runs_dir when it is not the default ./runs, else "": quoted as
    a shell takes it (`~/My Experiments/runs` pasted bare is two words)."""
    from .config import RunConfig

    if Path(runs_dir).resolve() == Path(RunConfig.runs_dir).resolve():
        return ""
    return f" --runs-dir {shlex.quote(str(runs_dir))}"


def resumed_when_settled(runs_dir: Path, job: dict[str, Any]) -> int | None:
    """The resumes left to a started job of runs_dir whose process is gone when a daemon started now would resume it
    as it settles it (Daemon._settle: its run died or was interrupted, it has a checkpoint, it was submitted with
    --max-resumes and has some left); None when that daemon records it as ended."""
    left, run_dir = job.get("resumes_left") or 0, Path(runs_dir) / job["id"]
    if not left or not (run_dir / CONFIG).is_file() or not has_checkpoints(run_dir) \
            or not _kernel_since(run_dir, job.get("pid_started")):  # a resume refused before it trained: not again
        return None
    return left if run_overview(run_dir, time.time())["status"] in RESUMED_STATUSES else None


def ended_jobs(registry: Registry) -> list[dict[str, Any]]:
    """The STATUS_ENDED jobs that ended last, each with how it went: its run's status and error, except for a resume
    refused before training, whose run is still as it last ended (failed, with the job's detail as the error)."""
    return [{**job, "status": "failed", "error": job["detail"]} if str(job.get("detail")).startswith(RESUME_FAILED)
            else job for job in registry.ended_jobs(STATUS_ENDED)]


def _kernel_since(run_dir: Path, ts: float | None) -> bool:
    """A kernel started in run_dir at or after ts (each kernel writes its kernel.pid as it starts)."""
    try:
        return ts is None or (run_dir / KERNEL_PID).stat().st_mtime >= ts - 1.0
    except OSError:
        return False


def _last_option(argv: list[str], flag: str) -> str | None:
    """The value the last `FLAG VALUE` or `FLAG=VALUE` among a submitted command line's words gives; None if none."""
    value = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(f"{flag}="):
            value = word.split("=", 1)[1]
    return value


def _without_option(argv: list[str], flag: str) -> list[str]:
    """A submitted command line's words less each `FLAG VALUE` and `FLAG=VALUE`."""
    words, left = iter(argv), []
    for word in words:
        if word == flag:
            next(words, None)
        elif not word.startswith(f"{flag}="):
            left.append(word)
    return left


def epochs_of(argv: list[str]) -> int | None:
    epochs = _last_option(argv, "--epochs")
    return int(epochs) if epochs is not None and epochs.isdigit() else None


def resumed_run(argv: list[str], runs_dir: Path) -> Path | str | None:
    """The run directory `--resume RUN` names in runs_dir (None: no --resume, or a checkpoint file, which starts a
    new run), or why it cannot be (a str)."""
    resume = _last_option(argv, "--resume")
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
    from .daemon_client import request  # it imports this module

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
    if not (Path(runs_dir) / REGISTRY_NAME).is_file():
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
    if not (Path(runs_dir) / REGISTRY_NAME).is_file():
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
    if Path(run["dir"]) != (Path(runs_dir) / run["id"]).resolve() or not (Path(runs_dir) / REGISTRY_NAME).is_file():
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
    if not (Path(runs_dir) / REGISTRY_NAME).is_file():
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
                               f"whose id does have ended or were cancelled: `trainbus daemon status` shows the queue)")
            raise JobError(_not_queued(registry.job(held[0]) if held else None, held[0] if held else run_id,
                                       runs_dir, remote))
    return run_id
