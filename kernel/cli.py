"""The `trainbus` command: run training with plugins, list plugins; user mistakes get one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainbus.proto import JOURNAL_NAME, PROTOCOL_VERSION
from trainbus.proto.settings_format import METRIC

from .config import (ConfigError, apply_set, check_runs_dir, config_of_run, load_config, registered_plugins,
                     resolve_plugin)
from .checkpointing import CheckpointError
from .spec import SpecError, UserCodeError

__version__ = "0.1.0"

# rich_markup_mode=None: usage errors print as click's plain "Error: ..." line, not a framed panel.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="trainbus: PyTorch training whose plugins run in their own processes.")
plugins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Plugins: what is installed.")
app.add_typer(plugins_app, name="plugins")
runs_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Runs: what a runs directory holds.")
app.add_typer(runs_app, name="runs")
keys_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="CURVE keys for remote plugins and attach: a server pair per host, a client pair per person.")
app.add_typer(keys_app, name="keys")
KEYS_DIR_HELP = "Key directory (default $TRAINBUS_KEYS_DIR, else ~/.config/trainbus/keys)."
out = Console(highlight=False, soft_wrap=True)  # paths and ids stay on one line, copyable


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
                                                                        "(replaces the config's list; '' for none)."),
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
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train in this many processes (DDP: gloo on CPU, NCCL on "
                                                       "CUDA), launched through torch.distributed.run."),
) -> None:
    """Train, with every plugin in its own process; prints the run id, the outcome and where results are."""
    from .session import run_training

    flag_words = list(flag_words or [])
    if target is not None and _is_flag_word(target):  # `trainbus run lr=0.01`: the default target's flags
        target, flag_words = None, [target, *flag_words]
    cfg = load_config(config)
    continuing = _run_to_continue(resume, runs_dir or Path(cfg.runs_dir)) if resume and config is None else None
    if continuing is not None:
        cfg = config_of_run(continuing)
        cfg.runs_dir = str(continuing.parent)
    if target is not None:
        cfg.target = target
    if help_flags or flag_words:
        _apply_flags(cfg, flag_words, help_flags)
    if plugins is not None:
        cfg.plugins = [resolve_plugin(name.strip(), {}) for name in plugins.split(",") if name.strip()]
    for key, value in (("epochs", epochs), ("seed", seed), ("device", device), ("resume", resume),
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
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        apply_set(cfg, key, value)
    from .config import check_run

    check_run(cfg, "command line")
    check_runs_dir(cfg.runs_dir)
    metric_settings = _check_plugin_settings(cfg.plugins)
    if nproc > 1:
        _launch(nproc)
    result = run_training(cfg, run_id=continuing.name if continuing else None, continue_run=continuing is not None,
                          install_sigint=True, announce=lambda line: print(f"trainbus: {line}", file=sys.stderr),
                          metric_settings=metric_settings)
    if result.cluster.get("rank", 0) == 0:  # across ranks, rank 0 tells how the run went
        _print_summary(result)
    raise typer.Exit(code={"completed": 0, "stopped": 0, "interrupted": 130}.get(result.status, 1))


def _launch(nproc: int) -> None:
    """This same command in `nproc` processes under torch.distributed.run (rank 0 keeps the run); exits."""
    from torch.distributed.run import main as torchrun

    from .cluster import detect
    from .distributed import LAUNCH_RUN_ID
    from .session import new_run_id

    if detect().distributed:
        raise UserError("--nproc inside torchrun or srun: the launcher already started the processes; drop --nproc")
    argv, words = [], iter(sys.argv[1:])
    for word in words:  # the command as given, less --nproc
        if word == "--nproc":
            next(words, None)
        elif not word.startswith("--nproc="):
            argv.append(word)
    os.environ[LAUNCH_RUN_ID] = new_run_id()  # every rank, and a restarted group, trains the same run
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "trainbus.kernel.cli", *argv])
    except Exception as exc:  # torch's ChildFailedError: which rank failed and how is above, from torchrun
        print(f"error: a training process failed ({type(exc).__name__}); its output is above", file=sys.stderr)
        raise typer.Exit(code=1) from None
    raise typer.Exit()


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


def _run_to_continue(resume: str, runs_dir: Path) -> Path | None:
    """The run directory `--resume` names (a run id under runs_dir, or a run directory); None for a file."""
    for candidate in (Path(resume), runs_dir / resume):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


@plugins_app.command("list")
def plugins_list(
    as_json: bool = typer.Option(False, "--json", help="One JSON object, plugin name -> its description and "
                                                       "settings, instead of a table."),
) -> None:
    """Every installed plugin with a one-line description and every setting: type, default, what is allowed, help."""
    known = registered_plugins()
    described = dict(zip(known, _describe(list(known.values()))))
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


@runs_app.command("plot")
def runs_plot(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir) or a run directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where the PNGs go (default RUN_DIR/plots)."),
) -> None:
    """Draw a run's plots (loss, metrics, resources) from its journal alone."""
    run_dir = Path(run) if Path(run).is_dir() else runs_dir / run
    if not (run_dir / JOURNAL_NAME).is_file():
        raise UserError(f"no run {run!r}: {run_dir / JOURNAL_NAME} does not exist (is --runs-dir right?)")
    # The visualization plugin's code draws them, in its own process: the kernel imports no plugin.
    cmd = [sys.executable, "-m", "trainbus.plugins.visualization", "--plot", str(run_dir)]
    proc = subprocess.run(cmd + (["--out", str(out_dir)] if out_dir else []), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise UserError(lines[-1].removeprefix("error: ") if lines else f"plotting failed (exit {proc.returncode})")
    out.print(proc.stdout.rstrip(), markup=False)


@runs_app.command("list")
def runs_list(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON array of runs instead of a table."),
    status: Optional[str] = typer.Option(None, "--status", help="Only runs of these statuses (comma-separated)."),
    target: Optional[str] = typer.Option(None, "--target", help="Only runs whose target contains this text."),
) -> None:
    """Every run, newest first: status, target, flags, start, duration, epochs, last validation, plugin trouble."""
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
        found = registry.reindex(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    except (registry.sqlite3.Error, registry.RegistryError, OSError) as exc:
        raise UserError(f"cannot write {Path(runs_dir).resolve() / registry.REGISTRY_NAME} ({exc}); is the runs "
                        f"directory yours and writable?") from None
    out.print(f"{len(found)} run{'s' * (len(found) != 1)} indexed in "
              f"{escape(str(Path(runs_dir).resolve() / registry.REGISTRY_NAME))}")


@runs_app.command("show")
def runs_show(
    run: str = typer.Argument(..., help="Run id (a folder of --runs-dir, or a unique start of one) or a run directory."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are (default ./runs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of text."),
) -> None:
    """One run in detail: status, per-epoch metrics, plugins and their state, the error, where its files are."""
    from . import runs, runs_view

    try:
        details = runs.run_details(runs.resolve_run(run, runs_dir))
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(runs_view.as_json(details))
    else:
        runs_view.print_show(_wide(), details)


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
                                                                         "(default: the connection file's)."),
) -> None:
    """Watch a live run: progress, metrics, resources and plugins (snapshot first, then live events, no gap).

    A run that has ended is told at once (its `runs show`), without waiting. Commands are journaled under this
    client's name (attach-USER@HOST-PID).
    """
    from . import runs, runs_view

    where = run
    if "://" not in run and key is None:
        try:
            run_dir = runs.resolve_run(run, runs_dir)
        except runs.RunLookupError as exc:
            raise UserError(str(exc)) from None
        overview = runs.run_overview(run_dir)
        if overview["status"] != "running":
            if as_json:
                print(json.dumps({"type": "ended", **overview}, default=str))
            else:
                runs_view.print_show(_wide(), runs.run_details(run_dir))
            raise typer.Exit(code=1 if stop or checkpoint else 0)  # a command had nothing to reach
        where = str(run_dir)
    # The client is a plugin-side process (the kernel imports no sdk or plugin code); exec keeps the terminal.
    flags = ["--json"] * as_json + ["--control"] * control + (["--stop", stop] if stop is not None else []) \
        + (["--checkpoint", checkpoint] if checkpoint is not None else []) \
        + (["--key", str(key)] if key is not None else []) + (["--server-key", str(server_key)] if server_key else [])
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "trainbus.plugins.dashboard", where, *flags])


def _wide() -> Console:
    """`out` on a terminal; piped or redirected, wide enough that no table row wraps."""
    return out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=400)


def _describe(items: list[str]) -> list[dict]:
    """Ask a plugin-side process to describe plugins: the kernel never imports plugin code itself."""
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", *items],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"could not load plugins: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
    return json.loads(proc.stdout)


def _check_plugin_settings(plugins) -> dict[str, str]:
    """Every plugin's settings checked against their declarations (a plugin-side process, before anything
    starts), and put in the form the plugin reads ("1" for an integer setting is 1). Returns the settings that
    name a metric, "plugin: setting" -> metric, for run_training to check against what the run produces."""
    plugins = [p for p in plugins if not p.command]  # a command plugin checks its own settings
    if not plugins:
        return {}
    infos = _describe([f"{p.target}={json.dumps(p.settings)}" for p in plugins])
    metric_settings = {}
    for p, info in zip(plugins, infos):
        if "error" in info:
            raise UserError(f"plugin {p.name}: {info['error']}")
        p.settings.update(info["values"])
        for key, s in info["settings"].items():
            value = p.settings.get(key, s["default"])
            if s["kind"] == METRIC and value:
                metric_settings[f"{p.name}: {key}"] = value
    return metric_settings


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
        out.print(f"  error: {escape(result.error)}")
    if o["validation_loss"] is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in o["validation_metrics"].items())
        out.print(f"  validation loss {o['validation_loss']:.4f}" + (f", {metrics}" if metrics else ""))
    for name, p in result.plugins.items():
        if p["restarts"] or p["state"] == "failed":
            out.print(f"  plugin {name}: {p['state']}, {p['restarts']} restarts ({'; '.join(p['crashes'][-3:])})")
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
    out.print(f"public key: {public}\nsecret key: {secret}")
    if kind == "client":
        out.print(f"Copy {secret} and {store.server_public} to the client's machine (then delete {secret} here); "
                  f"there: python -m trainbus.sdk MODULE:CLASS --connect HOST:PORT --key {secret.name} "
                  f"--server-key {store.server_public.name}")


@keys_app.command("list")
def keys_list(keys_dir: Optional[Path] = typer.Option(None, "--keys-dir", help=KEYS_DIR_HELP)) -> None:
    """The server key and every client key with its role (revoked ones too)."""
    from trainbus.proto.remote import KeyFileError, keys_dir as default_keys_dir, load_public

    from .keys import KeyStore

    store = KeyStore(default_keys_dir(keys_dir))
    table = Table("name", "role", "public key", "file")
    try:
        if store.server_public.exists():
            table.add_row("server", "server", load_public(store.server_public).decode(), str(store.server_public))
        for key in store.clients():
            table.add_row(key.name, key.role, key.public, str(key.path))
    except KeyFileError as exc:
        raise UserError(str(exc)) from None
    out.print(table)


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
    out.print(f"revoked {key.role} key {key.name} ({key.public})")


def main() -> None:
    try:
        app(standalone_mode=True)
    except (UserError, ConfigError, SpecError, CheckpointError) as exc:
        if isinstance(exc, UserCodeError):  # their build() raised: their frames, then the one line
            print(exc.trace, end="", file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # torch.distributed.run starts each rank as `-m trainbus.kernel.cli`
    main()
