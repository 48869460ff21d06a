"""`trainbus run`: the command line read into a run config, checked before torch's seconds of import, then the run
trained here, launched across processes (cli_launch.py) or queued for the daemon (--detach, cli_run_detach.py); its
summary printed (cli_run_summary.py). Its flags and --set items are read in cli_run_flags.py, --resume RUN's run is
found and checked in cli_run_resume.py."""

from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

import typer

from .cli_common import (EXIT_CODES, KEYS_DIR_HELP, UserError, _check_plugin_settings, config_file_path,
                         keys_dir_path, runs_dir_path, says_the_checks)
from .cli_ctrl_c import ctrl_c_back, ctrl_c_says, interrupted_before_start, says_ctrl_c_until_the_run_begins
from .cli_launch import check_nproc, launch as launch_group, under_a_launcher
from .cli_run_detach import check_not_queue_options, check_queueable, submit
from .cli_run_flags import (apply_flags, apply_sets, check_epochs_given_once, epochs_named, from_the_file,
                            is_flag_word)
from .cli_run_resume import check_resumable, check_trained_as_recorded, run_to_continue, same_target
from .cli_run_summary import print_node_done, print_summary
from .config_checks import ONE_GPU_PER_RANK, check_metric_settings, device_index
from .config_file import defaults_left_out, load_config
from .plugin_names import plugin_name_clashes, registered_plugins, resolve_plugin
from .recorded_config import config_of_run, launch_of_run
from .runs_dir_check import check_runs_dir
from .flags import FlagError
from .registry import MAX_RESUMES
from .collector import importing_quietly
from .spec import SpecError
from .target import DEFAULT_TARGET, full_target


@says_ctrl_c_until_the_run_begins
def run(
    target: Optional[str] = typer.Argument(None, help="path/to/file.py:function or package.module:function "
                                                      "returning a TrainingSpec (a file alone: its build); "
                                                      "default: the digits demo."),
    flag_words: Optional[list[str]] = typer.Argument(None, metavar="NAME=VALUE",
                                                     help="Flags: the spec function's arguments (lr=0.01 epochs=5)."),
    help_flags: bool = typer.Option(False, "--help-flags", help="Print the target's flags (names, types, defaults, "
                                                                "help) and exit."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", parser=config_file_path,
                                          help="TOML run config, or bz's JSON one (.json)."),
    plugins: Optional[str] = typer.Option(None, "--plugins", "-p", help="Comma-separated plugin names "
                                                                        "(replaces the config's list; '' for none); "
                                                                        "one the config has a [plugins.NAME] table "
                                                                        "for keeps its target and settings."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Override the number of epochs."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for every RNG (default 0)."),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", parser=runs_dir_path,
                                            help="Where run directories go (default ./runs)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, or cuda:N (the GPU of index N)."),
    hparam: list[str] = typer.Option([], "--set", help="Hyperparameter KEY=VALUE (VALUE parsed as JSON if it can be); "
                                                       "NAME.SETTING=VALUE or plugins.NAME.settings.SETTING=VALUE "
                                                       "sets a setting of this run's plugin NAME; "
                                                       "hyperparameters.A.B=VALUE a hyperparameter named A.B."),
    resume: Optional[str] = typer.Option(None, "--resume", help="RUN_ID or run directory: continue that run in place "
                                                                "from its newest verified checkpoint, with its config "
                                                                "(options given override it); a checkpoint file (or "
                                                                "--config given too): a new run starting from it."),
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT: also serve control on PORT, events on "
                                                                "PORT+1 and bursts on PORT+2 over TCP with CURVE "
                                                                "(PORT 0: free ones); needs `trainbus keys`. "
                                                                "Endpoints: RUN_DIR/connection.json."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path, help=KEYS_DIR_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help="32, bf16-mixed, 16-mixed (CUDA) or bf16-true "
                                                                        "(Lightning's 32-true, 16 and bf16 too)."),
    accumulate_grad_batches: Optional[int] = typer.Option(None, "--accumulate-grad-batches", min=1,
                                                          help="Batches per optimizer step (default 1)."),
    gradient_clip_val: Optional[float] = typer.Option(None, "--gradient-clip-val",
                                                      help="Clip the gradients' 2-norm to this (0: off)."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1,
                                        help="Train in this many processes (DDP: gloo on CPU, NCCL on CUDA), launched "
                                             "through torch.distributed.run."),
    max_restarts: Optional[int] = typer.Option(None, "--max-restarts", min=0,
                                               help="Restart the processes up to this many times when one fails "
                                                    "(torchrun's --max-restarts); the restarted ones continue the run "
                                                    "from its newest checkpoint."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1,
                                         help="Machines training this run, each running this same command (--nproc "
                                              "processes each); with --rdzv-endpoint."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT where the --nnodes machines "
                                                                             "meet (torchrun's c10d rendezvous): one "
                                                                             "of them, and a port free there."),
    detach: bool = typer.Option(False, "--detach", help="Queue the run for the daemon of --runs-dir, print its id "
                                                        "and return at once (`trainbus daemon start` runs the queue)."),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="With --detach: GPUs this run needs; the daemon "
                                                                   "starts it when that many are free, with "
                                                                   "CUDA_VISIBLE_DEVICES naming them (default 1 when "
                                                                   "the daemon has GPUs)."),
    max_resumes: Optional[int] = typer.Option(None, "--max-resumes", min=0, max=MAX_RESUMES,
                                              help="With --detach: when the run's kernel dies or is killed (the OOM "
                                                   "killer, a reboot), the daemon continues it from its newest "
                                                   "checkpoint, up to this many times (default 0)."),
) -> None:
    """Train, with every plugin in its own process; prints the run id, the outcome and where results are."""
    flag_words = list(flag_words or [])
    for flag, value in (("--resume", resume), ("--listen", listen)):
        if value is not None and not value.strip():  # "$UNSET_VARIABLE": a new run, or no TCP, without a word
            raise UserError(f"{flag} is empty: give it a value, or leave {flag} out")
    if target is not None and is_flag_word(target):  # `trainbus run lr=0.01`: the default target's flags
        target, flag_words = None, [target, *flag_words]
    quiet = not says_the_checks() and logging.lastResort is not None
    if quiet:  # a config's warnings (bz's keys that mean nothing here): said by one process of the command
        logging.lastResort.setLevel(logging.ERROR)
    try:
        cfg = load_config(config)
    finally:
        if quiet:
            logging.lastResort.setLevel(logging.WARNING)
    in_file = set(cfg.hyperparameters) if config is not None else set()  # named where a mistake in one is said
    resumed_run = run_to_continue(resume, runs_dir or Path(cfg.runs_dir)) if resume else None
    continuing = resumed_run if config is None else None  # with --config: a new run from that run's checkpoint
    if continuing is not None:
        check_resumable(continuing, epochs, detach)
        cfg = config_of_run(continuing)
        cfg.runs_dir = str(continuing.parent)
        if seed is not None and seed != cfg.seed:  # as a flag (check_trained_as_recorded): the build it runs again
            # would draw from the new seed (a random_split: another validation set), the record say it for all of it
            raise UserError(f"--resume {continuing.name} continues that run as it trained, with seed {cfg.seed}: "
                            f"--seed {seed} would change it midway, while its record would say that for all of it; "
                            f"leave --seed out to continue it, or start a new run with it")
    if target is not None:
        if continuing is not None and not same_target(full_target(target), cfg.target):  # as a flag: the record
            raise UserError(f"--resume {continuing.name} continues that run as it trained, with {cfg.target}: "
                            f"{full_target(target)} would change it midway, while its record would say that for all "
                            f"of it; leave the target out to continue it, or start a new run from one of its "
                            f"checkpoints: trainbus run {full_target(target)} --resume "
                            f"{continuing / 'checkpoints' / 'last.pt'}")
        cfg.target = full_target(target)
    launch = {"nproc": nproc, "nnodes": nnodes, "max_restarts": max_restarts, "rdzv_endpoint": rdzv_endpoint}
    if continuing is not None and all(v is None for v in launch.values()) and not under_a_launcher():
        launch = launch_of_run(continuing)  # `--resume RUN` alone: in as many processes as the run had
    launch = {"nproc": 1, "nnodes": 1, "max_restarts": 0, "rdzv_endpoint": None,
              **{k: v for k, v in launch.items() if v is not None}}
    listen_checked = None
    if not detach and not help_flags and (listen if listen is not None else cfg.listen) and launch["nnodes"] == 1 \
            and not under_a_launcher():  # before the flags: checking them imports the target, and torch with it
        listen_checked = (listen if listen is not None else cfg.listen,
                          str(keys_dir) if keys_dir is not None else cfg.keys_dir)
        _check_listen(*listen_checked)
    if help_flags or flag_words:
        try:
            apply_flags(cfg, flag_words, help_flags, cfg.seed if seed is None else seed)
        except KeyboardInterrupt:  # its own raise (a Ctrl-C is _SaysAndExits'), or a Ctrl-C where that is not ours
            interrupted_before_start(f"KeyboardInterrupt while {cfg.target} was imported to read its flags; "
                                      f"nothing was made")
    if plugins is not None:  # which plugins run; a name the config has a [plugins.NAME] table for runs as it says,
        # one with `enabled = false` too
        configured = {p.name: p for p in cfg.plugins}
        cfg.plugins = [configured.get(name) or _turned_on(cfg.plugins_off.get(name), config) or
                       resolve_plugin(name, {}, where="--plugins")
                       for name in (word.strip() for word in plugins.split(",")) if name]
    for key, value in (("epochs", epochs), ("seed", seed), ("device", device),
                       ("resume", str(resumed_run) if resumed_run else resume),
                       ("listen", listen), ("keys_dir", keys_dir and str(keys_dir)), ("precision", precision),
                       ("accumulate_grad_batches", accumulate_grad_batches), ("gradient_clip_val", gradient_clip_val),
                       ("compile", compile_model)):
        if value is not None:
            setattr(cfg, key, value)
    if runs_dir is not None:
        cfg.runs_dir = str(runs_dir)
    apply_sets(cfg, hparam, flag_words)
    check_epochs_given_once(epochs, [*flag_words, *hparam], cfg.hyperparameters)
    only_in_file = in_file - {w.partition("=")[0] for w in flag_words} - {
        item.partition("=")[0].removeprefix("hyperparameters.") for item in hparam}
    from_file = functools.partial(from_the_file, only_in_file=only_in_file, config=config)
    named_epochs = cfg.hyperparameters.get("epochs")
    if epochs is None and epochs_named([*flag_words, *hparam]) and type(named_epochs) is int and named_epochs >= 1:
        # the command line's epochs=N beats the file's [run] epochs (or a resumed run's), as every flag beats it;
        # a wrong N is left to the checks of the function it is a flag of, which say what it takes
        cfg.epochs = named_epochs
    from .config_checks import check_precision_on_device, check_run

    check_run(cfg, "command line")
    check_precision_on_device(cfg)
    check_runs_dir(cfg.runs_dir)
    _warn_name_clashes(cfg.plugins)
    metric_settings = _check_plugin_settings(cfg.plugins)
    if cfg.target == DEFAULT_TARGET:  # the demo's hyperparameters and metrics, told before torch is imported
        from .digits_hyperparameters import METRICS, checked

        try:
            checked(cfg.hyperparameters)
        except SpecError as exc:
            raise UserError(from_file(exc)) from None
        check_metric_settings(METRICS, metric_settings)  # a queued run too: not only once the daemon starts it
    if continuing is not None:  # after the flags' own checks: a typo is said as one, naming those there are
        check_trained_as_recorded(continuing, cfg.hyperparameters)
    if config is not None and plugins is None and continuing is None and says_the_checks() and (
            note := defaults_left_out(config)):
        print(f"trainbus: note: {note}", file=sys.stderr)
    if detach:
        check_queueable(cfg, from_file)
        check_nproc(launch["nproc"])  # the daemon runs it on this host: said now, not as the daemon starts it
        ctrl_c_says(f"Ctrl-C as the run was submitted: `trainbus runs list --runs-dir "
                    f"{shlex.quote(str(cfg.runs_dir))}` shows whether the daemon queued it")
        submit(cfg, continuing, gpus, max_resumes or 0)
        return
    check_not_queue_options(gpus, max_resumes)
    if cfg.listen and launch["nnodes"] == 1 and (cfg.listen, cfg.keys_dir) != listen_checked \
            and not under_a_launcher():
        _check_listen(cfg.listen, cfg.keys_dir)
    if launch["nproc"] > 1 or launch["nnodes"] > 1 or launch["max_restarts"] or launch["rdzv_endpoint"]:
        if device_index(cfg.device) is not None:
            raise UserError(ONE_GPU_PER_RANK.format(device=cfg.device))
        launch_group(launch, cfg.runs_dir, continuing.name if continuing else None)
    _train_here(cfg, continuing, metric_settings, from_file)


def _train_here(cfg, continuing: Path | None, metric_settings: dict[str, str],
                from_file: Callable[[Exception], str]) -> NoReturn:
    """The run, in this process (a rank of --nproc's too): its summary printed, and the command's exit code."""
    with importing_quietly():  # torch's ~300,000 objects, out of every collection's way (kernel/collector.py)
        from .session import InterruptedBeforeStart, run_training  # here: torch takes seconds to import, and a
        # mistake above is told at once
    ctrl_c_back(signal.default_int_handler)  # run_training takes it at once, and gives this back when it returns
    try:
        result = run_training(cfg, run_id=continuing.name if continuing else None, continue_run=continuing is not None,
                              install_sigint=True, announce=lambda line: print(f"trainbus: {line}", file=sys.stderr),
                              metric_settings=metric_settings)
    except KeyboardInterrupt:  # a second Ctrl-C while it was set up
        interrupted_before_start("Ctrl-C twice before the run began")
    except InterruptedBeforeStart as exc:
        interrupted_before_start(str(exc))
    except FlagError as exc:
        raise UserError(from_file(exc)) from None
    if result.cluster.get("rank", 0) == 0:  # across ranks, rank 0 tells how the run went
        print_summary(result)
    elif result.cluster.get("local_rank") == 0 and result.cluster.get("node_rank", 0) > 0:
        print_node_done(result, cfg.runs_dir)
    code = EXIT_CODES.get(result.status, 1)
    if code == 130 and os.environ.get("TRAINBUS_LAUNCH"):  # distributed.LAUNCH: a rank of `run --nproc`, whose
        # launcher exits 130 from summary.json; 130 here would have torchrun restart the group (--max-restarts)
        code = 0
    raise typer.Exit(code=code)


def _check_listen(listen: str, keys_dir: str | None) -> None:
    """--listen's keys, and its ports taken, said before torch's seconds of import (the run checks them again as it
    binds), and under --nproc before any rank starts: rank 0 binds only once the ranks have met and the others
    train. Not with --nnodes (HOST is node 0's, maybe not this machine), nor in a rank (rank 0 binds the ports)."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir

    from .keys import KeyStore
    from .remote import ListenError, check_listen, probe_ports

    try:
        probe_ports(*check_listen(listen, KeyStore(default_keys_dir(keys_dir))))
    except (ListenError, KeyFileError) as exc:
        raise UserError(str(exc)) from None


def _turned_on(table, config: Path | None):
    """The plugin of a config's [plugins.NAME] table with `enabled = false` that --plugins names (its target resolved
    now: an unknown plugin of the table's is said naming it); None for no such table."""
    if table is None or table.command:
        return table
    return resolve_plugin(table.name, table.settings, table.target or None, where=f"{config}: [plugins.{table.name}]")


def _warn_name_clashes(plugins) -> None:
    """A built-in this run uses whose name a package registers too: say which one runs, before it starts."""
    clashes, known = plugin_name_clashes(), registered_plugins()
    for p in plugins:
        if p.name in clashes and p.target == known.get(p.name) and says_the_checks():
            print(f"trainbus: warning: {clashes[p.name]}", file=sys.stderr)
