"""`trainbus run --nproc`: the same command in N processes (on M machines) under torch.distributed.run, and how
the group ended, said once as one process would say it."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import typer

from .cli_common import EXIT_CODES, UserError
from .cluster import LAUNCH_ERRORS
from .launch_wait import JOIN_TIMEOUT_S, RendezvousWatch, signal_name
from .pids import killed_by
from .private_dirs import process_scratch_dir, remove_scratch_dir


def check_rdzv_endpoint(endpoint: str) -> None:
    """UserError for an endpoint torchrun would wait on in vain (its rendezvous timeout, minutes): not HOST:PORT, or
    a host name that does not resolve."""
    import socket

    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rdzv-endpoint {endpoint!r} must be HOST:PORT (a port 1-65535), the same on every machine: "
                        f"one of them, and a port free there")
    try:
        socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UserError(f"--rdzv-endpoint {endpoint}: host {host!r} does not resolve ({exc.strerror or exc}); give one "
                        f"of the machines' names or addresses") from None


RANK_SEPARATOR = "\x1f"  # between the rank and its text in the launcher's errors file (_tell_launcher)
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")  # `run`'s, handed to torchrun


def under_a_launcher() -> bool:
    """This process is a rank of torchrun or srun (ours or the user's): it launches nothing itself."""
    from .cluster import detect

    return detect().distributed


def check_nproc(nproc: int) -> None:
    """UserError for more processes than the CPUs this command may use (a cgroup's or taskset's share, not the
    machine's count): each trains on one at least, and a typo (100000 for 10) would start ranks, each importing
    torch, until memory ran out."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > usable:
        raise UserError(f"--nproc {nproc}: this command may use {usable} CPU{'s' * (usable != 1)}, and each process "
                        f"trains on one at least (more processes than CPUs train slower, not faster): give --nproc "
                        f"{usable} or fewer")


def launch(launch: dict, runs_dir: str, continuing: str | None) -> NoReturn:
    """This same command in `nproc` processes (on each of `nnodes` machines) under torch.distributed.run, which
    restarts them up to `max_restarts` times; rank 0 keeps the run. Exits as the run ended (its summary.json):
    0 completed or stopped, 130 interrupted, 1 failed."""
    nproc, nnodes, rdzv_endpoint, max_restarts = (launch["nproc"], launch["nnodes"], launch["rdzv_endpoint"],
                                                  launch["max_restarts"])
    if under_a_launcher():
        raise UserError("--nproc, --nnodes or --max-restarts inside torchrun or srun: the launcher already started "
                        "the processes; drop them")
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine: one of "
                        f"them, and a port free there")
    if rdzv_endpoint and nnodes == 1:
        raise UserError("--rdzv-endpoint is where the machines of a --nnodes N run meet, and this run has one "
                        "(--nnodes 1, the default): give --nnodes N for N machines, or drop --rdzv-endpoint")
    if rdzv_endpoint:
        check_rdzv_endpoint(rdzv_endpoint)
    check_nproc(nproc)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun  # here: after the checks, which need no torch (seconds)

    from .cluster import LAUNCH, LAUNCH_RUN_ID, LAUNCHER_PID, ClusterError, launch_run_id
    from .runs import new_run_id

    argv, words = [], iter(sys.argv[1:])
    for word in words:  # the command as given, less what is torchrun's
        if word in LAUNCH_OPTIONS:
            next(words, None)
        elif not word.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            argv.append(word)
    meet = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
            "--rdzv-conf", f"join_timeout={JOIN_TIMEOUT_S}"] if nnodes > 1 else ["--standalone"]
    # every rank, and a restarted group, trains the same run (the daemon names it for a queued one)
    try:
        run_id = os.environ[LAUNCH_RUN_ID] = continuing or launch_run_id() or new_run_id()
    except ClusterError as exc:
        raise UserError(str(exc)) from None
    os.environ[LAUNCH] = json.dumps(launch)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # each rank ends the run once this process is gone, killed or not
    # torchrun hands its workers one TCP store for the whole job, and a restarted group's processes read
    # the failed group's gloo addresses from it (connection refused): rank 0 hosts a fresh one each round instead
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun gives each rank one intra-op thread unless told otherwise, in a five-line warning every launch; the
    # same choice made here, without the warning (a user's own OMP_NUM_THREADS stands)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torch's lines about its workers' exits ("Sending process ... closing signal SIGTERM", "failed (exitcode: 1)
    # local_rank: 1 ...") repeat what rank 0 says of the run; where rank 0 could not say it, a failure a restart
    # follows is said here (_Restarts)
    restarts = _Restarts(max_restarts, Path(runs_dir) / run_id / "summary.json", nnodes)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(restarts.heard)
    # and its agent's "Received 2 death signal, shutting down workers" on a Ctrl-C, which the run's end says
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(
        lambda record: "death signal" not in str(record.msg))
    failure, started = None, time.time()
    # This launch's own files: the ranks' errors and torchrun's logs (by default a torchelastic_* directory in /tmp,
    # one a launch, never removed). One of a launcher killed with SIGKILL is removed by the next launch.
    try:
        scratch = process_scratch_dir(f"trainbus-launch-{os.getuid()}")
    except OSError as exc:  # not ours (PermissionError names it and the fix), or a temp dir we cannot write
        raise UserError(f"{exc}") from None
    errors = scratch / "errors"
    errors.touch(0o600)
    os.environ[LAUNCH_ERRORS] = str(errors)
    # torchrun's own handling of Ctrl-C and SIGTERM (SignalException: it stops its ranks), from the start: it
    # installs it only once its ranks run, and its rendezvous may wait minutes for the other machines before that
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_signal_exception)
    watch = RendezvousWatch(nnodes, rdzv_endpoint, lambda line: print(line, file=sys.stderr), time.monotonic())
    try:
        with watch:
            torchrun([*meet, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                      "--log-dir", str(scratch / "torchelastic"), "-m", "trainbus.kernel.cli", *argv])
    except Exception as exc:  # ChildFailedError (which rank failed and how is above, from torchrun), SignalException
        failure = exc
    finally:
        said = errors.read_text(errors="replace")
        remove_scratch_dir(scratch)
    if said:  # a mistake in the command, found by the ranks (each wrote it): once, as in one process
        print(_first_said(said, nproc), end="", file=sys.stderr)
        raise typer.Exit(code=2)
    if not watch.started and isinstance(failure, (SignalException, RendezvousTimeoutError)):
        # no rank ever ran: the machines never met (a signal ended the wait, or torchrun's join timeout did)
        interrupted = isinstance(failure, SignalException)
        print(watch.stopped_line(failure.sigval) if interrupted else watch.timed_out_line(), file=sys.stderr)
        raise typer.Exit(code=130 if interrupted else 1)
    raise typer.Exit(code=_exit_code(Path(runs_dir) / run_id / "summary.json", started, failure))


def _exit_code(summary: Path, started: float, failure: Exception | None) -> int:
    """The launch's exit code from how the run ended (its summary.json, if this session wrote one), saying what
    rank 0 could not: a rank that failed with no word of it, one killed (which `runs resume` goes on from)."""
    # How the run ended, as rank 0 wrote it: a Ctrl-C or SIGTERM reaching the ranks ends the run interrupted (130),
    # whatever torchrun makes of its workers' exits.
    told = False
    try:
        if summary.stat().st_mtime < started:  # a continued run's last session's: this one never got that far
            raise ValueError(summary)
        status, told = json.loads(summary.read_text())["status"], True
    except (OSError, ValueError, KeyError, TypeError):
        status = "interrupted" if type(failure).__name__ == "SignalException" else "failed" if failure else None
        if status == "interrupted" and not summary.parent.exists():  # the ranks stopped as they built: as one process
            print(f"trainbus: {signal_name(failure.sigval)} before the run began; nothing was made", file=sys.stderr)
    if status == "failed" and failure is not None and not told:  # rank 0 said nothing of it
        said = _what_rank_0_did_not_say(failure, summary.parent)
        print(said or f"error: a training process failed ({type(failure).__name__}); its output is above",
              end="" if said else "\n", file=sys.stderr)
    elif status == "failed" and _killed_ranks(failure) and (summary.parent / "config.json").is_file():
        # rank 0 said which rank died; that the run's code did not fail it, and so it can go on, only this sees
        print(f"trainbus: {resume_line(summary.parent.name)}", file=sys.stderr)
    return 0 if status is None else EXIT_CODES.get(status, 1)  # None: rank 0 on another node


class _Restarts:
    """The failures of the group that torchrun restarts it for (--max-restarts), from its "failed (exitcode ...)"
    log record, which (like the rest of that logger's) is not shown. Rank 0 says a failed attempt's end in its
    summary, "torchrun restarts the group"; where it wrote none of this attempt (it was the rank killed, or the run
    had not begun), the group restarted without a word of why: the rank torchrun saw fail first is said here."""

    def __init__(self, max_restarts: int, summary: Path, nnodes: int):
        self.left, self.summary, self.nnodes = max_restarts, summary, nnodes
        self.attempt_began = time.time()

    def heard(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("failed (exitcode") and len(record.args or ()) >= 3 and self.left > 0:
            exitcode, local_rank, pid = record.args[:3]
            if not self._rank_0_said():
                oom = " (kill -9, or the out-of-memory killer: `dmesg` says which)"
                how = (f"was killed by {killed_by(-exitcode)}{oom * (exitcode == -signal.SIGKILL)}"
                       if isinstance(exitcode, int) and exitcode < 0 else f"exited with code {exitcode}")
                rank = f"rank {local_rank}" if self.nnodes == 1 else f"local rank {local_rank} of this machine"
                print(f"trainbus: {rank} (pid {pid}) {how}; torchrun restarts the group ({self.left} restart"
                      f"{'s' * (self.left != 1)} left): {restart_goes_on(self.summary.parent)}",
                      file=sys.stderr, flush=True)
            self.left -= 1
            self.attempt_began = time.time()
        return False  # said here or by rank 0, or a SIGTERM torchrun sent itself: none of torch's lines

    def _rank_0_said(self) -> bool:
        try:
            return self.summary.stat().st_mtime >= self.attempt_began
        except OSError:
            return False


def _first_said(said: str, nproc: int) -> str:
    """The first error the ranks wrote (_tell_launcher); one of the user's build() that not every rank of this
    machine met (data only some ranks have) names its rank, as a rank's error in training does."""
    entries = [entry.partition(RANK_SEPARATOR)[::2] for entry in said.split("\0") if entry]
    rank, text = entries[0]
    if rank and sum(other == text for _, other in entries) < nproc:
        trace, _, line = text.rpartition("error: ")
        text = f"{trace}error: rank {rank}: {line}"
    return text


def _what_rank_0_did_not_say(failure: Exception, run_dir: Path) -> str:
    """The launcher's lines for a run whose rank 0 wrote no summary: a rank that a signal killed (torchrun saw its
    exit: kill -9, the out-of-memory killer) first, then what the other ranks wrote of their own errors, less the
    collectives that the killed rank broke (gloo's "Connection reset by peer" is its effect, not its cause)."""
    from .failures import read_rank_errors

    oom = " (kill -9, or the out-of-memory killer: `dmesg` says which)"
    killed = [f"error: rank {rank} (pid {process.pid}) was killed by {process.signal_name()}"
              f"{oom * (process.exitcode == -signal.SIGKILL)}\n" for rank, process in _killed_ranks(failure)]
    errors = [e for e in read_rank_errors(run_dir) if not (killed and e.get("peer_gone"))]
    said = "".join(killed) + "".join(f"{e.get('trace') or ''}error: rank {e.get('rank')}: {e.get('error')}\n"
                                     for e in errors)
    if said and (run_dir / "config.json").is_file():
        said += f"trainbus: run {run_dir.name} died; {resume_line(run_dir.name)}\n"
    return said


def _killed_ranks(failure: Exception | None) -> list[tuple[int, Any]]:
    """(rank, its process failure) of the ranks a signal killed, by torchrun's ChildFailedError. Those it ended with
    SIGTERM itself once another was gone are left out: the cause is the one killed otherwise (a SIGTERM to a rank
    from outside, alone, stays)."""
    killed = sorted((rank, process) for rank, process in getattr(failure, "failures", {}).items()
                    if process.exitcode < 0)
    return [(rank, process) for rank, process in killed if process.exitcode != -signal.SIGTERM] or killed


def restart_goes_on(run_dir: Path) -> str:
    """Where a group torchrun restarts (--max-restarts) takes the run up again (session.py: continue_run)."""
    from .checkpointing import has_checkpoints

    return ("the run goes on in place from its newest checkpoint" if has_checkpoints(run_dir) else
            "the run goes on in place from where it began (it has no checkpoint yet)")


def resume_line(run_id: str) -> str:
    return f"`trainbus runs resume {run_id}` continues it from its newest checkpoint"


def _raise_signal_exception(signum: int, frame) -> None:
    """torchrun's termination handler: what its agent does with a signal, it does before its ranks run too."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))
