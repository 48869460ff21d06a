"""`python -m trainbus.sdk module:Class` runs a plugin (`--name`, `--set`: by hand; `--connect`: against a remote
kernel); `--describe T [T ...]` prints what they are, as JSON."""

from __future__ import annotations

import json
import os
import sys

from trainbus.proto.messages import PEER_NAME_MAX_CHARS
from trainbus.proto.process import exit_without_teardown
from trainbus.proto.settings_format import typed_word
from trainbus.proto.text import near_miss

from .bz import Plugin as BzPlugin, constructor_arguments
from .loader import PluginLoadError, where_raised, describe, load_plugin_class
from .plugin import SettingsError, merge_settings
from .entry import run

USAGE = """usage: python -m trainbus.sdk module:Class [--name NAME] [--set SETTING=VALUE ...]
           [--connect HOST:PORT|connection.json --key FILE [--server-key FILE]]
       python -m trainbus.sdk --describe module:Class[=SETTINGS_JSON] ..."""
HELP = f"""{USAGE}

Runs the plugin class module:Class in this process against a running kernel, until the run ends. `trainbus run`
starts its plugins so; to attach one to a live run by hand, set:
  TRAINBUS_RUN_DIR  RUN_DIR, the run directory: the plugin proves itself with RUN_DIR/credential, and finds the
                    run's sockets there (or, for a run directory whose path is too long for a socket, where
                    kernel.log's `sockets:` line names them), unless these two say where they are:
  TRAINBUS_EVENTS   the run's events socket: ipc://RUN_DIR/events.sock
  TRAINBUS_CONTROL  the run's control socket: ipc://RUN_DIR/control.sock

options:
  --name NAME           the name it says hello with (default: TRAINBUS_PLUGIN_NAME, else the class's `name`, else
                        the class name in snake_case less a `_plugin` ending: MyPlugin is `my`); a name the run's
                        config gives a plugin is refused
  --set SETTING=VALUE   a setting, repeatable (each setting once: twice with two values is refused); VALUE is read
                        as JSON when it parses, else as text (as `trainbus run --set` reads it), and checked
                        against the plugin's declared settings. The
                        kernel gives a plugin it starts its settings in TRAINBUS_PLUGIN_SETTINGS (msgpack, hex);
                        --set goes on top
  --connect HOST:PORT|connection.json
                        a remote kernel (`trainbus run --listen`; tcp://HOST:PORT as it prints it is taken too),
                        over TCP with CURVE keys
  --key FILE            with --connect: this client's secret key, NAME.key_secret, made on the kernel's host
                        (`trainbus keys generate client NAME` there) and copied to this machine
  --server-key FILE     with --connect: the server's public key, pinned: its server.key or the run's
                        connection.json (default: the connection file's, else server.key in the key directory)
  --describe T ...      print each plugin's description and settings as JSON, checking SETTINGS_JSON if given
  -h, --help            this text"""
OPTIONS = ("--name", "--set", "--connect", "--key", "--server-key")  # each takes a value


class UsageError(Exception):
    """A mistake on the command line, said in one line."""


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if "-h" in argv or "--help" in argv:
        print(HELP)
        return 0
    if argv[0] == "--describe":
        return _describe(argv[1:])
    try:
        options, settings = _options(argv[1:])
        cls = load_plugin_class(argv[0])
        code = run(cls, settings, connect=options.get("--connect", ""), key=options.get("--key", ""),
                   server_key=options.get("--server-key", ""), name=options.get("--name", ""))
    except (PluginLoadError, SettingsError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cls.__module__.startswith("trainbus.plugins."):
        # One of ours (the checkpoint plugin loads torch) has closed everything by now: the run waits for this
        # process to end, and torch's teardown took 1.2-1.6 s of every run's end. A user's plugin gets Python's
        # whole teardown: a file it left open at module level is flushed there.
        exit_without_teardown(code)
    return code


def _options(words: list[str]) -> tuple[dict[str, str], dict[str, object]]:
    """The options after the target, and the settings --set gives; UsageError for a mistake."""
    options: dict[str, str] = {}
    settings: dict[str, object] = {}
    given: dict[str, str] = {}  # each setting's --set as written: one given twice with two values is refused
    for flag, value in zip(words[::2], words[1::2] + [None]):
        if flag not in OPTIONS:
            raise UsageError(f"unknown option {flag!r}{near_miss(flag, OPTIONS)}; the options are "
                             f"{', '.join(OPTIONS)} (see --help)")
        if value is None:
            raise UsageError(f"{flag} needs a value (see --help)")
        if flag == "--set":
            key, sep, raw = value.partition("=")
            if not sep or not key:
                raise UsageError(f"--set {value!r} must look like SETTING=VALUE")
            if key in given and given[key].partition("=")[2] != raw:  # the later would win unsaid
                raise UsageError(f"--set {key} given twice ({given[key]} and {value}): give it once")
            given[key], settings[key] = value, typed_word(raw)
        elif flag in options and options[flag] != value:
            raise UsageError(f"{flag} given twice ({options[flag]!r} and {value!r}): give it once")
        else:
            options[flag] = value
    if "--name" in options and not 1 <= len(options["--name"]) <= PEER_NAME_MAX_CHARS:  # the kernel drops such a hello
        raise UsageError(f"--name must be 1 to {PEER_NAME_MAX_CHARS} characters, got {len(options['--name']):,}")
    lonely = [flag for flag in ("--key", "--server-key") if flag in options and "--connect" not in options]
    if lonely:  # else the plugin would look for a local run's environment and say nothing of the key
        raise UsageError(f"{lonely[0]} is for a remote kernel: give --connect HOST:PORT (or its connection.json) too")
    return options, settings


def _describe(targets: list[str]) -> int:
    """One JSON list on stdout; with settings given, each entry says whether they are valid and, when they
    are, gives them as the plugin will read them ("values": a string from the command line converted)."""
    # stdout is the JSON alone (`trainbus run` and `plugins list` parse it): what a plugin's module prints as it is
    # imported (a banner, a library's notice, from C too) goes to stderr
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    out = []
    for item in targets:
        target, _, settings_json = item.partition("=")
        try:
            info = describe(target)
            if settings_json:
                cls = load_plugin_class(target)
                given = json.loads(settings_json)
                settings = merge_settings(cls, given)
                if issubclass(cls, BzPlugin):  # its constructor's parameters are filled from its config table
                    constructor_arguments(cls, settings)
                info["values"] = {key: settings[key] for key in given}
        except (PluginLoadError, SettingsError) as exc:
            info = {"target": target, "error": str(exc)}
        except Exception as exc:  # the plugin's own code (check_settings, a classmethod) raised: name its line
            info = {"target": target, "error": f"checking its settings raised {where_raised(exc)}"}
        out.append(info)
    with json_out:  # closed even when its reader has gone (BrokenPipeError, below): nothing left to flush at exit
        json_out.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `--describe ... | head` closed the pipe: the reader has what it wanted, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one from the exit's flush
