"""What the `trainbus` subcommands share: the console, the one-line user error, run lookup, plugin-side helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import typer
from rich.console import Console

from trainbus.proto.process import WARNINGS_SAID_ENV
from trainbus.proto.settings_format import METRIC_FIELDS, metrics_named

from .cluster import LAUNCH
from .last_words import exit_status
from .runs_dir_check import LOOP_OF_LINKS, loop_of_links

# A read of a whole journal this long (runs show, runs plot) says how far it got: about a second of reading on a
# quiet core, more on a busy one, and a run of days is 10^7 events, half a minute or more (docs/benchmarks.md).
LONG_JOURNAL_EVENTS = 100_000

# `trainbus run`'s exit code, by the run's status; any other (failed): 1
EXIT_CODES = {"completed": 0, "stopped": 0, "interrupted": 130}
# how long the plugins' own process may take to import and describe them; torch and a plugin package's
# imports take seconds, more on a busy machine
DESCRIBE_TIMEOUT_S = 120.0

KEYS_DIR_HELP = "Key directory (default $TRAINBUS_KEYS_DIR, else ~/.config/trainbus/keys)."


def runs_dir_path(text: str) -> Path:
    """--runs-dir's value. An empty one ("$UNSET_VARIABLE") would be the current directory: runs made, listed or
    deleted there without a word."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a directory, or leave --runs-dir out for ./runs")
    if loop_of_links(text):
        raise typer.BadParameter(f"{text} {LOOP_OF_LINKS}")
    return Path(text)


RUNS_DIR_OPTION = typer.Option("runs", "--runs-dir", parser=runs_dir_path,
                               help="Where run directories are (default ./runs).")


def keys_dir_path(text: str) -> Path:
    """--keys-dir's value. An empty one ("$UNSET_VARIABLE") would be the current directory: a secret key written, or
    the keys a run lets in read, there."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a directory, or leave --keys-dir out for $TRAINBUS_KEYS_DIR or "
                                 "~/.config/trainbus/keys")
    return Path(text)


def key_file_path(text: str) -> Path:
    """--key's and --server-key's value. An empty one ("$UNSET_VARIABLE") was read as the current directory, and
    said as "server key file . is not a readable CURVE public key"."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a key file (`trainbus keys list` shows where they are), or leave it "
                                 "out")
    return Path(text)


def config_file_path(text: str) -> Path:
    """--config's value. An empty one ("$UNSET_VARIABLE") was read as the current directory, and said as "config file
    . is a directory", naming neither the empty value nor the fix."""
    if not text.strip():
        raise typer.BadParameter("is empty: name a TOML file (or bz's .json one), or leave --config out")
    return Path(text)


def reason_text(text: str) -> str:
    """A REASON option's value (`attach --stop`, `runs stop --reason`). click takes the word after the option for
    its value whatever it is, so `--stop --key FILE` journaled "--key" as the reason and then refused FILE as an
    extra argument, naming neither mistake."""
    if re.fullmatch(r"--[A-Za-z][\w-]*", text):
        raise typer.BadParameter(f"takes a REASON, and {text!r} is an option: put the reason right after it, "
                                 f"quoted ('loss diverged')")
    return text


class _Console(Console):
    """rich's Console, but a reader that went away (`trainbus run | head`) costs the rest of the output only: rich
    exits 1 there, and the command's own exit code (a completed run's 0) would be lost."""

    def on_broken_pipe(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


out = _Console(highlight=False, soft_wrap=True)  # paths and ids stay on one line, copyable


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit code 2."""


def _attach_client(where: str, flags: list[str]) -> NoReturn:
    """This process becomes the attach client (plugins/dashboard.py) for WHERE, a live run: the client is a
    plugin-side process (the kernel imports no sdk or plugin code); exec keeps the terminal and the exit code.

    Ctrl-C is blocked across the exec (a signal mask outlives it), so that one pressed during the exec, Python's
    start and the client's imports is delivered once the client can say it: it unblocks it first thing."""
    sys.stdout.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        os.execv(sys.executable, [sys.executable, "-m", "trainbus.plugins.dashboard", where, *flags])
    finally:  # the exec failed: this process goes on, and says a Ctrl-C itself (ctrl_c_says)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _wide() -> Console:
    """`out` on a terminal; piped or redirected, wide enough that no table row wraps."""
    return out if out.is_terminal else _Console(highlight=False, soft_wrap=True, width=400)


def _describe(items: list[str]) -> list[dict]:
    """Ask a plugin-side process to describe plugins: the kernel never imports plugin code itself."""
    targets = ", ".join(item.partition("=")[0] for item in items)
    try:
        proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", *items],
                              capture_output=True, text=True, timeout=DESCRIBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"could not load plugins: describing them took over {DESCRIBE_TIMEOUT_S:g} s ({targets}): a "
                        f"plugin module that waits as it is imported (for a device, a lock, the network) should wait "
                        f"in its setup() instead; or the machine is too busy: try again once it is less so") from None
    if proc.returncode != 0:  # --describe says each plugin's failure in its JSON: a module ended the process itself
        if len(items) > 1:  # which one: each alone, so the others are still described (plugins list)
            return [info for item in items for info in _describe([item])]
        module = targets.partition(":")[0]
        said = "".join(f": {line}" for line in proc.stderr.strip().splitlines()[-1:])
        return [{"target": targets, "error": f"cannot import plugin module {module!r}: it ended the process as it "
                                             f"was imported ({exit_status(proc.returncode)}{said}), as os._exit or a "
                                             f"crash in a C extension it imports does; see where with python -c "
                                             f"'import {module}'"}]
    return json.loads(proc.stdout)


def says_the_checks() -> bool:
    """Whether this process says what the checks before a run find (a note, a plugin's or a config's warning): one
    process of a command does. Not a rank that `trainbus run --nproc` started, whose command said it before it
    started torchrun (under --nproc 2 each line came three times), nor a rank above 0 of the user's own torchrun or
    srun, whose rank 0 says it."""
    if os.environ.get(LAUNCH):  # set by `run --nproc` for the ranks it starts
        return False
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")).strip() in ("", "0")


def _check_plugin_settings(plugins, deliveries: dict[str, str] | None = None) -> dict[str, str]:
    """Every plugin's settings checked against their declarations (a plugin-side process, before anything
    starts), and put in the form the plugin reads ("1" for an integer setting is 1). Returns the settings that
    name a metric ("plugin: setting = value" -> metric; a METRIC_FIELDS template's each), for run_training to check
    against what the run produces;
    fills `deliveries`, when given, with each plugin's delivery class."""
    plugins = [p for p in plugins if not p.command]  # a command plugin checks its own settings
    if not plugins:
        return {}
    infos = _describe([f"{p.target}={json.dumps(p.settings)}" for p in plugins])
    metric_settings = {}
    for p, info in zip(plugins, infos):
        if "error" in info:
            raise UserError(f"plugin {p.name}: {info['error']}")
        for warning in info.get("warnings", []) if says_the_checks() else []:  # on the terminal, before the run:
            print(f"trainbus: warning: plugin {p.name}: {warning}", file=sys.stderr)  # the console is not up yet
        if info.get("warnings") and says_the_checks():  # the plugin logs them into kernel.log, not to the console
            said = os.environ.get(WARNINGS_SAID_ENV, "").split("\n")
            os.environ[WARNINGS_SAID_ENV] = "\n".join(name for name in [*said, p.name] if name)
        given = set(p.settings)
        p.settings.update(info["values"])
        p.capabilities = info["capabilities"]  # whether the kernel waits for it as a persister while it starts
        if deliveries is not None:
            deliveries[p.name] = info["delivery"]
        for key, s in info["settings"].items():
            value = p.settings.get(key, s["default"])
            # a default the user never wrote (a plugin turned on by bz's early_stopping_patience) is said to be one
            default = "" if key in given else f" (its default: set {p.name}.{key})"
            for metric in metrics_named(s["kind"], value):  # the plugin's check made a METRIC_FIELDS a template
                names = f" names {metric}, which" if s["kind"] == METRIC_FIELDS else ""
                metric_settings[f"{p.name}: {key} = {value!r}{default}{names}"] = metric
    return metric_settings


def _run_and_status(run: str, runs_dir: Path) -> tuple[Path, str]:
    """The run directory `run` names (an id, a unique start of one, a directory) and its status; UserError for
    no such run."""
    from . import runs
    from .run_overview import run_overview

    try:
        run_dir = runs.resolve_run(run, runs_dir)
    except runs.RunLookupError as exc:
        raise UserError(str(exc)) from None
    return run_dir, run_overview(run_dir)["status"]


@contextlib.contextmanager
def journal_progress(journal: Path, what: str) -> Iterator[Callable[[int], None]]:
    """A callback taking the seq a read of this whole journal has reached: on a terminal, and for a long journal,
    a line on stderr says how far (`what`: what the read is for), gone once the block ends; else it does nothing."""
    from trainbus.proto.journal_format import journal_tail

    tail = journal_tail(journal) if sys.stderr.isatty() else []
    last = tail[-1].seq if tail else 0
    if last < LONG_JOURNAL_EVENTS:
        yield lambda seq: None
        return
    with Console(stderr=True).status(f"{what}: reading its journal ({last:,} events)") as status:
        yield lambda seq: status.update(f"{what}: reading its journal, {min(seq, last) * 100 // last} % "
                                        f"({seq:,} of {last:,} events)")
