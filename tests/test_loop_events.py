"""The loop alone, in this process, against a recording bus: the exact event list, and replies at every boundary;
and on the real bus, where the order the bus gives the loop's last event is the point."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
import zmq

from trainbus.kernel.bus import FLUSH_INTERVAL_S
from trainbus.kernel.control_reading import CONTROL_PER_WAKE
from trainbus.kernel.checkpointing import Checkpointer
from trainbus.kernel.journal import read_events
from trainbus.kernel.loop import CHECKPOINT_NOW_AFTER_EPOCHS, Loop
from trainbus.kernel.replies import Reply, merge_replies
from trainbus.kernel.run_bus import close_bus, open_bus
from trainbus.kernel.snapshot import SnapshotBuffers
from trainbus.proto import events as ev

from specs import TRAIN_BATCHES, epoch_events, lifecycle, tiny


class RecordingBus:
    """What the loop publishes, in order; replies handed in as if they arrived while a given event was out."""

    def __init__(self, replies_at: dict[tuple[str, int], list[Reply]] | None = None):
        self.events: list[tuple[str, int, dict]] = []  # (type, epoch, data)
        self.replies_at = dict(replies_at or {})
        self._pending: list[Reply] = []

    def publish(self, type_: str, step: int, epoch: int, data: dict) -> None:
        self.events.append((type_, epoch, data))
        self._pending += self.replies_at.pop((type_, epoch), [])

    def take_replies(self) -> list[Reply]:
        out, self._pending = self._pending, []
        return out

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        return []

    def journal_refused_since(self, since: float) -> bool:
        return False

    def types(self) -> list[str]:
        return [t for t, _, _ in self.events]


class OnePersister:
    """The peer table as the checkpointer sees it: one live persister that settles everything at once."""

    class _Peer:
        name = "checkpoint"
        capabilities = ("checkpoint",)

    def named(self, capability: str, now: float) -> list:
        return [self._Peer()]

    def position(self, name: str) -> int:
        return 1 << 62


class NoPersister:
    """The peer table with no persister known: `starting` names the plugins that have not said hello yet."""

    def __init__(self, starting: list[str]):
        self._starting = starting

    def named(self, capability: str, now: float) -> list:
        return []

    def starting(self) -> list[str]:
        return self._starting


@pytest.mark.parametrize("starting", [["checkpoint"], []])
def test_a_checkpoint_without_a_persister_is_skipped_saying_why(tmp_path, starting):
    """A persister still starting (a slow import past ready_timeout_s): scheduled and asked-for checkpoints are
    skipped, each with that reason; with none configured the schedule is silent and checkpoint_now says so."""
    asked = Reply("checkpoint_now", "watcher", "now please")
    bus = RecordingBus({(ev.START_TRAINING_BATCH, 1): [asked]})
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    checkpointer = Checkpointer(buffers, NoPersister(starting), every_n_epochs=1, every_n_steps=0,
                                directories=[tmp_path])
    try:
        Loop(tiny({}), bus, torch.device("cpu"), checkpointer=checkpointer).run()
    finally:
        checkpointer.close()
    assert ev.SAVE_CHECKPOINT not in bus.types()
    skipped = [(epoch, data["reason"]) for type_, epoch, data in bus.events if type_ == ev.CHECKPOINT_SKIPPED]
    if starting:
        why = "no checkpoint plugin has said hello yet (plugins still starting: checkpoint)"
        assert skipped == [(1, why), (1, why), (2, why)]  # checkpoint_now at a step, then each epoch's
    else:
        assert skipped == [(1, "no checkpoint plugin is attached (`trainbus plugins attach RUN checkpoint` on the "
                               "run's host adds one to the live run; `--plugins checkpoint` to a run at its start)")]


def test_the_checkpointer_keeps_verdicts_only_for_what_its_slots_hold(tmp_path):
    """A multi-day run takes a snapshot every few minutes: what the checkpointer remembers per save_checkpoint
    stays one entry a slot (it grew by one for every snapshot), and a late verdict for a reused slot's old
    snapshot frees nothing."""
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    checkpointer = Checkpointer(buffers, OnePersister(), every_n_epochs=0, every_n_steps=0, directories=[tmp_path])
    state = {"w": torch.zeros(4)}
    try:
        for seq in range(1, 201):
            snapshot = checkpointer.take(state)
            assert snapshot is not None, f"snapshot {seq}: both buffers busy, though every one was persisted"
            checkpointer.numbered(seq, {"slot": snapshot.slot})
            checkpointer.settle(OnePersister._Peer(), {"type": "checkpoint_failed", "seq": seq}, seq)
            assert len(checkpointer._settled) <= 2, checkpointer._settled
        held = set(checkpointer._slot_seq.values())
        assert 200 in held and set(checkpointer._settled) == held
        checkpointer.settle(OnePersister._Peer(), {"type": "checkpoint_failed", "seq": 199}, 200)  # late, resent
        assert set(checkpointer._settled) == held, "a verdict for a snapshot no slot holds is remembered"
    finally:
        checkpointer.close()


def test_a_run_publishes_exactly_the_lifecycle_in_order():
    bus = RecordingBus()
    outcome = Loop(tiny({}), bus, torch.device("cpu")).run()
    assert bus.types() == lifecycle(2)
    assert outcome.epochs_completed == 2 and outcome.steps == 2 * TRAIN_BATCHES and not outcome.stopped_early


def test_checkpoint_now_during_validation_snapshots_at_that_epochs_boundary(tmp_path):
    asked = Reply("checkpoint_now", "watcher", "validation looks odd")
    bus = RecordingBus({(ev.START_VALIDATION_BATCH, 1): [asked]})
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    checkpointer = Checkpointer(buffers, OnePersister(), every_n_epochs=0, every_n_steps=0, directories=[tmp_path])
    try:
        Loop(tiny({}), bus, torch.device("cpu"), checkpointer=checkpointer).run()
    finally:
        checkpointer.close()
    assert bus.types() == [ev.START_TRAINING_SESSION, *epoch_events(checkpoint_before_end=True), *epoch_events(),
                           ev.END_TRAINING_SESSION]
    saves = [(epoch, data) for type_, epoch, data in bus.events if type_ == ev.SAVE_CHECKPOINT]
    assert len(saves) == 1 and saves[0][0] == 1
    assert saves[0][1]["reason"] == "checkpoint_now"
    assert saves[0][1]["state"]["trainbus"]["epoch_complete"] is True
    assert saves[0][1]["state"]["step"] == TRAIN_BATCHES


@pytest.mark.parametrize("every_n_epochs", [0, 1])
def test_checkpoint_now_with_the_end_epoch_votes_is_taken_or_answered_when_the_epoch_already_has_one(
        tmp_path, every_n_epochs):
    asked = Reply("checkpoint_now", "watcher", "save it")
    bus = RecordingBus({(ev.END_EPOCH, 1): [asked]})  # as if sent with its vote on end_epoch
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    checkpointer = Checkpointer(buffers, OnePersister(), every_n_epochs=every_n_epochs, every_n_steps=0,
                                directories=[tmp_path])
    try:
        Loop(tiny({}), bus, torch.device("cpu"), checkpointer=checkpointer).run()
    finally:
        checkpointer.close()
    after_end_epoch = bus.types()[bus.types().index(ev.END_EPOCH) + 1]
    if every_n_epochs == 0:  # taken there, of the epoch's state
        assert after_end_epoch == ev.SAVE_CHECKPOINT
        saves = [data for type_, _, data in bus.events if type_ == ev.SAVE_CHECKPOINT]
        assert len(saves) == 1 and saves[0]["reason"] == "checkpoint_now" and saves[0]["state"]["step"] == TRAIN_BATCHES
    else:  # the epoch's own, just before end_epoch, is of the same state: said so, not silently dropped
        assert after_end_epoch == ev.CHECKPOINT_SKIPPED
        skipped = [data["reason"] for type_, _, data in bus.events if type_ == ev.CHECKPOINT_SKIPPED]
        assert skipped == [CHECKPOINT_NOW_AFTER_EPOCHS]
        assert [data["reason"] for type_, _, data in bus.events if type_ == ev.SAVE_CHECKPOINT] == ["epoch", "epoch"]


def test_a_stop_during_validation_ends_the_run_at_that_epochs_end():
    bus = RecordingBus({(ev.START_VALIDATION_BATCH, 1): [Reply("stop", "early", "enough")]})
    outcome = Loop(tiny({}), bus, torch.device("cpu")).run()
    assert outcome.epochs_completed == 1 and outcome.stopped_early
    assert outcome.stop_reasons == ["early: stop: enough"]
    assert bus.types()[-3:] == [ev.END_EPOCH, ev.STOP_REQUESTED, ev.END_TRAINING_SESSION]


class StopAfterBatch(RecordingBus):
    """A stop reply arrives while the first epoch's batch `batch_index` is out."""

    def __init__(self, batch_index: int):
        super().__init__()
        self.batch_index = batch_index

    def publish(self, type_: str, step: int, epoch: int, data: dict) -> None:
        super().publish(type_, step, epoch, data)
        if type_ == ev.END_TRAINING_BATCH and epoch == 1 and data["batch_index"] == self.batch_index:
            self._pending.append(Reply("stop", "user", "enough"))

    def data_of(self, type_: str) -> list[dict]:
        return [data for t, _, data in self.events if t == type_]


class Unsized:
    """A loader without a length (an iterable dataset, a generator)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


@pytest.mark.parametrize("stop_after, sized, partial", [
    (0, True, True),  # 1 of 3 batches
    (TRAIN_BATCHES - 1, True, False),  # after the last batch: the epoch is whole
    (TRAIN_BATCHES - 1, False, True),  # no length: any stop inside the loop counts as partial
])
def test_an_epoch_that_a_stop_cuts_short_says_partial_and_is_not_counted(stop_after, sized, partial):
    spec = tiny({})
    if not sized:
        spec.train_loader = Unsized(spec.train_loader)
    bus = StopAfterBatch(stop_after)
    outcome = Loop(spec, bus, torch.device("cpu")).run()
    planned = TRAIN_BATCHES if sized else None
    assert bus.data_of(ev.START_EPOCH) == [{"batches_planned": planned}]
    for type_ in (ev.END_TRAINING_LOOP, ev.END_EPOCH):
        (data,) = bus.data_of(type_)
        assert (data["partial"], data["batches_planned"], data["training_batch_count"]) == \
            (partial, planned, stop_after + 1)
    assert outcome.stopped_early and outcome.epochs_completed == (0 if partial else 1)
    assert bus.data_of(ev.END_TRAINING_SESSION)[0]["epochs_completed"] == outcome.epochs_completed


def test_whole_epochs_say_so_and_publish_their_planned_batches():
    bus = StopAfterBatch(-1)  # never stops
    Loop(tiny({}), bus, torch.device("cpu")).run()
    assert bus.data_of(ev.START_EPOCH) == [{"batches_planned": TRAIN_BATCHES}] * 2
    assert [(d["partial"], d["batches_planned"]) for d in bus.data_of(ev.END_EPOCH)] == [(False, TRAIN_BATCHES)] * 2


def test_a_signal_at_the_step_a_plugins_stop_lands_on_is_in_the_stop_reasons():
    """SIGTERM (a preemption) and early stopping's stop at one boundary: the run ended `interrupted` (exit 130), but
    its stop_reasons named the plugin's stop alone, so its end mail said `stopped early`, with no `runs resume`."""
    bus = StopAfterBatch(0)
    loop = None

    def interrupted() -> str:
        return "SIGTERM" if loop.batches_done >= 1 else ""
    loop = Loop(tiny({}), bus, torch.device("cpu"), stop_requested=interrupted)
    outcome = loop.run()
    assert outcome.stopped_early
    assert outcome.stop_reasons == ["kernel: stop: interrupted (SIGTERM)", "user: stop: enough"]
    [stop] = bus.data_of(ev.STOP_REQUESTED)
    assert stop["reasons"] == outcome.stop_reasons


def test_stop_reasons_hold_stop_replies_only():
    control = merge_replies([Reply("checkpoint_now", "a", "save"), Reply("stop", "b", "done"), Reply("log", "c", "x")])
    assert control.should_stop and control.checkpoint_now
    assert control.reasons == ("b: stop: done",) and control.checkpoint_reasons == ("a: save",)


def test_a_checkpoint_for_another_model_names_the_keys_in_one_line():
    from trainbus.kernel.training_state import restore_weights

    spec = tiny({})
    other = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Linear(8, 3))
    state = {"trainbus": {"format": 1}, "model_state_dict": other.state_dict(), "optimizer_state_dict": {}}
    with pytest.raises(ValueError) as raised:
        restore_weights(spec, state)
    message = str(raised.value)
    assert "\n" not in message
    assert "missing keys [bias, weight]" in message and "unexpected keys [0.bias, 0.weight, 1.bias, 1.weight]" in message


def test_replies_received_before_the_final_event_are_published_before_it(tmp_path):
    """PROTOCOL.md 6.3: replies the kernel received before it published the final event (a monitor's last metric,
    a log) are published before it: a plugin that exits at the final event still sees them. A real bus, a monitor
    attached by hand on its real control socket (raw pyzmq + msgpack), and the real loop raising the run's events.

    The test holds the bus thread between two of its rounds (its `idle` condition, taken at the end of each), so
    what the monitor sends is received, in the kernel's control socket, and not yet read: a burst of heartbeats
    (one round's reading, CONTROL_PER_WAKE messages), then its metric and its log. Meanwhile the loop runs the
    whole of `tiny` and raises end_training_session. Let go, the bus reads the heartbeats, flushes, and must read
    the metric and the log before it numbers the final event. settle_s is generous, not tight: it lets the bus's
    round in progress end (a poll of at most FLUSH_INTERVAL_S) and the ipc socket carry 258 small messages; too
    short, the test gets less sharp, never fails a kernel that keeps the statement."""
    settle_s = 5 * FLUSH_INTERVAL_S
    bus, _, sockets = open_bus("final-order", tmp_path, plugins=[])
    bus.start()
    ctx = zmq.Context()
    monitor = ctx.socket(zmq.DEALER)
    monitor.setsockopt(zmq.LINGER, 0)
    monitor.connect(bus.control_endpoint)

    def send(type_: str, **fields) -> None:
        monitor.send(msgpack.packb({"v": 1, "type": type_, **fields}))

    try:
        send("hello", name="monitor", pid=os.getpid(), subscriptions=[""], replies=["metric", "log"],
             delivery="best_effort", votes=[], capabilities=[],
             secret=(tmp_path / "credential").read_text().strip())
        assert monitor.poll(30_000) and msgpack.unpackb(monitor.recv())["type"] == "welcome"
        with bus.idle:  # the bus thread stops at the end of its round in progress
            time.sleep(settle_s)
            for _ in range(CONTROL_PER_WAKE):
                send("heartbeat")
            send("metric", name="monitor/last", value=1.5, step=None)
            send("log", level="info", text="the monitor's last words")
            time.sleep(settle_s)  # received: in the kernel's socket, read by nobody yet
            outcome = Loop(tiny({}), bus, torch.device("cpu")).run()  # no voter: it never waits (letting go of idle)
        bus.flush_now()
    finally:
        ctx.destroy(linger=0)
        close_bus(bus, tmp_path, sockets)
    assert outcome.epochs_completed == 2
    events = read_events(tmp_path)
    assert [e.type for e in events if e.type in ev.LIFECYCLE_EVENTS] == lifecycle(2)
    (final,) = [e for e in events if e.type == ev.END_TRAINING_SESSION]
    replies = [e for e in events if e.type in (ev.METRIC, ev.LOG) and e.data["plugin"] == "monitor"]
    assert [(e.type, e.data.get("name") or e.data.get("text")) for e in replies] == \
        [(ev.METRIC, "monitor/last"), (ev.LOG, "the monitor's last words")], replies
    last_epoch = [e for e in events if e.type == ev.END_EPOCH][-1]
    assert all(last_epoch.seq < e.seq for e in replies), "read before the loop's last events: proves nothing"
    assert all(e.seq < final.seq for e in replies), \
        f"received before the final event (seq {final.seq}), published after it: {[e.seq for e in replies]}"


def test_a_resumed_loop_keeps_the_runs_best_validation_loss_from_its_checkpoint():
    """The summary's best covered only the resumed session: a run whose best epoch came before the resume named a
    later, worse one (runs show, which reads the journal, had it right)."""
    first = Loop(tiny({}), RecordingBus(), torch.device("cpu"))
    done = first.run()
    state = first.training_state(epoch_complete=True)
    assert (state["trainbus"]["best_validation_loss"], state["trainbus"]["best_epoch"]) == (
        done.best_validation_loss, done.best_epoch) and done.best_epoch is not None
    state["trainbus"]["best_validation_loss"] = 1e-9  # a best no later epoch beats
    spec = tiny({})
    spec.epochs = 4
    second = Loop(spec, RecordingBus(), torch.device("cpu"))
    second.resume(state, "checkpoint.pt")
    out = second.run()
    assert out.epochs_completed == 4 and (out.best_validation_loss, out.best_epoch) == (1e-9, done.best_epoch)


@pytest.mark.parametrize("at_batch", [TRAIN_BATCHES, 1])
def test_a_stop_at_an_epochs_last_batch_still_takes_that_epochs_checkpoint(tmp_path, at_batch):
    """Ctrl-C (or SLURM's SIGTERM) as the epoch's last batch ends: the epoch is whole, so its scheduled checkpoint
    is taken, and a resume goes on from the next epoch rather than training this one again. Cut short inside the
    epoch, it is not whole, and no epoch checkpoint is taken of it."""
    bus = RecordingBus()
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    checkpointer = Checkpointer(buffers, OnePersister(), every_n_epochs=1, every_n_steps=0, directories=[tmp_path])
    loop = None

    def interrupted() -> str:
        return "SIGINT" if loop.epoch == 1 and loop.batches_done == at_batch else ""
    try:
        loop = Loop(tiny({}), bus, torch.device("cpu"), stop_requested=interrupted, checkpointer=checkpointer)
        outcome = loop.run()
    finally:
        checkpointer.close()
    assert outcome.stopped_early and bus.types()[-1] == ev.END_TRAINING_SESSION
    saves = [data for type_, _, data in bus.events if type_ == ev.SAVE_CHECKPOINT]
    if at_batch == TRAIN_BATCHES:
        assert outcome.epochs_completed == 1 and len(saves) == 1
        assert saves[0]["state"]["trainbus"]["epoch_complete"] is True and saves[0]["state"]["step"] == TRAIN_BATCHES
        assert bus.types().index(ev.SAVE_CHECKPOINT) < bus.types().index(ev.END_EPOCH)
    else:
        assert outcome.epochs_completed == 0 and saves == []


class NumberingBus(RecordingBus):
    """A RecordingBus that numbers each save_checkpoint for the checkpointer as the real bus does; with
    OnePersister (far ahead of every seq) each buffer is free again at once."""

    def __init__(self, checkpointer: Checkpointer | None = None):
        super().__init__()
        self.checkpointer = checkpointer

    def publish(self, type_: str, step: int, epoch: int, data: dict) -> None:
        super().publish(type_, step, epoch, data)
        if type_ == ev.SAVE_CHECKPOINT:
            self.checkpointer.numbered(len(self.events), data)


def test_a_step_checkpoint_due_at_an_epochs_last_batch_is_the_epochs_one_not_a_second_at_that_step(tmp_path):
    """checkpoint_every_n_steps landing on an epoch's last batch, with the epoch's own schedule too: one snapshot
    at that step, taken at the epoch's end (whole: its validation done, a resume starts the next epoch). Two
    were taken, of nearly the same state, the first already partial."""
    bus = NumberingBus()
    buffers = SnapshotBuffers("loop-test", [tmp_path])
    bus.checkpointer = checkpointer = Checkpointer(buffers, OnePersister(), every_n_epochs=1,
                                                   every_n_steps=TRAIN_BATCHES, directories=[tmp_path])
    try:
        Loop(tiny({}), bus, torch.device("cpu"), checkpointer=checkpointer).run()
    finally:
        checkpointer.close()
    saves = [data for type_, _, data in bus.events if type_ == ev.SAVE_CHECKPOINT]
    # named "epoch", the schedule it is one of ("step" was the one it took the place of)
    assert [(d["state"]["step"], d["state"]["trainbus"]["epoch_complete"], d["reason"]) for d in saves] == \
        [(TRAIN_BATCHES, True, "epoch"), (2 * TRAIN_BATCHES, True, "epoch")]
    assert ev.CHECKPOINT_SKIPPED not in bus.types()
