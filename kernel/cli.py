"""The `trainbus` command: its commands put together, and how it exits; user mistakes get one line, exit 2.

Its commands live beside it: cli_run.py (`run`, with its cli_run_*.py), cli_runs.py (`runs`), cli_plugins.py
(`plugins`), cli_keys.py (`keys`), cli_daemon.py (`daemon`); `run --nproc`'s launching, in cli_launch.py; a Ctrl-C
before anything was made, in cli_ctrl_c.py; what they share, in cli_common.py. `attach` is here.
"""

from __future__ import annotations

import os
import signal
import sys

from .cli_ctrl_c import ctrl_c_back, ctrl_c_says

# First, before the rest of this module's imports (a second of them, typer's and rich's most)
_SIGINT_BEFORE = signal.getsignal(signal.SIGINT)
ctrl_c_says("Ctrl-C as it started; nothing was done")

import difflib
import logging
import re
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

import typer

from trainbus.proto import PROTOCOL_VERSION
from trainbus.proto.output import ATTACH_STOPS, RefusalGuard, error_on_stderr
from trainbus.proto.process import exit_without_teardown
from trainbus.proto.text import printable

from .checkpointing import CheckpointError
from .cli_common import RUNS_DIR_OPTION, UserError, _attach_client, _wide, key_file_path, out, reason_text
from .cli_daemon import daemon_app
from .cli_keys import keys_app
from .cli_launch import RANK_SEPARATOR
from .cli_plugins import plugins_app
from .cli_run import run
from .cli_runs import runs_app
from .cluster import LAUNCH_ERRORS, PeerGone
from .config import ConfigError
from .registry import RegistryError
from .spec import SpecError, UserCodeError

__all__ = ["UserError", "app", "main"]
__version__ = "0.1.0"

# rich_markup_mode=None: usage errors print as click's plain "Error: ..." line, not a framed panel.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="trainbus: PyTorch training whose plugins run in their own processes.")
for group, name in ((plugins_app, "plugins"), (runs_app, "runs"), (keys_app, "keys"), (daemon_app, "daemon")):
    app.add_typer(group, name=name)
app.command()(run)


def _version(value: bool) -> None:
    if value:
        out.print(f"trainbus {__version__} (protocol v{PROTOCOL_VERSION})")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


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
    from trainbus.proto.remote import CLIENT_KEY_FIX, names_connection_file

    from . import runs, runs_view
    from .kernel_pid import kernel_elsewhere
    from .run_details import run_details
    from .run_overview import run_overview

    modes = [flag for flag, given in (("--json", as_json), ("--control", control), ("--stop", stop is not None),
                                      ("--checkpoint", checkpoint is not None)) if given]
    if len(modes) > 1:  # each is a way of attaching: all but one were dropped without a word
        raise UserError(f"{' and '.join(modes)} are ways of attaching: give one (one command at a time)")
    if control and not sys.stdin.isatty():
        raise UserError("--control reads its keys from a terminal, and stdin is not one: from a script, use "
                        "--stop REASON or --checkpoint REASON")
    if server_key is not None and key is None:  # else a run of this host took it, unused, without a word
        raise UserError("--server-key pins a remote kernel's key and goes with --key: give --key too for a remote "
                        "kernel's HOST:PORT or connection.json, or leave --server-key out for a run of this host")
    where = run
    if key is not None and "://" not in run and not re.fullmatch(r"[^/\s]+:\d+", run) \
            and not names_connection_file(run):
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
            beside = Path(run).parent.resolve()
            if names_connection_file(run) and runs.is_run_dir(beside) and not kernel_elsewhere(beside):
                # the file `run --listen` prints, read on the run's own host: its ipc sockets need no key
                raise UserError(f"{run} is the connection file of a run on this host: attach its run directory "
                                f"without --key, `trainbus attach {beside}` (--key is for a remote kernel's "
                                f"HOST:PORT or connection.json)") from None
            if re.fullmatch(r"[^/\s]+:\d+", run) or names_connection_file(run):  # a remote kernel, without a key
                raise UserError(f"{run} is a remote kernel's HOST:PORT or connection file: give --key, this "
                                f"client's secret key file: {CLIENT_KEY_FIX}") from None
            raise UserError(str(exc)) from None
        overview = run_overview(run_dir)
        if overview["status"] != "running":
            _refused_stdout_stops_attach()
            if as_json:
                print(runs_view.as_json({"type": "ended", **overview}, indent=None))
            else:
                runs_view.print_show(_wide(), run_details(run_dir))
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



def _refused_stdout_stops_attach() -> None:
    """An ended run's attach says a full disk as the client says it for a live one (plugins/dashboard.py)."""
    if isinstance(sys.stdout, RefusalGuard):
        sys.stdout.say_instead(error_on_stderr, ATTACH_STOPS)


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


# A mistyped option's suggestions. click compares it with each option dashes and all, alike in every one, and lists
# all over difflib's 0.6: `--epoch` got `--detach, --epochs, --nproc`, `--lr` got `--help`. Compared without
# the dashes, the options at least SUGGEST_CUTOFF alike and within SUGGEST_SPREAD of the closest are named.
SUGGEST_CUTOFF = 0.7
SUGGEST_SPREAD = 0.1
# `trainbus run`'s options that a remote submission takes as `daemon submit`'s own, not in its ARGS (daemon_serve)
SUBMIT_OWN = ("--gpus", "--max-resumes")
SUBMIT_REFUSED = ("--detach", *SUBMIT_OWN)


# `trainbus run` options another tool's users reach for that no near miss names (`--devices` is no typo of --device)
RUN_OPTIONS_ELSEWHERE = {
    "devices": "Lightning's --devices is --nproc N here: processes on this machine, one GPU each on CUDA; or "
               "--device cuda:N for one GPU",
    "accelerator": "Lightning's --accelerator is --device here: auto, cpu or cuda",
    "strategy": "Lightning's --strategy has nothing to set here: DDP under --nproc, torchrun or srun",
    "nproc_per_node": "torchrun's --nproc-per-node is --nproc N here",
}


def usage_error(exc: Exception, submitted: bool = False) -> str:
    """click's usage error in its words; an unknown option with the one or two options it is likely a misspelling
    of, as a question; a number out of range or not one, with what the option takes. `submitted`: of a remote
    submission's ARGS, where `daemon submit`'s own options are named as its own and --detach not at all."""
    if type(exc).__name__ == "BadParameter":
        return _bad_number(exc) or exc.format_message()
    if type(exc).__name__ != "NoSuchOption" or getattr(exc, "ctx", None) is None:
        return exc.format_message()
    ctx, given = exc.ctx, exc.option_name.lstrip("-")
    if ctx.command.name == "run" and (elsewhere := RUN_OPTIONS_ELSEWHERE.get(given.replace("-", "_"))):
        return f"{exc.message} ({elsewhere})"
    names = {opt.lstrip("-"): opt for param in ctx.command.get_params(ctx)
             for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}
    if submitted:
        names = {name: opt for name, opt in names.items() if opt not in SUBMIT_REFUSED or opt in SUBMIT_OWN}
    alike = sorted(((difflib.SequenceMatcher(None, given, name).ratio(), name) for name in names), reverse=True)
    cutoff = max(SUGGEST_CUTOFF, alike[0][0] - SUGGEST_SPREAD) if alike else 1
    close = [names[name] for ratio, name in alike[:2] if ratio >= cutoff]
    if submitted:
        close = [f"daemon submit's own {opt}, given before `--`" if opt in SUBMIT_OWN else opt for opt in close]
    return exc.message + (f" (did you mean {' or '.join(close)}?)" if close else "")


# pydantic's error types (its stable API: docs.pydantic.dev, "Validation Errors") for a bound click's min or max set
INCLUSIVE_BOUND_ERRORS = ("greater_than_equal", "less_than_equal")


def _bad_number(exc: Exception) -> str | None:
    """`Invalid value for '--last': must be a whole number, 1 or more, got 0` for a numeric option's bad value, which
    typer (0.2x) checks with pydantic and says in its words, naming neither the value nor both bounds (`Input should
    be greater than or equal to 1`); None for any other error. Older typer's click says its own (`0 is not in the
    range x>=1`)."""
    errors, param = getattr(exc.__cause__, "errors", None), getattr(exc, "param", None)
    error = next(iter(errors()), None) if callable(errors) and param is not None else None
    if error is None:
        return None
    family = error["type"].partition("_")[0]  # int_parsing, int_from_float, float_parsing
    if family in ("int", "float"):
        got = repr(error.get("input"))
    elif error["type"] in INCLUSIVE_BOUND_ERRORS:
        family, got = type(next(iter(error["ctx"].values()))).__name__, str(error.get("input"))
    else:
        return None
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    bounds = (f" from {low} to {high}" if low is not None and high is not None else f", {low} or more"
              if low is not None else f", {high} or less" if high is not None else "")
    return f"Invalid value for '{param.opts[0]}': must be {'a whole number' if family == 'int' else 'a number'}" \
           f"{bounds}, got {got}"


def read_run_command(argv: list[str], submitted: bool = False) -> tuple[dict[str, Any], str | None]:
    """`trainbus run ARGV`'s options and arguments as it reads them, and what it would refuse as it reads them (no
    such option, a value missing or of the wrong type) in click's words, or None. Nothing runs: no callback of the
    command's, only its parsing (`--help` would print, so is let through unread). `submitted`: ARGV is a remote
    submission's (usage_error)."""
    if "--help" in argv:
        return {}, None
    exceptions = _click_exceptions()
    try:
        return typer.main.get_command(app).commands["run"].make_context("run", list(argv)).params, None
    except exceptions.ClickException as exc:
        return {}, usage_error(exc, submitted)


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


# What a Ctrl-C leaves, said in one line as it exits 130 (ctrl_c_says), for the commands that can take a while
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
        ctrl_c_says(said)
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
        print(f"error: {usage_error(exc)} (`{where} --help` shows what it takes)", file=sys.stderr)
        _exit(2)
    except click.ClickException as exc:
        exc.show()
        _exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C at a prompt
        print("aborted", file=sys.stderr)
        _exit(130)
    except (UserError, ConfigError, SpecError, CheckpointError, RegistryError) as exc:
        # their build() raised: their frames, then the one line, which may quote what the user typed (a target's
        # file name): its control characters shown, not obeyed by the terminal, and the line kept one
        said = (exc.trace if isinstance(exc, UserCodeError) else "") + f"error: {printable(str(exc))}\n"
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
        _exit(_unless_output_lost(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1),
                                   command))
    _exit(_unless_output_lost(code if isinstance(code, int) else 0, command))


def _unless_output_lost(code: int, command: str) -> int:
    """The exit code, but 1 for a command other than `run` that succeeded while its stdout refused what it wrote: a
    run's output is a copy of what its directory holds, so its loss costs the run nothing; that of `runs list --json
    > runs.json` is all the command made, and a script must not take the cut file for it."""
    refused = getattr(sys.stdout, "refused", None) is not None
    return 1 if code == 0 and refused and command != "trainbus run" else code


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
                os.dup2(devnull, fd)  # inheritable, as dup2 makes it
                os.close(devnull)
            else:  # os.open's is close-on-exec: the plugins, which draw on the kernel's stdout, would have none
                os.set_inheritable(fd, True)
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


ctrl_c_back(_SIGINT_BEFORE)  # imported

if __name__ == "__main__":  # torch.distributed.run starts each rank as `-m trainbus.kernel.cli`
    main()
