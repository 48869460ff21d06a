"""Races between the kernel's two threads: the training thread and the bus thread (kernel/bus.py), which also runs
the supervisor (kernel/supervisor.py), the dispatcher and the peer table.

Each test holds one thread at the critical point through a function the code already calls there (a module-level
function wrapped with monkeypatch, or a callable the caller passes in), lets the other thread run into the window,
then lets go. Everything else is real: a Bus wired as a run wires it (kernel/run_bus.open_bus), its ipc sockets, real
plugin processes. Every wait is bounded; where the fixed code cannot reach the point the test waits for (a lock
keeps the other thread out), the hold is let go after a few seconds, which only makes the test weaker on a slow box,
never wrong.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from trainbus.kernel import bus as bus_module, plugin_processes, supervisor as supervisor_module
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import close_bus, open_bus, wait_drained
from trainbus.kernel.snapshot import SnapshotBuffers
from trainbus.kernel.supervisor import PluginSpec
from trainbus.proto import events as ev

from bus_probes import AttachedPeer, hold_flush_of

BUS_THREAD = "trainbus-bus"
LET_GO_ANYWAY_S = 2.0  # the fixed code keeps the other thread out of the window: the hold ends anyway after this
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]  # a plugin process that runs until signalled


def hold_on_bus_thread(monkeypatch, module, name: str, after: bool = False) -> tuple[threading.Event, threading.Event]:
    """Wrap module.name (a module's function or a class's method) so that its first call on the bus thread waits (at
    most 30 s) for `let_go` before it runs (after=True: once it ran, before it returns); returns (inside, let_go)."""
    inside, let_go = threading.Event(), threading.Event()
    real = getattr(module, name)

    def held(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if threading.current_thread().name == BUS_THREAD and not inside.is_set():
            inside.set()
            let_go.wait(30)
        return result if after else real(*args, **kwargs)

    monkeypatch.setattr(module, name, held)
    return inside, let_go


def flaky_plugin(tmp_path: Path) -> PluginSpec:
    """A plugin process that crashes (exit 3) the first time and, restarted, runs until signalled."""
    script = tmp_path / "flaky.py"
    script.write_text("import os, sys, time\n"
                      f"marker = {str(tmp_path / 'started-once')!r}\n"
                      "if not os.path.exists(marker):\n"
                      "    open(marker, 'w').close()\n"
                      "    sys.exit(3)\n"
                      "time.sleep(120)\n")
    return PluginSpec("flaky", "", command=[sys.executable, str(script)])


def test_a_restart_under_way_when_shutdown_begins_is_stopped_with_the_others(bus_with, tmp_path, monkeypatch):
    """The bus thread restarts a crashed plugin once its backoff ends, unless the supervisor is stopping; the
    training thread's shutdown() sets `stopping`, picks the live processes to wait for and signal, then reaps every
    child's process. A restart that passed its `stopping` check just before shutdown began, and had not yet stored
    its new process when shutdown picked, must not escape: its process must be stopped with the others, not be
    left running, nor be waited for without end (shutdown's reaping `wait()` has no timeout: the run never ends).

    Here the bus thread is held inside that restart (once Processes.spawn started it) until shutdown has picked its
    processes (the first call of its `abort`), and shutdown then waits for another plugin that does not exit (its
    deadline), so the restart's process is stored before shutdown reaps."""
    inside, let_go = hold_on_bus_thread(monkeypatch, plugin_processes.Processes, "spawn", after=True)
    bus = bus_with(tmp_path / "run", [flaky_plugin(tmp_path), PluginSpec("slow", "", command=SLEEPER)])
    supervisor = bus.supervisor
    flaky = supervisor.children["flaky"]
    assert inside.wait(30), "the crashed plugin was not restarted"
    crashed = flaky.proc  # the process that exited 3: the restart has not stored its new one yet
    chosen = threading.Event()

    def abort() -> bool:  # shutdown calls it once it picked the processes it waits for
        if not chosen.is_set():
            chosen.set()
            let_go.set()
            end = time.monotonic() + 10
            while flaky.proc is crashed and time.monotonic() < end:  # the restart stores its process
                time.sleep(0.01)
        return False

    def let_go_anyway() -> None:  # fixed: shutdown cannot pick while a restart is under way
        chosen.wait(LET_GO_ANYWAY_S)
        let_go.set()

    threading.Thread(target=let_go_anyway, daemon=True).start()
    training = threading.Thread(target=supervisor.shutdown, args=(1.0, abort), name="training", daemon=True)
    training.start()
    training.join(30)
    restarted = flaky.proc
    try:
        assert restarted is not crashed, "the restart never stored its process"
        assert not training.is_alive(), "shutdown waits without end for the restarted process it never signalled"
        assert restarted.poll() is not None, "the restarted plugin was left running after shutdown"
        assert flaky.state == "exited", flaky.state
    finally:
        if restarted.poll() is None:
            os.killpg(restarted.pid, signal.SIGKILL)
        training.join(10)


def test_a_crash_seen_by_both_threads_at_shutdown_is_told_once(bus_with, tmp_path, monkeypatch):
    """A plugin's exit is handled by the bus thread's tick (_on_exit) or, once the run is over, by the training
    thread's shutdown() (_ended_at_shutdown), "whichever thread saw it first". A crash the bus thread began to handle
    before `stopping` was set must not be handled by shutdown as well: one plugin_crashed, one crash in the summary,
    and the plugin ends `exited`, not `backoff`.

    Here the bus thread is held inside its handling of the crash (in exit_status, before it records anything) while the
    training thread runs shutdown; then it is let go."""
    inside, let_go = hold_on_bus_thread(monkeypatch, supervisor_module, "exit_status")
    bus = bus_with(tmp_path / "run", [PluginSpec("crasher", "", command=[sys.executable, "-c", "raise SystemExit(3)"])])
    supervisor = bus.supervisor
    crasher = supervisor.children["crasher"]
    assert inside.wait(30), "the crash was not seen"
    # no restart before shutdown takes the lock: beside busy cores the bus thread, let go, took it again at its
    # next tick, past the 0.25 s backoff, and the restarted process's crash was a second one (rightly)
    crasher.backoff_s = 600.0
    training = threading.Thread(target=supervisor.shutdown, args=(1.0,), name="training", daemon=True)
    training.start()
    training.join(LET_GO_ANYWAY_S)  # fixed: shutdown waits for the bus thread to finish with the exit
    let_go.set()
    training.join(30)
    assert not training.is_alive(), "shutdown did not return"
    bus.flush_now()  # a flush that begins after the held round ended: what it emitted is numbered
    crashed = [e for e in read_events(bus.journal.path) if e.type == ev.PLUGIN_CRASHED]
    assert len(crashed) == 1, [e.data for e in crashed]
    assert crasher.crashes == ["exit code 3"], crasher.crashes
    assert crasher.state == "exited", crasher.state


FLUSH_NOW_S = 1.0  # flush_now's wait (5 s in a run), shortened so that holding a flush past it takes seconds less
FLUSH_HELD_S = 2.5  # past flush_now's wait: a flush held up this long (an fsync behind a checkpoint's writes)


def attached_peers_live_through_the_hold(bus) -> None:
    """An attached peer is live while the bus thread hears from it within the liveness window (3 s); a bus thread held
    for FLUSH_HELD_S hears nobody. What these tests are about is the seq waited for, not that: a longer window."""
    bus.control.peers.liveness_s = 60.0


def training_held_at_flush_of(monkeypatch, event_type: str, part: Callable[[], None]) -> None:
    """part() (the training thread's part: publish, then wait for it) on a thread of its own while the flush that
    takes `event_type` is held FLUSH_HELD_S, past flush_now's wait: a part that returns then did not wait for its
    event. Let go, it must return."""
    inside, let_go = hold_flush_of(monkeypatch, event_type)
    training = threading.Thread(target=part, name="training", daemon=True)
    training.start()
    assert inside.wait(10), f"no flush took {event_type}"
    training.join(FLUSH_HELD_S)
    let_go.set()
    training.join(40)
    assert not training.is_alive(), f"{part.__name__} did not return once {event_type}'s flush was let go"


@pytest.fixture
def short_flush_wait(monkeypatch):
    monkeypatch.setattr(bus_module, "FLUSH_NOW_TIMEOUT_S", FLUSH_NOW_S)


def test_a_vote_waits_for_its_event_however_long_its_flush_is_held_up(bus_with, tmp_path, monkeypatch,
                                                                      short_flush_wait):
    """await_votes waits for the voters to ack the seq its end_epoch got. That seq is known only once a flush numbered
    it; flush_now gives up after 5 s (FLUSH_NOW_S here), and the latest end_epoch seq is then the one before (here none: 0), which every
    voter acked long ago: the vote would be skipped without a word, and a stop decided on this epoch would land in the
    middle of the next. A flush held up that long is an fsync behind a checkpoint being written to the same disk.

    Here the burst that took end_epoch is held past flush_now's wait; the vote (timeout 30 s) must still be on this
    end_epoch: once the flush is let go, the voter acks it before await_votes returns."""
    run_dir = tmp_path / "run"
    bus = bus_with(run_dir, [])
    attached_peers_live_through_the_hold(bus)
    voter = AttachedPeer(run_dir, bus, votes=(ev.END_EPOCH,), acks=ev.END_EPOCH)
    voter.start()
    voted: dict = {}

    def vote() -> None:  # the training thread's part
        bus.publish(ev.END_EPOCH, 1, 1, {"epoch": 1, "training_loss": 0.5})
        voted["late"] = bus.await_votes(ev.END_EPOCH, timeout_s=30)
        voted["acked"] = list(voter.acked)

    try:
        assert voter.welcomed.wait(30), "the voter was not welcomed"
        bus.wait(lambda: bus.control.peers.has_voters(ev.END_EPOCH), 10)
        training_held_at_flush_of(monkeypatch, ev.END_EPOCH, vote)
    finally:
        voter.stopping.set()
        voter.join(5)
    end_epoch = next(e for e in read_events(run_dir) if e.type == ev.END_EPOCH)
    assert voted == {"late": [], "acked": [end_epoch.seq]}, (voted, end_epoch.seq)


def test_the_drain_waits_for_the_final_event_however_long_its_flush_is_held_up(bus_with, tmp_path, monkeypatch,
                                                                               short_flush_wait):
    """wait_drained waits until every durable plugin acked the run's final event (bus.final_seq). flush_now gives up
    after 5 s (FLUSH_NOW_S here); while no flush has numbered the final event, final_seq is the last seq numbered, which a durable
    plugin that kept up has acked: the drain would end at once, its plugins be stopped before they had the final
    event (the last checkpoint unwritten), and the summary say that none was left behind.

    Here a durable peer acked everything numbered, then the flush that took end_training_session is held past
    flush_now's wait; the drain (timeout 30 s) must not end before the peer acked the final event."""
    run_dir = tmp_path / "run"
    bus = bus_with(run_dir, [])
    attached_peers_live_through_the_hold(bus)
    durable = AttachedPeer(run_dir, bus, delivery="durable")
    durable.start()
    drained: dict = {}

    def drain() -> None:  # the training thread's part
        bus.publish(ev.END_TRAINING_SESSION, 1, 1, {"epochs_completed": 1, "steps": 1, "stopped_early": False})
        drained["undrained"] = wait_drained(bus, timeout_s=30)
        drained["acked"] = list(durable.acked)

    try:
        assert durable.welcomed.wait(30), "the durable peer was not welcomed"
        bus.publish(ev.END_EPOCH, 1, 1, {"epoch": 1, "training_loss": 0.5})
        bus.flush_now()
        assert bus.wait(lambda: not bus.control.peers.durable_behind(bus.last_seq, time.monotonic()), 10), \
            "the durable peer did not keep up"
        training_held_at_flush_of(monkeypatch, ev.END_TRAINING_SESSION, drain)
    finally:
        durable.stopping.set()
        durable.join(5)
    final = next(e for e in read_events(run_dir) if e.type == ev.END_TRAINING_SESSION)
    assert drained["undrained"] == {} and final.seq in drained["acked"], (drained, final.seq)


def test_an_attached_peer_is_not_taken_for_gone_while_the_bus_thread_is_held_up(tmp_path, monkeypatch):
    """A peer attached by hand is live while it keeps talking: its last message is recorded by the bus thread as it
    reads the control socket, and the training thread asks too (has a persister said hello, who votes, who the drain
    waits for). A bus thread held up past the liveness window (3 s; a flush waiting for its disk) reads nobody
    meanwhile: a peer that kept talking is unread, not silent, and must not be taken for gone (a checkpoint skipped
    as "no checkpoint plugin is attached", a vote not waited for, the drain cut short).

    Here an attached durable persister that votes keeps sending heartbeats while the bus thread is held in a flush
    until the peer's last message read is older than the window; then the training thread's questions are asked."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bus, checkpointer, sockets = open_bus("races-" + secrets.token_hex(3), run_dir, [],
                                          buffers=SnapshotBuffers("races", [tmp_path]))
    bus.start()
    peer = AttachedPeer(run_dir, bus, delivery="durable", votes=(ev.END_EPOCH,), capabilities=("checkpoint",))
    peer.start()
    let_go = threading.Event()
    try:
        assert peer.welcomed.wait(30), "the peer was not welcomed"
        assert bus.wait(checkpointer.has_persister, 10), "the persister was not taken for one"
        peers = bus.control.peers
        inside, let_go = hold_flush_of(monkeypatch, ev.START_EPOCH)
        bus.publish(ev.START_EPOCH, 1, 1, {"batches_planned": 1})
        assert inside.wait(10), "no flush took start_epoch"
        welcomed = next(p for p in peers if p.name == "peer")
        end = time.monotonic() + 30
        while time.monotonic() - welcomed.last_seen <= peers.liveness_s + 0.5 and time.monotonic() < end:
            time.sleep(0.05)  # the peer talks on; the held bus thread reads none of it
        now, next_seq = time.monotonic(), bus.last_seq + 1
        assert checkpointer.has_persister(), "an attached persister that kept talking was taken for gone"
        assert peers.voters_behind(ev.END_EPOCH, next_seq, now) == ["peer"]
        assert list(peers.durable_behind(next_seq, now)) == ["peer"]
    finally:
        let_go.set()
        peer.stopping.set()
        peer.join(5)
        close_bus(bus, run_dir, sockets, plugin_exit_timeout_s=1.0)
        checkpointer.close()


def test_a_bus_thread_held_up_at_close_keeps_its_journal_and_journals_the_last_events(tmp_path, monkeypatch):
    """Bus.close waits CLOSE_TIMEOUT_S for the bus thread's last round. A thread still held up then (its last flush
    waiting for the journal's disk) keeps its journal and sockets: closed under it, the run's last events would be
    lost, and a replay it still serves could read a descriptor reused by another file. Here the flush that took the
    final event is held past a close timeout shortened to 0.5 s; once let go, the final event is journaled."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bus, _, _ = open_bus("races-" + secrets.token_hex(3), run_dir, [])
    bus.start()
    monkeypatch.setattr(bus_module, "CLOSE_TIMEOUT_S", 0.5)
    inside, let_go = hold_flush_of(monkeypatch, ev.END_TRAINING_SESSION)
    bus.publish(ev.END_TRAINING_SESSION, 1, 1, {"epochs_completed": 1, "steps": 1, "stopped_early": False})
    try:
        assert inside.wait(10), "no flush took end_training_session"
        bus.close()
        held_at_close = bus._thread.is_alive()
    finally:
        let_go.set()
        bus._thread.join(30)
    try:
        assert held_at_close and not bus._thread.is_alive()
        assert [e.type for e in read_events(run_dir)][-1] == ev.END_TRAINING_SESSION
    finally:
        bus.journal.close()
        bus.ctx.destroy(linger=0)
