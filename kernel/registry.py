"""The run registry: one SQLite table per runs directory, so `trainbus runs list` (and the daemon) need not read
every run directory to know what ran.

`<runs_dir>/registry.sqlite` holds one row per run: status, target, flags, start and end, duration, the last and
best metrics, plugin trouble, last seq and step. The run directories stay the source of truth: a row is what
`run_overview` read from its directory at one moment (`observed_ts`), and `trainbus runs reindex` rebuilds
the whole table from the directories.

Who writes: the kernel, as its run starts and once it ended (kernel/session.py, `record_run`); `runs list`, for
the rows it finds out of date (a running run, a directory with no row, a row whose directory moved, an ended run
whose summary.json or config.json changed after its row was written). A row only
ever gives way to a newer observation, so a slow `runs list` never puts back what a kernel wrote after it looked.

Several writers (kernels, the daemon, `runs list` loops) share the file safely: WAL mode (readers never wait for a
writer), every write is one short `BEGIN IMMEDIATE` transaction (no lock upgrade that could deadlock), and a writer
waits up to BUSY_TIMEOUT_S for another. A registry that cannot be written never fails a run: one warning line,
and the run directory still holds the run.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import sqlite3
import sys
import time
import urllib.parse
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .daemon_files import unwatched_tail
from .journal_history import iso_time
from .pids import process_alive
from .private_dirs import others_can_write, others_can_write_file
from .registry_rows import (CANCELLED, COLUMNS, JOB_COLUMNS, JOB_JSON_COLUMNS, QUEUED, STATUSES, from_row, job_from_row,
                            job_row, text_list, to_row, unreadable_row)
from .run_json import CONFIG, SUMMARY
from .run_overview import run_overview
from .runs import find_runs, newest_first, no_runs_dir, overview_or_unreadable

REGISTRY_NAME = "registry.sqlite"
SCHEMA_VERSION = 8  # PRAGMA user_version; a newer trainbus adds columns and tables in _migrate (2: jobs, 3: who,
# 4: runs.hyperparameters, 5: runs.training_metrics, 6: jobs.resumes_left, 7: jobs.python, 8: runs.last_epoch_partial)
BUSY_TIMEOUT_S = 5.0  # a write waits this long for another writer's transaction (each takes milliseconds)
LIVE = ("running",)  # a status that changes with no one to write it (a kernel killed): read anew at every list
# A run's row written, unless the one there was observed later (a slow `runs list` never puts back an older view).
_UPSERT = (f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) ON CONFLICT (id) DO "
           f"UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in COLUMNS if n != 'id')} "
           f"WHERE excluded.observed_ts >= runs.observed_ts")
# The queue's bound. A daemon's round reads the queue's head only, but `daemon status`, `runs list` and the rows
# themselves (each with its environment, a few KiB) grow with it: a script submitting in a loop is stopped at a
# figure no one queues by hand (Slurm's default MaxJobCount is 10,000 for a whole cluster).
MAX_QUEUED = 10_000
MAX_RESUMES = 1000  # --max-resumes' bound: each resume is a kernel's start, and a run dying at once would loop
JOB_STATES = ("queued", "starting", "running", "ended", "cancelled")
JOB_ACTIVE = ("queued", "starting", "running")  # a job in one of these holds its run id

_warned: set[str] = set()


class JobError(Exception):
    """A submission or cancellation the queue cannot take (the CLI prints one line, exit 2)."""


class _Unwritable(Exception):
    """A registry on a read-only mount, which list_runs does not write back to."""


class RegistryError(Exception):
    """The registry cannot be used: no runs directory, a file from a newer trainbus, or not a registry (one line,
    naming the fix)."""


class RegistryUnreadable(RegistryError):
    """The file is not an SQLite database, or a damaged one: `trainbus runs reindex` sets it aside."""


class Registry:
    """A connection to one runs directory's registry; use as a context manager."""

    def __init__(self, runs_dir: Path, busy_timeout_s: float = BUSY_TIMEOUT_S):
        """RegistryError, in one line naming the fix, when the runs directory is missing or the file is not a
        registry; sqlite3.OperationalError when it is busy for longer than busy_timeout_s."""
        self.path = Path(runs_dir) / REGISTRY_NAME
        if not Path(runs_dir).is_dir():  # before anything is created: a registry is made only inside a runs dir
            raise RegistryError(no_runs_dir(Path(runs_dir)))  # a file there is another mistake than a typo
        # its queue is what the daemon starts, as this user: a registry others could have replaced is not read
        why = others_can_write(runs_dir) or others_can_write_file(self.path)
        if why:
            raise RegistryError(f"the run registry {self.path} is not this user's alone: {why}")
        # a runs directory on a read-only mount (an archive, a snapshot): read, never written, by no one
        self.read_only = self.path.is_file() and read_only_mount(self.path)
        try:
            if not self.path.exists():  # owner-only, like all of a run's files; SQLite gives its -wal, -shm the same
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600))
        except OSError as exc:
            raise RegistryError(f"cannot create the run registry {self.path}: {exc.strerror or exc}") from None
        # isolation_level=None: no implicit transactions; each write below says BEGIN IMMEDIATE itself
        self.db = self._read_only_db() if self.read_only else sqlite3.connect(self.path, timeout=busy_timeout_s,
                                                                              isolation_level=None)
        try:
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if self.read_only:  # a schema it cannot migrate is a newer trainbus's, or not a registry
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise RegistryError(f"{self.path} (on a read-only mount) is of schema {version}, not "
                                        f"{SCHEMA_VERSION}: runs list reads the run directories instead")
                return
            self.db.execute("PRAGMA journal_mode = WAL")  # persistent: said once per file, cheap to repeat
            self.db.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a power cut may lose the last rows
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            if type(exc) is not sqlite3.DatabaseError:  # locked, read-only, ...: not the file's fault
                raise
            raise RegistryUnreadable(f"{self.path} is not a run registry ({exc}): `trainbus runs reindex --runs-dir "
                                     f"{shlex.quote(str(runs_dir))}` sets it aside and builds a new one from the run "
                                     f"directories (a daemon's queue in it is lost)") from None
        except BaseException:
            self.db.close()
            raise

    def _read_only_db(self) -> sqlite3.Connection:
        """The registry of a read-only mount. A WAL database is read with its -wal and -shm files (mode=ro), which
        the last writer's close removed, and which cannot be made here: then as a file that cannot change
        (immutable=1), which it cannot."""
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}"
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None)  # opens lazily: the read tells
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError:
            db.close()
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")  # take the write lock now (waiting busy_timeout), never mid-transaction
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        if self.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return
        with self._write():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(f"{self.path} was written by a newer trainbus (schema {version}); "
                                    f"upgrade trainbus, or delete it and run `trainbus runs reindex`")
            if version < 1:
                columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
                self.db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
                self.db.execute("CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status)")
            if version < 2:
                columns = ", ".join(f"{name} {kind}" for name, kind in JOB_COLUMNS.items())
                self.db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns})")
                self.db.execute("CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, submitted_ts)")
            have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
            for column, kind in (("submitted_by", "TEXT"), ("resumes_left", "INTEGER"),  # < 3, < 6
                                 ("python", "TEXT")):  # < 7
                if column not in have:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")  # rows of before: NULL
            have = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
            for column, kind in (("hyperparameters", "TEXT"), ("training_metrics", "TEXT"),  # < 4, < 5
                                 ("last_epoch_partial", "INTEGER")):  # < 8
                if column not in have:
                    self.db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")  # rows of before: NULL
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- writing -------------------------------------------------------------------------------------

    def record(self, runs: Iterable[dict[str, Any]], observed_ts: float) -> None:
        """Upsert runs (run_overview's dicts) as seen at observed_ts; a row observed later is kept as it is."""
        rows = [to_row(run, observed_ts) for run in runs if run.get("status") in STATUSES]
        with self._write():
            self.db.executemany(_UPSERT, rows)

    # -- the daemon's queue ---------------------------------------------------------------------------

    def submit(self, job: dict[str, Any], run: dict[str, Any], observed_ts: float, replacing: bool = False) -> None:
        """Queue `job` and show its run as queued, in one transaction. JobError when its run id is already
        queued or running (a run is continued by one kernel at a time), unless `replacing`: the daemon queues a
        job's resume in its place as it settles it (Daemon._resume_dead)."""
        with self._write():
            held = self.db.execute("SELECT state, pid, pid_started FROM jobs WHERE id = ?", (job["id"],)).fetchone()
            if held is not None and not replacing and job_holds_run(dict(zip(("state", "pid", "pid_started"), held))):
                raise JobError(f"run {job['id']} is already {held[0]} in the daemon's queue")
            queued = self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= MAX_QUEUED and not replacing:
                raise JobError(f"the daemon's queue holds {queued} runs, the most it takes: let some start, or take "
                               f"some off it (`trainbus daemon cancel RUN`), then submit again")
            self.db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(JOB_COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(JOB_COLUMNS))})", job_row(job))
            self.db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(COLUMNS))})", to_row(run, observed_ts))

    def cancel_job(self, job_id: str, now: float, detail: str, run: dict[str, Any] | None = None) -> bool:
        """Take job_id off the queue, and say so in its run's row, in one transaction: a queued resume's row is
        `run` again (its directory's overview); a new run's, which has no directory, stays, cancelled with `detail`
        (who took it off), for `runs list` and `runs show` until `runs delete`. False when it was not queued."""
        with self._write():
            cursor = self.db.execute("UPDATE jobs SET state = 'cancelled', ended_ts = ?, env = NULL WHERE id = ? AND "
                                     "state = 'queued'", (now, job_id))
            if cursor.rowcount != 1:
                return False
            if run is not None:
                self.db.execute(_UPSERT, to_row(run, now))
            else:
                self.db.execute("UPDATE runs SET status = ?, detail = ?, ended_ts = ?, observed_ts = ? WHERE id = ? "
                                "AND dir IS NULL", (CANCELLED, detail, now, now, job_id))
        return True

    def jobs(self, states: Iterable[str] = JOB_STATES) -> list[dict[str, Any]]:
        """The jobs in these states, oldest submission first."""
        with closing(self._select_jobs(JOB_COLUMNS, states)) as cursor:
            return [job_from_row(row) for row in cursor]

    def each_job(self, states: Iterable[str]) -> Iterator[dict[str, Any]]:
        """The jobs in these states, oldest submission first, read as they are asked for: a round that starts the
        queue's first runs does not decode the thousands behind them (their argv and environment)."""
        with closing(self._select_jobs(JOB_COLUMNS, states)) as cursor:
            for row in cursor:
                yield job_from_row(row)

    def job(self, job_id: str, states: Iterable[str] = JOB_STATES) -> dict[str, Any] | None:
        """The job job_id when it is in one of these states; None when it is not."""
        states = list(states)
        row = self.db.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = ? AND state IN "
                              f"({', '.join('?' * len(states))})", [job_id, *states]).fetchone()
        return None if row is None else job_from_row(row)

    def job_ids(self, states: Iterable[str] = JOB_STATES) -> list[str]:
        """The ids of the jobs in these states, oldest submission first (nothing else of them decoded)."""
        with closing(self._select_jobs(("id",), states)) as cursor:
            return [row[0] for row in cursor]

    def _select_jobs(self, columns: Iterable[str], states: Iterable[str]) -> sqlite3.Cursor:
        states = list(states)
        return self.db.execute(f"SELECT {', '.join(columns)} FROM jobs WHERE state IN "
                               f"({', '.join('?' * len(states))}) ORDER BY submitted_ts, id", states)

    def ended_jobs(self, limit: int) -> list[dict[str, Any]]:
        """The `limit` jobs that ended (or were cancelled) last, newest first, each with its run's status and error
        from the runs table (what `runs list` shows for it), "cancelled" for a cancelled one: "deleted" when it has
        no row there any more (`runs delete`, or its directory removed by hand, which `runs list` forgets), a
        cancelled one's too."""
        cursor = self.db.execute(
            "SELECT jobs.id, jobs.state, jobs.ended_ts, jobs.detail, jobs.submitted_by, runs.status, runs.error, "
            "runs.stop_reasons FROM jobs LEFT JOIN runs ON runs.id = jobs.id WHERE jobs.state IN ('ended', "
            "'cancelled') ORDER BY jobs.ended_ts DESC, jobs.id LIMIT ?", (limit,))
        return [{"run": run, "status": "deleted" if not status else "cancelled" if state == "cancelled" else status,
                 "ended_ts": ended_ts, "submitted_by": by, "error": error, "detail": detail,
                 "stop_reasons": text_list(reasons)}
                for run, state, ended_ts, detail, by, status, error, reasons in cursor]

    def move_job(self, job_id: str, from_states: Iterable[str], **fields: Any) -> bool:
        """Set `fields` (state among them) on a job still in one of from_states; False when it was not (someone
        cancelled it, or another daemon took it): the compare and the set are one transaction."""
        from_states = list(from_states)
        names = list(fields)
        values = [json.dumps(fields[n]) if n in JOB_JSON_COLUMNS and fields[n] is not None else fields[n]
                  for n in names]
        with self._write():
            cursor = self.db.execute(
                f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ? AND state IN "
                f"({', '.join('?' * len(from_states))})", [*values, job_id, *from_states])
            return cursor.rowcount == 1

    def forget(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        if ids:
            with self._write():
                self.db.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in ids])

    def replace(self, runs: Iterable[dict[str, Any]], observed_ts: float) -> None:
        """Every row with a directory replaced by `runs`, in one transaction (readers see before or after); the
        daemon's runs that have none (queued, or failed before their kernel made one) are kept."""
        rows = [to_row(run, observed_ts) for run in runs if run.get("status") in STATUSES]
        with self._write():
            self.db.execute("DELETE FROM runs WHERE dir IS NOT NULL")
            self.db.executemany(f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(COLUMNS))})", rows)

    # -- reading -------------------------------------------------------------------------------------

    def runs(self, now: float) -> dict[str, dict[str, Any]]:
        """Every row, as run_overview's dicts, by id."""
        cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM runs")
        return {row[0]: from_row(row, now) for row in cursor}


def read_only_mount(path: Path) -> bool:
    """Whether `path` is on a filesystem mounted read-only (False when that cannot be told)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def cannot_read(runs_dir: Path, exc: sqlite3.Error) -> str:
    """Why a registry SQLite could not open or read is unknown (a full disk is the usual cause: WAL mode writes to
    open; a read-only mount the other): the file and the fix, for `daemon status`, whether a daemon serves or not."""
    if read_only_mount(runs_dir):  # "free space there" would send the user after a fix that cannot work
        return (f"{Path(runs_dir) / REGISTRY_NAME} cannot be changed ({exc}): {Path(runs_dir).resolve()} is on a "
                f"read-only filesystem; do this where the runs directory is mounted writable")
    return f"{Path(runs_dir) / REGISTRY_NAME} cannot be read ({exc}); free space there (a full disk says this)"


def job_holds_run(job: dict[str, Any]) -> bool:
    """Whether a job still holds its run: queued, or started and its process alive. A started job whose process
    is gone while no daemon was up to settle it (the daemon stopped or killed first) holds nothing: the run's
    directory tells how it ended, and it may be resumed or deleted without starting a daemon first."""
    if job["state"] not in JOB_ACTIVE:
        return False
    if job["state"] == "queued" or job["pid"] is None:  # being started: the daemon knows its process soon
        return True
    return process_alive(job["pid"], job["pid_started"])


# -- what the kernel and the CLI call ----------------------------------------------------------------

def record_run(run_dir: Path) -> None:
    """The kernel's word on its run, as it starts and once it ended. Never raises: a registry that cannot be
    written costs one warning line; the run directory still holds the run."""
    run_dir = Path(run_dir)
    try:
        observed = time.time()
        with Registry(run_dir.parent) as registry:
            registry.record([run_overview(run_dir, observed)], observed)
    except Exception as exc:  # noqa: BLE001 -- anything the index does wrong must not touch training
        warn(run_dir.parent, exc)


def list_runs(runs_dir: Path, statuses: tuple[str, ...] = (), target: str | None = None,
              now: float | None = None) -> list[dict[str, Any]]:
    """The runs of runs_dir, newest first (runs.list_runs's dicts), through the registry: a row is read from its
    directory only when it may be out of date, and written back. Without a usable registry, from the directories.

    statuses: keep only these; target: keep runs whose target contains it."""
    now = time.time() if now is None else now
    dirs = {path.name: path.resolve() for path in find_runs(runs_dir)}
    try:
        with Registry(runs_dir) as registry:
            known = registry.runs(now)
            observed = dict(registry.db.execute("SELECT id, observed_ts FROM runs"))
            started = {job["id"]: job for job in registry.jobs(["starting", "running"])}  # by the daemon
            # queued resumes (a queue of new runs has no directories: not decoded, each with its environment)
            waiting = [registry.job(i) for i in registry.job_ids([QUEUED]) if i in dirs]
            stale = [name for name, path in dirs.items()
                     if name not in known or known[name]["status"] in LIVE or known[name]["dir"] != str(path)
                     or name in started  # the daemon started it: its directory may say so any moment
                     or "unreadable_row" in known[name]  # garbled by hand: its directory says again
                     or _changed_since(path, known[name]["status"], observed.get(name))]
            fresh = {name: overview_or_unreadable(dirs[name], now) for name in stale}
            try:
                if registry.read_only:  # read from the directories, as they are read each time
                    raise _Unwritable
                registry.record(fresh.values(), now)
                registry.forget(i for i, run in known.items() if i not in dirs and run["dir"] is not None)
            except _Unwritable:
                pass
            except sqlite3.Error as exc:  # readable but not writable (someone else's runs dir): list all the same
                warn(runs_dir, exc)
        known.update(fresh)
        known.update({i: unreadable_row(run) for i, run in known.items() if "unreadable_row" in run})
        for job in waiting:  # a resume waits in the queue: its directory tells how it last ended
            if job is not None and known[job["id"]]["status"] != QUEUED:
                known[job["id"]] = queued_resume(known[job["id"]], job["submitted_by"])
        for i, job in started.items():  # started, and its kernel has not made the run directory yet, or not
            if i in known:              # yet said in a resumed run's directory that it runs
                known[i] = resume_started(known[i], job) if i in dirs else as_started(
                    known[i], job, functools.partial(unwatched_tail, runs_dir, i))
        found = [known[name] for name in dirs] + [run for i, run in known.items() if run["dir"] is None
                                                  and i not in dirs]
    except (sqlite3.Error, OSError, RegistryError) as exc:
        warn(runs_dir, exc)
        found = [overview_or_unreadable(path, now) for path in dirs.values()]
    return newest_first([run for run in found if (not statuses or run["status"] in statuses)
                         and (target is None or _bare(target) in _bare(run.get("target") or ""))])


def _changed_since(run_dir: Path, status: str, observed_ts: Any) -> bool:
    """An ended run's files that say something else than its row may: its summary.json or config.json written after
    the row was observed (garbled, edited), a summary gone from a run the row has ended, or one there for a run the
    row has died (a summary its full disk kept elsewhere moved in, keeping its old time). Two stats a run. A queued
    resume's row is the queue's word (list_runs reads its directory's through queued_resume)."""
    if status == QUEUED:
        return False
    times = []
    for name in (SUMMARY, CONFIG):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            times.append(None)
    if (times[0] is None) != (status == "died"):
        return True
    return not isinstance(observed_ts, (int, float)) or any(t is not None and t > observed_ts for t in times)


def _bare(target: str) -> str:
    """A target as --target compares it: `./train.py` and `train.py` name the same file, however each was given."""
    return target.removeprefix("./").replace("/./", "/")


def has_registry(runs_dir: Path) -> bool:
    """Whether runs_dir holds a registry file; False where this user cannot search runs_dir (someone else's: the
    command says so as it lists or looks up its runs, find_runs and resolve_run)."""
    try:
        return (Path(runs_dir) / REGISTRY_NAME).is_file()
    except OSError:
        return False


def runs_without_directory(runs_dir: Path, prefix: str) -> list[tuple[str, str, str | None]]:
    """(id, status, detail), by id, of the runs starting with `prefix` that the registry alone holds (queued, or
    failed before their kernel made a directory): a run-id prefix is unique only among these and the directories
    together. [] without a usable registry (the directories are all there is then)."""
    if not has_registry(runs_dir):
        return []
    try:
        prefix.encode()
    except UnicodeEncodeError:  # a byte that is not UTF-8 (os.fsdecode's surrogates): no run id has one
        return []
    try:
        with Registry(runs_dir) as registry:
            rows = registry.db.execute(f"SELECT {', '.join(COLUMNS)} FROM runs WHERE dir IS NULL "
                                       "AND substr(id, 1, ?) = ?", (len(prefix), prefix)).fetchall()
    except (sqlite3.Error, OSError, RegistryError):
        return []
    runs = [from_row(row, time.time()) for row in rows]  # a row garbled by hand: unreadable, as `runs list` says
    runs = [unreadable_row(run) if "unreadable_row" in run else run for run in runs]
    return sorted((str(run["id"]), run["status"], run["detail"]) for run in runs)


def as_started(run: dict[str, Any], job: dict[str, Any], unwatched_tail: Callable[[], str | None] | None = None
               ) -> dict[str, Any]:
    """A queued run's row once the daemon started it (`job` starting or running), before its kernel made the
    run's directory: running, by that process. A process that ended while no daemon watched it (the daemon
    stopped first) is over, as the next daemon will settle it: failed when its output ends in an `error:` line
    (`unwatched_tail()`: that line; None while a daemon lives, which settles it in a moment), else died."""
    if run["status"] != QUEUED or job["state"] not in ("starting", "running"):
        return run
    started = job.get("started_ts") or run.get("started_ts")  # listed among the others by it, not last
    tail = None if unwatched_tail is None or job_holds_run(job) else unwatched_tail()
    if tail is not None:
        status, error = ended_without_directory("while no daemon watched it", tail)
        return {**run, "status": status, "pid": None, "started_ts": started, "started_at": iso_time(started),
                "ended_ts": None, "detail": None, "error": error}
    return {**run, "status": "running", "pid": job["pid"], "started_ts": started, "started_at": iso_time(started),
            "detail": f"started by the daemon (pid {job['pid']}); its kernel is starting"}


def ended_without_directory(how: str, tail: str, killed: bool = False, exit_code: int | None = None
                            ) -> tuple[str, str]:
    """(status, error) of a started job whose process ended before its kernel made the run's directory: failed
    when it exited with a code, or its output (`tail`, daemon.output_tail) ends in an `error:` line; else died
    (killed, or gone unwatched with no word of why), which only submitting it again trains."""
    died = killed or (exit_code is None and not tail.startswith("error:"))
    return ("died" if died else "failed",
            f"ended before its run had a directory ({how}): {tail}" + ("; submit it again to train it" if died else ""))


def resume_started(run: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """A run's row while the daemon's resume of it starts (`job` starting or running, its process alive) and its
    directory still tells the last session's end (the resumed kernel rewrites kernel.pid only once its spec is
    built: seconds): running, by that process, and how it last ended; not `died`, which `runs list` said meanwhile."""
    if run["status"] in ("running", QUEUED) or job["state"] not in ("starting", "running"):
        return run
    started = job.get("started_ts")
    if started is None or (run.get("ended_ts") or 0) > started or not job_holds_run(job):  # this session ended
        return run
    last = run["status"] + (f" ({run['detail']})" if run.get("detail") else "")
    return {**run, "status": "running", "pid": job["pid"],
            "detail": f"resumed by the daemon (pid {job['pid']}); its kernel is starting; last {last}"}


def queued_resume(run: dict[str, Any], by: str | None) -> dict[str, Any]:
    """`run` (a run directory's overview) while its resume waits in the daemon's queue: queued, and how it last
    ended (a kernel that died starting it is queued again, and is no longer just `died`)."""
    last = run["status"] + (f" ({run['detail']})" if run.get("detail") else "")
    return {**run, "status": QUEUED, "detail": f"queued to be resumed by {by or '?'}; last {last}"}


def reindex(runs_dir: Path) -> tuple[list[dict[str, Any]], Path | None]:
    """Rebuild the registry from the run directories (the daemon's runs without one are kept): the runs found,
    newest first, and where a registry SQLite could not read at all was set aside (None when none was)."""
    now = time.time()
    found = [overview_or_unreadable(path, now) for path in find_runs(runs_dir)]
    set_aside = None
    try:
        registry = Registry(runs_dir)
    except RegistryUnreadable:
        # not a database, or a malformed one: kept for whoever wants to look, and a new one made in its place
        path = Path(runs_dir).resolve() / REGISTRY_NAME
        set_aside = path.with_name(f"{REGISTRY_NAME}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, set_aside)
        for journal in (f"{REGISTRY_NAME}-wal", f"{REGISTRY_NAME}-shm", f"{REGISTRY_NAME}-journal"):
            path.with_name(journal).unlink(missing_ok=True)
        registry = Registry(runs_dir)
    with registry:
        registry.replace(found, now)
    return newest_first(found), set_aside


def warn(runs_dir: Path, exc: Exception) -> None:
    """One line on stderr, once per registry and process."""
    path = str(Path(runs_dir).resolve() / REGISTRY_NAME)
    if path in _warned:
        return
    _warned.add(path)
    if isinstance(exc, RegistryError):  # names the file and the fix itself
        print(f"trainbus: warning: {exc}; the run directories still hold every run", file=sys.stderr)
        return
    reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else f"{exc.strerror or exc}"
    print(f"trainbus: warning: run registry {path} not usable ({reason}); the run directories still hold every "
          f"run (`trainbus runs reindex` rebuilds it)", file=sys.stderr)
