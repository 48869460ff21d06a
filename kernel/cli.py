"""The `trainbus` command: run training with plugins, list plugins; user mistakes get one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainbus.proto import JOURNAL_NAME, PROTOCOL_VERSION

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
) -> None:
    """Train, with every plugin in its own process; prints the run id, the outcome and where results are."""
    from .session import run_training

    cfg = load_config(config)
    continuing = _run_to_continue(resume, runs_dir or Path(cfg.runs_dir)) if resume and config is None else None
    if continuing is not None:
        cfg = config_of_run(continuing)
        cfg.runs_dir = str(continuing.parent)
    if target is not None:
        cfg.target = target
    if plugins is not None:
        cfg.plugins = [resolve_plugin(name.strip(), {}) for name in plugins.split(",") if name.strip()]
    for key, value in (("epochs", epochs), ("seed", seed), ("device", device), ("resume", resume)):
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
    _check_plugin_settings(cfg.plugins)
    result = run_training(cfg, run_id=continuing.name if continuing else None, continue_run=continuing is not None,
                          install_sigint=True, announce=lambda line: print(f"trainbus: {line}", file=sys.stderr))
    _print_summary(result)
    raise typer.Exit(code={"completed": 0, "stopped": 0, "interrupted": 130}.get(result.status, 1))


def _run_to_continue(resume: str, runs_dir: Path) -> Path | None:
    """The run directory `--resume` names (a run id under runs_dir, or a run directory); None for a file."""
    for candidate in (Path(resume), runs_dir / resume):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


@plugins_app.command("list")
def plugins_list() -> None:
    """Every installed plugin with a one-line description and its settings (with defaults)."""
    known = registered_plugins()
    table = Table("plugin", "delivery", "description", "settings (defaults)")
    for name, info in zip(known, _describe(list(known.values()))):
        if "error" in info:
            table.add_row(name, "?", f"[red]cannot load: {info['error']}[/red]", "")
            continue
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in info["settings"].items()) or "-"
        table.add_row(name, info["delivery"], escape(info["description"]), escape(settings))
    out.print(table)


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
) -> None:
    """Every run, newest first: status, target, start, duration, epochs, last validation, plugin trouble."""
    from . import runs, runs_view

    try:
        found = runs.list_runs(runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        print(runs_view.as_json(found))
    else:
        runs_view.print_list(_wide(), found, runs_dir)


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


def _check_plugin_settings(plugins) -> None:
    plugins = [p for p in plugins if not p.command]  # a command plugin checks its own settings
    if not plugins:
        return
    infos = _describe([f"{p.target}={json.dumps(p.settings)}" for p in plugins])
    for p, info in zip(plugins, infos):
        if "error" in info:
            raise UserError(f"plugin {p.name}: {info['error']}")


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


def main() -> None:
    try:
        app(standalone_mode=True)
    except (UserError, ConfigError, SpecError, CheckpointError) as exc:
        if isinstance(exc, UserCodeError):  # their build() raised: their frames, then the one line
            print(exc.trace, end="", file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
