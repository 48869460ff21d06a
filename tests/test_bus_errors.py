"""The bus thread's integrity. It survives an exception while it numbers a burst of events, and the journal stays
whole: a seq is taken only together with its record, so an event that fails costs itself, never a gap (the journal
refuses a batch after a gap: nothing would be journaled or published again), and never the rest of its burst. And its
sockets stay its own: an answer made on another thread is sent by it."""

from __future__ import annotations

import threading
import time

import torch

from bus_probes import AttachedPeer
from trainbus.kernel.journal import read_events
from trainbus.proto import control, encode_control, events as ev


def publish_burst(bus, middle: dict, type_: str = ev.END_TRAINING_BATCH) -> None:
    """Three events in one burst (queued together, flushed once), `middle`'s data in the second."""
    bus.publish(ev.START_TRAINING_BATCH, 1, 1, {"batch_index": 0})
    bus.publish(type_, 1, 1, middle)
    bus.publish(ev.START_TRAINING_BATCH, 2, 1, {"batch_index": 1})
    bus.flush_now()


def test_a_tensor_that_cannot_be_read_costs_its_value_not_its_burst(bus_with, tmp_path):
    """Reading the burst's tensors as floats together fails (here one is not a scalar): each goes out as what it holds
    (a list), the burst's other events with it."""
    run_dir = tmp_path / "run"
    bus = bus_with(run_dir, [])
    publish_burst(bus, {"batch_index": 0, "loss": torch.ones(2)})
    publish_burst(bus, {"batch_index": 1, "loss": torch.tensor(0.5)})  # and the bus goes on
    journal = read_events(run_dir)
    assert [e.seq for e in journal] == list(range(1, len(journal) + 1))
    events = [e for e in journal if e.type != ev.HEARTBEAT]
    assert [e.type for e in events] == [ev.START_TRAINING_BATCH, ev.END_TRAINING_BATCH, ev.START_TRAINING_BATCH] * 2
    assert events[1].data["loss"] == [1.0, 1.0]
    assert events[4].data["loss"] == 0.5
    assert bus.counters["bus_errors"] == 1


def test_an_exception_while_an_event_is_numbered_leaves_no_gap_and_the_bus_goes_on(bus_with, tmp_path, monkeypatch):
    """Past its encoding (the run's state folded in, here a kernel bug): the event is journaled and published, the
    rest of its burst too, and every later burst."""
    run_dir = tmp_path / "run"
    bus = bus_with(run_dir, [])
    fold = bus.run_state.fold

    def buggy(event):
        if event.type == ev.END_TRAINING_BATCH and event.data.get("batch_index") == 0:
            raise KeyError("a kernel bug")
        fold(event)

    monkeypatch.setattr(bus.run_state, "fold", buggy)
    publish_burst(bus, {"batch_index": 0, "loss": 0.25})
    publish_burst(bus, {"batch_index": 1, "loss": 0.5})
    journal = read_events(run_dir)
    assert [e.seq for e in journal] == list(range(1, len(journal) + 1))
    losses = [e.data["loss"] for e in journal if e.type == ev.END_TRAINING_BATCH]
    assert losses == [0.25, 0.5]
    assert bus.counters["bus_errors"] == 1 and bus.last_seq == journal[-1].seq


class SendingThreads:
    """The bus's control socket, noting the thread of each send (ZeroMQ sockets are not thread-safe: a send racing
    the bus thread's use of it may corrupt it or crash the process, rarely and unreproducibly). Compares and hashes as
    the socket, which the bus's poller returns."""

    def __init__(self, socket):
        self.socket, self.threads = socket, []

    def send_multipart(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.socket.send_multipart(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.socket, name)

    def __eq__(self, other):
        return other is self.socket or other is self

    def __hash__(self):
        return hash(self.socket)


def test_an_answer_made_on_another_thread_is_sent_by_the_bus_thread(bus_with, tmp_path):
    """The training thread answering a peer (a detach that ended with the run, answered by Supervisor.shutdown) does
    not touch the bus thread's socket: the bus thread sends it, and it arrives."""
    run_dir = tmp_path / "run"
    bus = bus_with(run_dir, [])
    bus.router = SendingThreads(bus.router)
    peer = AttachedPeer(run_dir, bus)
    peer.start()
    try:
        assert peer.welcomed.wait(30), "the peer was not welcomed"
        [identity] = [p.identity for p in bus.control.peers if p.name == "peer"]
        answer = control("command_result", id="7", ok=True, text="stopped it")
        assert threading.current_thread() is not bus._thread
        bus.send(identity, encode_control(answer))
        deadline = time.monotonic() + 10
        while not any(m["type"] == "command_result" for m in peer.received) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [m for m in peer.received if m["type"] == "command_result"] == [answer]
        assert set(bus.router.threads) == {bus._thread.name}, bus.router.threads  # the welcome, and the answer
    finally:
        peer.stopping.set()
        peer.join(5)
