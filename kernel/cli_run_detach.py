"""`trainbus run --detach`: the run checked for what the daemon would fail it on, then queued for it."""

from __future__ import annotations

import os
import shlex
import sqlite3
import sys
from pathlib import Path
from typing import Callable

from .checkpointing import find_checkpoint
from .cli_common import UserError
from .config_checks import device_index
from .flags import FlagError
from .target import DEFAULT_TARGET


def check_not_queue_options(gpus: int | None, max_resumes: int | None) -> None:
    """UserError for the options of a run queued for the daemon (--gpus, --max-resumes) on a run started here."""
    if gpus is not None:
        if gpus and (no_gpu := _no_gpu_here(gpus)):  # --detach would not help: the daemon here has none either
            raise UserError(f"{no_gpu}; --gpus is for a run queued (--detach) on the daemon's GPUs: drop --gpus to "
                            f"train here on the CPU (--device cpu)")
        raise UserError("--gpus places a queued run: add --detach (a run started here uses the GPUs "
                        "CUDA_VISIBLE_DEVICES shows it)")
    if max_resumes is not None:
        raise UserError("--max-resumes is the daemon's: add --detach (a run started here is continued with "
                        "`trainbus runs resume RUN`; --max-restarts restarts failed processes of --nproc)")


def check_queueable(cfg, from_file: Callable[[Exception], str]) -> None:
    """UserError for a run the daemon would queue only to fail as it starts it: a target that cannot be
    imported, a GPU index (the daemon numbers a run's GPUs), CUDA on a host with none, a checkpoint to resume
    from that is not one."""
    if cfg.target != DEFAULT_TARGET:  # the demo's hyperparameters are checked without torch (cli_run), and it imports
        try:
            _check_target(cfg)
        except FlagError as exc:
            raise UserError(from_file(exc)) from None
    if device_index(cfg.device) is not None:
        raise UserError(f"--device {cfg.device} with --detach: the daemon gives each run its GPUs (and numbers "
                        f"them from 0 for it); use --device cuda, with --gpus N for more than one")
    if cfg.device.startswith("cuda") or cfg.precision == "16-mixed" and cfg.device == "auto":
        from .placement import detected_devices

        if not detected_devices():  # the run would fail only once the daemon started it
            if cfg.device.startswith("cuda"):
                raise UserError(f"--device {cfg.device}, but this host has no GPU that NVML sees, so the daemon's "
                                f"run would fail as it starts; use --device cpu or auto")
            raise UserError("--precision 16-mixed needs a CUDA device, but this host has no GPU that NVML sees, so "
                            "the daemon's run would fail as it starts; use bf16-mixed on the CPU")
    if cfg.resume:  # what the queued run would look for first: a verified checkpoint to start from
        find_checkpoint(cfg.resume, cfg.runs_dir)


def _no_gpu_here(gpus: int) -> str:
    """"--gpus N: this host has no GPU ... (why)" when NVML sees none here; "" when it sees some."""
    from .placement import gpu_census

    found, why = gpu_census()
    return "" if found else f"--gpus {gpus}: this host has no GPU that NVML sees ({why})"


def submit(cfg, continuing: Path | None, gpus: int | None, max_resumes: int) -> None:
    """`run --detach`: this command, checked and less --detach, --gpus and --max-resumes, queued for the daemon; its
    id printed."""
    from . import daemon_client, daemon_queue, placement
    from .registry import JobError
    from .runs import new_run_id

    words, argv = iter(sys.argv[sys.argv.index("run", 1) + 1:]), []
    for word in words:
        if word in ("--gpus", "--max-resumes"):
            next(words, None)
        elif word != "--detach" and not word.startswith(("--gpus=", "--max-resumes=")):
            argv.append(word)
    run_id = continuing.name if continuing is not None else new_run_id()
    runs_dir = Path(cfg.runs_dir)
    # a daemon that could never place it: said now
    serving = daemon_client.request(runs_dir, "status") if gpus else None
    if serving is not None and (why := placement.unplaceable(gpus, list(serving.get("devices") or []))) is not None:
        if not serving.get("devices") and (no_gpu := _no_gpu_here(gpus)):  # "start the daemon with --gpus": of what?
            raise UserError(f"{no_gpu}, so the daemon can never place the run; drop --gpus to queue it on the CPU "
                            f"(--device cpu)")
        raise UserError(f"--gpus {gpus}: the run {why}")
    if gpus and serving is None and not daemon_client.daemon_lives(runs_dir) and (no_gpu := _no_gpu_here(gpus)):
        # the daemon started next takes the GPUs NVML sees, none, and fails it at placement: said now, as a serving
        # daemon with none says it (one that holds the directory but did not answer may have been given devices)
        raise UserError(f"{no_gpu} and no daemon serves {runs_dir.resolve()}, so a daemon started here could never "
                        f"place the run; drop --gpus to queue it on the CPU (--device cpu), or first start one on "
                        f"devices NVML does not see yet: `trainbus daemon start --gpus "
                        f"{','.join(map(str, range(gpus)))}{daemon_queue.runs_dir_option(runs_dir)}`")
    try:
        told = daemon_queue.submit(runs_dir, run_id, argv, gpus, cfg.target, dict(cfg.hyperparameters), continuing,
                             env=dict(os.environ), max_resumes=max_resumes)
    except JobError as exc:
        raise UserError(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:  # the queue is one transaction: nothing was queued
        raise UserError(f"cannot queue run {run_id}: {runs_dir / 'registry.sqlite'} cannot be written ({exc}); free "
                        f"space there (a full disk says this), or give --runs-dir another place") from None
    print(run_id)
    if max_resumes and not _may_checkpoint(cfg):
        print(f"trainbus: note: --max-resumes {max_resumes}, but none of the run's plugins saves checkpoints: a "
              f"kernel that dies leaves nothing to resume from, so the daemon cannot continue it (add checkpoint to "
              f"--plugins)", file=sys.stderr)
    where = str(runs_dir.resolve())  # printed as it is (print, not rich)
    if told:
        print(f"trainbus: queued run {run_id} for the daemon of {where}", file=sys.stderr)
    elif (stuck := daemon_client.unanswering(runs_dir)) is not None:  # `daemon start` would say one serves it
        print(f"trainbus: queued run {run_id}; {stuck[1]}; it starts the run once it answers (`trainbus daemon "
              f"status --runs-dir {shlex.quote(where)}` says when)", file=sys.stderr)
    else:
        print(f"trainbus: queued run {run_id}; no daemon serves {where} yet: start one with "
              f"`trainbus daemon start --runs-dir {shlex.quote(where)}`", file=sys.stderr)


def _may_checkpoint(cfg) -> bool:
    """Whether one of the run's plugins may save its checkpoints (the daemon resumes a run from one)."""
    from .supervisor import PluginSpec

    return any(PluginSpec.of(plugin).may_persist() for plugin in cfg.plugins)


def _check_target(cfg) -> None:
    """For a queued run, what it would fail on first, said now: its target imports and takes these flags. Its
    function is not called here (building the model and data is the run's); a dict-taking target's values are
    checked by that function, when the run starts."""
    from .flags import resolve, signature_of
    from .target import load_target

    resolve(signature_of(load_target(cfg.target)), dict(cfg.hyperparameters), cfg.target)
