"""`trainbus plugins`: what is installed; attach a plugin to a live run, or detach it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.markup import escape
from rich.table import Table

from trainbus.proto import DURABLE
from trainbus.proto.settings_format import typed_word

from .cli_common import RUNS_DIR_OPTION, UserError, _check_plugin_settings, _describe, _run_and_status, _wide
from .config import PluginConfig
from .config_checks import check_metric_settings
from .plugin_names import plugin_name_clashes, registered_plugins, resolve_plugin
from .run_json import read_config

plugins_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="Plugins: what is installed; attach one to a live run, or detach it.")


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
            table.add_row(escape(key), escape(s["type"]), escape(json.dumps(s["default"])),
                          escape(s["constraint"] or "-"), escape(s["help"]))
        console.print(table)


@plugins_app.command("attach")
def plugins_attach(
    run: str = typer.Argument(..., help="A running run: its id (a folder of --runs-dir, or a unique start of one) or "
                                        "its directory."),
    name: str = typer.Argument(..., help="An installed plugin's name (`trainbus plugins list`), or one "
                                        "the run's config runs (its own target or command too)."),
    setting_words: Optional[list[str]] = typer.Argument(None, metavar="[SETTING=VALUE]...",
                                                        help="Its settings, typed and checked as `trainbus run "
                                                             "--set NAME.SETTING=VALUE` does."),
    set_words: Optional[list[str]] = typer.Option(None, "--set", metavar="[NAME.]SETTING=VALUE",
                                                  help="A setting as `trainbus run --set` gives it (repeatable); the "
                                                       "same as a SETTING=VALUE word."),
    from_start: bool = typer.Option(False, "--from-start", help="A durable plugin handles the run from seq 1 (the "
                                                                "journal, replayed); default: from the current seq."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Start a plugin in a live run, as its owner; prints its pid. It is supervised (restarted) like the run's own."""
    from .live_plugins import installed_target

    run_dir = _live_run_dir(run, runs_dir, f"attach {name} to")
    plugin = configured_plugin(run_dir, name)  # the run's own, detached: what its config ran, with its settings
    if plugin is None and ":" in name:  # a class of the author's own is run by hand, the SDK proving itself
        raise UserError(f"{name!r} is a module:Class, not a plugin name; attach your own class by hand: "
                        f"TRAINBUS_RUN_DIR={run_dir} python -m trainbus.sdk {name}")
    if plugin is None:
        target = installed_target(name)
        plugin = resolve_plugin(name, configured_settings(run_dir, name, target), target)
    given: dict[str, str] = {}
    # `--set` as `trainbus run` takes it, as run's users are used to; its NAME. optional here (this command names
    # the plugin)
    for word in [*(setting_words or []), *(w.removeprefix(f"{name}.") for w in set_words or [])]:
        key, sep, raw = word.partition("=")
        if not sep or not key:
            raise UserError(f"{word!r} must look like SETTING=VALUE")
        if key in given and given[key].partition("=")[2] != raw:  # the later would win unsaid, as `run --set` says
            raise UserError(f"plugin {name}: {key} given twice ({given[key]} and {word}): give it once")
        given[key], plugin.settings[key] = word, typed_word(raw)
    deliveries: dict[str, str] = {}
    metric_settings = _check_plugin_settings([plugin], deliveries)
    produced = read_config(run_dir).get("metrics")  # none from a run of before trainbus recorded them
    if isinstance(produced, list):
        check_metric_settings(produced, metric_settings)
    if from_start and deliveries.get(name, DURABLE) != DURABLE:  # a command plugin's (any language) is not known
        raise UserError(f"--from-start replays the journal to a durable plugin; {name} is {deliveries[name]}: it "
                        f"sees the live events only (drop --from-start)")
    _owner_command(run_dir, ["attach", name, "--settings", json.dumps(plugin.settings)] + ["--from-start"] * from_start)


@plugins_app.command("detach")
def plugins_detach(
    run: str = typer.Argument(..., help="A running run: its id (a folder of --runs-dir, or a unique start of one) or "
                                        "its directory."),
    name: str = typer.Argument(..., help="The plugin's name, as the run has it."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Stop a plugin of a live run for good, as its owner: it finishes its teardown and exits (not restarted)."""
    _owner_command(_live_run_dir(run, runs_dir, f"detach {name} from"), ["detach", name])


def configured_settings(run_dir: Path, name: str, target: str) -> dict:
    """The settings the run's config gave plugin NAME where it ran this target, else none: a plugin of the run's
    config detached and attached again is the one the run had, not one with defaults (metrics_log's every_n_steps
    back at 50, visualization's every_n_steps unlike the summaries its earlier files hold)."""
    for entry in read_config(run_dir).get("plugins") or []:
        if isinstance(entry, dict) and entry.get("name") == name and entry.get("target") == target:
            settings = entry.get("settings")
            return dict(settings) if isinstance(settings, dict) else {}
    return {}


def configured_plugin(run_dir: Path, name: str) -> PluginConfig | None:
    """Plugin NAME as the run's config gave it (target or command, settings), else None: what the kernel runs again
    for that name, an author's own `[plugins.NAME] target = "module:Class"`, which no installed name finds, too."""
    for entry in read_config(run_dir).get("plugins") or []:
        if not isinstance(entry, dict) or entry.get("name") != name:
            continue
        target, command, settings = entry.get("target"), entry.get("command"), entry.get("settings")
        command = [str(word) for word in command] if isinstance(command, list) else []
        target = target if isinstance(target, str) else ""
        if target or command:
            return PluginConfig(name, target, dict(settings) if isinstance(settings, dict) else {}, command)
    return None


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
