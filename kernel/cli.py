"""The `trainbus` command: run training with plugins, attach to a run; user mistakes get one line, exit 2.

Its command groups live beside it: cli_runs.py (`runs`), cli_plugins.py (`plugins`), cli_keys.py (`keys`),
cli_daemon.py (`daemon`); `run --nproc`'s launching, in cli_launch.py; what they share, in cli_common.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn


def _interrupted_before_start(said: str) -> NoReturn:
    """A stop before anything was made: `said` in one line, and exit 130 at once. A rank of `run --nproc`
    (cluster.LAUNCH set) says nothing and exits 0: its launcher, which had the Ctrl-C too, says it, and 130 would have
    torchrun restart the group."""
    launched = bool(os.environ.get("TRAINBUS_LAUNCH"))
    for stream in (sys.stdout, sys.stderr):  # what was said before it
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a handler that cut a write to it (reentrant)
            pass
    if not launched:
        os.write(2, f"trainbus: {said}\n".encode())
    os._exit(0 if launched else 130)


class _SaysAndExits:
    """The SIGINT handler while nothing has been made: _interrupted_before_start. Python's KeyboardInterrupt there
    printed a traceback of whichever import it cut, and in torch's import was now and then lost (the run then
    trained to its end, exit 0) or raised through a C++ callback, which aborted the process."""

    def __init__(self, said: str):
        self.said = said

    def __call__(self, signum: int, frame) -> None:
        _interrupted_before_start(self.said)


def _ctrl_c_says(said: str) -> None:
    """From here a Ctrl-C says `said` and exits; a process whose Ctrl-C is not Python's own (ignored under nohup or
    in a background job, or a caller's) is left as it is."""
    current = signal.getsignal(signal.SIGINT)
    if isinstance(current, _SaysAndExits):
        current.said = said
    elif current is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _SaysAndExits(said))


def _ctrl_c_back(handler) -> None:
    """Ctrl-C as it was before _ctrl_c_says (when that took it)."""
    if isinstance(signal.getsignal(signal.SIGINT), _SaysAndExits):
        signal.signal(signal.SIGINT, handler)


# First, before the rest of this module's imports (a second of them, typer's and rich's most)
_SIGINT_BEFORE = signal.getsignal(signal.SIGINT)
_ctrl_c_says("Ctrl-C as it started; nothing was done")

import functools
import json
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import typer
from rich.markup import escape

from trainbus.proto import PROTOCOL_VERSION
from trainbus.proto.output import RefusalGuard
from trainbus.proto.process import exit_without_teardown
from trainbus.proto.settings_format import typed_word

from .checkpointing import CheckpointError, find_checkpoint
from .cli_common import (EXIT_CODES, KEYS_DIR_HELP, RUNS_DIR_OPTION, UserError, _attach_client, _check_plugin_settings,
                         _wide, key_file_path, keys_dir_path, out, reason_text, runs_dir_path,
                         says_the_checks)
from .cli_daemon import daemon_app
from .cli_launch import RANK_SEPARATOR, launch as launch_group, under_a_launcher
from .cli_keys import keys_app
from .cli_plugins import plugins_app
from .cli_runs import runs_app
from .cluster import LAUNCH_ERRORS, PeerGone, restarts_left
from .config import (ONE_GPU_PER_RANK, ConfigError, apply_set, check_metric_settings, check_runs_dir, config_of_run,
                     defaults_left_out, device_index, launch_of_run, load_config, plugin_name_clashes,
                     registered_plugins, resolve_plugin)
from .flags import FlagError
from .registry import MAX_RESUMES, RegistryError
from .spec import DEFAULT_TARGET, SpecError, UserCodeError, full_target

__all__ = ["UserError", "app", "main"]
__version__ = "0.1.0"

# rich_markup_mode=None: usage errors print as click's plain "Error: ..." line, not a framed panel.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="trainbus: PyTorch training whose plugins run in their own processes.")
for group, name in ((plugins_app, "plugins"), (runs_app, "runs"), (keys_app, "keys"), (daemon_app, "daemon")):
    app.add_typer(group, name=name)


def _version(value: bool) -> None:
    if value:
        out.print(f"trainbus {__version__} (protocol v{PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _says_ctrl_c_until_the_run_begins(command: Callable) -> Callable:
    """`run`, where a Ctrl-C before the run takes it (run_training's handler, torchrun's) says nothing was made and
    exits: most of that time is torch's import, the user's target's or ours."""
    @functools.wraps(command)
    def run_command(*args, **kwargs):
        before = signal.getsignal(signal.SIGINT)
        _ctrl_c_says("Ctrl-C before the run began; nothing was made")
        try:
            return command(*args, **kwargs)
        finally:
            _ctrl_c_back(before)
    return run_command


@app.command()
@_says_ctrl_c_until_the_run_begins
def run(
    target: Optional[str] = typer.Argument(None, help="path/to/file.py:function or package.module:function "
                                                      "returning a TrainingSpec (a file alone: its build); "
                                                      "default: the digits demo."),
    flag_words: Optional[list[str]] = typer.Argument(None, metavar="NAME=VALUE",
                                                     help="Flags: the spec function's arguments (lr=0.01 epochs=5)."),
    help_flags: bool = typer.Option(False, "--help-flags", help="Print the target's flags (names, types, defaults, "
                                                                "help) and exit."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML run config, or bz's JSON one (.json)."),
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
                                                                "(PORT 0: free ones); "
                                                                "needs `trainbus keys`. Endpoints: RUN_DIR/connection.json."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", parser=keys_dir_path, help=KEYS_DIR_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help="32, bf16-mixed, 16-mixed (CUDA) or bf16-true "
                                                                        "(Lightning's 32-true, 16 and bf16 too)."),
    accumulate_grad_batches: Optional[int] = typer.Option(None, "--accumulate-grad-batches", min=1,
                                                          help="Batches per optimizer step (default 1)."),
    gradient_clip_val: Optional[float] = typer.Option(None, "--gradient-clip-val",
                                                      help="Clip the gradients' 2-norm to this (0: off)."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train in this many processes (DDP: gloo on CPU, NCCL on "
                                                       "CUDA), launched through torch.distributed.run."),
    max_restarts: Optional[int] = typer.Option(None, "--max-restarts", min=0, help="Restart the processes up to this many times "
                                                                      "when one fails (torchrun's --max-restarts); "
                                                                      "the restarted ones continue the run from its "
                                                                      "newest checkpoint."),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", min=1, help="Machines training this run, each running this same "
                                                         "command (--nproc processes each); with --rdzv-endpoint."),
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
    global _OUTPUT_IS_A_COPY
    _OUTPUT_IS_A_COPY = True
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
    if target is not None:
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
            _interrupted_before_start(f"KeyboardInterrupt while {cfg.target} was imported to read its flags; "
                                      f"nothing was made")
    if plugins is not None:  # which plugins run; a name the config has a [plugins.NAME] table for runs as it says
        configured = {p.name: p for p in cfg.plugins}
        cfg.plugins = [configured.get(name) or resolve_plugin(name, {}, where="--plugins")
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
    _check_epochs_given_once(epochs, [*flag_words, *hparam], cfg.hyperparameters)
    only_in_file = in_file - {w.partition("=")[0] for w in flag_words} - {
        item.partition("=")[0].removeprefix("hyperparameters.") for item in hparam}
    from_file = functools.partial(_from_the_file, only_in_file=only_in_file, config=config)
    named_epochs = cfg.hyperparameters.get("epochs")
    if epochs is None and _epochs_named([*flag_words, *hparam]) and type(named_epochs) is int and named_epochs >= 1:
        # the command line's epochs=N beats the file's [run] epochs (or a resumed run's), as every flag beats it;
        # a wrong N is left to the checks of the function it is a flag of, which say what it takes
        cfg.epochs = named_epochs
    from .config import check_run

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
    if gpus is not None and not detach:
        raise UserError("--gpus places a queued run: add --detach (a run started here uses the GPUs "
                        "CUDA_VISIBLE_DEVICES shows it)")
    if max_resumes is not None and not detach:
        raise UserError("--max-resumes is the daemon's: add --detach (a run started here is continued with "
                        "`trainbus runs resume RUN`; --max-restarts restarts failed processes of --nproc)")
    if detach:
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
            from .daemon import detected_devices

            if not detected_devices():  # the run would fail only once the daemon started it
                if cfg.device.startswith("cuda"):
                    raise UserError(f"--device {cfg.device}, but this host has no GPU that NVML sees, so the daemon's "
                                    f"run would fail as it starts; use --device cpu or auto")
                raise UserError("--precision 16-mixed needs a CUDA device, but this host has no GPU that NVML sees, so "
                                "the daemon's run would fail as it starts; use bf16-mixed on the CPU")
        if cfg.resume:  # what the queued run would look for first: a verified checkpoint to start from
            find_checkpoint(cfg.resume, cfg.runs_dir)
        _ctrl_c_says(f"Ctrl-C as the run was submitted: `trainbus runs list --runs-dir {cfg.runs_dir}` shows whether "
                     f"the daemon queued it")
        _submit(cfg, continuing, gpus, max_resumes or 0)
        return
    if cfg.listen and launch["nnodes"] == 1 and (cfg.listen, cfg.keys_dir) != listen_checked \
            and not under_a_launcher():
        _check_listen(cfg.listen, cfg.keys_dir)
    if launch["nproc"] > 1 or launch["nnodes"] > 1 or launch["max_restarts"] or launch["rdzv_endpoint"]:
        if device_index(cfg.device) is not None:
            raise UserError(ONE_GPU_PER_RANK.format(device=cfg.device))
        launch_group(launch, cfg.runs_dir, continuing.name if continuing else None)
    from .session import InterruptedBeforeStart, run_training  # here: torch takes seconds to import, and a mistake
    # above is told at once
    _ctrl_c_back(signal.default_int_handler)  # run_training takes it at once, and gives this back when it returns
    try:
        result = run_training(cfg, run_id=continuing.name if continuing else None, continue_run=continuing is not None,
                              install_sigint=True, announce=lambda line: print(f"trainbus: {line}", file=sys.stderr),
                              metric_settings=metric_settings)
    except KeyboardInterrupt:  # a second Ctrl-C while it was set up
        _interrupted_before_start("Ctrl-C twice before the run began")
    except InterruptedBeforeStart as exc:
        _interrupted_before_start(str(exc))
    except FlagError as exc:
        raise UserError(from_file(exc)) from None
    if result.cluster.get("rank", 0) == 0:  # across ranks, rank 0 tells how the run went
        _print_summary(result)
    code = EXIT_CODES.get(result.status, 1)
    if code == 130 and os.environ.get("TRAINBUS_LAUNCH"):  # distributed.LAUNCH: a rank of `run --nproc`, whose
        code = 0  # launcher exits 130 from summary.json; 130 here would have torchrun restart the group (--max-restarts)
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


def _submit(cfg, continuing: Path | None, gpus: int | None, max_resumes: int) -> None:
    """`run --detach`: this command, checked and less --detach, --gpus and --max-resumes, queued for the daemon; its
    id printed."""
    from . import daemon, daemon_client
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
    if serving is not None and (why := daemon.unplaceable(gpus, list(serving.get("devices") or []))) is not None:
        raise UserError(f"--gpus {gpus}: the run {why}")
    try:
        told = daemon.submit(runs_dir, run_id, argv, gpus, cfg.target, dict(cfg.hyperparameters), continuing,
                             env=dict(os.environ), max_resumes=max_resumes)
    except JobError as exc:
        raise UserError(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:  # the queue is one transaction: nothing was queued
        raise UserError(f"cannot queue run {run_id}: {runs_dir / 'registry.sqlite'} cannot be written ({exc}); free "
                        f"space there (a full disk says this), or give --runs-dir another place") from None
    print(run_id)
    where = escape(str(runs_dir.resolve()))
    if told:
        print(f"trainbus: queued run {run_id} for the daemon of {where}", file=sys.stderr)
    else:
        print(f"trainbus: queued run {run_id}; no daemon serves {where} yet: start one with "
              f"`trainbus daemon start --runs-dir {where}`", file=sys.stderr)


def _is_flag_word(word: str) -> bool:
    name, sep, _ = word.partition("=")
    return bool(sep) and name.isidentifier()


def _apply_flags(cfg, flag_words: list[str], help_flags: bool, seed: int) -> None:
    """--help-flags: print the target's flags and exit; else the NAME=VALUE words, typed, into the hyperparameters
    (checked here, before anything is made: an unknown flag or a bad value is one line, exit 2)."""
    from .config import SEED_LIMIT
    from .flags import help_text, parse_words, signature_of
    from .loop import seed_everything
    from .spec import load_target

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
    from .spec import load_target

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
    """UserError for a run that cannot be resumed now (kernel/daemon.py why_not_resumable)."""
    from .daemon import why_not_resumable

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



@app.command()
def attach(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one), a run directory, "
                                        "or ENDPOINT: ipc://DIR/events.sock, or EVENTS,CONTROL."),
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="JSON lines: the snapshot (with its seq), then every event."),
    control: bool = typer.Option(False, "--control", help="Steer from the dashboard: s stops the run, c asks for a "
                                                          "checkpoint now (each confirmed with y)."),
    stop: Optional[str] = typer.Option(None, "--stop", metavar="REASON", parser=reason_text,
                                       help="Send stop with REASON, wait until the kernel journaled it, exit."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="REASON", parser=reason_text,
                                             help="Send checkpoint_now with REASON the same way."),
    key: Optional[Path] = typer.Option(None, "--key", parser=key_file_path,
                                       help="This client's secret key file: RUN is then a remote kernel's HOST:PORT "
                                            "or its connection.json (TCP + CURVE)."),
    server_key: Optional[Path] = typer.Option(None, "--server-key", parser=key_file_path,
                                              help="The server's public key, pinned: its server.key or the run's "
                                                   "connection.json (default: the connection file's; for HOST:PORT, "
                                                   "server.key in $TRAINBUS_KEYS_DIR or ~/.config/trainbus/keys)."),
) -> None:
    """Watch a live run: progress, metrics, resources and plugins (snapshot first, then live events, no gap).

    A run that has ended is told at once (its `runs show`), without waiting. Commands are journaled under this
    client's name (attach-USER@HOST-PID).
    """
    from . import runs, runs_view

    modes = [flag for flag, given in (("--json", as_json), ("--control", control), ("--stop", stop is not None),
                                      ("--checkpoint", checkpoint is not None)) if given]
    if len(modes) > 1:  # each is a way of attaching: all but one were dropped without a word
        raise UserError(f"{' and '.join(modes)} are ways of attaching: give one (one command at a time)")
    if control and not sys.stdin.isatty():
        raise UserError("--control reads its keys from a terminal, and stdin is not one: from a script, use "
                        "--stop REASON or --checkpoint REASON")
    where = run
    if key is not None and "://" not in run and not re.fullmatch(r"[^/\s]+:\d+", run) and not run.endswith(".json"):
        try:  # a run of this host's runs directory: said so, not that it is not HOST:PORT
            local = runs.resolve_run(run, runs_dir)
        except runs.RunLookupError:
            local = None
        if local is not None:
            raise UserError(f"{run} is a run on this host ({local}): attach it without --key (--key and --server-key "
                            f"are for a remote kernel's HOST:PORT or connection.json)")
    if "://" not in run and key is None:
        try:
            run_dir = runs.resolve_run(run, runs_dir)
        except runs.RunLookupError as exc:
            if re.fullmatch(r"[^/\s]+:\d+", run) or run.endswith(".json"):  # a remote kernel, named without a key
                raise UserError(f"{run} is a remote kernel's HOST:PORT or connection file: give --key (this "
                                f"client's secret key file, `trainbus keys generate client NAME`)") from None
            raise UserError(str(exc)) from None
        overview = runs.run_overview(run_dir)
        if overview["status"] != "running":
            if as_json:
                print(runs_view.as_json({"type": "ended", **overview}, indent=None))
            else:
                runs_view.print_show(_wide(), runs.run_details(run_dir))
            if stop is not None or checkpoint is not None:  # not done: exit 1, as a command the kernel refused
                print(f"error: run {overview['id']} has ended ({overview['status']}): there is no run to "
                      f"{'stop' if stop is not None else 'checkpoint'}", file=sys.stderr)
                raise typer.Exit(code=1)
            raise typer.Exit(code=0)
        where = str(run_dir)
    flags = ["--json"] * as_json + ["--control"] * control + (["--stop", stop] if stop is not None else []) \
        + (["--checkpoint", checkpoint] if checkpoint is not None else []) \
        + (["--key", str(key)] if key is not None else []) + (["--server-key", str(server_key)] if server_key else [])
    _attach_client(where, flags)



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
    if o["validation_loss"] is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in o["validation_metrics"].items())
        out.print(f"  validation loss {o['validation_loss']:.4f}" + (f", {metrics}" if metrics else ""))
    elif o.get("training_loss") is not None:  # nothing validated: what training saw is all there is to say
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (o.get("training_metrics") or {}).items())
        out.print(f"  training loss {o['training_loss']:.4f}" + (f", {metrics}" if metrics else "") + " (no validation)")
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
            if p["crashes"]:  # a class whose constructor or import raised: the crash line above says why
                out.print(f"  plugin {name}: never said hello, so it took no event: it crashed before it could (why: "
                          f"above; what it printed: {printed})")
            else:
                out.print(f"  plugin {name}: never said hello, so it took no event (what it printed: {printed}; a "
                          f"command plugin speaks proto/PROTOCOL.md)")
        if p.get("checkpoints_failed"):
            out.print(f"  plugin {name}: {p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} "
                      f"could not be written (see {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("errors_logged"):
            out.print(f"  plugin {name}: {p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged "
                      f"(see {Path(result.run_dir) / 'kernel.log'}; what it printed: plugins/{name}.log)")
    for name, acked in result.undrained.items():
        out.print(f"  plugin {name}: did not catch up (acked up to seq {acked})")
    out.print(f"  results: {result.run_dir}")
    left = restarts_left() if result.status == "failed" else 0
    if left:  # --max-restarts: this failure is not the run's end
        out.print(f"  torchrun restarts the group ({left} restart{'s' * (left != 1)} left): the run goes on in place "
                  f"from its newest checkpoint")


def _click_exceptions():
    """click's exception module: its own package under typer < 0.20, vendored inside typer since."""
    try:
        import click.exceptions as exceptions
    except ImportError:
        from typer._click import exceptions
    return exceptions


class _SaidBeforeTheRun(logging.Formatter):
    """What the kernel logs while a command is read (a config file's warnings), before a run has its kernel.log: a
    line like every other warning on the terminal (Python's last-resort handler prints the bare message)."""

    def format(self, record: logging.LogRecord) -> str:
        if not record.name.startswith("trainbus"):  # another library's (torch's launcher): as Python says it
            return record.getMessage()
        return f"trainbus: {record.levelname.lower()}: {record.getMessage()}"


def _command_path(words: list[str]) -> str:
    """`trainbus runs list` for `runs list --status`: the command a usage error without click's context was met in
    (an option given no value), whose --help says what it takes; the words name it up to the first that is no
    subcommand."""
    command, path = typer.main.get_command(app), ["trainbus"]
    for word in words:
        subcommands = getattr(command, "commands", {})
        if word not in subcommands:
            break
        command = subcommands[word]
        path.append(word)
    return " ".join(path)


# Options the later of two counts for, unsaid: a daemon's remote `submit` appends its own --runs-dir to the command
# it queues, whatever the submitter's said (docs/daemon.md).
_LATER_WINS = {"runs_dir"}


def _option_given_twice(words: list[str]) -> str | None:
    """The mistake, in words, when an option that takes one value is given twice with two (`--epochs 3 --epochs 4`,
    `--compile --no-compile`): click keeps the later without a word, as a flag given twice would have; None when
    there is none. The same value twice is harmless. Read from the options click declares, not its parser."""
    command, rest = typer.main.get_command(app), list(words)
    while rest and rest[0] in getattr(command, "commands", {}):
        command = command.commands[rest.pop(0)]
    options = {opt: param for param in getattr(command, "params", []) if param.param_type_name == "option"
               for opt in (*param.opts, *param.secondary_opts)}
    given: dict[str, tuple[Any, str]] = {}
    words_left = iter(rest)
    for word in words_left:
        if word == "--":  # what follows is arguments (daemon submit's command), not options
            break
        name, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        param = options.get(name)
        if param is None:
            continue
        if param.is_flag:
            value, said = name in param.opts, word
        else:
            value = inline if eq else next(words_left, None)
            if value is None:  # the last word: click says the value is missing
                break
            said = word if eq else f"{word} {value}"
        if param.multiple or param.count or param.name in _LATER_WINS:
            continue
        if param.name in given and given[param.name][0] != value:
            return f"{param.opts[0]} given twice ({given[param.name][1]} and {said}): give it once"
        given[param.name] = (value, said)
    return None


# What a Ctrl-C leaves, said in one line as it exits 130 (_ctrl_c_says), for the commands that can take a while
# (a big registry, a journal read whole, a daemon or remote host slow to answer) and have no Ctrl-C of their own:
# typer's handling of one exits 130 without a word. `run`, `runs stop` and `runs delete` say their own; `attach`'s
# client (plugins/dashboard.py) says it once attached.
_CTRL_C_SAYS = {
    "trainbus runs list": "Ctrl-C: the listing stopped; nothing was changed",
    "trainbus runs show": "Ctrl-C: stopped; nothing was changed",
    "trainbus runs compare": "Ctrl-C: the comparison stopped; nothing was changed",
    # the drawing process gets the terminal's Ctrl-C too; each PNG is written to a temporary file and renamed
    "trainbus runs plot": "Ctrl-C: plotting stopped; each plot is whole, drawn or as it was",
    "trainbus attach": "Ctrl-C before attaching; nothing was sent, and the run goes on",
    "trainbus daemon status": "Ctrl-C: stopped asking; nothing was changed",
    # the daemon it spawned is in a session of its own: the terminal's Ctrl-C does not reach it
    "trainbus daemon start": "Ctrl-C as the daemon started: `trainbus daemon status` shows whether it serves",
    "trainbus daemon stop": "Ctrl-C: stopped waiting; `trainbus daemon status` shows whether the daemon still serves "
                            "(its runs train on)",
    # a request already sent may be carried out after the Ctrl-C: where to look
    "trainbus daemon cancel": "Ctrl-C: stopped; `trainbus daemon status` shows whether the run is still queued",
    "trainbus daemon cancel --remote": "Ctrl-C: stopped waiting for the daemon; `trainbus daemon status` (with the "
                                       "same --remote, --key and --server-key) shows whether the run is still queued",
    "trainbus daemon submit": "Ctrl-C: stopped waiting for the daemon; `trainbus daemon status` (with the same "
                              "--remote, --key and --server-key) shows whether the run was queued",
    "trainbus keys list": "Ctrl-C: stopped; nothing was changed",
    "trainbus keys generate": "Ctrl-C: stopped; `trainbus keys list` shows whether the pair was made",
    "trainbus plugins list": "Ctrl-C: the listing stopped; nothing was changed",
}


def main() -> None:
    logging.lastResort.setFormatter(_SaidBeforeTheRun())
    _guard_standard_streams()
    command = _command_path(sys.argv[1:])
    remote = any(arg == "--remote" or arg.startswith("--remote=") for arg in sys.argv[1:])
    said = _CTRL_C_SAYS.get(f"{command} --remote" if remote else command) or _CTRL_C_SAYS.get(command)
    if said:  # for the whole command: each reads, or writes one thing its line says how to check
        _ctrl_c_says(said)
    click = _click_exceptions()
    twice = _option_given_twice(sys.argv[1:])
    if twice:
        print(f"error: {twice} (`{command} --help` shows what it takes)", file=sys.stderr)
        _exit(2)
    try:
        # Not standalone: click's own usage errors come here, said in one line like every other mistake (its
        # standalone form is three: usage, a help hint, the error). Exit returns its code.
        # prog_name: `trainbus`, also where `runs resume` execs `python -m trainbus.kernel.cli run ...`, whose
        # usage errors named that command for --help
        code = app(standalone_mode=False, prog_name="trainbus")
    except click.UsageError as exc:  # an unknown option or command, a bad or missing value
        if type(exc).__name__ == "NoArgsIsHelpError":  # `trainbus` alone: its help
            exc.show()
            _exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx is not None else _command_path(sys.argv[1:])
        print(f"error: {exc.format_message()} (`{where} --help` shows what it takes)", file=sys.stderr)
        _exit(2)
    except click.ClickException as exc:
        exc.show()
        _exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C at a prompt
        print("aborted", file=sys.stderr)
        _exit(130)
    except (UserError, ConfigError, SpecError, CheckpointError, RegistryError) as exc:
        # their build() raised: their frames, then the one line
        said = (exc.trace if isinstance(exc, UserCodeError) else "") + f"error: {exc}\n"
        if _tell_launcher(said, os.environ.get("RANK", "") if isinstance(exc, UserCodeError) else ""):
            _exit(0)  # a rank of `run --nproc`: the launcher says it once, and exits 2
        print(said, end="", file=sys.stderr)
        _exit(2)
    except PeerGone as exc:
        if os.environ.get(LAUNCH_ERRORS):  # under `run --nproc`: the launcher says the other rank's error, once
            _exit(0)
        print(f"error: {exc}", file=sys.stderr)
        _exit(1)
    except SystemExit as exc:  # a command's own sys.exit
        _exit(_unless_output_lost(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)))
    _exit(_unless_output_lost(code if isinstance(code, int) else 0))


# A run's output is a copy of what its directory holds, so its loss costs the run nothing; that of `runs list --json >
# runs.json` is all the command made, and a script must not take the cut file for it.
_OUTPUT_IS_A_COPY = False


def _unless_output_lost(code: int) -> int:
    """The exit code, but 1 for a command other than `run` that succeeded while its stdout refused what it wrote."""
    refused = getattr(sys.stdout, "refused", None) is not None
    return 1 if code == 0 and refused and not _OUTPUT_IS_A_COPY else code


def _guard_standard_streams() -> None:
    """stdout and stderr redirected to a file whose disk fills (`trainbus run > train.log`, nohup, a batch script):
    the first refused write is said once on the other stream, naming the file and the fix, and the rest is dropped.
    The command goes on and exits as it would have: a run's results are in its directory, not in that file."""
    def say_on(stream_of: Callable[[], TextIO]) -> Callable[[str], None]:
        def say(line: str) -> None:
            try:
                print(f"trainbus: warning: {line}", file=stream_of(), flush=True)
            except OSError:  # that one refuses too (`> log 2>&1`): nowhere left to say it
                pass
        return say

    _closed_streams_to_devnull()
    sys.stdout = RefusalGuard(sys.stdout, say_on(lambda: sys.stderr))
    sys.stderr = RefusalGuard(sys.stderr, say_on(lambda: sys.stdout))


def _closed_streams_to_devnull() -> None:
    """A standard descriptor the command was started without (`trainbus run >&- 2>&-`) becomes /dev/null: Python
    leaves sys.stdout None, and the first line printed failed the run; and the next file or pipe opened would take
    descriptor 1 or 2, so that what is meant for the terminal (the plugins' too, which inherit them) went into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one, or one below it
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, errors="backslashreplace"))


def _tell_launcher(said: str, rank: str = "") -> bool:
    """A rank of `trainbus run --nproc`: its mistake in the command (`said`) written where the launcher reads it,
    and True; then the rank exits 0 so that torchrun does not restart the group for it. False elsewhere. `rank`:
    this rank's, for an error of the user's own build(), which other ranks may not have met (_first_said)."""
    path = os.environ.get(LAUNCH_ERRORS)
    if not path:
        return False
    try:
        with open(path, "a") as f:  # O_APPEND: each rank's text whole, and ended by a NUL
            f.write(f"{rank}{RANK_SEPARATOR}{said}\0")
    except OSError:
        return False
    return True


def _exit(code: int) -> None:
    """Leave once everything the command did is closed, without Python's teardown of every module
    (proto/process.py): with torch loaded it took 0.7 s of every `trainbus run` (1.5 s on a busy box) and did
    nothing for the run, which closed its journal, sockets and plugins before returning. It also ran C++ static
    destructors under torchrun, where a gloo thread still alive in one rank now and then aborted it at exit
    ("terminate called without an active exception") after a complete run."""
    exit_without_teardown(code)


_ctrl_c_back(_SIGINT_BEFORE)  # imported

if __name__ == "__main__":  # torch.distributed.run starts each rank as `-m trainbus.kernel.cli`
    main()
