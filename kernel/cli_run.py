"""`trainbus run`: the command line read into a run config, checked before torch's seconds of import, then the run
trained here, launched across processes (cli_launch.py) or queued for the daemon (--detach); its summary printed."""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

import typer
from rich.markup import escape

from trainbus.proto.settings_format import typed_word

from .checkpointing import find_checkpoint
from .cli_common import (EXIT_CODES, KEYS_DIR_HELP, UserError, _check_plugin_settings, config_file_path,
                         keys_dir_path, out, runs_dir_path, says_the_checks)
from .cli_ctrl_c import ctrl_c_back, ctrl_c_says, interrupted_before_start, says_ctrl_c_until_the_run_begins
from .cli_launch import check_nproc, launch as launch_group, under_a_launcher
from .cluster import LAUNCH_RUN_ID, restarts_left
from .config import apply_set
from .config_checks import ONE_GPU_PER_RANK, check_metric_settings, device_index
from .config_file import defaults_left_out, load_config
from .plugin_names import plugin_name_clashes, registered_plugins, resolve_plugin
from .recorded_config import config_of_run, launch_of_run
from .runs_dir_check import check_runs_dir
from .flags import FlagError
from .registry import MAX_RESUMES
from .run_overview import votes_missed
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
    if target is not None and _is_flag_word(target):  # `trainbus run lr=0.01`: the default target's flags
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
    resumed_run = _run_to_continue(resume, runs_dir or Path(cfg.runs_dir)) if resume else None
    continuing = resumed_run if config is None else None  # with --config: a new run from that run's checkpoint
    if continuing is not None:
        _check_resumable(continuing, epochs)
        cfg = config_of_run(continuing)
        cfg.runs_dir = str(continuing.parent)
        if seed is not None and seed != cfg.seed:  # as a flag (_check_trained_as_recorded): the build it runs again
            # would draw from the new seed (a random_split: another validation set), the record say it for all of it
            raise UserError(f"--resume {continuing.name} continues that run as it trained, with seed {cfg.seed}: "
                            f"--seed {seed} would change it midway, while its record would say that for all of it; "
                            f"leave --seed out to continue it, or start a new run with it")
    if target is not None:
        if continuing is not None and not _same_target(full_target(target), cfg.target):  # as a flag: the record
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
            _apply_flags(cfg, flag_words, help_flags, cfg.seed if seed is None else seed)
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
    _apply_sets(cfg, hparam, flag_words)
    _check_epochs_given_once(epochs, [*flag_words, *hparam], cfg.hyperparameters)
    only_in_file = in_file - {w.partition("=")[0] for w in flag_words} - {
        item.partition("=")[0].removeprefix("hyperparameters.") for item in hparam}
    from_file = functools.partial(_from_the_file, only_in_file=only_in_file, config=config)
    named_epochs = cfg.hyperparameters.get("epochs")
    if epochs is None and _epochs_named([*flag_words, *hparam]) and type(named_epochs) is int and named_epochs >= 1:
        # the command line's epochs=N beats the file's [run] epochs (or a resumed run's), as every flag beats it;
        # a wrong N is left to the checks of the function it is a flag of, which say what it takes
        cfg.epochs = named_epochs
    from .config_checks import check_run

    check_run(cfg, "command line")
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
        _check_trained_as_recorded(continuing, cfg.hyperparameters)
    if config is not None and plugins is None and continuing is None and says_the_checks() and (
            note := defaults_left_out(config)):
        print(f"trainbus: note: {note}", file=sys.stderr)
    if detach:
        _check_queueable(cfg, from_file)
        check_nproc(launch["nproc"])  # the daemon runs it on this host: said now, not as the daemon starts it
        ctrl_c_says(f"Ctrl-C as the run was submitted: `trainbus runs list --runs-dir "
                    f"{shlex.quote(str(cfg.runs_dir))}` shows whether the daemon queued it")
        _submit(cfg, continuing, gpus, max_resumes or 0)
        return
    _check_not_queue_options(gpus, max_resumes)
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
        _print_summary(result)
    elif result.cluster.get("local_rank") == 0 and result.cluster.get("node_rank", 0) > 0:
        _print_node_done(result, cfg.runs_dir)
    code = EXIT_CODES.get(result.status, 1)
    if code == 130 and os.environ.get("TRAINBUS_LAUNCH"):  # distributed.LAUNCH: a rank of `run --nproc`, whose
        # launcher exits 130 from summary.json; 130 here would have torchrun restart the group (--max-restarts)
        code = 0
    raise typer.Exit(code=code)


def _apply_sets(cfg, hparam: list[str], flag_words: list[str]) -> None:
    """Each --set KEY=VALUE put into cfg; UserError for one malformed, or naming what a flag word or an earlier
    --set gave another value."""
    flagged = {word.partition("=")[0]: word for word in flag_words}
    set_before: dict[str, str] = {}
    for item in hparam:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} must look like KEY=VALUE")
        word = flagged.get(key.removeprefix("hyperparameters."))
        if word is not None and word.partition("=")[2] != raw:  # the later would win without a word
            raise UserError(f"{key.removeprefix('hyperparameters.')} given twice, as {word} and as --set {item}: "
                            f"give it once")
        earlier = set_before.setdefault(_set_name(key), item)
        if earlier.partition("=")[2] != raw:  # as a flag given twice: which one the run was meant to have is unsaid
            raise UserError(f"{_set_name(key)} given twice, as --set {earlier} and as --set {item}: give it once")
        apply_set(cfg, key, typed_word(raw))


def _check_not_queue_options(gpus: int | None, max_resumes: int | None) -> None:
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


def _check_queueable(cfg, from_file: Callable[[Exception], str]) -> None:
    """UserError for a run the daemon would queue only to fail as it starts it: a target that cannot be
    imported, a GPU index (the daemon numbers a run's GPUs), CUDA on a host with none, a checkpoint to resume
    from that is not one."""
    try:
        _check_target(cfg)
    except FlagError as exc:
        raise UserError(from_file(exc)) from None
    if device_index(cfg.device) is not None:
        raise UserError(f"--device {cfg.device} with --detach: the daemon gives each run its GPUs (and numbers "
                        f"them from 0 for it); use --device cuda, with --gpus N for more than one")
    if cfg.precision == "16-mixed" and cfg.device == "cpu":  # the daemon's run would fail as it starts
        raise UserError("--precision 16-mixed needs a CUDA device and this run asks for --device cpu; use "
                        "bf16-mixed on the CPU")
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


def _submit(cfg, continuing: Path | None, gpus: int | None, max_resumes: int) -> None:
    """`run --detach`: this command, checked and less --detach, --gpus and --max-resumes, queued for the daemon; its
    id printed."""
    from . import daemon_client, daemon_queue, placement
    from .registry import JobError
    from .session import new_run_id

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
    where = str(runs_dir.resolve())  # printed as it is (print, not rich)
    if told:
        print(f"trainbus: queued run {run_id} for the daemon of {where}", file=sys.stderr)
    elif (stuck := daemon_client.unanswering(runs_dir)) is not None:  # `daemon start` would say one serves it
        print(f"trainbus: queued run {run_id}; {stuck[1]}; it starts the run once it answers (`trainbus daemon "
              f"status --runs-dir {shlex.quote(where)}` says when)", file=sys.stderr)
    else:
        print(f"trainbus: queued run {run_id}; no daemon serves {where} yet: start one with "
              f"`trainbus daemon start --runs-dir {shlex.quote(where)}`", file=sys.stderr)


def _turned_on(table, config: Path | None):
    """The plugin of a config's [plugins.NAME] table with `enabled = false` that --plugins names (its target resolved
    now: an unknown plugin of the table's is said naming it); None for no such table."""
    if table is None or table.command:
        return table
    return resolve_plugin(table.name, table.settings, table.target or None, where=f"{config}: [plugins.{table.name}]")


def _same_target(given: str, recorded: str) -> bool:
    """Whether a target given with `--resume RUN` is the one RUN trained: the same module and function, or the same
    file's (by its name: given from another directory, or the project moved with its runs)."""
    from .target import is_file_target

    given_part, _, given_function = given.rpartition(":")
    recorded_part, _, recorded_function = recorded.rpartition(":")
    if given_function != recorded_function or is_file_target(given_part) != is_file_target(recorded_part):
        return False
    return Path(given_part).name == Path(recorded_part).name if is_file_target(given_part) else \
        given_part == recorded_part


def _is_flag_word(word: str) -> bool:
    name, sep, _ = word.partition("=")
    return bool(sep) and name.isidentifier()


def _apply_flags(cfg, flag_words: list[str], help_flags: bool, seed: int) -> None:
    """--help-flags: print the target's flags and exit; else the NAME=VALUE words, typed, into the hyperparameters
    (checked here, before anything is made: an unknown flag or a bad value is one line, exit 2)."""
    from .config_checks import SEED_LIMIT
    from .flags import help_text, parse_words, signature_of
    from .training_state import seed_everything
    from .target import load_target

    if 0 <= seed < SEED_LIMIT:  # else check_run says what it takes, once the rest is read
        seed_everything(seed)  # what a script draws as it is imported (a model made at its top) is the seed's too
    func = load_target(cfg.target)
    signature = signature_of(func)
    if help_flags:
        print(help_text(func, signature, cfg.target))
        raise typer.Exit()
    cfg.hyperparameters.update(parse_words(signature, flag_words, cfg.target))


def _from_the_file(exc: SpecError, only_in_file: set[str], config: Path | None) -> str:
    """The error, naming the config file when the hyperparameter it is about was given there and not on the
    command line: `unknown flag 'bogus'` alone sends the user looking through their command."""
    if exc.flag in only_in_file:
        return f"{exc} ({exc.flag} is set in {config}'s {_section_of(config, exc.flag)})"
    return str(exc)


def _section_of(config: Path, name: str) -> str:
    """Where the config file sets hyperparameter `name`: a TOML file's [hyperparameters]; bz's JSON its "training"
    (whose keys besides epochs, device, ... are hyperparameters: bz's `batch_size` among them) or "hyperparameters",
    which has no [hyperparameters] table to look in."""
    if config.suffix != ".json":
        return "[hyperparameters]"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    given = raw.get("hyperparameters") if isinstance(raw, dict) else None
    return '"hyperparameters"' if isinstance(given, dict) and name in given else '"training"'


def _check_target(cfg) -> None:
    """For a queued run, what it would fail on first, said now: its target imports and takes these flags. Its
    function is not called here (building the model and data is the run's); a dict-taking target's values are
    checked by that function, when the run starts."""
    from .flags import resolve, signature_of
    from .target import load_target

    resolve(signature_of(load_target(cfg.target)), dict(cfg.hyperparameters), cfg.target)


def _set_name(key: str) -> str:
    """What a --set KEY names, however spelt: `hyperparameters.lr` is `lr`, `plugins.NAME.settings.S` is `NAME.S`."""
    head, _, rest = key.partition(".")
    if head == "hyperparameters" and rest:
        return rest
    name, _, tail = rest.partition(".")
    section, _, setting = tail.partition(".")
    if head == "plugins" and name and section == "settings" and setting:
        return f"{name}.{setting}"
    return key


def _check_epochs_given_once(epochs: int | None, words: list[str], hyperparameters: dict) -> None:
    """UserError for `epochs=N` (a flag word or --set) and a different `--epochs M` on one command line: the spec
    function would be called with N and --epochs would override the epochs it sets, so the run would train M
    epochs while its flags (runs list, runs compare) said N."""
    named = _epochs_named(words)
    if epochs is not None and named and hyperparameters.get("epochs") != epochs:
        raise UserError(f"epochs given twice, as {named[-1]} and as --epochs {epochs}: give epochs once (--epochs "
                        f"overrides the epochs the spec sets; the flag is what its function is called with)")


def _epochs_named(words: list[str]) -> list[str]:
    """The flag words and --set items that give the hyperparameter `epochs`."""
    return [word for word in words if word.partition("=")[0] in ("epochs", "hyperparameters.epochs")]


def _check_resumable(run_dir: Path, epochs: int | None) -> None:
    """UserError for a run that cannot be resumed now (kernel/daemon_queue.py why_not_resumable)."""
    from .daemon_queue import why_not_resumable

    why = why_not_resumable(run_dir, epochs, rank=under_a_launcher())
    if why:
        raise UserError(why)


def _check_trained_as_recorded(run_dir: Path, given: dict) -> None:
    """UserError for a flag (or --set hyperparameter) of a run continued in place that is not what it trained with:
    its config.json, the registry and `runs compare` would say the new value for the whole run, and its
    checkpoint's optimizer state puts back the old one where a flag set it (an lr): the record and the training
    would part. `epochs` is the exception: more of them is what a continued run is for."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # config_of_run has read it; a file gone since is the resume's to say
    if not isinstance(recorded, dict):
        return  # config_of_run says what is wrong with it
    trained = {key: value for part in ("hyperparameters", "flags") if isinstance(recorded.get(part), dict)
               for key, value in recorded[part].items()}  # flags win, as they did

    def plain(value):  # as config.json holds it: a Path as text, a tuple as a list
        return json.loads(json.dumps(value, default=str))

    for name, value in given.items():
        if name != "epochs" and (name not in trained or plain(value) != plain(trained[name])):
            was = f"with {name}={json.dumps(plain(trained[name]))}" if name in trained else f"without {name}"
            raise UserError(f"--resume {run_dir.name} continues that run as it trained, {was}: "
                            f"{name}={json.dumps(plain(value))} would change it midway, while its record would say "
                            f"that for all of it; leave {name} out to continue it, or start a new run with it")


def _run_to_continue(resume: str, runs_dir: Path) -> Path | None:
    """The run directory `--resume` names (a run id under runs_dir, a unique start of one, or a run directory);
    None for anything else, which find_checkpoint reads (a checkpoint file or directory) or says is not there.
    UserError for a start of more than one run id."""
    from . import runs

    if Path(resume).is_file():  # a checkpoint file wins over run ids that start with its name
        return None
    for candidate in (Path(resume), runs_dir / resume):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
    if Path(resume).exists() or (runs_dir / resume).exists():
        return None
    try:
        run_dir = runs.resolve_run(resume, runs_dir)
    except runs.AmbiguousRunError as exc:
        raise UserError(f"--resume: {exc}") from None
    except runs.RunLookupError:
        return None
    return run_dir if (run_dir / "config.json").is_file() else None


def _warn_name_clashes(plugins) -> None:
    """A built-in this run uses whose name a package registers too: say which one runs, before it starts."""
    clashes, known = plugin_name_clashes(), registered_plugins()
    for p in plugins:
        if p.name in clashes and p.target == known.get(p.name) and says_the_checks():
            print(f"trainbus: warning: {clashes[p.name]}", file=sys.stderr)


def _of_processes(cluster: dict) -> str:
    """Across ranks a step is each rank's batch, all stepping together: half a one-process run's steps on 2."""
    world = cluster.get("world_size", 1) if isinstance(cluster, dict) else 1
    return f" of {world} processes (a batch each)" if isinstance(world, int) and world > 1 else ""


def _dropped(entry: dict) -> str:
    """`1,234 metrics and 56 logs dropped`: what a plugin reported past its [limits] (summary.json's plugins)."""
    counts = [f"{entry[f'{kind}_dropped']:,} {kind}{'s' * (entry[f'{kind}_dropped'] != 1)}"
              for kind in ("metric", "log") if entry.get(f"{kind}_dropped")]
    return " and ".join(counts) + " dropped"


def _print_node_done(result, runs_dir: str) -> None:
    """Another machine's end of a --nnodes run, said by its first rank: its ranks' outcome, and that rank 0's machine
    keeps the run (its directory, journal and summary, printed there): the one line its user sees at the end."""
    cluster, outcome = result.cluster, result.outcome
    first, last = cluster["rank"], cluster["rank"] + cluster["local_world_size"] - 1
    epochs, steps = outcome["epochs_completed"], outcome["steps"]
    ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
    print(f"run {result.run_id}: node {cluster['node_rank']}'s {ranks} trained {epochs} epoch{'s' * (epochs != 1)}, "
          f"{steps} step{'s' * (steps != 1)} ({result.status}); rank 0's machine ({cluster['main_address']}) keeps "
          f"the run, its journal and summary: {Path(runs_dir) / result.run_id} there", flush=True)


def _print_summary(result) -> None:
    o = result.outcome
    colour = {"completed": "green", "stopped": "yellow"}.get(result.status, "red")
    out.print(f"\n[bold]run {result.run_id}[/bold]: [{colour}]{result.status}[/{colour}] "
              f"after {o['epochs_completed']} epoch{'s' * (o['epochs_completed'] != 1)}, {o['steps']} "
              f"step{'s' * (o['steps'] != 1)}{_of_processes(result.cluster)}, {result.duration_s:.1f} s")
    # The kernel's own stop for an error (the journal's disk) is said once, as the error (which may go on: where
    # the weights went); texts are not markup (a reason naming "[run] runs_dir" would lose its brackets).
    own = "kernel: stop: "
    reasons = [r for r in o["stop_reasons"]
               if not (result.error and r.startswith(own) and result.error.startswith(r.removeprefix(own)))]
    if reasons:
        out.print("  stopped by: " + escape("; ".join(reasons)))
    if result.error:
        if result.trace:  # the user's code raised: their frames first, on stderr (the whole one is in kernel.log)
            out.file.flush()
            print(result.trace, end="", file=sys.stderr, flush=True)
        out.print(f"  error: {escape(result.error)}")
    # the last metrics are the last end_epoch's: after a stop mid-epoch, that cut epoch's, over part of it
    cut = f" (epoch {o['epochs_completed'] + 1}, partial)" if o.get("last_epoch_partial") else ""
    if o["validation_loss"] is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in o["validation_metrics"].items())
        out.print(f"  validation loss {o['validation_loss']:.4f}" + (f", {metrics}" if metrics else "") + cut)
    elif o.get("training_loss") is not None:  # nothing validated: what training saw is all there is to say
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (o.get("training_metrics") or {}).items())
        out.print(f"  training loss {o['training_loss']:.4f}" + (f", {metrics}" if metrics else "")
                  + " (no validation)" + cut)
    for name, p in result.plugins.items():
        if p["crashes"] or p["restarts"] or p["state"] == "failed":  # a crash late in a run is not restarted
            crashes = p.get("crash_count", len(p["crashes"]))  # the summary keeps the newest causes only
            out.print(f"  plugin {name}: {p['state']}, {crashes} crash{'es' * (crashes != 1)}, {p['restarts']} "
                      f"restarts ({escape('; '.join(p['crashes'][-3:]))})")
        if p.get("left_early"):
            out.print(f"  plugin {name}: left before the run ended (exit code 0 or bye), so it saw nothing after (what "
                      f"it printed: {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("greeted") is False and not p.get("detached"):
            printed = Path(result.run_dir) / "plugins" / f"{name}.log"
            if p.get("hello_trouble"):  # it said one the kernel did not take: why (the field, or the refusal)
                out.print(f"  plugin {name}: never said a hello the kernel took, so it took no event: "
                          f"{escape(p['hello_trouble'])} (what it printed: {printed}; a command plugin speaks "
                          f"proto/PROTOCOL.md)")
            elif p["crashes"]:  # a class whose constructor or import raised: the crash line above says why
                out.print(f"  plugin {name}: never said hello, so it took no event: it crashed before it could (why: "
                          f"above; what it printed: {printed})")
            else:
                out.print(f"  plugin {name}: never said hello, so it took no event (what it printed: {printed}; a "
                          f"command plugin speaks proto/PROTOCOL.md)")
        if p.get("checkpoints_failed"):
            out.print(f"  plugin {name}: {p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} "
                      f"could not be written (see {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("metric_dropped") or p.get("log_dropped"):
            out.print(f"  plugin {name}: {_dropped(p)}, past its \\[limits] (metrics_per_s, logs_per_s, "
                      f"bytes_per_s; see kernel.log)")
        if p.get("votes_missed"):
            out.print(f"  plugin {name}: missed {votes_missed(p['votes_missed'])}: it did not answer within "
                      f"vote_timeout_s")
        if p.get("errors_logged"):
            out.print(f"  plugin {name}: {p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged "
                      f"(see {Path(result.run_dir) / 'kernel.log'}; what it printed: plugins/{name}.log)")
    for name, acked in result.undrained.items():
        out.print(f"  plugin {name}: did not catch up (acked up to seq {acked})")
    out.print(f"  results: {result.run_dir}")
    left = restarts_left() if result.status == "failed" else 0
    if left and os.environ.get(LAUNCH_RUN_ID):  # --max-restarts: this failure is not the run's end
        out.print(f"  torchrun restarts the group ({left} restart{'s' * (left != 1)} left): the run goes on in place "
                  f"from its newest checkpoint")
    elif left:  # the user's own torchrun: its restarted group names no run to go on with, so makes a new one
        out.print(f"  torchrun restarts the group ({left} restart{'s' * (left != 1)} left) as a new run, from the "
                  f"start: a restart continues the run in place only under `trainbus run --nproc N --max-restarts M`")
