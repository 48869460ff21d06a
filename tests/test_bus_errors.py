"""The bus thread survives an exception while it numbers a burst of events, and the journal stays whole: a seq is
taken only together with its record, so an event that fails costs itself, never a gap (the journal refuses a batch
after a gap: nothing would be journaled or published again), and never the rest of its burst."""

from __future__ import annotations

import torch

from trainbus.kernel.journal import read_events
from trainbus.proto import events as ev


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
