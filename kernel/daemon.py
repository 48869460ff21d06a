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

Which queued runs start each round, and on which GPUs, is kernel/placement.py's to say; what the CLI and the
remote endpoint do to the queue (submit, cancel, look a run up), kernel/daemon_queue.py's; where the `.daemon`
directory's files and the runs' output files are, kernel/daemon_files.py's.
"""

from __future__ import annotations

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
from typing import Any

from trainbus.proto.remote import CONNECTION_FILE, KeyFileError, read_connection_file

from .buffer_files import remove_dead_runs_buffers
from .checkpointing import has_checkpoints
from .daemon_files import OUTPUT_DIR, DaemonError, make_daemon_dir, open_output, output_file, output_tail
from .daemon_queue import (RESUME_FAILED, RESUMED_STATUSES, ids_starting, kernel_since, last_option, named,
                           several_runs, without_option)
from .kernel_log import cap_log
from .kernel_pid import kernel_process
from .pids import killed_by, process_alive
from .placement import place
from .registry import (JOB_ACTIVE, REGISTRY_NAME, JobError, Registry, RegistryError, ended_without_directory,
                       queued_resume, record_run)
from .run_json import CONFIG
from .run_overview import run_overview

log = logging.getLogger("trainbus.daemon")

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
                elif not (run_dir / CONFIG).is_file() or not kernel_since(run_dir, job["started_ts"]):
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
            overview = run_overview(run_dir, now)
            status = overview["status"]
            if status == "running":  # not its kernel (that one is watched above): `runs resume` by hand, meanwhile
                detail = (f"its process was gone; the run goes on in a kernel the daemon did not start (pid "
                          f"{overview.get('pid')})")
            elif code > 0 and not kernel_since(run_dir, watched.pid_started):
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
                            "it had no checkpoint (it ran without the checkpoint plugin, or died before its "
                            "first): submit it again to train it")
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
        argv = without_option(without_option(job["argv"], "--config"), "-c")
        argv = [word for word in argv if not (word.startswith("-c") and len(word) > 2)]  # -cFILE, click's short form
        if last_option(argv, "--resume") != run_id or last_option(argv, "--runs-dir") != str(self.runs_dir):
            argv = [*without_option(argv, "--resume"), "--resume", run_id, "--runs-dir", str(self.runs_dir)]
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
