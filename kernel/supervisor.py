"""Spawns plugin processes and keeps them alive: exit watch, heartbeat liveness, restart with backoff.

When a silent plugin is hung is liveness.py's, what its exit says last_words.py's, and what is done to the OS for it
plugin_processes.py's; the decisions, and each plugin's state, are here.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainbus.proto import events as ev, pack
from trainbus.proto.messages import HEARTBEAT_LIVENESS, PERSISTS
from trainbus.proto.process import TRAINING_ENV

from .journal_history import CRASHES_KEPT
from .kernel_log import cap_log
from .last_words import exit_status, last_line, last_words
from .liveness import HEARTBEAT_INTERVAL_S, STARVED_SAMPLE_S, Patience, await_exit
from .plugin_processes import Processes

log = logging.getLogger("trainbus.kernel")

# spawn -> hello. A plugin starting on a loaded box (importing torch at nice 10 beside training and other
# busy processes took 58 s of wall time, ~3 s of its own CPU) is slow, not stuck: it is declared hung after
# STARTUP_CPU_S of its own CPU time, or STARTUP_TIMEOUT_S of wall time, whichever comes first.
STARTUP_CPU_S = 30.0
STARTUP_TIMEOUT_S = 180.0
TERM_GRACE_S = 1.0  # SIGTERM -> SIGKILL for a hung plugin (silent for the liveness window already)
# SIGTERM -> SIGKILL for a plugin still running once the run is over: the SDK lets a running handler finish for up to
# 0.5 s, then tears down and exits. A plugin runs at nice 10, and on a box busy with other work (another run, a
# neighbour's job) that second half-second of wall time can be a few ms of CPU: such a plugin is slow, not hung.
EXIT_TERM_GRACE_S = 3.0
# SIGTERM -> SIGKILL for a plugin its owner detached: it finishes its teardown (a log's last flush, a checkpoint
# being written, an outbox's last mail attempt) in this time; the SDK's teardown normally takes milliseconds.
DETACH_GRACE_S = 30.0
# Restart backoff: doubles from INTERVAL_INIT_S up to INTERVAL_MAX_S, back to the start after a
# healthy HEALTHY_RESET_S; more than MAX_RESTARTS within RESTART_WINDOW_S and the plugin is failed.
INTERVAL_INIT_S = 0.25
INTERVAL_MAX_S = 8.0
HEALTHY_RESET_S = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# A plugin's output log (runs/<id>/plugins/<name>.log) is capped: past LOG_MAX_BYTES it is copied to <name>.log.1
# (the previous copy replaced) and emptied in place, as logrotate's copytruncate does, since the plugin holds the
# file open. A plugin that prints a line a step would otherwise fill the disk in a multi-day run. Checked every
# LOG_CHECK_S; what the plugin writes between the copy and the truncation (microseconds) is lost.
LOG_MAX_BYTES = 64 * 1024 * 1024
LOG_CHECK_S = 5.0

Emit = Callable[[str, dict[str, Any]], None]


BUILTIN_PLUGINS = "trainbus.plugins."  # the built-ins' targets (pyproject.toml's entry points)
BUILTIN_PERSISTER = "trainbus.plugins.checkpoint:CheckpointPlugin"  # the one built-in with the checkpoint capability


@dataclass
class PluginSpec:
    """What the run's config says about one plugin."""

    name: str
    target: str  # "module:Class", resolved from the entry-point registry or given directly
    settings: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # instead of target: any program speaking the protocol
    console: bool = False  # draws on the kernel's terminal instead of logging to the run dir
    cwd: str = ""  # where its process starts ("": the kernel's working directory; config.PluginConfig.cwd)
    # What its class declares (config.PluginConfig.capabilities); None: not known before its hello
    capabilities: tuple[str, ...] | None = None

    @classmethod
    def of(cls, plugin) -> PluginSpec:
        """The spec of a run config's plugin (config.PluginConfig)."""
        return cls(plugin.name, plugin.target, plugin.settings, plugin.command, console=plugin.name == "console",
                   cwd=plugin.cwd, capabilities=None if plugin.capabilities is None else tuple(plugin.capabilities))

    def may_persist(self) -> bool:
        """Whether its hello may declare the checkpoint capability: as its class declares, where `trainbus run`
        described it; else trainbus's built-ins other than its checkpoint plugin never do, and a program, or a class
        started without that description (run_training called from Python, a plugin attached to a live run), may.
        Only a guess, for what is said while it starts: its hello is what makes it a persister."""
        if self.capabilities is not None:
            return PERSISTS in self.capabilities
        return not self.target.startswith(BUILTIN_PLUGINS) or self.target == BUILTIN_PERSISTER


@dataclass
class Child:
    """One supervised plugin and the state of its current process."""

    spec: PluginSpec
    proc: subprocess.Popen | None = None
    state: str = "pending"  # pending|starting|running|backoff|terminating|detaching|exited|failed
    started_at: float = 0.0
    last_seen: float = 0.0
    next_start_at: float = 0.0
    backoff_s: float = INTERVAL_INIT_S
    restart_times: deque = field(default_factory=deque)
    kill_at: float = 0.0
    leaving: bool = False  # said bye: an exit is on purpose
    left_early: bool = False  # exited on purpose (0, bye) while training went on: not restarted, yet it saw no more
    overdue: str = ""  # still running when the run's plugins were out of time to exit: why it was stopped
    patience: Patience | None = None  # silent nearly the liveness window: sampled to tell starved from hung
    greeted: bool = False  # some process of it said hello: the kernel knows what it can do (its capabilities)
    detached: bool = False  # its owner stopped it (plugins detach): gone on purpose, hello or not, so no trouble
    hello_trouble: str = ""  # why a hello under its name was not taken (malformed, refused), while it has none taken
    restarts: int = 0
    crashes: list = field(default_factory=list)  # human-readable reasons, the newest CRASHES_KEPT, for the summary
    crashes_forgotten: int = 0  # older ones, counted
    # detach(): called with the exit code once the detached process is gone (None: there was no process to stop)
    on_detached: Callable[[int | None], None] | None = None

    def crashed(self, cause: str) -> None:
        self.crashes.append(cause)
        if len(self.crashes) > CRASHES_KEPT:
            del self.crashes[0]
            self.crashes_forgotten += 1

    @property
    def crash_count(self) -> int:
        return self.crashes_forgotten + len(self.crashes)


class Supervisor:
    """Owns the plugin processes of one run; ticked by the bus thread, which also feeds it liveness."""

    def __init__(self, specs: list[PluginSpec], env: dict[str, str], run_dir: Path, emit: Emit,
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
                 token_for: Callable[[str], str] = lambda name: "", processes: Processes | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.processes = processes or Processes()
        self.clock, self.sleep = clock, sleep  # shutdown's own waiting (tick() is given `now`)
        self.children = {s.name: Child(s) for s in specs}
        self.env = env
        self.token_for = token_for  # the secret a plugin's hello must carry (kernel/credentials.py)
        self.log_dir = Path(run_dir) / "plugins"
        self.emit = emit
        self.liveness_s = heartbeat_interval_s * HEARTBEAT_LIVENESS
        self.stopping = False
        self.training_over = False  # the run's final event is numbered (the bus): a plugin leaving now is done
        self.stop_requested: Callable[[], bool] = lambda: False  # a signal asked the run to stop (the session's)
        # Before training starts (while the kernel waits for their hello) plugins start at the kernel's priority:
        # there is nothing to yield to yet, and a plugin importing torch at nice 10 beside a neighbour's busy job took
        # 33 s instead of 5, past ready_timeout_s. training_starts() lowers them; later ones start lowered.
        self.below_training = False
        # tick() runs on the bus thread, shutdown() on the training thread: a restart that passed its `stopping` check
        # stores its process before shutdown picks what to stop, and an exit both see is told by one of them.
        self._lock = threading.Lock()
        self.log_max_bytes = LOG_MAX_BYTES
        self._next_log_check = 0.0

    # -- called by the bus ------------------------------------------------------------------------

    def start_all(self, now: float | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for child in self.children.values():
                self._spawn(child, time.monotonic() if now is None else now)

    def seen(self, name: str, pid: int, now: float) -> None:
        """The plugin's current process sent something: it is alive."""
        child = self.children.get(name)
        if child and child.proc and pid == child.proc.pid:
            child.last_seen = now
            child.patience = None
            if child.state == "starting":
                with self._lock:  # rechecked: shutdown (the training thread) may have told its exit in between
                    if child.state == "starting":
                        child.state, child.greeted = "running", True

    def hello_not_taken(self, name: str, why: str) -> None:
        """A hello under a name of the run's was dropped as malformed or refused: kept, while the plugin has had no
        hello taken, for the run's summary, which otherwise says only that it never said hello."""
        child = self.children.get(name)
        if child is not None and not child.greeted:
            child.hello_trouble = why

    def training_starts(self) -> None:
        """Every plugin goes below training from here (the ones running now, and every start from now on)."""
        with self._lock:  # a restart (tick) or an attach spawning now sees the flag, or is in the list
            self.below_training = True
            pids = [c.proc.pid for c in self.children.values() if c.proc is not None and c.proc.poll() is None]
        for pid in pids:
            self.processes.lower(pid)

    def spawned(self, name: str) -> bool:
        return name in self.children

    def is_current(self, name: str, pid: int) -> bool:
        """`pid` is the live process the supervisor started for `name` (one being detached too: its teardown's
        last acks and logs are its own)."""
        child = self.children.get(name)
        return (child is not None and child.proc is not None and child.proc.pid == pid
                and child.state in ("starting", "running", "detaching"))

    def coming_back(self, name: str) -> bool:
        """Alive, or being restarted: neither given up on (failed) nor gone or going on purpose (exited, detaching)."""
        child = self.children.get(name)
        return child is not None and child.state not in ("exited", "failed", "detaching")

    def unannounced(self) -> list[str]:
        """Plugins of the run that never said hello yet, and still may (starting, or restarting before their first):
        what they can do, and where a durable one replays from, is not known."""
        return [name for name, child in list(self.children.items())
                if not child.greeted and child.state not in ("exited", "failed", "detaching")]

    def starting(self) -> list[str]:
        """The unannounced plugins that may turn out to persist checkpoints: trainbus's built-ins other than its
        checkpoint plugin persist nothing, so a run without one is not told of a checkpoint plugin while its console
        starts slowly."""
        return [name for name in self.unannounced() if self.children[name].spec.may_persist()]

    def attached(self, name: str) -> Child | None:
        """The plugin of that name while it is the run's: starting, running, restarting or stopping."""
        child = self.children.get(name)
        return child if child is not None and child.state not in ("exited", "failed") else None

    def attach(self, spec: PluginSpec, now: float) -> Child:
        """Start a plugin in the live run, supervised from then on like those of its config. A name that exited or
        failed starts afresh (backoff and restart count too); the caller checked that no live one holds it."""
        with self._lock:
            child = self.children[spec.name] = Child(spec)
            self._spawn(child, now)
        return child

    def detach(self, name: str, now: float, done: Callable[[int | None], None]) -> None:
        """Stop an attached plugin for good: SIGTERM (it tears down and exits), SIGKILL after DETACH_GRACE_S; never
        restarted, and no crash. done(exit code) once it is gone; done(None) at once when no process runs (it was
        waiting to be restarted)."""
        child = self.children[name]
        child.detached = True
        if child.proc is None or child.state == "backoff":
            child.state = "exited"
            done(None)
            return
        child.state, child.on_detached = "detaching", done
        child.kill_at = now + DETACH_GRACE_S
        code = child.proc.poll()
        if code is not None:  # it exited a moment ago, unseen yet: that exit is the one asked for
            self._on_exit(child, code, now)
            return
        self.processes.signal(child.proc, signal.SIGTERM)
        self.processes.signal(child.proc, signal.SIGCONT)  # a stopped process must run to see SIGTERM

    def leaving(self, name: str) -> None:
        """Its bye (the bus thread, as the final event is numbered): its exit is on purpose, and early if before."""
        if name in self.children:
            self.children[name].leaving = True
            self.children[name].left_early |= self._before_the_end()

    def _before_the_end(self) -> bool:
        """A plugin leaving now leaves a run still training, not one ending: neither after its final event nor
        once a signal asked it to stop (one sent to every process, systemd's or SLURM's, ends the plugins too)."""
        return not self.training_over and not self.stop_requested()

    def tick(self, now: float, heard_at: float = float("inf")) -> None:
        """Restarts, kills and verdicts due at `now`; a plugin's silence counts up to `heard_at`, when the bus thread
        last read the ipc control socket (a socket left unread while its share is spent holds their heartbeats)."""
        with self._lock:
            for child in self.children.values():
                self._check(child, now, heard_at)
        if now >= self._next_log_check:
            self._next_log_check = now + LOG_CHECK_S
            self._cap_logs()

    def _cap_logs(self) -> None:
        for name in list(self.children):
            cap_log(self.log_dir / f"{name}.log", self.log_max_bytes, "plugin log")

    def next_deadline(self, listening: bool = True) -> float:
        """When tick() next has something to decide (a liveness window ending, a restart due); inf if never. Not a
        liveness window while the ipc control socket is left unread (not `listening`): silence does not count then."""
        deadlines = [float("inf")]
        for c in self.children.values():
            if c.state == "running" and listening:
                deadlines.append(c.last_seen + self.liveness_s - STARVED_SAMPLE_S if c.patience is None
                                 else max(c.last_seen + self.liveness_s, c.patience.last[0] + STARVED_SAMPLE_S))
            elif c.state == "backoff":
                deadlines.append(c.next_start_at)
            elif c.state in ("terminating", "detaching"):
                deadlines.append(c.kill_at)
        return min(deadlines)

    def live_names(self) -> list[str]:
        # a copy first: the bus thread may attach a plugin while the training thread asks
        return [c.spec.name for c in list(self.children.values()) if c.state in ("starting", "running")]

    def shutdown(self, deadline_s: float, abort: Callable[[], bool] = lambda: False) -> None:
        """Stop restarting; give live plugins until the deadline (or abort()) to exit, then TERM, then KILL."""
        with self._lock:
            self.stopping = True
            procs = [c.proc for c in list(self.children.values()) if c.proc and c.proc.poll() is None]
        started = self.clock()
        procs = await_exit(self.processes, procs, deadline_s, self.clock, self.sleep, abort)
        if not abort():  # still running at the deadline: it did not finish with the run (a second Ctrl-C is the user's)
            for child in list(self.children.values()):
                if child.proc is not None and any(child.proc is p for p in procs):
                    child.overdue = f"still running {self.clock() - started:.0f} s after the run's end"
        for p in procs:
            self.processes.signal(p, signal.SIGTERM)
        procs = await_exit(self.processes, procs, EXIT_TERM_GRACE_S, self.clock, self.sleep)
        for p in procs:
            self.processes.signal(p, signal.SIGKILL)
        for child in list(self.children.values()):
            if child.proc:
                code = child.proc.wait()  # reap, so no zombie outlives the run
                with self._lock:
                    if child.state == "backoff":  # crashed while the run drained, counted then: no restart now
                        child.state = "exited"
                    elif child.state not in ("failed", "exited"):
                        self._ended_at_shutdown(child, code)
        self.processes.close()  # every group reaped: the guard has nothing left to watch
        self._cap_logs()  # what they wrote since the last look: a short run's 70 MB too

    def _detached(self, child: Child, code: int) -> None:
        """Its owner asked it to go (detach): whatever its exit code, not a crash; the owner is answered."""
        child.state = "exited"
        self.emit(ev.PLUGIN_EXITED, {"plugin": child.spec.name, "exit_code": code})
        child.on_detached(code)

    def _ended_at_shutdown(self, child: Child, code: int) -> None:
        """A plugin's exit once the run is over (whichever thread saw it first): gone for good, never restarted,
        and a crash or a stall there is still trouble the summary names (a logger that died writing its last
        lines lost them): plugin_crashed, else plugin_exited."""
        if child.state == "exited":  # the other thread saw this exit first
            return
        if child.state == "detaching":  # asked to go just before the run's end: its owner is still answered
            self._detached(child, code)
            return
        child.state = "exited"
        name = child.spec.name
        # Overdue, it was asked to stop (SIGTERM): going then is no fault (a slow teardown on a busy box, a process
        # still importing); one that had to be killed was hung. Before the deadline, a non-zero exit is a crash.
        hung = bool(child.overdue) and code == -signal.SIGKILL
        if hung or (not child.overdue and code != 0 and not child.leaving):
            cause = (f"{child.overdue} ({exit_status(code)})" if child.overdue
                     else f"{self._exit_cause(child, code)} at the run's end")
            child.crashed(cause)
            self.emit(ev.PLUGIN_CRASHED, {"plugin": name, "exit_code": code, "cause": cause, "hung": hung})
            return
        if child.overdue:
            log.warning("plugin %s was %s; it stopped when asked (%s)", name, child.overdue, exit_status(code))
        self.emit(ev.PLUGIN_EXITED, {"plugin": name, "exit_code": code})

    def _exit_cause(self, child: Child, code: int) -> str:
        """`exit code 1`, with the exception that ended it when its log says (an error in its constructor, say,
        which the console otherwise never learns of). A command plugin (any language) that failed before its hello:
        its log's last line, named as such (a program's own refusal, Python's `can't open file`, is no traceback)."""
        log_file = self.log_dir / f"{child.spec.name}.log"
        words = last_words(log_file) if code > 0 else ""
        if words:
            return f"{exit_status(code)}: {words}"
        if code > 0 and child.spec.command and child.state == "starting" and (line := last_line(log_file)):
            return f"{exit_status(code)}; its log's last line: {line}"
        return exit_status(code)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"state": c.state, "restarts": c.restarts, "crashes": list(c.crashes), "greeted": c.greeted,
                   **({"crash_count": c.crash_count} if c.crashes_forgotten else {}),
                   **({"left_early": True} if c.left_early else {}), **({"detached": True} if c.detached else {}),
                   **({"hello_trouble": c.hello_trouble} if c.hello_trouble and not c.greeted else {})}
            for name, c in self.children.items()
        }

    # -- internals --------------------------------------------------------------------------------

    def _spawn(self, child: Child, now: float) -> bool:
        """Start the plugin's process; False (and the plugin failed, said once) when it cannot be started at all:
        a program that is missing or not executable does not appear by retrying."""
        spec = child.spec
        env = dict(self.env, TRAINBUS_PLUGIN_NAME=spec.name, TRAINBUS_SECRET=self.token_for(spec.name),
                   TRAINBUS_PLUGIN_SETTINGS=pack(spec.settings).hex())
        if self.below_training:  # a restart or an attach: training runs, and this plugin starts below it
            env[TRAINING_ENV] = "1"
        cmd = spec.command or [sys.executable, "-m", "trainbus.sdk", spec.target]
        log = open(self.log_dir / f"{spec.name}.log", "ab")
        try:
            # The console draws on the kernel's terminal (its stdout); what any plugin says on stderr
            # (the SDK's end-of-run counts, a traceback) goes to its log, not between the bars.
            child.proc = self.processes.spawn(cmd, env, None if spec.console else log, log, self.below_training,
                                              cwd=spec.cwd or None)
        except OSError as exc:
            child.proc, child.state = None, "failed"
            child.crashed(f"cannot start {cmd[0]}: {exc.strerror or exc}")
            self.emit(ev.PLUGIN_FAILED, {"plugin": spec.name, "reason": child.crashes[-1],
                                         "log": str(self.log_dir / f"{spec.name}.log")})
            return False
        finally:
            log.close()
        child.state = "starting"
        child.started_at = child.last_seen = now
        child.leaving = False
        self.emit(ev.PLUGIN_STARTED, {"plugin": spec.name, "pid": child.proc.pid, "restarts": child.restarts})
        return True

    def _check(self, child: Child, now: float, heard_at: float) -> None:
        if child.state == "backoff":
            if now >= child.next_start_at and not self.stopping:
                child.restarts += 1
                if not self._spawn(child, now):
                    return
                self.emit(ev.PLUGIN_RESTARTED, {"plugin": child.spec.name, "pid": child.proc.pid,
                                                "restarts": child.restarts})
            return
        if child.proc is None or child.state in ("exited", "failed"):
            return
        code = child.proc.poll()
        if code is not None:
            self._on_exit(child, code, now)
            return
        if child.state in ("terminating", "detaching"):
            if now >= child.kill_at:
                self.processes.signal(child.proc, signal.SIGKILL)
            return
        if self.stopping:
            return
        if child.state == "running":
            self._check_silence(child, now, heard_at)
        elif child.state == "starting" and now - child.started_at > STARTUP_CPU_S:
            cpu_s = self.processes.cpu_seconds(child.proc.pid)
            if cpu_s > STARTUP_CPU_S or now - child.started_at > STARTUP_TIMEOUT_S:
                self._declare_hung(child, now, f"no hello after {now - child.started_at:.0f} s ({cpu_s:.1f} s of CPU)")

    def _check_silence(self, child: Child, now: float, heard_at: float) -> None:
        """Hung once silent past the liveness window, unless it spent it waiting for a CPU (Patience): then it
        is given another sample window, and another, within STARVED_MAX_S."""
        silent = min(now, heard_at) - child.last_seen
        if silent < self.liveness_s - STARVED_SAMPLE_S:
            return
        if child.patience is None:  # (a first look already past the window, the bus thread late, waits a window)
            child.patience = Patience(self.processes, child.proc.pid, now)
        if silent <= self.liveness_s or child.patience.waiting(now):
            return
        self._declare_hung(child, now, f"silent for {silent:.1f} s")

    def _declare_hung(self, child: Child, now: float, why: str) -> None:
        self.emit(ev.PLUGIN_HUNG, {"plugin": child.spec.name, "pid": child.proc.pid, "reason": why})
        child.crashed(f"hung ({why})")
        self.processes.signal(child.proc, signal.SIGTERM)
        self.processes.signal(child.proc, signal.SIGCONT)  # a stopped process must run to see SIGTERM
        child.state = "terminating"
        child.kill_at = now + TERM_GRACE_S

    def _on_exit(self, child: Child, code: int, now: float) -> None:
        name = child.spec.name
        if child.state == "detaching":
            self._detached(child, code)
            return
        if self.stopping:
            self._ended_at_shutdown(child, code)
            return
        hung = child.state == "terminating"
        if hung and code == -signal.SIGKILL and now < child.kill_at:
            # We sent SIGTERM and have not yet escalated: someone else's SIGKILL (a person, the OOM killer) ended it,
            # and the silence we took for a hang was most likely its dying (a starved process exits slowly).
            hung = False
            child.crashes.pop()  # the "hung (...)" _declare_hung wrote: the signal is the cause, said below
        if (code == 0 or child.leaving) and not hung:
            child.state = "exited"
            # its bye, or its exit seen now, came before the run's end (one that never said hello is that trouble)
            child.left_early |= self._before_the_end() and child.greeted
            if child.left_early:  # a plugin may leave on purpose; a run that lost one mid-way should say so
                log.warning("plugin %s left before the run ended (exit code %d%s): it is not restarted, and sees "
                            "nothing more of this run", name, code, ", after bye" if child.leaving else "")
            self.emit(ev.PLUGIN_EXITED, {"plugin": name, "exit_code": code})
            return
        cause = self._exit_cause(child, code) if not hung else exit_status(code)
        log.warning("plugin %s exited with %s", name, cause)
        if not hung:
            child.crashed(cause)
        self.emit(ev.PLUGIN_CRASHED, {"plugin": name, "exit_code": code, "cause": cause, "hung": hung})
        # Healthy for long enough: forget the old backoff, as Paranoid Pirate does on a good reply.
        if now - child.started_at >= HEALTHY_RESET_S:
            child.backoff_s = INTERVAL_INIT_S
        while child.restart_times and now - child.restart_times[0] > RESTART_WINDOW_S:
            child.restart_times.popleft()
        if len(child.restart_times) >= MAX_RESTARTS:
            child.state = "failed"
            self.emit(ev.PLUGIN_FAILED, {
                "plugin": name,
                "reason": f"{len(child.restart_times) + 1} failures within {RESTART_WINDOW_S:.0f} s; "
                          f"last: {cause}",
                "log": str(self.log_dir / f"{name}.log"),
            })
            return
        child.restart_times.append(now)
        child.state = "backoff"
        child.next_start_at = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, INTERVAL_MAX_S)

