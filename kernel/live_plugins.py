"""Plugins attached to and detached from a live run by its owner: each command checked, journaled, done, answered.

`trainbus plugins attach RUN NAME` and `detach` arrive here as `attach_plugin` and `detach_plugin`, from a
peer the dispatcher has checked is the run's owner (kernel/peers.py OWNER_ONLY). The supervisor starts and
stops the process; the peer table decides where a durable plugin starts; the answer is one `command_result`.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from trainbus.proto import control, encode_control, events as ev, pack

from .checkpointing import persister_directory_inside
from .config import ConfigError
from .config_checks import SETTINGS_MAX_BYTES
from .plugin_names import registered_plugins, unknown_plugin_hint
from .peers import Peer, Peers
from .supervisor import DETACH_GRACE_S, PluginSpec, Supervisor

log = logging.getLogger("trainbus.kernel")

CONSOLE = "console"  # draws on the kernel's terminal instead of logging to the run directory (kernel/session.py)
# An attach is answered once the plugin said hello or its process exited, or after this long (still starting: a
# plugin importing a large library), well within the command's own wait (sdk/command.py RESULT_TIMEOUT_S, 45 s).
ATTACH_ANSWER_S = 10.0


def installed_target(name: str) -> str:
    """The "module:Class" an installed plugin name runs (built-in or entry point); ConfigError naming them all."""
    known = registered_plugins()
    if name not in known:
        raise ConfigError(f"unknown plugin {name!r}{unknown_plugin_hint(name, known)}; installed: "
                          f"{', '.join(sorted(known))} (trainbus plugins list)")
    return known[name]


class LivePlugins:
    """The owner's attach_plugin and detach_plugin commands, on the bus thread."""

    def __init__(self, bus, supervisor: Supervisor, peers: Peers, checkpointer=None):
        self.bus, self.supervisor, self.peers, self.checkpointer = bus, supervisor, peers, checkpointer
        # name -> (identity, label, msg, answer text, crashes before it started, when to answer anyway): attached
        # plugins whose hello or first exit the owner's command waits for
        self._starting: dict[str, tuple[bytes, str, dict[str, Any], str, int, float]] = {}

    def attach(self, peer: Peer, msg: dict[str, Any]) -> None:
        """Start it now. A durable plugin is welcomed with resume_from just past the last seq numbered when the
        command arrived (the next event is its first), or 1 with from_start: where the kernel already keeps a
        durable plugin's position (Peers.positions), so its restarts and the end-of-run drain work as for any."""
        name, settings = msg["name"], msg["settings"]
        try:
            target, command, cwd = self._attachable(name, settings)
        except ConfigError as exc:
            self._answer(peer.identity, peer.label, msg, False, str(exc))
            return
        directory = persister_directory_inside(self.bus.journal.path.parent, settings)
        if directory is not None and self.checkpointer is not None:  # a persister's checkpoint_saved may name it
            self.checkpointer.directories.append(directory)
        after_seq = 0 if msg["from_start"] else self.bus.last_seq
        self.peers.start_at(name, after_seq)
        self.bus.emit(ev.PLUGIN_ATTACHED, {"plugin": name, "target": target, "settings": settings,
                                           "from_seq": after_seq + 1, "by": peer.label})
        child = self.supervisor.attach(PluginSpec(name, target, settings, command, console=name == CONSOLE, cwd=cwd),
                                       time.monotonic())
        if child.proc is None:  # its program could not be started at all; plugin_failed says so too
            self._answer(peer.identity, peer.label, msg, False, f"{name} could not be started: {child.crashes[-1]}")
            return
        # answered at its hello (ready) or its first exit (tick): a plugin that fails as it starts (a setting only
        # the kernel's environment can check, a password variable not set there) is said, not called started
        self._starting[name] = (peer.identity, peer.label, msg, f"started {name} in run {self.bus.run_id} (pid "
                                f"{child.proc.pid}, from seq {after_seq + 1})", child.crash_count,
                                time.monotonic() + ATTACH_ANSWER_S)

    def ready(self, name: str) -> None:
        """A plugin of the run said hello: an attach waiting for it is answered."""
        if name in self._starting:
            identity, label, msg, text, _, _ = self._starting.pop(name)
            self._answer(identity, label, msg, True, text)

    def tick(self, now: float) -> None:
        """Attaches whose plugin exited before its hello are answered with why; those still starting after
        ATTACH_ANSWER_S, with that."""
        for name, (identity, label, msg, text, crashes, answer_at) in list(self._starting.items()):
            child = self.supervisor.children.get(name)
            crashed = child is not None and child.crash_count > crashes
            if crashed or (child is not None and child.state == "exited" and not child.detached):
                del self._starting[name]
                again = (f"it is started again (backoff), until `trainbus plugins detach {self.bus.run_id} {name}` "
                         f"or it is given up" if crashed else "it is not started again")
                self._answer(identity, label, msg, False, (
                    f"{name} exited before it said hello: {child.crashes[-1] if crashed else 'on its own'}; what it "
                    f"printed: {self.supervisor.log_dir / (name + '.log')}; {again}"))
            elif now >= answer_at or child is None or child.detached:
                del self._starting[name]
                self._answer(identity, label, msg, True, text + (
                    f"; it has not said hello yet after {ATTACH_ANSWER_S:.0f} s: `trainbus runs show "
                    f"{self.bus.run_id}` says when it does" if now >= answer_at else ""))

    def detach(self, peer: Peer, msg: dict[str, Any]) -> None:
        """SIGTERM it: it finishes its teardown (a durable one acks what it handled) and exits; never restarted,
        never a crash. Answered once it has exited (at most DETACH_GRACE_S, then it is killed)."""
        name = msg["name"]
        child = self.supervisor.attached(name)
        if self.bus.ended:
            why = f"run {self.bus.run_id} has ended: its plugins are being stopped already"
        elif child is None:
            attached = sorted(n for n in list(self.supervisor.children) if self.supervisor.attached(n))
            why = f"{name} is not attached to run {self.bus.run_id}; attached: {', '.join(attached) or 'none'}"
        elif child.state == "detaching":
            why = f"{name} is being detached already"
        else:
            why = None
        if why:
            self._answer(peer.identity, peer.label, msg, False, why)
            return
        self.bus.emit(ev.PLUGIN_DETACHED, {"plugin": name, "by": peer.label})
        identity, label = peer.identity, peer.label  # answered on this connection, even once the peer table forgot it
        self.supervisor.detach(name, time.monotonic(),
                               lambda code: self._answer(identity, label, msg, True, _stopped(name, code)))

    def _attachable(self, name: str, settings: dict[str, Any]) -> tuple[str, list[str], str]:
        """The plugin's target, command and working directory, or ConfigError saying why it cannot be attached
        now."""
        if self.bus.ended:
            raise ConfigError(f"run {self.bus.run_id} has ended: there is nothing to attach {name} to")
        child = self.supervisor.attached(name)
        if child is not None:
            raise ConfigError(f"{name} is already attached to run {self.bus.run_id} ({child.state}); detach it "
                              f"first: trainbus plugins detach {self.bus.run_id} {name}")
        holder = self.peers.held_by_hand(name, time.monotonic())
        if holder is not None:  # starting ours under its name would cut that peer off without a word
            raise ConfigError(f"{name} is the name of a live peer attached by hand to run {self.bus.run_id} (pid "
                              f"{holder.pid}); it holds it until it says bye or is silent for 3 heartbeat intervals")
        # a name the run has had (its config's, an author's own `target = "module:Class"` or `command` included) runs
        # what it ran, where it ran it (a continued run's relative program); any other is an installed plugin's
        had = self.supervisor.children.get(name)
        target, command, cwd = (had.spec.target, list(had.spec.command), had.spec.cwd) if had is not None else (
            installed_target(name), [], "")
        size = len(pack(settings))
        if size > SETTINGS_MAX_BYTES:  # they reach the plugin in one environment variable (kernel/config_checks.py)
            raise ConfigError(f"{name}: its settings take {size:,} bytes encoded, over the {SETTINGS_MAX_BYTES:,} "
                              f"that fit in its environment; put large data in a file and give its path")
        return target, command, cwd

    def _answer(self, identity: bytes, label: str, msg: dict[str, Any], ok: bool, text: str) -> None:
        log.info("[%s] %s %s: %s", label, msg["type"], msg["name"], text)
        self.bus.send(identity, encode_control(control("command_result", id=msg["id"], ok=ok, text=text)))


def _stopped(name: str, code: int | None) -> str:
    if code is None:
        return f"stopped {name} (no process was running: it was waiting to be restarted)"
    if code == -signal.SIGKILL:
        return f"stopped {name}: killed, its teardown had not finished after {DETACH_GRACE_S:.0f} s"
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return f"stopped {name} ({how})"
