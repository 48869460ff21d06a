"""One run from start to end: its device and ranks, run directory, bus and plugins, the loop, and how it ended.

This is the order of things; the parts are their own modules': devices.py (the device), user_build.py (the user's
spec), run_dir.py (the run directory, config.json), run_bus.py (the bus and its plugins), other_ranks.py (how ranks
other than 0 train), run_end.py (what the run leaves).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from trainbus.proto import events as ev
from trainbus.proto.remote import CONNECTION_FILE, KeyFileError, keys_dir

from .buffer_files import snapshot_directories
from .checkpointing import find_checkpoint, has_checkpoints
from .collector import freeze_before_training
from .cluster import LAUNCHER_PID, Cluster, ClusterError, detect, launch_run_id
from .config import ConfigError, RunConfig
from .config_checks import check_run
from .devices import device_for
from .distributed import GroupInterrupted, PortInUse, Ranks, broken_by_a_peer, distribute, join_group
from .failures import RANK_ERROR, rank_errors, what_failed
from .kernel_log import log_to, stop_logging_to
from .interrupts import Interrupts
from .loop import Loop
from .keys import KeyStore
from .memory import keep_freed_memory
from .other_ranks import run_other_rank
from .pids import signalled_when_gone
from .rank_stacks import ask_ranks
from .remote import ListenError, check_listen
from .resuming import restore_checkpoint
from .registry import record_run
from .run_bus import PLUGIN_EXIT_TIMEOUT_S, close_bus, listen_on, open_bus, wait_drained, wait_ready
from .run_dir import check_not_running, make_run_dir, write_config
from .run_end import RunResult, bus_counters, plugin_summary, save_final_weights, write_summary
from .runs import new_run_id
from .kernel_pid import write_kernel_pid
from .snapshot import SnapshotBuffers
from .spec import TrainingSpec
from .stepping import Stepper, SteppingError
from .supervisor import PluginSpec
from .training_state import seed_everything
from .user_build import build_for_run
from .user_errors import is_user_file, user_trace

log = logging.getLogger("trainbus.kernel")

# After a SIGTERM the durable plugins get this long to catch up (then PLUGIN_EXIT_TIMEOUT_S to exit), not
# [run] drain_timeout_s: the run's end must be written before the SIGKILL a scheduler sends after its grace.
SIGTERM_DRAIN_S = 2.0


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
    device = device_for(cfg, cluster)
    ranks = _join(cluster, device, interrupts, announce) if cluster.distributed else None
    try:
        run_id = run_id or launch_run_id() or new_run_id()
    except ClusterError as exc:
        raise ConfigError(str(exc)) from None
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
    spec, flags, runs_given = build_for_run(cfg, interrupts, started_in, runs_path, metric_settings)
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
            return run_other_rank(spec, stepper, ranks, device, cfg, resume_state, resume_from, run_id, run_dir)

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
        whole = traceback.format_exc()
        tail = "".join(whole.splitlines(keepends=True)[-30:])  # what the event carries
        if ranks is not None:  # a collective failing here is mostly another rank's failure: say whose, and why
            error, tail, trace = rank_errors(run_dir, error, tail, trace, cluster.local_world_size,
                                             pids=ranks.local_pids, peer_gone=broken_by_a_peer(exc))
        # kernel.log has the whole traceback (a deep model's outer frames, where the trimmed one has none of the
        # user's); under ranks, each rank's as it wrote it
        log.error("training failed:\n%s", whole if ranks is None else tail)
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
                       plugins=plugin_summary(bus), undrained=undrained, bus=bus_counters(bus), error=error,
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
        make_run_dir(run_dir, cfg.runs_dir, continue_run)
    except BaseException:
        if remote is not None:
            remote.close()
        raise
    handler = None
    try:  # a full disk here is one line, and a new run directory is not left half made
        run_dir.chmod(0o700)  # owner-only (whatever the umask): journal, logs, checkpoints, sockets are nobody else's
        write_kernel_pid(run_dir)  # `trainbus runs list`: a run without summary.json is running while this pid lives
        write_config(run_dir, cfg, spec, flags, started_in, continue_run)
        record_run(run_dir)  # the run registry: running (never raises; a registry it cannot write costs a warning)
        handler = log_to(run_dir / "kernel.log")
        for line in warnings:
            announce(f"warning: {line}")
            log.warning("%s", line)

        plugins = [PluginSpec.of(p) for p in cfg.plugins]
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


