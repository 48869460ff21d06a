"""One run from start to end: its device and ranks, run directory, bus and plugins, the loop, and how it ended."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from trainbus.proto import JOURNAL_NAME, events as ev
from trainbus.proto.remote import CONNECTION_FILE, KeyFileError, keys_dir

from .buffer_files import snapshot_directories
from .bus import Bus
from .checkpointing import find_checkpoint, has_checkpoints
from .collector import freeze_before_training
from .cluster import LAUNCH, LAUNCH_ERRORS, LAUNCH_RUN_ID, LAUNCHER_PID, Cluster, ClusterError, detect
from .config import (ONE_GPU_PER_RANK, ConfigError, RunConfig, check_metric_settings, check_run,
                     check_runs_dir_private)
from .distributed import GroupInterrupted, PortInUse, Ranks, broken_by_a_peer, distribute, join_group
from .failures import RANK_ERROR, rank_errors, what_failed, write_rank_error
from .kernel_log import log_to, stop_logging_to
from .journal import JournalInUse, check_free
from .interrupts import Interrupts
from .loop import Loop, pick_device, seed_everything
from .keys import KeyStore
from .memory import keep_freed_memory
from .pids import gone_within, signalled_when_gone
from .private_dirs import make_dirs
from .rank_stacks import StackAnswer, ask_ranks
from .remote import ListenError, check_listen
from .resuming import restore_checkpoint
from .registry import record_run
from .run_bus import PLUGIN_EXIT_TIMEOUT_S, close_bus, listen_on, open_bus, wait_drained, wait_ready
from .run_end import RunResult, reason, save_final_weights, write_summary
from .runs import write_kernel_pid
from .snapshot import SnapshotBuffers
from .spec import SpecError, TrainingSpec, build_with_flags, is_user_file, load_target, user_code_error, user_trace
from .stepping import Stepper, SteppingError
from .supervisor import PluginSpec

log = logging.getLogger("trainbus.kernel")

# After a SIGTERM the durable plugins get this long to catch up (then PLUGIN_EXIT_TIMEOUT_S to exit), not
# [run] drain_timeout_s: the run's end must be written before the SIGKILL a scheduler sends after its grace.
SIGTERM_DRAIN_S = 2.0
RANK_0_GONE_S = 5.0  # a rank whose collective rank 0's death broke waits this long to see it gone (pids.gone_within)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


RUN_ENV = ("RUN_ID", "RUN_DIR", "TRAINBUS_RUN_ID", "TRAINBUS_RUN_DIR")  # what user code sees while its run trains


class InterruptedBeforeStart(Exception):
    """Ctrl-C or SIGTERM while the run was being set up (torch importing, the model and data being built): nothing
    was made, nothing started."""


def run_training(cfg: RunConfig, run_id: str | None = None, install_sigint: bool = False,
                 announce: Callable[[str], None] = lambda line: None, continue_run: bool = False,
                 metric_settings: dict[str, str] | None = None) -> RunResult:
    """_run_training, with RUN_ENV as it was once it returns: a process that trains run after run (a notebook, a
    test, the daemon) never hands one run's directory to what it starts next."""
    saved = {name: os.environ.get(name) for name in RUN_ENV}
    # From the start: a Ctrl-C while the user's build() imports or loads raised KeyboardInterrupt wherever it was
    # (a numpy import cut halfway then failed the build with a RecursionError); now it is a stop before the run.
    interrupts = Interrupts(install_sigint)
    held: list[int] = []  # a continued run's directory, locked while its kernel sets it up (check_not_running)
    try:
        return _run_training(cfg, run_id, interrupts, announce, continue_run, metric_settings, held)
    finally:
        for fd in held:
            os.close(fd)
        interrupts.restore()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_training(cfg: RunConfig, run_id: str | None, interrupts: Interrupts, announce: Callable[[str], None],
                  continue_run: bool, metric_settings: dict[str, str] | None, held: list[int]) -> RunResult:
    """Train per the config with its plugins attached; never raises for what a plugin does.

    continue_run: `run_id` names an existing run, continued in place from its newest checkpoint (cfg.resume):
    same directory, its journal going on from its last whole seq, its logs and outputs appended to.
    Raises SpecError when the user's target cannot be built, InterruptedBeforeStart for a Ctrl-C meanwhile: nothing
    has started by then.
    metric_settings: "plugin: setting = value" -> the metric it names (a monitor, a field of a file name template);
    ConfigError, before the run directory is made, for one this spec does not produce.
    """
    started = time.monotonic()
    # the CLI's config was checked; one made in Python (a notebook) is checked here, but for its plugins' programs:
    # one that cannot be started fails that plugin, never the run (the supervisor says it)
    check_run(cfg, "RunConfig", programs=False)
    seed_everything(cfg.seed)
    try:
        cluster = detect()
    except ClusterError as exc:
        raise ConfigError(str(exc)) from None
    if cluster.distributed and os.environ.get(LAUNCHER_PID, "").isdigit():
        # a rank of `run --nproc`, whose launcher's end (a kill -9) is taken as its SIGTERM: the run ends interrupted
        signalled_when_gone(int(os.environ[LAUNCHER_PID]))
    device = _device_for(cfg, cluster)
    ranks = _join(cluster, device, interrupts, announce) if cluster.distributed else None
    run_id = run_id or os.environ.get(LAUNCH_RUN_ID) or new_run_id()
    if ranks is not None:
        run_id = ranks.meet(run_id)  # rank 0's: one run, one directory
    run_dir = Path(cfg.runs_dir).resolve() / run_id
    # The user's build() may change directory (to its data): the run's paths, its plugins' working directory and what a
    # resume reads a relative target from stay the command's (_from_where_it_ran).
    started_in, runs_path = os.getcwd(), run_dir.parent
    if cluster.restart_count and not continue_run and (run_dir / "config.json").is_file():
        # torchrun restarted the group after a rank failed (--max-restarts): the run the failed group trained goes
        # on in place, from its newest checkpoint; with none yet, from where it began (its start or --resume file)
        continue_run = True
        if has_checkpoints(run_dir):
            cfg.resume = str(run_dir)
    # The user's code (build, loaders, loss, metrics) sees where its run is, as plugins do: Guild's names and ours.
    os.environ.update(RUN_ID=run_id, RUN_DIR=str(run_dir), TRAINBUS_RUN_ID=run_id, TRAINBUS_RUN_DIR=str(run_dir))
    spec, flags, runs_given = _build(cfg, interrupts, started_in, runs_path, metric_settings)
    keys = _check_places(cfg)
    spec.model.to(device)  # before loading optimizer state, which follows its parameters' device
    stepper = _stepper(spec, device, cfg)
    warnings: list[str] = []  # said on the terminal and in kernel.log once the run has one
    resume_from = find_checkpoint(cfg.resume, runs_given, warnings) if cfg.resume else None
    if continue_run and (ranks is None or ranks.is_main):
        held.append(check_not_running(run_dir))
        # The last session's: this one's failures are new. Cleared before the ranks meet below, since from there
        # another rank may fail at once and write its own (write_rank_error).
        for stale in run_dir.glob(RANK_ERROR.format("*")):
            stale.unlink(missing_ok=True)
    if ranks is not None:  # rank 0's pick: a checkpoint landing meanwhile (a killed run's writer) must not split them
        resume_from = ranks.share(resume_from)
    resume_state = restore_checkpoint(spec, resume_from, cfg, flags, cluster.world_size, continue_run, warnings) \
        if resume_from else None
    if interrupts.count:  # Ctrl-C (or SIGTERM) while it was set up: leave before anything is made (every rank here)
        raise InterruptedBeforeStart(f"{interrupts.first} before the run began; nothing was made")
    interrupts.started = True  # from here a signal stops the run at its first batch boundary
    if ranks is not None:
        try:
            warnings += distribute(spec, stepper, ranks, device, cfg)
        except ValueError as exc:  # a loader it cannot shard: names it and the opt-out
            raise ConfigError(str(exc)) from None
        if not ranks.is_main:
            interrupts.restore()  # another rank stops where rank 0 decides; a signal acts on it as it always did
            return _run_other_rank(spec, stepper, ranks, device, cfg, resume_state, resume_from, run_id, run_dir)

    bus, checkpointer, sockets, handler = _open_run(cfg, spec, flags, run_dir, started_in, continue_run, keys,
                                                    warnings, announce)
    while held:  # the journal is this kernel's now: a kernel continuing the run after it is refused by that
        os.close(held.pop())
    for line in bus.journal.missing:  # a continued run's journal with a segment gone: plugins go on without it
        announce(f"warning: {line}")
    if bus.remote is not None:
        announce(f"listening with CURVE on {bus.remote.control_endpoint} (control), {bus.remote.events_endpoint} "
                 f"(events) and {bus.remote.bursts_endpoint} (bursts); clients: {run_dir / CONNECTION_FILE}")
    bus.run_state.run["target"] = cfg.target  # what `trainbus attach` shows; no event carries it
    # a SIGTERM to every process (systemd stopping the unit, SLURM preempting) ends the plugins too: not early leavers
    bus.supervisor.stop_requested = lambda: bool(interrupts.count)
    if ranks is not None and len(ranks.local_pids) > 1:  # a stall says where this machine's other ranks wait too
        bus.loop_watch.ask_other_ranks = lambda: ask_ranks(run_dir, ranks.local_pids, is_user_file)
    loop = Loop(spec, bus, device, stop_requested=interrupts.requested, vote_timeout_s=cfg.vote_timeout_s,
                checkpointer=checkpointer, stepper=stepper, ranks=ranks, session_info={"cluster": cluster.describe()},
                warn=lambda line: (log.warning("%s", line), announce(f"warning: {line}")))
    if resume_state is not None:
        loop.resume(resume_state, str(resume_from))
        # what the bus journals before training starts (its plugins starting, their first readings) is where the
        # run goes on from, as start_training_session will be, not at step 0 amid the run's later steps
        bus.numbering.position = (loop.step, loop.epoch)
        at = resume_state["trainbus"]
        where = f"epoch {at['epoch']}" + ("" if at["epoch_complete"] else f", batch {at['batches_done']}")
        announce(f"{'continuing run ' + run_id if continue_run else 'resuming'} from {resume_from} "
                 f"({where}, step {at['step']})")
    status, error, trace = "completed", None, ""
    try:
        bus.start()
        announce(f"run {run_id} on {device}: {cfg.target}, plugins: {', '.join(p.name for p in cfg.plugins) or 'none'}")
        missing = wait_ready(bus, cfg.ready_timeout_s)
        if missing:
            line = f"plugins not ready after {cfg.ready_timeout_s:.0f} s, training anyway: {', '.join(missing)}"
            log.warning("%s", line)
            announce(f"warning: {line}")
        freeze_before_training()
        with keep_freed_memory(cfg.keep_freed_memory):
            outcome = loop.run()
        if outcome.stopped_early:
            status = "interrupted" if interrupts.count else "stopped"
    except KeyboardInterrupt as exc:
        status, error = "interrupted", interrupts.what_raised(exc)
        if interrupts.count < 2:  # not our second signal: where it was raised, in their code if it was
            where, trace = user_trace(exc)
            error += where
        bus.publish(ev.RUN_FAILED, loop.step, loop.epoch, {"error": error})
    except BaseException as exc:  # SystemExit: the user's sys.exit(), which would end us without a word; any
        status = "failed"  # BaseException of theirs (a library's own timeout class) too: KeyboardInterrupt is above
        error, trace = what_failed(exc)
        tail = "".join(traceback.format_exc().splitlines(keepends=True)[-30:])
        if ranks is not None:  # a collective failing here is mostly another rank's failure: say whose, and why
            error, tail, trace = rank_errors(run_dir, error, tail, trace, cluster.local_world_size,
                                             pids=ranks.local_pids, peer_gone=broken_by_a_peer(exc))
        log.error("training failed:\n%s", tail)
        bus.publish(ev.RUN_FAILED, loop.step, loop.epoch, {"error": error, "traceback": tail})
    loop.outcome.steps = loop.step  # also when the loop never got to its own end to count them (Ctrl-C, an error)
    if bus.failure is not None:  # the journal's disk: the loop stopped at a step boundary for it
        status, error = "failed", bus.failure
        log.error("%s", error)
    if ranks is not None:
        ranks.close()
    # From here on a second Ctrl-C no longer raises: it cuts the drain and the plugins' exit short.
    interrupts.begin_closing()
    # The trained weights, loadable with torch.load(weights_only=True); also after the journal's disk filled up,
    # which stopped training at a step boundary: what it trained is whole, and may be all there is of it.
    final_in_place = False
    if status in ("completed", "stopped") or bus.failure is not None:
        status, error, final_in_place = save_final_weights(spec, loop, run_dir, run_id, status, error,
                                                           journal_failed=bus.failure is not None)
    drain_started = time.monotonic()
    # One Ctrl-C lets the plugins drain, as any run's end does; a second one cuts the wait short. A SIGTERM is a
    # scheduler's or a service manager's, whose SIGKILL follows it (SLURM's KillWait: 30 s by default): a short wait,
    # so that the plugins' exit and the summary come before that.
    by_sigterm = status == "interrupted" and interrupts.first == "SIGTERM"
    undrained = wait_drained(bus, SIGTERM_DRAIN_S if by_sigterm else cfg.drain_timeout_s, abort=interrupts.hurry)
    # While the journal's disk still refuses the final event no plugin can reach it (nothing is published before it
    # is journaled): no waiting for the plugins' exit, which they make at the final event.
    hurry = lambda: interrupts.hurry() or bus.journal_refused_since(drain_started)  # noqa: E731
    journal_error = close_bus(bus, run_dir, sockets, PLUGIN_EXIT_TIMEOUT_S, hurry)
    checkpointer.close()
    if journal_error is not None and bus.journal.backlog_bytes:  # kept in $TMPDIR, as the weights are, or lost
        kept = bus.journal.held_message()
        status, error = "failed", f"{error}; {kept}" if status == "failed" and error else kept
    if interrupts.hurry() and status in ("completed", "stopped"):
        status, error = "interrupted", f"interrupted (a second {interrupts.last}) while plugins drained"
    result = RunResult(run_id=run_id, run_dir=str(run_dir), status=status,
                       duration_s=round(time.monotonic() - started, 3), outcome=asdict(loop.outcome),
                       plugins=_plugin_summary(bus), undrained=undrained, bus=_counters(bus), error=error,
                       trace=trace, cluster=cluster.describe())
    write_summary(run_dir, result, final_in_place)
    record_run(run_dir)  # the run registry: how it ended
    stop_logging_to(handler)
    return result


def _open_run(cfg: RunConfig, spec: TrainingSpec, flags: dict[str, Any], run_dir: Path, started_in: str,
              continue_run: bool, keys: KeyStore | None, warnings: list[str], announce: Callable[[str], None]):
    """The run's directory (made, or a continued one reopened) with its config.json, kernel.log and registry row,
    and its bus with the plugins it starts: (bus, checkpointer, sockets, kernel.log's handler). ConfigError, with
    nothing left behind, for a port taken or a disk that refuses the directory."""
    # The TCP ports are bound before the run directory is made: a port already taken is one line and exit 2, with
    # no run left behind that never began.
    remote = listen_on(cfg.listen, keys) if keys is not None else None
    try:
        _make_runs_dir(run_dir.parent, cfg.runs_dir)
        if continue_run:
            (run_dir / "summary.json").unlink(missing_ok=True)  # the run is going again
        else:
            _make_dir(run_dir, cfg.runs_dir)
    except BaseException:
        if remote is not None:
            remote.close()
        raise
    handler = None
    try:  # a full disk here is one line, and a new run directory is not left half made
        run_dir.chmod(0o700)  # owner-only (whatever the umask): journal, logs, checkpoints, sockets are nobody else's
        write_kernel_pid(run_dir)  # `trainbus runs list`: a run without summary.json is running while this pid lives
        recorded = _recorded_config(run_dir) if continue_run else None  # read before it is written again
        (run_dir / "config.json").write_text(json.dumps(effective_config(cfg, spec, flags, started_in, recorded),
                                                        indent=2, default=str) + "\n")
        record_run(run_dir)  # the run registry: running (never raises; a registry it cannot write costs a warning)
        handler = log_to(run_dir / "kernel.log")
        for line in warnings:
            announce(f"warning: {line}")
            log.warning("%s", line)

        plugins = [PluginSpec(p.name, p.target, p.settings, p.command, console=(p.name == "console"), cwd=p.cwd)
                   for p in cfg.plugins]
        buffers = SnapshotBuffers(run_dir.name, snapshot_directories(run_dir, cfg.snapshot_dir))
        bus, checkpointer, sockets = open_bus(run_dir.name, run_dir, plugins, cfg.peer_limits(), buffers,
                                              cfg.checkpoint_every_n_epochs, cfg.checkpoint_every_n_steps,
                                              journal_backlog_bytes=int(cfg.journal_backlog_mb * 2**20),
                                              journal_segment_bytes=int(cfg.journal_segment_mb * 2**20),
                                              journal_compact=cfg.journal_compact,
                                              remote=remote, stalled_after_s=cfg.stalled_after_s)
    except OSError as exc:
        if handler is not None:
            stop_logging_to(handler)
        if remote is not None:
            remote.close()
        if not continue_run:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(f"cannot set up the run directory {run_dir}: {exc.strerror or exc}"
                          f"{f' ({exc.filename})' if exc.filename else ''}; free space there, or give --runs-dir "
                          f"another place") from None
    return bus, checkpointer, sockets, handler


def _join(cluster: Cluster, device: torch.device, interrupts: Interrupts, announce: Callable[[str], None]) -> Ranks:
    """This rank in its process group, once every rank has joined; a first Ctrl-C ends the wait."""
    interrupts.joining = True
    try:
        ranks = join_group(cluster, device, lambda: interrupts.count > 0, announce)
        interrupts.across_ranks = True
    except GroupInterrupted as exc:
        raise InterruptedBeforeStart(f"{interrupts.first}: {exc}; nothing was made") from None
    except PortInUse as exc:
        raise ConfigError(str(exc)) from None
    finally:
        interrupts.joining = False
    return ranks


def _build(cfg: RunConfig, interrupts: Interrupts, started_in: str, runs_path: Path,
           metric_settings: dict[str, str] | None) -> tuple[TrainingSpec, dict[str, Any], str]:
    """The user's spec built under the seed, with the flags its function was called with, and runs_dir as the
    lines that name it give it (absolute once their build() changed directory)."""
    try:
        # The target is imported under the seed, then the build starts from it again: as when the command line
        # imported it first, to read its flags (kernel/cli_run.py _apply_flags), so a script's top-level draws (a model
        # made there) and its build's are the seed's either way.
        load_target(cfg.target)
        seed_everything(cfg.seed)
        spec, flags = build_with_flags(cfg.target, dict(cfg.hyperparameters), cfg.epochs)
    except KeyboardInterrupt as exc:
        if interrupts.count or not interrupts.installed:  # our second Ctrl-C; or Python's own, a raise alike
            raise
        raise user_code_error(exc, cfg.target) from None  # the user's code raised it: their error, shown as one
    runs_given = cfg.runs_dir  # as given, for the lines that name it; absolute once a chdir made that another place
    if os.getcwd() != started_in:
        _from_where_it_ran(cfg, started_in)
        runs_given = str(runs_path)
    if cfg.epochs is not None:
        spec.epochs = cfg.epochs
        spec.check_loaders_last()
    check_metric_settings(spec.metric_names(), metric_settings or {})
    return spec, flags, runs_given


def _check_places(cfg: RunConfig) -> KeyStore | None:
    """ConfigError for a snapshot_dir this user cannot write, or a listen address or key file that would not
    be safe; the client keys when the run listens on TCP."""
    if cfg.snapshot_dir and not (os.path.isdir(cfg.snapshot_dir) and os.access(cfg.snapshot_dir, os.W_OK)):
        why = ("does not exist; create it" if not os.path.exists(cfg.snapshot_dir) else
               "is a file, not a directory; give a directory" if not os.path.isdir(cfg.snapshot_dir) else
               "is not writable by this user; give one that is")
        raise ConfigError(f"snapshot_dir {cfg.snapshot_dir} {why}, or leave snapshot_dir empty for /dev/shm")
    keys = KeyStore(keys_dir(cfg.keys_dir)) if cfg.listen else None
    if keys is not None:
        try:
            check_listen(cfg.listen, keys)  # before anything starts: a key file others can read stops us here
        except (ListenError, KeyFileError) as exc:
            raise ConfigError(str(exc)) from None
    return keys


def _stepper(spec: TrainingSpec, device: torch.device, cfg: RunConfig) -> Stepper:
    """How a batch is stepped: precision, accumulation, clipping, compile; ConfigError for one this device
    cannot do (16-mixed on a CPU)."""
    try:
        return Stepper(spec.model, spec.optimizer, device, cfg.precision, cfg.accumulate_grad_batches,
                       cfg.gradient_clip_val, cfg.compile)
    except SteppingError as exc:
        raise ConfigError(str(exc)) from None


def _device_for(cfg: RunConfig, cluster: Cluster) -> torch.device:
    """The device this process trains on: cfg.device, checked against the GPUs visible, or one GPU a rank."""
    device = pick_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {cfg.device} requested but no CUDA GPU is visible; use --device cpu or auto")
    if device.index is not None:
        if cluster.distributed:
            raise SpecError(ONE_GPU_PER_RANK.format(device=cfg.device))
        if device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise SpecError(f"device {cfg.device}, but {count} GPU{'s' * (count != 1)} {'are' if count != 1 else 'is'} "
                            f"visible (cuda:0 to cuda:{count - 1}, as CUDA_VISIBLE_DEVICES numbers them); give one "
                            f"of those")
        torch.cuda.set_device(device)  # what the user's own .cuda() and torch's defaults take too
    if device.type == "cuda" and cluster.distributed:
        device = gpu_of_rank(cluster.local_rank, cluster.local_world_size, torch.cuda.device_count())
    return device


def gpu_of_rank(local_rank: int, local_ranks: int, visible: int) -> torch.device:
    """The GPU of this machine's local_rank-th process: one a process, as torchrun and srun lay them out. More
    processes than GPUs is one line, not CUDA's "invalid device ordinal" from deep in the first copy to it; said by
    every process of the machine, not only those without a GPU: the others would wait for those to meet them."""
    if local_ranks > visible:
        raise SpecError(f"{local_ranks} processes on this machine train on a GPU each, but {visible} "
                        f"GPU{'s' * (visible != 1)} {'are' if visible != 1 else 'is'} visible: start at most "
                        f"{visible} (--nproc {visible}), or make more visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)


class _Silent:
    """The bus of a rank other than 0: it publishes nothing and hears nothing (rank 0 tells it what to do)."""

    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None:
        pass

    def take_replies(self) -> list:
        return []

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        return []


def _run_other_rank(spec: TrainingSpec, stepper: Stepper, ranks: Ranks, device: torch.device, cfg: RunConfig,
                    resume_state: dict[str, Any] | None, resume_from: Path | None, run_id: str, run_dir: Path) -> RunResult:
    """Train as one of ranks 1..N-1: the same loop, no bus, no plugins, no files (rank 0 keeps the run)."""
    started = time.monotonic()
    loop = Loop(spec, _Silent(), device, vote_timeout_s=cfg.vote_timeout_s, stepper=stepper, ranks=ranks)
    if resume_state is not None:
        loop.resume(resume_state, str(resume_from))
    # rank 0, seeing training stand still, asks where this rank waits (a signal only reaches its own machine)
    stacks = StackAnswer(run_dir, ranks.rank) if ranks.rank in ranks.local_pids else None
    # A SIGTERM or Ctrl-C reaches every rank (torchrun and srun pass them on): rank 0 decides, and every rank
    # stops at the step it broadcasts; one rank stopping alone would leave the others waiting in a collective.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in Interrupts.SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        freeze_before_training()
        with keep_freed_memory(cfg.keep_freed_memory):
            outcome = loop.run()
    except BaseException as exc:  # said here (the user's frames), then torchrun ends the group on our exit (signals
        # are ignored here: a KeyboardInterrupt is the user's own)
        beside_rank_0 = ranks.cluster.node_rank == 0
        said = write_rank_error(run_dir, ranks.rank, exc, beside_rank_0,
                                main_pid=ranks.main_pid if beside_rank_0 else None)
        if (not said and beside_rank_0 and broken_by_a_peer(exc) and ranks.main_pid is not None
                and not os.environ.get(LAUNCH_ERRORS) and gone_within(ranks.main_pid, RANK_0_GONE_S)
                and not (run_dir / "summary.json").exists()):  # which rank 0 writes as it ends, failed or not
            # rank 0, which says the run's end, is gone without a word (kill -9, the out-of-memory killer): under
            # `run --nproc` the launcher says so; under srun or the user's torchrun, this rank, or no one
            said = (f"error: rank {ranks.rank} stopped: rank 0 (pid {ranks.main_pid}) ended without a word: killed "
                    f"(kill -9, the out-of-memory killer: `dmesg` says which) or an os._exit; `trainbus runs resume "
                    f"{run_id}` continues the run from its newest checkpoint\n")
        print(said, end="", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stacks is not None:
            stacks.close()
    ranks.close()
    return RunResult(run_id=run_id, run_dir=str(run_dir), status="stopped" if outcome.stopped_early else "completed",
                     duration_s=round(time.monotonic() - started, 3), outcome=asdict(outcome), plugins={},
                     cluster=ranks.cluster.describe())


def check_not_running(run_dir: Path) -> int:
    """ConfigError when a kernel still holds the run's journal (two kernels must never write one run), or another
    kernel continuing it is between this check and taking the journal: a kernel takes its journal only once it has
    set the run up, rewriting kernel.pid and config.json, so two resumes at once both passed the check, and the
    second to the journal failed having put its own pid in kernel.pid. Returns the run directory's descriptor,
    locked (flock) until the caller holds the journal and closes it."""
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--resume {run_dir.name}: another process holds this run (a kernel starting to continue "
                          f"it, or `trainbus runs delete`); wait for it to end, or stop it (`trainbus runs stop "
                          f"{run_dir.name}`)") from None
    except OSError:  # a filesystem that locks no directory: the journal's lock below stands alone, as before
        pass
    try:
        check_free(run_dir / JOURNAL_NAME)
    except JournalInUse as exc:
        os.close(fd)
        raise ConfigError(f"--resume {run_dir.name}: {exc}; wait for it to end, or stop it (Ctrl-C)") from None
    return fd


def _from_where_it_ran(cfg: RunConfig, started_in: str) -> None:
    """The config's relative paths made absolute from `started_in`, the command's directory, which the user's build()
    changed: a --resume path, snapshot_dir, keys_dir, and where each plugin's process starts."""
    if cfg.resume and os.path.exists(os.path.join(started_in, cfg.resume)):  # a checkpoint or run directory's path
        cfg.resume = os.path.join(started_in, cfg.resume)
    if cfg.snapshot_dir:
        cfg.snapshot_dir = os.path.join(started_in, cfg.snapshot_dir)
    if cfg.keys_dir:
        cfg.keys_dir = os.path.join(started_in, os.path.expanduser(cfg.keys_dir))
    for plugin in cfg.plugins:
        plugin.cwd = os.path.normpath(os.path.join(started_in, plugin.cwd))  # "": the command's directory itself


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json a continued run was recorded with (None when it cannot be read: config_of_run said so)."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def effective_config(cfg: RunConfig, spec: TrainingSpec, flags: dict[str, Any],
                     started_in: str | None = None, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as the run used it, for config.json: the hyperparameters and epochs of the built spec.

    A build() fills in its own defaults (the digits demo's lr, batch size, ...), so the spec's
    hyperparameters are what trained; those given that the spec does not name are kept. `flags` are the
    arguments the spec function was called with (kernel/flags.py): a run continued from this file is given
    them again (config_of_run), so it builds the same spec."""
    config = cfg.to_dict()
    config["hyperparameters"] = {**cfg.hyperparameters, **spec.hyperparameters}
    config["flags"] = flags
    config["epochs"] = spec.epochs
    config["metrics"] = spec.metric_names()  # what a plugin attached later may name (`plugins attach` checks)
    if os.environ.get(LAUNCH):  # launched by `trainbus run --nproc`: how, for a resume to launch it alike
        config["launch"] = json.loads(os.environ[LAUNCH])
    # what a relative target file is relative to, for a resume from elsewhere: where the command ran (`started_in`),
    # whatever directory the user's build() changed to
    config["cwd"] = started_in or os.getcwd()
    if recorded is not None and _same_target_file(recorded, config["target"]):
        # a continued run: its target as it was typed, with the directory it is relative to, not the absolute path
        # config_of_run made of it to import it from wherever the resume ran
        config["target"], config["cwd"] = recorded["target"], recorded["cwd"]
    return config


def _same_target_file(recorded: dict[str, Any], target: str) -> bool:
    """Whether `recorded` (a run's config.json) names `target` with a file path relative to its own cwd."""
    was, cwd = recorded.get("target"), recorded.get("cwd")
    if not isinstance(was, str) or not isinstance(cwd, str) or was == target:
        return False
    file_part, _, function = was.rpartition(":")
    target_file, _, target_function = target.rpartition(":")
    return bool(file_part) and not os.path.isabs(file_part) and function == target_function and \
        os.path.normpath(os.path.join(cwd, file_part)) == os.path.normpath(target_file)


def _plugin_summary(bus: Bus) -> dict[str, dict[str, Any]]:
    """The supervisor's account of each plugin, with the errors it reported (a failed handler's log reply)."""
    summary = bus.supervisor.summary()
    for name, entry in summary.items():
        entry["errors_logged"] = bus.control.errors_logged[name]
        if bus.control.checkpoints_failed[name]:  # a full disk, say: the run completed, its checkpoints did not
            entry["checkpoints_failed"] = bus.control.checkpoints_failed[name]
        for kind in ("metric", "log"):  # past its [limits]: what it reported is not all in the journal
            if bus.control.dropped[name, kind]:
                entry[f"{kind}_dropped"] = bus.control.dropped[name, kind]
        if bus.votes.missed[name]:  # training went on without its vote: a stop it decided there came late
            entry["votes_missed"] = bus.votes.missed[name]
    return summary


def _counters(bus: Bus) -> dict[str, int]:
    """What the bus counted (events, refusals by reason, drops), plus the journal's refused writes."""
    counters = {k: v for k, v in bus.counters.items() if v}
    if bus.journal.failed_writes:
        counters["journal_write_errors"] = bus.journal.failed_writes
    return counters


def _make_runs_dir(path: Path, runs_dir: str) -> None:
    """The runs directory, made if missing; a ConfigError when it cannot be, or when others could change it."""
    try:
        make_dirs(path)
    except OSError as exc:
        raise ConfigError(f"runs_dir {runs_dir}: cannot create {path} ({reason(exc)}); pick a writable place "
                          f"with --runs-dir or [run] runs_dir") from None
    check_runs_dir_private(path, runs_dir)


def _make_dir(path: Path, runs_dir: str, **how) -> None:
    """mkdir, or a ConfigError naming runs_dir: a read-only mount, no permission, a file in the way (exit 2)."""
    try:
        path.mkdir(**how)
    except OSError as exc:
        raise ConfigError(f"runs_dir {runs_dir}: cannot create {path} ({reason(exc)}); pick a writable place "
                          f"with --runs-dir or [run] runs_dir") from None
