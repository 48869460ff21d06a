"""The `trainbus` command: run training with plugins, list plugins; user mistakes get one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainbus.proto import DURABLE, JOURNAL_NAME, PROTOCOL_VERSION
from trainbus.proto.process import exit_without_teardown
from trainbus.proto.settings_format import METRIC, typed_word

from .config import (ConfigError, apply_set, check_runs_dir, config_of_run, launch_of_run, load_config,
                     plugin_name_clashes, registered_plugins, resolve_plugin)
from .checkpointing import CheckpointError, find_checkpoint
from .registry import RegistryError
from .spec import DEFAULT_TARGET, SpecError, UserCodeError

__version__ = "0.1.0"

# rich_markup_mode=None: usage errors print as click's plain "Error: ..." line, not a framed panel.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="trainbus: PyTorch training whose plugins run in their own processes.")
plugins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Plugins: what is installed; attach one to a live run, or detach it.")
app.add_typer(plugins_app, name="plugins")
runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Runs: what a runs directory holds.")
app.add_typer(runs_app, name="runs")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="CURVE keys for remote plugins and attach: a server pair per host, a client pair per person.")
app.add_typer(keys_app, name="keys")
daemon_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="The kernel daemon: a queue of runs for one runs directory that outlives crashes.")
app.add_typer(daemon_app, name="daemon")
KEYS_DIR_HELP = "Key directory (default $TRAINBUS_KEYS_DIR, else ~/.config/trainbus/keys)."
class _Console(Console):
    """rich's Console, but a reader that went away (`trainbus run | head`) costs the rest of the output only: rich
    exits 1 there, and the command's own exit code (a completed run's 0) would be lost."""

    def on_broken_pipe(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


out = _Console(highlight=False, soft_wrap=True)  # paths and ids stay on one line, copyable


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _version(value: bool) -> None:
    if value:
        out.print(f"trainbus {__version__} (protocol v{PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
def run(
    target: Optional[str] = typer.Argument(None, help="path/to/file.py:function or package.module:function "
                                                      "returning a TrainingSpec; default: the digits demo."),
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
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="Where run directories go (default ./runs)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
    hparam: list[str] = typer.Option([], "--set", help="Hyperparameter KEY=VALUE (VALUE parsed as JSON if it can be); "
                                                       "NAME.SETTING=VALUE or plugins.NAME.settings.SETTING=VALUE "
                                                       "sets a setting of this run's plugin NAME; "
                                                       "hyperparameters.A.B=VALUE a hyperparameter named A.B."),
    resume: Optional[str] = typer.Option(None, "--resume", help="RUN_ID or run directory: continue that run in place "
                                                                "from its newest verified checkpoint, with its config "
                                                                "(options given override it); a checkpoint file (or "
                                                                "--config given too): a new run starting from it."),
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT: also serve control on PORT and events on "
                                                                "PORT+1 over TCP with CURVE (PORT 0: a free pair); "
                                                                "needs `trainbus keys`. Endpoints: RUN_DIR/connection.json."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help="32, bf16-mixed, 16-mixed (CUDA) or bf16-true."),
    accumulate_grad_batches: Optional[int] = typer.Option(None, "--accumulate-grad-batches", min=1,
                                                          help="Batches per optimizer step (default 1)."),
    gradient_clip_val: Optional[float] = typer.Option(None, "--gradient-clip-val", min=0.0,
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
) -> None:
    """Train, with every plugin in its own process; prints the run id, the outcome and where results are."""
    flag_words = list(flag_words or [])
    if target is not None and _is_flag_word(target):  # `trainbus run lr=0.01`: the default target's flags
        target, flag_words = None, [target, *flag_words]
    cfg = load_config(config)
    resumed_run = _run_to_continue(resume, runs_dir or Path(cfg.runs_dir)) if resume else None
    continuing = resumed_run if config is None else None  # with --config: a new run from that run's checkpoint
    if continuing is not None:
        _check_resumable(continuing, epochs)
        cfg = config_of_run(continuing)
        cfg.runs_dir = str(continuing.parent)
    if target is not None:
        cfg.target = target
    if help_flags or flag_words:
        _apply_flags(cfg, flag_words, help_flags)
    if plugins is not None:  # which plugins run; a name the config has a [plugins.NAME] table for runs as it says
        configured = {p.name: p for p in cfg.plugins}
        cfg.plugins = [configured.get(name) or resolve_plugin(name, {})
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
    for item in hparam:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} must look like KEY=VALUE")
        apply_set(cfg, key, typed_word(raw))
    _check_epochs_given_once(epochs, [*flag_words, *hparam], cfg.hyperparameters)
    from .config import check_run

    check_run(cfg, "command line")
    check_runs_dir(cfg.runs_dir)
    _warn_name_clashes(cfg.plugins)
    metric_settings = _check_plugin_settings(cfg.plugins)
    if cfg.target == DEFAULT_TARGET:  # the demo's hyperparameters, told before torch is imported (seconds)
        from .digits_hyperparameters import checked

        try:
            checked(cfg.hyperparameters)
        except SpecError as exc:
            raise UserError(str(exc)) from None
    if gpus is not None and not detach:
        raise UserError("--gpus places a queued run: add --detach (a run started here uses the GPUs "
                        "CUDA_VISIBLE_DEVICES shows it)")
    if detach:
        _check_target(cfg)
        if cfg.resume:  # what the queued run would look for first: a verified checkpoint to start from
            find_checkpoint(cfg.resume, cfg.runs_dir)
        _submit(cfg, continuing, gpus)
        return
    launch = {"nproc": nproc, "nnodes": nnodes, "max_restarts": max_restarts, "rdzv_endpoint": rdzv_endpoint}
    if continuing is not None and all(v is None for v in launch.values()) and not _under_a_launcher():
        launch = launch_of_run(continuing)  # `--resume RUN` alone: in as many processes as the run had
    launch = {"nproc": 1, "nnodes": 1, "max_restarts": 0, "rdzv_endpoint": None,
              **{k: v for k, v in launch.items() if v is not None}}
    if launch["nproc"] > 1 or launch["nnodes"] > 1 or launch["max_restarts"] or launch["rdzv_endpoint"]:
        _launch(launch, cfg.runs_dir, continuing.name if continuing else None)
    try:  # Ctrl-C while torch imports, or the run is set up: one line (typer would exit 130 and say nothing)
        from .session import InterruptedBeforeStart, run_training  # here: torch takes seconds to import, and a
        # mistake above is told at once
    except KeyboardInterrupt:
        _interrupted_before_start("Ctrl-C before the run began")
    try:
        result = run_training(cfg, run_id=continuing.name if continuing else None, continue_run=continuing is not None,
                              install_sigint=True, announce=lambda line: print(f"trainbus: {line}", file=sys.stderr),
                              metric_settings=metric_settings)
    except KeyboardInterrupt:  # a second Ctrl-C while it was set up
        _interrupted_before_start("Ctrl-C twice before the run began")
    except InterruptedBeforeStart as exc:
        _interrupted_before_start(str(exc))
    if result.cluster.get("rank", 0) == 0:  # across ranks, rank 0 tells how the run went
        _print_summary(result)
    code = EXIT_CODES.get(result.status, 1)
    if code == 130 and os.environ.get("TRAINBUS_LAUNCH"):  # distributed.LAUNCH: a rank of `run --nproc`, whose
        code = 0  # launcher exits 130 from summary.json; 130 here would have torchrun restart the group (--max-restarts)
    raise typer.Exit(code=code)


def _interrupted_before_start(said: str) -> NoReturn:
    launched = bool(os.environ.get("TRAINBUS_LAUNCH"))  # a rank of `run --nproc`: 130 would have torchrun restart it
    if not launched:
        print(f"trainbus: {said}", file=sys.stderr)
    raise typer.Exit(code=0 if launched else 130)


EXIT_CODES = {"completed": 0, "stopped": 0, "interrupted": 130}  # by the run's status; any other (failed): 1
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--max-restarts")  # `run`'s, handed to torchrun


def _under_a_launcher() -> bool:
    """This process is a rank of torchrun or srun (ours or the user's): it launches nothing itself."""
    from .cluster import detect

    return detect().distributed


def _launch(launch: dict, runs_dir: str, continuing: str | None) -> NoReturn:
    """This same command in `nproc` processes (on each of `nnodes` machines) under torch.distributed.run, which
    restarts them up to `max_restarts` times; rank 0 keeps the run. Exits as the run ended (its summary.json):
    0 completed or stopped, 130 interrupted, 1 failed."""
    from torch.distributed.run import main as torchrun

    from .cluster import LAUNCH, LAUNCH_ERRORS, LAUNCH_RUN_ID
    from .session import new_run_id

    nproc, nnodes, rdzv_endpoint, max_restarts = (launch["nproc"], launch["nnodes"], launch["rdzv_endpoint"],
                                                  launch["max_restarts"])
    if _under_a_launcher():
        raise UserError("--nproc, --nnodes or --max-restarts inside torchrun or srun: the launcher already started "
                        "the processes; drop them")
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, the same on every machine: one of "
                        f"them, and a port free there")
    if rdzv_endpoint and nnodes == 1:
        raise UserError("--rdzv-endpoint is where the machines of a --nnodes run meet: add --nnodes N, or drop it")
    argv, words = [], iter(sys.argv[1:])
    for word in words:  # the command as given, less what is torchrun's
        if word in LAUNCH_OPTIONS:
            next(words, None)
        elif not word.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            argv.append(word)
    meet = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint] if nnodes > 1 \
        else ["--standalone"]
    # every rank, and a restarted group, trains the same run (the daemon names it for a queued one)
    run_id = os.environ[LAUNCH_RUN_ID] = continuing or os.environ.get(LAUNCH_RUN_ID) or new_run_id()
    os.environ[LAUNCH] = json.dumps(launch)
    # torchrun hands its workers one TCP store for the whole job, and a restarted group's processes read
    # the failed group's gloo addresses from it (connection refused): rank 0 hosts a fresh one each round instead
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun gives each rank one intra-op thread unless told otherwise, in a five-line warning every launch; the
    # same choice made here, without the warning (a user's own OMP_NUM_THREADS stands)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    failure, started = None, time.time()
    descriptor, errors = tempfile.mkstemp(prefix="trainbus-launch-", suffix=".errors")
    os.close(descriptor)
    os.environ[LAUNCH_ERRORS] = errors
    try:
        torchrun([*meet, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
                  "-m", "trainbus.kernel.cli", *argv])
    except Exception as exc:  # ChildFailedError (which rank failed and how is above, from torchrun), SignalException
        failure = exc
    finally:
        said = Path(errors).read_text(errors="replace")
        os.unlink(errors)
    if said:  # a mistake in the command, found by the ranks (each wrote it): once, as in one process
        print(said.split("\0")[0], end="", file=sys.stderr)
        raise typer.Exit(code=2)
    # How the run ended, as rank 0 wrote it: a Ctrl-C or SIGTERM reaching the ranks ends the run interrupted (130),
    # whatever torchrun makes of its workers' exits.
    summary = Path(runs_dir) / run_id / "summary.json"
    try:
        if summary.stat().st_mtime < started:  # a continued run's last session's: this one never got that far
            raise ValueError(summary)
        status = json.loads(summary.read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        status = "interrupted" if type(failure).__name__ == "SignalException" else "failed" if failure else None
    if status == "failed" and failure is not None:
        print(f"error: a training process failed ({type(failure).__name__}); its output is above", file=sys.stderr)
    raise typer.Exit(code=0 if status is None else EXIT_CODES.get(status, 1))  # None: rank 0 on another node


def _submit(cfg, continuing: Path | None, gpus: int | None) -> None:
    """`run --detach`: this command, checked and less --detach and --gpus, queued for the daemon; its id printed."""
    from . import daemon
    from .registry import JobError
    from .session import new_run_id

    words, argv = iter(sys.argv[sys.argv.index("run", 1) + 1:]), []
    for word in words:
        if word == "--gpus":
            next(words, None)
        elif word != "--detach" and not word.startswith("--gpus="):
            argv.append(word)
    run_id = continuing.name if continuing is not None else new_run_id()
    runs_dir = Path(cfg.runs_dir)
    try:
        told = daemon.submit(runs_dir, run_id, argv, gpus, cfg.target, dict(cfg.hyperparameters), continuing,
                             env=dict(os.environ))
    except JobError as exc:
        raise UserError(str(exc)) from None
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


def _apply_flags(cfg, flag_words: list[str], help_flags: bool) -> None:
    """--help-flags: print the target's flags and exit; else the NAME=VALUE words, typed, into the hyperparameters
    (checked here, before anything is made: an unknown flag or a bad value is one line, exit 2)."""
    from .flags import help_text, parse_words, signature_of
    from .spec import load_target

    func = load_target(cfg.target)
    signature = signature_of(func)
    if help_flags:
        print(help_text(func, signature, cfg.target))
        raise typer.Exit()
    cfg.hyperparameters.update(parse_words(signature, flag_words, cfg.target))


def _check_target(cfg) -> None:
    """For a queued run, what it would fail on first, said now: its target imports and takes these flags. Its
    function is not called here (building the model and data is the run's); a dict-taking target's values are
    checked by that function, when the run starts."""
    from .flags import resolve, signature_of
    from .spec import load_target

    resolve(signature_of(load_target(cfg.target)), dict(cfg.hyperparameters), cfg.target)


def _check_epochs_given_once(epochs: int | None, words: list[str], hyperparameters: dict) -> None:
    """UserError for `epochs=N` (a flag word or --set) and a different `--epochs M` on one command line: the spec
    function would be called with N and --epochs would override the epochs it sets, so the run would train M
    epochs while its flags (runs list, runs compare) said N."""
    named = [word for word in words if word.partition("=")[0] in ("epochs", "hyperparameters.epochs")]
    if epochs is not None and named and hyperparameters.get("epochs") != epochs:
        raise UserError(f"epochs given twice, as {named[-1]} and as --epochs {epochs}: give epochs once (--epochs "
                        f"overrides the epochs the spec sets; the flag is what its function is called with)")


def _check_resumable(run_dir: Path, epochs: int | None) -> None:
    """UserError for a run that cannot be resumed now (kernel/daemon.py why_not_resumable)."""
    from .daemon import why_not_resumable

    why = why_not_resumable(run_dir, epochs, rank=_under_a_launcher())
    if why:
        raise UserError(why)


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


@plugins_app.command("list")
def plugins_list(
    as_json: bool = typer.Option(False, "--json", help="One JSON object, plugin name -> its description and "
                                                       "settings, instead of a table."),
) -> None:
    """Every installed plugin with a one-line description and every setting: type, default, what is allowed, help."""
    known = registered_plugins()
    described = dict(zip(known, _describe(list(known.values()))))
    for line in plugin_name_clashes().values():  # on stderr: --json stays one JSON object
        print(f"trainbus: warning: {line}", file=sys.stderr)
    if as_json:
        print(json.dumps(described, indent=2))
        return
    console = _wide()
    for name, info in described.items():
        if "error" in info:
            console.print(f"[bold]{name}[/bold]: [red]cannot load: {escape(info['error'])}[/red]\n")
            continue
        console.print(f"[bold]{name}[/bold] ({info['delivery']}): {escape(info['description'])}")
        if not info["settings"]:
            console.print("  no settings\n")
            continue
        # No cell is cut: a name stays whole, a long default, constraint or help folds onto more lines (never "...").
        table = Table()
        for column in ("setting", "type", "default", "allowed", "help"):
            table.add_column(column, overflow="fold", no_wrap=column in ("setting", "type"))
        for key, s in info["settings"].items():
            table.add_row(key, s["type"], escape(json.dumps(s["default"])), escape(s["constraint"] or "-"),
                          escape(s["help"]))
        console.print(table)


@plugins_app.command("attach")
def plugins_attach(
    run: str = typer.Argument(..., help="A running run: its id (a folder of --runs-dir, or a unique start of one) or "
                                        "its directory."),
    name: str = typer.Argument(..., help="An installed plugin's name (`trainbus plugins list`)."),
    setting_words: Optional[list[str]] = typer.Argument(None, metavar="[SETTING=VALUE]...",
                                                        help="Its settings, typed and checked as `trainbus run "
                                                             "--set NAME.SETTING=VALUE` does."),
    from_start: bool = typer.Option(False, "--from-start", help="A durable plugin handles the run from seq 1 (the "
                                                                "journal, replayed); default: from the current seq."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
) -> None:
    """Start a plugin in a live run, as its owner; prints its pid. It is supervised (restarted) like the run's own."""
    from .live_plugins import installed_target

    run_dir = _live_run_dir(run, runs_dir, f"attach {name} to")
    plugin = resolve_plugin(name, {}, installed_target(name))
    for word in setting_words or []:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise UserError(f"{word!r} must look like SETTING=VALUE")
        plugin.settings[key] = typed_word(raw)
    deliveries: dict[str, str] = {}
    _check_plugin_settings([plugin], deliveries)  # a metric a setting names: the plugin checks it at its end_epoch
    if from_start and deliveries[name] != DURABLE:
        raise UserError(f"--from-start replays the journal to a durable plugin; {name} is {deliveries[name]}: it "
                        f"sees the live events only (drop --from-start)")
    _owner_command(run_dir, ["attach", name, "--settings", json.dumps(plugin.settings)] + ["--from-start"] * from_start)


@plugins_app.command("detach")
def plugins_detach(
    run: str = typer.Argument(..., help="A running run: its id (a folder of --runs-dir, or a unique start of one) or "
                                        "its directory."),
    name: str = typer.Argument(..., help="The plugin's name, as the run has it."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
) -> None:
    """Stop a plugin of a live run for good, as its owner: it finishes its teardown and exits (not restarted)."""
    _owner_command(_live_run_dir(run, runs_dir, f"detach {name} from"), ["detach", name])


def _live_run_dir(run: str, runs_dir: Path, doing: str) -> Path:
    """The run directory of a running run; UserError for an unknown run or one that has ended."""
    run_dir, status = _run_and_status(run, runs_dir)
    if status != "running":
        raise UserError(f"run {run_dir.name} is not running ({status}): there is nothing to {doing}")
    return run_dir


def _owner_command(run_dir: Path, words: list[str]) -> NoReturn:
    """This process becomes the client that sends the run's kernel one owner's command (sdk/command.py: the kernel
    imports no sdk code) and prints its answer; exec keeps the exit code."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "trainbus.sdk.command", str(run_dir), *words])


@runs_app.command("plot")
def runs_plot(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run "
                                        "directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the PNGs go (default RUN_DIR/plots)."),
) -> None:
    """Draw a run's plots (loss, metrics, resources) from its journal alone."""
    from . import runs

    try:
        run_dir = runs.resolve_run(run, runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if not (run_dir / JOURNAL_NAME).is_file():
        raise UserError(f"run {run_dir.name} has no journal to plot: {run_dir / JOURNAL_NAME} does not exist")
    if out_dir is not None:
        _make_out_dir(out_dir)
    # The visualization plugin's code draws them, in its own process: the kernel imports no plugin.
    cmd = [sys.executable, "-m", "trainbus.plugins.visualization", "--plot", str(run_dir)]
    proc = subprocess.run(cmd + (["--out", str(out_dir)] if out_dir else []), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"plotting failed (exit {proc.returncode})")
    for line in proc.stderr.splitlines():
        if line.startswith("warning: "):
            print(f"trainbus: {line}", file=sys.stderr)
    out.print(proc.stdout.rstrip(), markup=False)


def _make_out_dir(out_dir: Path) -> None:
    """runs plot's --out, made before anything is drawn: one line naming it when it cannot be."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory: name a directory (it is made if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out_dir}: cannot make that directory ({exc.strerror or exc}); name a directory "
                        f"you can write, or leave --out out for RUN_DIR/plots") from None


@runs_app.command("list")
def runs_list(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of runs instead of a table."),
    status: Optional[str] = typer.Option(None, "--status", help="Only runs of these statuses (comma-separated)."),
    target: Optional[str] = typer.Option(None, "--target", help="Only runs whose target contains this text."),
) -> None:
    """Every run, newest first: status, target, flags, start, duration, epochs, last validation, plugin trouble,
    error."""
    from . import registry, runs, runs_view

    statuses = tuple(s.strip() for s in (status or "").split(",") if s.strip())
    unknown = [s for s in statuses if s not in registry.STATUSES]
    if unknown:
        raise UserError(f"--status {unknown[0]!r} is not a status; statuses: {', '.join(registry.STATUSES)}")
    try:
        found = registry.list_runs(runs_dir, statuses, target)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(runs_view.as_json(found))
        return
    every = len(registry.list_runs(runs_dir)) if not found and (statuses or target) else 0
    if every:  # "no runs in DIR" would be false: the filter left none of them
        given = [f"--status {','.join(statuses)}"] * bool(statuses) + [f"--target {target}"] * bool(target)
        out.print(f"no run matched {escape(' '.join(given))}; {escape(str(Path(runs_dir).resolve()))} has {every} "
                  f"run{'s' * (every != 1)} (`trainbus runs list` alone lists every run)")
    else:
        runs_view.print_list(_wide(), found, runs_dir)


@runs_app.command("compare")
def runs_compare(
    run_ids: Optional[list[str]] = typer.Argument(None, metavar="[RUN]...", help="Runs to compare (ids, unique "
                                                                                "starts of ids, run directories); "
                                                                                "default: every run."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array, a run's flags and metrics each."),
) -> None:
    """Runs side by side, one a row: their flags, then their final (and best) metrics, as `guild compare`."""
    import time

    from . import registry, runs, runs_view

    try:
        if run_ids:
            now = time.time()
            found = [runs.overview_or_unreadable(runs.resolve_run(run, runs_dir), now) for run in run_ids]
        else:
            found = registry.list_runs(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    rows = runs_view.comparison(found)
    if as_json:
        print(runs_view.as_json(rows))
    else:
        runs_view.print_comparison(_wide(), rows, runs_dir)


@runs_app.command("reindex")
def runs_reindex(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
) -> None:
    """Rebuild the run registry (RUNS_DIR/registry.sqlite) from the run directories, which hold the truth."""
    from . import registry, runs

    try:
        found, set_aside = registry.reindex(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    except (registry.sqlite3.Error, registry.RegistryError, OSError) as exc:
        raise UserError(f"cannot write {Path(runs_dir).resolve() / registry.REGISTRY_NAME} ({exc}); is the runs "
                        f"directory yours and writable?") from None
    if set_aside is not None:
        out.print(f"the old registry was no SQLite database it could read: kept as {escape(str(set_aside))} (the "
                  f"daemon's queue was in it: queued runs need submitting again)")
    out.print(f"{len(found)} run{'s' * (len(found) != 1)} indexed in "
              f"{escape(str(Path(runs_dir).resolve() / registry.REGISTRY_NAME))}")


@runs_app.command("show")
def runs_show(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """One run in detail: status, per-epoch metrics, plugins and their state, the error, where its files are."""
    from . import daemon, runs, runs_view

    try:
        details = daemon.as_queued(runs_dir, runs.run_details(runs.resolve_run(run, runs_dir)))
    except runs.RunLookupError as exc:
        details = daemon.run_without_directory(runs_dir, run)  # queued, or failed before its kernel made one
        if details is None:
            raise UserError(str(exc)) from None
        if not as_json:
            out.print(f"run {details['id']}: {details['status']}" + (f" ({escape(details['error'])})"
                                                                     if details.get("error") else ""))
            out.print(f"  command: trainbus run {escape(shlex.join(details['argv']))}")  # as a shell takes it
            out.print(f"  submitted: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(details['submitted_ts']))}"
                      + (f" by {escape(details['submitted_by'])}" if details["submitted_by"] else ""))
            if Path(details["output"]).exists():
                out.print(f"  output: {escape(details['output'])}")
            else:  # queued, or failed at placement: no process has written any
                out.print("  output: none yet (it is queued)" if details["job"] == "queued"
                          else "  output: none (the daemon never started a process for it)")
            return
    for line in details.get("journal_damage") or []:  # on stderr: --json stays one JSON object
        print(f"trainbus: warning: {line}; what this shows leaves those events out", file=sys.stderr)
    if as_json:
        print(runs_view.as_json(details))
    else:
        runs_view.print_show(_wide(), details)


@runs_app.command("stop")
def runs_stop(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run "
                                        "directory."),
    reason: str = typer.Option("trainbus runs stop", "--reason", help="Why: journaled with who sent the stop."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
) -> None:
    """Stop a running run at its next step boundary, as `trainbus attach RUN --stop REASON` does; exits once the
    kernel journaled the stop. A run queued for the daemon is taken off the queue. A run that has ended: one
    line, exit 1."""
    from . import daemon

    queued = daemon.queued_job(runs_dir, run)  # before the directory lookup: a queued run may have none yet
    if queued is not None:
        daemon.cancel(runs_dir, queued)
        resumed = (Path(runs_dir) / queued / "config.json").is_file()  # a queued resume: the run itself stays
        out.print(f"cancelled the queued resume of {queued}; the run stays as it was" if resumed
                  else f"cancelled {queued}: it was queued and never started")
        return
    unmade = daemon.run_without_directory(runs_dir, run)  # the daemon started it, or failed to, before its kernel
    if unmade is not None:                                  # made the run directory
        if unmade["job"] not in ("starting", "running") or not _kernel_listens(runs_dir, unmade):
            print(f"error: run {unmade['id']} has already ended ({unmade['status']}: {unmade.get('error') or '-'}); "
                  f"there is nothing to stop", file=sys.stderr)
            raise typer.Exit(code=1)
        run = str(Path(runs_dir) / unmade["id"])
    run_dir, status = _run_and_status(run, runs_dir)
    if status != "running":
        print(f"error: run {run_dir.name} has already ended ({status}); there is nothing to stop", file=sys.stderr)
        raise typer.Exit(code=1)
    _stop_running_run(run_dir, reason)


KERNEL_START_WAIT_S = 600.0  # `runs stop` of a run whose kernel is still building its spec (loading data, ...)


def _kernel_listens(runs_dir: Path, unmade: dict) -> bool:
    """A run the daemon started whose kernel has no directory or sockets yet (it builds the spec first): wait, while
    its process lives and at most KERNEL_START_WAIT_S, until its kernel.log names its sockets. False when the
    process ended first."""
    from . import daemon

    kernel_log = Path(runs_dir) / unmade["id"] / "kernel.log"
    print(f"trainbus: run {unmade['id']} is starting (its kernel builds the spec first); the stop goes in once it "
          f"listens", file=sys.stderr)
    deadline = time.monotonic() + KERNEL_START_WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(kernel_log, "rb") as f:
                if b" sockets: " in f.read(1 << 16):
                    return True
        except OSError:
            pass
        if unmade["pid"] is not None and not daemon.process_alive(unmade["pid"], unmade["pid_started"]):
            return kernel_log.parent.is_dir()  # it made its directory and ended: the run says how
        time.sleep(0.2)
    raise UserError(f"run {unmade['id']}'s kernel did not start listening within {KERNEL_START_WAIT_S:.0f} s; "
                    f"`trainbus runs show {unmade['id']}` says where it is")


def _stop_running_run(run_dir: Path, reason: str) -> NoReturn:
    """Stop the live run in run_dir: the attach client sends stop (journaled under its peer name) and exits once
    the kernel journaled it."""
    _attach_client(str(run_dir), ["--stop", reason])


@runs_app.command("delete")
def runs_delete(
    run_ids: list[str] = typer.Argument(..., metavar="RUN...", help="Runs to delete (ids, unique starts of ids, "
                                                                    "run directories)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (needed when stdin is not a terminal)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
) -> None:
    """Delete ended runs: each run directory, with every file in it, and its row in the run registry. A running
    run, or one the daemon has queued, is refused (stop it first with `trainbus runs stop`); nothing is deleted
    unless every run named can be."""
    from . import daemon, run_removal, runs

    run_dirs: dict[Path, None] = {}  # in the order named, once each
    records: dict[str, Path] = {}  # the daemon's runs that failed before they had a directory: their output
    try:
        for run in run_ids:
            try:
                run_dir = runs.resolve_run(run, runs_dir)
            except runs.RunLookupError:
                record = daemon.run_without_directory(runs_dir, run)
                if record is None:
                    raise
                run_removal.check_not_submitted(runs_dir, record["id"])
                records[record["id"]] = Path(record["output"])
            else:
                run_removal.check_ended(run_dir)
                run_dirs[run_dir] = None
    except (runs.RunLookupError, run_removal.RemovalError) as exc:
        raise UserError(str(exc)) from None
    names = ", ".join([*(d.name for d in run_dirs), *records])
    count = len(run_dirs) + len(records)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"deleting {names} needs a yes: add --yes (stdin is not a terminal to ask on)")
        if not typer.confirm(f"Delete {count} run{'s' * (count != 1)} ({names}) with every file "
                             f"in {'them' if count != 1 else 'it'}?"):
            out.print("nothing deleted")
            raise typer.Exit(code=1)
    try:
        for run_dir in run_dirs:
            run_removal.delete_run(run_dir)
            out.print(f"deleted run {run_dir.name} ({escape(str(run_dir))})")
        for run_id, output in records.items():
            had_output = output.exists()  # none for a run that failed at placement: it never had a process
            run_removal.delete_record(runs_dir, run_id, output)
            out.print(f"deleted run {run_id} (it never had a directory"
                      + (f"; its output {escape(str(output))})" if had_output else ")"))
    except run_removal.RemovalError as exc:
        raise UserError(str(exc)) from None


@app.command()
def attach(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one), a run directory, "
                                        "or ENDPOINT: ipc://DIR/events.sock, or EVENTS,CONTROL."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines: the snapshot (with its seq), then every event."),
    control: bool = typer.Option(False, "--control", help="Steer from the dashboard: s stops the run, c asks for a "
                                                          "checkpoint now (each confirmed with y)."),
    stop: Optional[str] = typer.Option(None, "--stop", metavar="REASON", help="Send stop with REASON, wait until "
                                                                              "the kernel journaled it, exit."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", metavar="REASON",
                                             help="Send checkpoint_now with REASON the same way."),
    key: Optional[Path] = typer.Option(None, "--key", help="This client's secret key file: RUN is then a remote "
                                                           "kernel's HOST:PORT or its connection.json (TCP + CURVE)."),
    server_key: Optional[Path] = typer.Option(None, "--server-key", help="The server's public key file, pinned "
                                                                         "(default: the connection file's; for "
                                                                         "HOST:PORT, server.key in "
                                                                         "$TRAINBUS_KEYS_DIR or "
                                                                         "~/.config/trainbus/keys)."),
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
                print(json.dumps({"type": "ended", **overview}, default=str))
            else:
                runs_view.print_show(_wide(), runs.run_details(run_dir))
            raise typer.Exit(code=1 if stop is not None or checkpoint is not None else 0)  # nothing to reach
        where = str(run_dir)
    flags = ["--json"] * as_json + ["--control"] * control + (["--stop", stop] if stop is not None else []) \
        + (["--checkpoint", checkpoint] if checkpoint is not None else []) \
        + (["--key", str(key)] if key is not None else []) + (["--server-key", str(server_key)] if server_key else [])
    _attach_client(where, flags)


def _attach_client(where: str, flags: list[str]) -> NoReturn:
    """This process becomes the attach client (plugins/dashboard.py) for WHERE, a live run: the client is a
    plugin-side process (the kernel imports no sdk or plugin code); exec keeps the terminal and the exit code."""
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "trainbus.plugins.dashboard", where, *flags])


def _wide() -> Console:
    """`out` on a terminal; piped or redirected, wide enough that no table row wraps."""
    return out if out.is_terminal else _Console(highlight=False, soft_wrap=True, width=400)


def _describe(items: list[str]) -> list[dict]:
    """Ask a plugin-side process to describe plugins: the kernel never imports plugin code itself."""
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", *items],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"could not load plugins: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(proc.stdout)


def _check_plugin_settings(plugins, deliveries: dict[str, str] | None = None) -> dict[str, str]:
    """Every plugin's settings checked against their declarations (a plugin-side process, before anything
    starts), and put in the form the plugin reads ("1" for an integer setting is 1). Returns the settings that
    name a metric, "plugin: setting" -> metric, for run_training to check against what the run produces;
    fills `deliveries`, when given, with each plugin's delivery class."""
    plugins = [p for p in plugins if not p.command]  # a command plugin checks its own settings
    if not plugins:
        return {}
    infos = _describe([f"{p.target}={json.dumps(p.settings)}" for p in plugins])
    metric_settings = {}
    for p, info in zip(plugins, infos):
        if "error" in info:
            raise UserError(f"plugin {p.name}: {info['error']}")
        for warning in info.get("warnings", []):  # on the terminal, before the run: the console is not up yet then
            print(f"trainbus: warning: plugin {p.name}: {warning}", file=sys.stderr)
        p.settings.update(info["values"])
        if deliveries is not None:
            deliveries[p.name] = info["delivery"]
        for key, s in info["settings"].items():
            value = p.settings.get(key, s["default"])
            if s["kind"] == METRIC and value:
                metric_settings[f"{p.name}: {key}"] = value
    return metric_settings


def _warn_name_clashes(plugins) -> None:
    """A built-in this run uses whose name a package registers too: say which one runs, before it starts."""
    clashes, known = plugin_name_clashes(), registered_plugins()
    for p in plugins:
        if p.name in clashes and p.target == known.get(p.name):
            print(f"trainbus: warning: {clashes[p.name]}", file=sys.stderr)


def _print_summary(result) -> None:
    o = result.outcome
    colour = {"completed": "green", "stopped": "yellow"}.get(result.status, "red")
    out.print(f"\n[bold]run {result.run_id}[/bold]: [{colour}]{result.status}[/{colour}] "
              f"after {o['epochs_completed']} epochs, {o['steps']} steps, {result.duration_s:.1f} s")
    # The kernel's own stop for an error (the journal's disk) is said once, as the error; texts are not markup
    # (a reason naming "[run] runs_dir" would lose its brackets).
    reasons = [r for r in o["stop_reasons"] if not (result.error and r == f"kernel: stop: {result.error}")]
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
    for name, p in result.plugins.items():
        if p["crashes"] or p["restarts"] or p["state"] == "failed":  # a crash late in a run is not restarted
            crashes = len(p["crashes"])
            out.print(f"  plugin {name}: {p['state']}, {crashes} crash{'es' * (crashes != 1)}, {p['restarts']} "
                      f"restarts ({escape('; '.join(p['crashes'][-3:]))})")
        if p.get("checkpoints_failed"):
            out.print(f"  plugin {name}: {p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} "
                      f"could not be written (see {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("errors_logged"):
            out.print(f"  plugin {name}: {p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged "
                      f"(see {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
    for name, acked in result.undrained.items():
        out.print(f"  plugin {name}: did not catch up (acked up to seq {acked})")
    out.print(f"  results: {result.run_dir}")


@keys_app.command("generate")
def keys_generate(
    kind: str = typer.Argument(..., help="server (this kernel host's pair) or client (one person or machine)."),
    name: Optional[str] = typer.Argument(None, help="The client's name, e.g. alice or gpu-box-3."),
    role: str = typer.Option("monitor", "--role", help="monitor (events, replays, metric and log) or control "
                                                       "(also stop and checkpoint_now)."),
    force: bool = typer.Option(False, "--force", help="Replace the server pair (clients pinned to it are locked out)."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP),
) -> None:
    """Make a CURVE key pair: public NAME.key and secret NAME.key_secret (0600, in a 0700 directory)."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir

    from .keys import KeyStore

    store = KeyStore(default_keys_dir(keys_dir))
    try:
        if kind == "server":
            public, secret = store.generate_server(force)
        elif kind == "client" and name:
            public, secret = store.generate_client(name, role)
        else:
            raise UserError("give `server`, or `client NAME --role monitor|control`")
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    out.print(escape(f"public key: {public}\nsecret key: {secret}"))  # paths, as they are: never markup
    if kind == "client":
        out.print(escape(f"Copy {secret} and {store.server_public} to the client's machine (then delete {secret} "
                         f"here); there: python -m trainbus.sdk MODULE:CLASS --connect HOST:PORT --key {secret.name} "
                         f"--server-key {store.server_public.name}"))


@keys_app.command("list")
def keys_list(keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP)) -> None:
    """The server key and every client key with its role (revoked ones too)."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir, load_public

    from .keys import KeyStore

    store = KeyStore(default_keys_dir(keys_dir))
    if not store.directory.is_dir():
        said = f"no key directory {store.directory}"
        if keys_dir is not None:  # named, so likely mistyped
            raise UserError(f"{said} (is --keys-dir right? `trainbus keys generate server` makes one)")
        out.print(f"{escape(said)} yet: `trainbus keys generate server` makes it")
        return
    table = Table("name", "role", "public key", "file")
    try:
        if store.server_public.exists():
            # keys are z85 text, brackets included: escaped, or rich takes "[...]" for markup and drops it
            table.add_row("server", "server", escape(load_public(store.server_public).decode()),
                          escape(str(store.server_public)))
        for key in store.clients():
            table.add_row(escape(key.name), key.role, escape(key.public), escape(str(key.path)))
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    _wide().print(table)  # piped or narrow, keys and paths whole: they are copied and scripted


@keys_app.command("revoke")
def keys_revoke(
    name: str = typer.Argument(..., help="The client key's name (`trainbus keys list`)."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP),
) -> None:
    """Take a client's authorization away: new connections with its key fail the handshake, a running kernel
    refuses its control messages within a second; its public key is kept under revoked/."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir

    from .keys import KeyStore

    try:
        key = KeyStore(default_keys_dir(keys_dir)).revoke(name)
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    out.print(escape(f"revoked {key.role} key {key.name} ({key.public})"))  # z85 has [ and ]: not markup


RUNS_DIR_OPTION = typer.Option(Path("runs"), "--runs-dir", help="The runs directory it serves (default ./runs).")


@daemon_app.command("start")
def daemon_start(
    runs_dir: Path = RUNS_DIR_OPTION,
    gpus: Optional[str] = typer.Option(None, "--gpus", help="The devices runs are placed on, comma-separated "
                                                            "(0,1 or GPU UUIDs; '' for none); default: every GPU "
                                                            "NVML sees."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", min=1, help="Runs training at once (default 1)."),
    foreground: bool = typer.Option(False, "--foreground", help="Stay in the foreground, logging to stderr too "
                                                                "(for systemd: docs/daemon.md)."),
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT: also serve requests over TCP with "
                                                                "CURVE (PORT 0: a free one): monitor keys may ask "
                                                                "status, control keys may submit and cancel runs."),
    keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP),
    quiet: bool = typer.Option(False, "--quiet", hidden=True, help="No log lines on stderr."),
) -> None:
    """Start the daemon for a runs directory: it runs the queued runs (`trainbus run ... --detach`) in order."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir

    from . import daemon
    from .keys import KeyStore
    from .remote import ListenError, check_listen

    check_runs_dir(str(runs_dir))
    try:
        devices = None if gpus is None else daemon.parse_devices(gpus)
        if listen:
            check_listen(listen, KeyStore(default_keys_dir(keys_dir)), ports=1)  # one port: the daemon's
        if foreground:
            raise typer.Exit(code=daemon.serve(runs_dir, devices, max_concurrent, foreground_log=not quiet,
                                               listen=listen, keys_dir=keys_dir and str(keys_dir)))
        argv = ["--runs-dir", str(runs_dir.resolve()), "--max-concurrent", str(max_concurrent)]
        argv += ["--gpus", gpus] if gpus is not None else []
        argv += ["--listen", listen] if listen else []
        argv += ["--keys-dir", str(keys_dir.resolve())] if keys_dir else []
        answer = daemon.start_background(runs_dir, argv)
    except (daemon.DaemonError, ListenError, KeyFileError) as exc:
        raise UserError(str(exc)) from None
    out.print(f"daemon pid {answer['pid']} serves {escape(answer['runs_dir'])} (devices: "
              f"{','.join(answer['devices']) or 'none'}, max concurrent {answer['max_concurrent']}); "
              f"log: {escape(str(daemon.daemon_dir(runs_dir) / daemon.LOG_FILE))}")
    if answer.get("remote"):
        out.print(_remote_line(answer["remote"], runs_dir))


def _remote_line(endpoint: str, runs_dir: Path) -> str:
    from . import daemon

    return (f"remote endpoint {escape(endpoint)}: clients need a key of `trainbus keys` and "
            f"{escape(str(daemon.daemon_dir(runs_dir) / daemon.REMOTE_FILE))} (--server-key)")


@daemon_app.command("stop")
def daemon_stop(runs_dir: Path = RUNS_DIR_OPTION) -> None:
    """Stop the daemon; its runs go on training and the next daemon adopts them."""
    from . import daemon

    try:
        answer = daemon.stop(runs_dir)
    except daemon.DaemonError as exc:
        raise UserError(str(exc)) from None
    if answer is None:
        out.print(f"no daemon serves {escape(str(runs_dir.resolve()))}")
        return
    running = answer.get("running") or []
    out.print("daemon stopped" + (f"; still training (adopted by the next daemon): {', '.join(running)}"
                                  if running else ""))


REMOTE_OPTION = typer.Option(None, "--remote", metavar="HOST:PORT",
                             help="A daemon started with --listen, over TCP with CURVE (needs --key, --server-key).")
KEY_OPTION = typer.Option(None, "--key", help="With --remote: this client's secret key file (`trainbus keys`).")
SERVER_KEY_OPTION = typer.Option(None, "--server-key", help="With --remote: the daemon host's public server key "
                                                           "file, or its .daemon/remote.json.")


def _remote(remote: str | None, key: Path | None, server_key: Path | None):
    from trainbus.proto.remote import KeyFileError

    from .daemon import RemoteDaemon

    if remote is None:
        return None
    if key is None or server_key is None:
        raise UserError("--remote needs --key (your secret key file) and --server-key (the daemon host's public key "
                        "file or .daemon/remote.json)")
    try:
        return RemoteDaemon(remote, key, server_key)
    except (KeyFileError, ValueError) as exc:  # as `trainbus attach --key` says them (sdk/attach.py target_of)
        raise UserError(str(exc)) from None


def _ask(runs_dir: Path, remote, op: str, **fields) -> dict:
    """The daemon's answer, or one error line: none answering, or its refusal."""
    from . import daemon

    answer = daemon.request(runs_dir, op, remote=remote, **fields)
    where = remote.host_port if remote else escape(str(runs_dir.resolve()))
    if answer is None:
        raise UserError(f"no daemon answered at {where}" + (" (is the key authorized there, and the server key "
                                                            "its?)" if remote else ""))
    if not answer.get("ok"):
        raise UserError(f"the daemon at {where} refused: {answer.get('error')}")
    return answer


@daemon_app.command("submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def daemon_submit(
    ctx: typer.Context,
    remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
    server_key: Optional[Path] = SERVER_KEY_OPTION,
    gpus: Optional[int] = typer.Option(None, "--gpus", min=0, help="GPUs the run needs (as `run --gpus`)."),
) -> None:
    """Queue `trainbus run ARGS...` on a remote daemon (`-- ARGS`, as they are to be run on that host, in the
    daemon's directory and environment); prints the run id. Locally, `trainbus run ... --detach` checks the
    arguments first and is the way."""
    target = _remote(remote, key, server_key)
    if target is None:
        raise UserError("daemon submit is for a remote daemon (--remote); here, use `trainbus run ... --detach`")
    answer = _ask(Path("."), target, "submit", argv=list(ctx.args), gpus=gpus)
    print(answer["run"])


@daemon_app.command("cancel")
def daemon_cancel(
    run: str = typer.Argument(..., help="A queued run's id, or a unique start of it."), runs_dir: Path = RUNS_DIR_OPTION,
    remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
    server_key: Optional[Path] = SERVER_KEY_OPTION,
) -> None:
    """Take a queued run off the queue (a running one is stopped with `trainbus runs stop`)."""
    from . import daemon
    from .registry import JobError

    target = _remote(remote, key, server_key)
    if target is not None:
        run = str(_ask(runs_dir, target, "cancel", run=run).get("run", run))
    else:
        try:
            run = daemon.cancel(runs_dir, run)
        except JobError as exc:
            raise UserError(str(exc)) from None
    out.print(f"cancelled {escape(run)}")


@daemon_app.command("status")
def daemon_status(runs_dir: Path = RUNS_DIR_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="One JSON object."),
                  remote: Optional[str] = REMOTE_OPTION, key: Optional[Path] = KEY_OPTION,
                  server_key: Optional[Path] = SERVER_KEY_OPTION) -> None:
    """Whether a daemon serves the runs directory: its pid, devices, the runs it watches, the queue.
    Exit code 0 when one does, 3 when none (as `systemctl status`)."""
    from . import daemon
    from .registry import REGISTRY_NAME, Registry

    target = _remote(remote, key, server_key)
    if target is not None:
        answer = _ask(runs_dir, target, "status")
    else:
        answer = daemon.request(runs_dir, "status") if runs_dir.is_dir() else None
    queued = (answer or {}).get("queued", [])
    if answer is None and (runs_dir / REGISTRY_NAME).is_file():
        with Registry(runs_dir) as registry:
            queued = [job["id"] for job in registry.jobs(["queued"])]
    if answer is not None:
        answer = {k: v for k, v in answer.items() if k not in ("ok", "queued")}
    if as_json:
        print(json.dumps({"serving": answer is not None, **(answer or {}), "queued": queued}))
    elif answer is None:
        out.print(f"no daemon serves {escape(str(runs_dir.resolve()))}"
                  + (f"; {len(queued)} run(s) queued" if queued else ""))
    else:
        watched = answer.get("running") or {}
        out.print(f"daemon pid {answer['pid']} serves {escape(answer['runs_dir'])}: devices "
                  f"{','.join(answer['devices']) or 'none'}, max concurrent {answer['max_concurrent']}")
        if answer.get("remote") and target is None:
            out.print("  " + _remote_line(answer["remote"], runs_dir))
        for run_id, info in watched.items():
            out.print(f"  running {run_id} (pid {info['pid']}"
                      + (f", CUDA_VISIBLE_DEVICES={','.join(info['devices'])}" if info["devices"] else "") + ")")
        out.print(f"  queued: {', '.join(queued) or 'none'}")
    raise typer.Exit(code=0 if answer is not None else 3)


@runs_app.command("resume")
def runs_resume(
    run: str = typer.Argument(..., help="Run id (or a unique start of one), or a run directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    detach: bool = typer.Option(False, "--detach", help="Queue it for the daemon instead of training here."),
) -> None:
    """Continue a run in place from its newest verified checkpoint (`trainbus run --resume RUN`)."""
    run_dir, status = _run_and_status(run, runs_dir)
    if status == "running":
        raise UserError(f"run {run_dir.name} is running; nothing to resume (`trainbus runs stop` stops it)")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "trainbus.kernel.cli", "run", "--resume", str(run_dir),
                              *(["--detach"] if detach else [])])


def _run_and_status(run: str, runs_dir: Path) -> tuple[Path, str]:
    """The run directory `run` names (an id, a unique start of one, a directory) and its status; UserError for
    no such run."""
    from . import runs

    try:
        run_dir = runs.resolve_run(run, runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    return run_dir, runs.run_overview(run_dir)["status"]


def _click_exceptions():
    """click's exception module: its own package under typer < 0.20, vendored inside typer since."""
    try:
        import click.exceptions as exceptions
    except ImportError:
        from typer._click import exceptions
    return exceptions


def main() -> None:
    click = _click_exceptions()
    try:
        # Not standalone: click's own usage errors come here, said in one line like every other mistake (its
        # standalone form is three: usage, a help hint, the error). Exit returns its code.
        code = app(standalone_mode=False)
    except click.UsageError as exc:  # an unknown option or command, a bad or missing value
        if type(exc).__name__ == "NoArgsIsHelpError":  # `trainbus` alone: its help
            exc.show()
            _exit(exc.exit_code)
        where = exc.ctx.command_path if exc.ctx is not None else "trainbus"
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
        if _tell_launcher(said):
            _exit(0)  # a rank of `run --nproc`: the launcher says it once, and exits 2
        print(said, end="", file=sys.stderr)
        _exit(2)
    except SystemExit as exc:  # a command's own sys.exit
        _exit(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
    _exit(code if isinstance(code, int) else 0)


def _tell_launcher(said: str) -> bool:
    """A rank of `trainbus run --nproc`: its mistake in the command (`said`) written where the launcher reads it,
    and True; then the rank exits 0 so that torchrun does not restart the group for it. False elsewhere."""
    from .cluster import LAUNCH_ERRORS

    path = os.environ.get(LAUNCH_ERRORS)
    if not path:
        return False
    try:
        with open(path, "a") as f:  # O_APPEND: each rank's text whole, and ended by a NUL
            f.write(said + "\0")
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


if __name__ == "__main__":  # torch.distributed.run starts each rank as `-m trainbus.kernel.cli`
    main()
