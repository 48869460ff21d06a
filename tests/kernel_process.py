"""Running a kernel in a process of its own and watching its journal grow: how a test acts on a live run.

A test that signals a kernel or its plugins from outside needs the run in another process (run_training
via `python -c`), and needs to see what the run did so far without waiting for its end: JournalTail
reads the journal file incrementally with a plain msgpack.Unpacker. Nothing here is mocked.

    kernel = KernelProcess(cfg, tmp_path)
    pid = kernel.wait_ready("checkpoint")           # the plugin's pid once it said hello
    kernel.wait_event("checkpoint_saved")           # the first such event in the journal
    kernel.kill()                                   # SIGKILL, reaped
    result = kernel.result()                        # the RunResult as a dict (for a run left to finish)

Child processes must import the test fixtures (fixture_targets, fixture_plugins): tests/conftest.py
puts this folder on PYTHONPATH for them.

A kernel is forked from a server process that has torch loaded (multiprocessing's forkserver, preloaded, one per
test worker): a fresh `python -c` kernel spent ~3 s importing torch and ~2 s more on torch._dynamo (the first
optimizer imports it) before training, on a 2-core VM, and the suite starts dozens. Forked, a kernel is still a
process of its own, as `trainbus run` is: its own pid, signals, kill -9, its plugins its children. `cli(ARGS)`
forks `trainbus ARGS` the same way (0.7 s for a run of the demo instead of 4 s).
"""

from __future__ import annotations

import atexit
import gc
import json
import multiprocessing
import multiprocessing.util
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import weakref
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import psutil

from trainbus.kernel.config import RunConfig
from trainbus.proto import JOURNAL_NAME, Event, event_from_map


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.01) -> Any:
    """The first truthy value of predicate(), polled; AssertionError naming `what` after timeout_s."""
    end = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def process_gone(pid: int) -> bool:
    """Exited; a zombie waiting for a reaper that is not us counts as exited."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def of(events: list[Event], type_: str, plugin_name: str | None = None) -> list[Event]:
    """The events of one type (and, for plugin_* and checkpoint_* events, of one plugin), in seq order."""
    return [e for e in events if e.type == type_ and (plugin_name is None or e.data.get("plugin") == plugin_name)]


class JournalTail:
    """Reads a live run's journal as it grows, with a plain msgpack.Unpacker: how a test watches a run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.unpacker = msgpack.Unpacker(raw=False)
        self.events: list[Event] = []

    def poll(self) -> list[Event]:
        """Every event journaled so far (a torn last record waits in the unpacker for its rest)."""
        if self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            self.unpacker.feed(data)
            self.events.extend(event_from_map(m) for m in self.unpacker)
        return self.events

    def of(self, type_: str, plugin_name: str | None = None) -> list[Event]:
        return of(self.poll(), type_, plugin_name)

    def step(self) -> int:
        """The step of the latest end_training_batch, 0 before the first."""
        batches = self.of("end_training_batch")
        return batches[-1].step if batches else 0

    def running_pid(self, name: str, not_in=()) -> int | None:
        """The pid of the plugin's latest process, once that process has said hello (plugin_ready)."""
        events = self.poll()
        started = of(events, "plugin_started", name)
        if not started or started[-1].data["pid"] in not_in:
            return None
        pid = started[-1].data["pid"]
        return pid if any(e.data["pid"] == pid for e in of(events, "plugin_ready", name)) else None


# What every kernel imports before it trains, and the libraries every `trainbus` command loads (pydantic: typer's
# parameter coercion, 0.15 s, with the parts of it typer/_adapters.py imports through pydantic's lazy attributes).
# Not trainbus.kernel.cli itself, nor typer: their import reads the environment (rich's console, typer's
# TYPER_USE_RICH), which is the test's, set in the child.
PRELOAD = ["torch", "torch._dynamo", "trainbus.kernel.session", "pydantic", "pydantic.main", "pydantic.type_adapter",
           "pydantic.functional_validators", "pydantic.fields", "pydantic.errors", "rich.console", "rich.table"]
_forkserver: Any = None
# The server's socket goes in multiprocessing's temporary directory, made once per process: made as the first forked
# command of a worker starts, under a test that set TMPDIR to a directory of its own (test_disk_full's), its address
# passed the 107 bytes an AF_UNIX one may have under xdist's longer tmp_path ("AF_UNIX path too long"). Made now,
# as the tests are collected, it is in the suite's own temporary directory.
multiprocessing.util.get_temp_dir()


def _context() -> Any:
    global _forkserver
    if _forkserver is None:
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(PRELOAD)
    return _forkserver


def _as_the_test_asked(stdout_path: str, stderr_path: str, cwd: str, env: dict[str, str]) -> None:
    """A forked child's output to files, the test's directory and environment, and multiprocessing's start method
    as a fresh interpreter has it (the forkserver's child inherits "forkserver": a DataLoader's workers would be
    started that way, unlike under `trainbus`).

    What the server had loaded is moved out of the collector's sight (gc.freeze: a merge of its lists, no object
    touched): the child's own collections, and the one `trainbus` runs before it exits, would otherwise walk the
    ~300,000 objects of torch and copy every page they sit on (0.35 s of CPU per child)."""
    gc.freeze()
    multiprocessing.set_start_method(None, force=True)
    tempfile.tempdir = None  # the server's, cached: the child's comes from its own TMPDIR, as a fresh interpreter's
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for entry in reversed(env.get("PYTHONPATH", "").split(os.pathsep)):  # as an interpreter started now would
        if entry and entry not in sys.path:
            sys.path.insert(1, entry)


def _kernel_child(config_json: str, run_id: str, stdout_path: str, stderr_path: str, cwd: str,
                  env: dict[str, str]) -> None:
    """The forked kernel: the test's environment and directory, output to files, then run_training. Once it has
    returned (sockets, journal and plugins closed) and the exit handlers ran, it leaves without the interpreter's
    teardown, as the kernel's CLI does (proto/process.py)."""
    from dataclasses import asdict

    _as_the_test_asked(stdout_path, stderr_path, cwd, env)
    from trainbus.kernel.config import PluginConfig
    from trainbus.kernel.session import run_training

    raw = json.loads(config_json)
    raw["plugins"] = [PluginConfig(**p) for p in raw["plugins"]]
    result = run_training(RunConfig(**raw), run_id=run_id)
    print(json.dumps(asdict(result)))
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cli_child(args: list[str], stdout_path: str, stderr_path: str, cwd: str, env: dict[str, str],
               constants: dict[str, Any]) -> None:
    """The forked `trainbus ARGS`: the console script's main() (it exits with the command's code), `constants` set
    first, as `python -c "import mod; mod.X = ...; main()"` would set them."""
    import importlib

    _as_the_test_asked(stdout_path, stderr_path, cwd, env)
    for name, value in constants.items():
        module, _, attribute = name.rpartition(".")
        setattr(importlib.import_module(module), attribute, value)
    sys.argv = ["trainbus", *args]
    from trainbus.kernel.cli import main

    os.execv = _cli_exec_here(os.execv)
    main()


# What `runs resume` execs to continue a run (kernel/cli_runs.py), whose start cost ~0.5 s of CPU to fail on a bad
# run, and ~5 s more to train (torch and torch._dynamo imported again), in a dozen tests
_CLI_MODULE = "trainbus.kernel.cli"


def _cli_exec_here(real_execv: Callable[..., Any]) -> Callable[..., Any]:
    """os.execv for a forked command: `python -m trainbus.kernel.cli ARGS` runs that command's main() in this
    process, with what the exec keeps (pid, descriptors, environment, working directory) and what it resets (Ctrl-C
    as the command started with, the standard streams unwrapped, no exit handlers of the first command); the
    command line is checked as the exec would take it (this interpreter, the module `-m` names). Any other exec is
    the real one. The tests of the exec itself start `trainbus` (conftest.trainbus_cmd)."""
    sigint = signal.getsignal(signal.SIGINT)

    def execv(path: Any, argv: Any) -> None:
        argv = [os.fsdecode(word) for word in argv]
        if os.fsdecode(path) != sys.executable or argv[:3] != [sys.executable, "-m", _CLI_MODULE]:
            real_execv(path, argv)
        import importlib

        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        atexit._clear()
        signal.signal(signal.SIGINT, sigint)
        module = importlib.import_module(_CLI_MODULE)
        sys.argv = [module.__file__, *argv[3:]]  # as `-m` sets it
        module.main()  # it ends the process (kernel/cli.py's _exit), as the exec's would
        os._exit(1)  # never: main() returned

    return execv


class Forked:
    """A forked kernel as subprocess.Popen shows a child: pid, poll, wait, returncode, send_signal."""

    def __init__(self, process: Any):
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # negative: killed by that signal

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired("forked kernel", timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not yet reaped by the server, so the pid is still this kernel's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def cli(*args: str, cwd: str | Path | None = None, timeout: float = 120.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`trainbus ARGS` as subprocess.run(..., capture_output=True, text=True) runs it, forked with torch loaded (a
    run's command imports torch and torch._dynamo: ~3 s of CPU each, in dozens of tests). The command's own
    main() in a process of its own, from its first line to its exit code; what it cannot show is the console
    script's start-up and a terminal, which the tests of those start `trainbus` itself (conftest.trainbus_cmd).
    `env`: added to the test's."""
    command = Command(*args, cwd=cwd, env=env)
    try:
        out, err = command.communicate(timeout)
    finally:
        command.kill()
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)


class Command(Forked):
    """`trainbus ARGS` forked as cli() runs it, shown as subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)
    shows a child: Forked's pid, poll, wait, send_signal, kill and returncode, and communicate. `env`: added to the
    test's. `output`: both streams to that file instead, in the order written, as `> FILE 2>&1` (the test reads it;
    communicate() is not for such a command); with `errors` too, stderr goes to that file, as `> FILE 2> ERRORS`;
    `append`: those files appended to, as `>>` does, not truncated. `constants`: {"module.NAME": value} set in the
    command's process before it starts (a window shortened where the test is not about its length)."""

    def __init__(self, *args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
                 output: str | Path | None = None, errors: str | Path | None = None, append: bool = False,
                 constants: dict[str, Any] | None = None):
        self.args = ["trainbus", *args]
        prefix = Path(tempfile.gettempdir()) / f"trainbus-cli-{secrets.token_hex(4)}"
        self.stdout_path, self.stderr_path = prefix.with_suffix(".out"), prefix.with_suffix(".err")
        if output is not None:
            self.stdout_path = Path(output)
            self.stderr_path = self.stdout_path if errors is None else Path(errors)
            for path in () if append else {self.stdout_path, self.stderr_path}:
                path.write_text("")  # truncated, as `>` does; the child appends to it
        process = _context().Process(target=_cli_child, daemon=False, args=(
            list(args), str(self.stdout_path), str(self.stderr_path), str(cwd or os.getcwd()),
            {**os.environ, **(env or {})}, dict(constants or {})))
        process.start()
        super().__init__(process)
        if output is None:  # a test that kills it and never asks for its output: the files go once it is forgotten
            weakref.finalize(self, _remove, self.stdout_path, self.stderr_path)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Its output once it exits (subprocess.TimeoutExpired before: kill it, as with Popen)."""
        self.wait(timeout)
        try:
            return _read(self.stdout_path), _read(self.stderr_path)
        finally:
            _remove(self.stdout_path, self.stderr_path)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _read(path: Path) -> str:
    """What a child wrote, as text=True reads a pipe (the locale's encoding, universal newlines)."""
    try:
        return path.read_text()
    except FileNotFoundError:  # killed before it wrote anything
        return ""


class KernelProcess:
    """A kernel in a process of its own (run_training, forked with torch loaded), so the test can signal it and its
    plugins."""

    def __init__(self, cfg: RunConfig, tmp_path: Path, run_id: str | None = None, env: dict[str, str] | None = None):
        self.run_id = run_id or "run-" + secrets.token_hex(3)
        self.run_dir = Path(cfg.runs_dir).resolve() / self.run_id
        self.stderr_path = Path(tmp_path) / f"{self.run_id}.stderr"
        self.stdout_path = Path(tmp_path) / f"{self.run_id}.stdout"
        process = _context().Process(target=_kernel_child, daemon=False, args=(
            json.dumps(cfg.to_dict()), self.run_id, str(self.stdout_path), str(self.stderr_path), os.getcwd(),
            {**os.environ, **(env or {})}))
        process.start()
        self.proc = Forked(process)
        self.journal = JournalTail(self.run_dir / JOURNAL_NAME)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"kernel exited {self.proc.returncode} early; stderr:\n{self.stderr()}")

    def wait_step(self, step: int, timeout_s: float = 30.0) -> int:
        """The kernel's latest step once it is at least `step`."""
        def reached():
            self._check_alive()
            return self.journal.step() >= step and self.journal.step()
        return wait_until(reached, timeout_s, f"kernel step {step}")

    def wait_ready(self, name: str, timeout_s: float = 30.0, not_in=()) -> int:
        """The pid of the plugin's process once it said hello; a process other than those in not_in."""
        def ready():
            self._check_alive()
            return self.journal.running_pid(name, not_in)
        return wait_until(ready, timeout_s, f"plugin {name} ready")

    def wait_event(self, type_: str, where: Callable[[Event], bool] = lambda e: True, timeout_s: float = 30.0,
                   after_seq: int = 0) -> Event:
        """The first journaled event of `type_` after `after_seq` for which `where` holds."""
        def found():
            hits = [e for e in self.journal.of(type_) if e.seq > after_seq and where(e)]
            if not hits:
                self._check_alive()  # checked after reading: an event written just before exiting still counts
            return hits[0] if hits else None
        return wait_until(found, timeout_s, f"a {type_} event")

    def result(self, timeout_s: float = 60.0) -> dict:
        """The run's RunResult as a dict, once the kernel exits on its own; AssertionError with stderr otherwise."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kernel did not finish in {timeout_s:.0f} s; stderr:\n{self.stderr()}")
        assert self.proc.returncode == 0, f"kernel exited {self.proc.returncode}; stderr:\n{self.stderr()}"
        return json.loads(self.stdout_path.read_text().strip().splitlines()[-1])

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the kernel (not its plugins: they notice it is gone and exit) and reap it."""
        self.proc.kill()
        self.proc.wait()
