"""A plugin's process from its start to its exit: the kernel's environment read (or a remote kernel's), what can
be said before the plugin is made said at once, the plugin made, signals taken, its Runner run, the exit code."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from io import TextIOWrapper
from pathlib import Path
from typing import Any, Mapping

from trainbus.proto import unpack
from trainbus.proto.process import exit_without_teardown
from trainbus.proto.remote import KeyFileError
from trainbus.proto.settings_format import METRIC_FIELDS, metrics_named

from .kernel_watch import connection_run_dir, kernel_died, remote_endpoints, run_summary
from .loader import where_raised
from .plugin import Plugin, _snake, check_constructed, named_settings
from .plugin_exit import end_own_group, exit_without_threads, terminate
from .runner import Runner
from .settings import SettingsError, declared
from .tracebacks import user_traceback

SECRET_ENV = "TRAINBUS_SECRET"  # the kernel's per-plugin secret (PROTOCOL.md, environment)
CREDENTIAL_FILE = "credential"  # in the run directory, owner-only: the secret of plugins attached by hand
PR_SET_PDEATHSIG = 1


class _NothingToRun(Exception):
    """What ends a plugin process before its plugin is made: said on stderr, and the process's exit code."""

    def __init__(self, said: str, code: int):
        super().__init__(said)
        self.code = code


def run(plugin_cls: type[Plugin], settings: dict[str, Any] | None = None, connect: str = "", key: str = "",
        server_key: str = "", name: str = "") -> int:
    """Entry point inside a plugin process: read the kernel's environment, connect, run to the end. A plugin whose
    setup raised ends the process here, without Python's teardown once its last words are out (proto/process.py).

    settings: on top of TRAINBUS_PLUGIN_SETTINGS's, each checked by the plugin's declarations (SettingsError).
    name: the name to say hello with; default TRAINBUS_PLUGIN_NAME, else the plugin's own.
    connect: a remote kernel's HOST:PORT (control; events on PORT + 1) or its connection.json, reached over
    TCP with CURVE: `key` is this client's secret key file, `server_key` the server's public key file
    (default: the connection file's key, else server.key in the key directory), pinned.
    """
    # What the plugin prints goes to plugins/NAME.log, a file, which Python's stdout fills in 8 KiB blocks: a line sat
    # in the process (a tail of the log showed nothing) and was lost with a kill. Each line goes out as printed.
    if isinstance(sys.stdout, TextIOWrapper) and not sys.stdout.line_buffering:
        sys.stdout.reconfigure(line_buffering=True)
    try:
        env, secure = _kernel_environment(connect, key, server_key)
        configured = unpack(bytes.fromhex(env["TRAINBUS_PLUGIN_SETTINGS"])) if "TRAINBUS_PLUGIN_SETTINGS" in env else {}
        settings = {**configured, **(settings or {})}
        by_hand = "TRAINBUS_KERNEL_PID" not in env
        if by_hand:  # a mistake in the settings is said before a missing or ended run: the command line's own first
            _check_settings_by_hand(plugin_cls, settings, env, name)
        env = _endpoints_found(env, connect)
        if by_hand:
            _check_run_is_live(connect, env)
    except _NothingToRun as stop:
        print(stop, file=sys.stderr)
        return stop.code
    try:
        secret = "" if connect else _secret(env)  # before the plugin is made: its children never see ours
    except OSError as exc:  # the kernel would refuse the hello: said at once, not after the connect timeout
        print(f"error: cannot read {exc.filename} ({exc.strerror or exc}): is TRAINBUS_RUN_DIR the run's directory, "
              f"and are you its owner? (the kernel takes no plugin without it)", file=sys.stderr)
        return 1
    kernel_pid = int(env["TRAINBUS_KERNEL_PID"]) if "TRAINBUS_KERNEL_PID" in env else None
    if kernel_pid is not None:
        _die_with_parent(kernel_pid)
    threads_before = frozenset(threading.enumerate())  # those the plugin starts, from its constructor on, are its own
    try:
        # absolute: a path made from it goes to the kernel (a persister's checkpoint_saved), which reads it from a
        # working directory of its own; a relative TRAINBUS_RUN_DIR typed by hand named files it refused as outside
        plugin = plugin_cls(settings, run_id=env.get("TRAINBUS_RUN_ID", ""),
                            run_dir=os.path.abspath(env.get("TRAINBUS_RUN_DIR", ".")))
        check_constructed(plugin)
    except Exception as exc:  # before any socket: the kernel reads why from the end of our log (its last words)
        print(user_traceback(exc, called=plugin_cls.__init__), file=sys.stderr)  # ours alone: at its __init__
        exit_without_teardown(1)  # as a failed setup (below): the restart waits for nothing
    plugin.name = name or env.get("TRAINBUS_PLUGIN_NAME") or plugin.name
    runner = Runner(plugin, env["TRAINBUS_EVENTS"], env["TRAINBUS_CONTROL"], kernel_pid, secret, secure)
    runner.threads_before = threads_before
    _take_signals(runner, kernel_pid)
    threading.excepthook = runner.report_thread_failure
    code = runner.run()
    end_own_group(runner)
    _say_unreached(runner, env["TRAINBUS_CONTROL"], connect)
    if runner.threads_left:
        exit_without_threads(code)
    if runner.setup_failed:
        # The kernel restarts the plugin once it sees this process end, and what the plugin said is out by now (the
        # I/O thread's last flush, stderr). Python's teardown with torch loaded took 4-14 s at nice 10 on a busy box
        # (docs/benchmarks.md), silent all along: the restart came late, or the plugin was taken for hung.
        exit_without_teardown(code)
    return code


def _kernel_environment(connect: str, key: str, server_key: str) -> tuple[Mapping[str, str], Any]:
    """The environment the plugin reads its kernel from, and the CURVE set-up of its sockets (None: local ipc). A
    remote kernel's endpoints replace the local ones, and a spawned plugin's secret and kernel pid are dropped."""
    if not connect:
        return os.environ, None
    try:
        control_endpoint, events_endpoint, _, secure = remote_endpoints(connect, key, server_key)
    except (KeyFileError, ValueError) as exc:
        raise _NothingToRun(f"error: {exc}", 2) from None
    env = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, "TRAINBUS_KERNEL_PID")}
    env.update(TRAINBUS_EVENTS=events_endpoint, TRAINBUS_CONTROL=control_endpoint)
    return env, secure


def _check_settings_by_hand(plugin_cls: type[Plugin], settings: dict[str, Any], env: Mapping[str, str],
                            name: str) -> None:
    """A plugin run by hand: its settings checked now (the kernel checked a spawned plugin's before the run, and the
    constructor does again). SettingsError as it is; the plugin's own check_settings raising: its frames, one line."""
    try:
        _check_metrics_produced(plugin_cls, named_settings(plugin_cls, settings), env.get("TRAINBUS_RUN_DIR"))
    except SettingsError:
        raise
    except Exception as exc:
        print(user_traceback(exc), file=sys.stderr)
        raise _NothingToRun(f"error: plugin {name or getattr(plugin_cls, 'name', '') or plugin_cls.__name__}: "
                            f"checking its settings raised {where_raised(exc)}", 2) from None


def _endpoints_found(env: Mapping[str, str], connect: str) -> Mapping[str, str]:
    """env with the kernel's endpoints: as given, or a live run's found from TRAINBUS_RUN_DIR alone (its sockets, as
    `trainbus attach RUN_DIR` finds them: beside it, or named by kernel.log when its path is too long for a
    socket). An ended run's directory is left as it is, for _check_run_is_live to say so."""
    missing = [k for k in ("TRAINBUS_EVENTS", "TRAINBUS_CONTROL") if k not in env]
    if not missing:
        return env
    by_hand_in = env.get("TRAINBUS_RUN_DIR") if not connect else None
    if not by_hand_in:
        raise _NothingToRun(f"error: {', '.join(missing)} not set; start plugins through `trainbus run`, or set "
                            f"TRAINBUS_RUN_DIR to the run's directory (see PROTOCOL.md)", 2)
    if run_summary(by_hand_in) is not None:
        return env
    from .attach import AttachError, target_of

    try:
        target = target_of(by_hand_in)
    except AttachError as exc:
        raise _NothingToRun(f"error: {exc}: is TRAINBUS_RUN_DIR a running run's directory? (`trainbus runs list` "
                            f"says)", 2) from None
    return {**env, "TRAINBUS_EVENTS": target.events, "TRAINBUS_CONTROL": target.control}


def _check_run_is_live(connect: str, env: Mapping[str, str]) -> None:
    """Attached by hand to a run that is over, or whose kernel died: said now, not after the connect timeout. Its
    summary.json is in the run directory, or beside the connection file read in place (a copy elsewhere has none:
    the kernel is asked)."""
    record = connection_run_dir(connect) if connect else env.get("TRAINBUS_RUN_DIR")
    ended = run_summary(record)
    if ended is not None:
        raise _NothingToRun(f"run {ended.get('run_id') or record} has ended ({ended.get('status', '?')}); there is "
                            f"nothing to attach to", 0)
    dead = kernel_died(record)
    if dead:
        raise _NothingToRun(f"error: {dead}; there is nothing to attach to", 1)


def _take_signals(runner: Runner, kernel_pid: int | None) -> None:
    # SIGTERM (supervisor, or a hang): finish the current handler (at most FINISH_ON_TERM_S), tear down, ack, exit.
    signal.signal(signal.SIGTERM, lambda *_: terminate(runner))
    if kernel_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the kernel; it tells us when to stop
    else:  # by hand, the terminal's Ctrl-C is how its user stops it: as SIGTERM does (teardown, acks), not ignored
        signal.signal(signal.SIGINT, lambda *_: terminate(runner, "interrupted (Ctrl-C)"))
    # A plugin is a background process group in the kernel's session: on a terminal with `stty tostop`
    # the console's writes would stop it (SIGTTOU), and a stopped plugin is declared hung and killed.
    # Ignored, the write goes through, as it would for the kernel.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)


def _say_unreached(runner: Runner, where: str, connect: str) -> None:
    """Why the plugin never reached its kernel, if it did not: refused, or nobody answered."""
    if runner.unreached and runner.io.denied:
        print(f"error: {runner.io.denied}", file=sys.stderr)
    elif runner.unreached and not runner.terminating:
        why = runner.io.why_silent()
        print(f"error: no kernel answered at {where}: " + (f"{why}; " if why else "") + (
            "check that the run listens there and that this machine reaches it (`trainbus runs list` on its host)"
            if connect else "is the run still running? (`trainbus runs list` says)"), file=sys.stderr)


def _check_metrics_produced(plugin_cls: type, merged: dict[str, Any], run_dir: str | None) -> None:
    """SettingsError for a METRIC setting, or a METRIC_FIELDS template's field, naming a metric the run does not
    produce (its config.json's `metrics`), as `trainbus run` and `plugins attach` check it: by hand, unchecked, it
    ran and failed each handler that looked the metric up (a KeyError per event)."""
    try:
        produced = json.loads((Path(run_dir) / "config.json").read_text()).get("metrics") if run_dir else None
    except (OSError, ValueError, AttributeError):
        return  # not a run directory we can read: the connect says what is wrong with it
    if not isinstance(produced, list):
        return  # a run of before trainbus recorded its metrics
    label = f"plugin {plugin_cls.name or _snake(plugin_cls.__name__)}"
    for key, spec in declared(plugin_cls.settings).items():
        value = merged.get(key)
        for metric in metrics_named(spec.kind, value):
            if metric not in produced:
                names = f" names {metric}, which" if spec.kind == METRIC_FIELDS else ""
                raise SettingsError(f"{label}: {key} = {value!r}{names} is not a metric this run produces; use one "
                                    f"of: {', '.join(produced)}")


def _secret(env) -> str:
    """What proves us to the kernel: the secret it spawned us with (taken out of the environment, so our
    own children do not inherit it), else the run's credential file for a plugin attached by hand (OSError, with
    its filename, when it cannot be read)."""
    secret = env.pop(SECRET_ENV, "")
    if secret or "TRAINBUS_RUN_DIR" not in env:
        return secret
    return (Path(env["TRAINBUS_RUN_DIR"]) / CREDENTIAL_FILE).read_text().strip()


def _die_with_parent(kernel_pid: int) -> None:
    """SIGTERM us when the kernel dies, even by SIGKILL; exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat watch still ends us within a few seconds
    if os.getppid() != kernel_pid:
        sys.exit(0)
