"""The SDK Runner's ordering logic without sockets: gaps and replay, duplicates, acks, votes; the last word
(on_kernel_gone) when the kernel dies.

The Runner is the real one; its I/O thread is replaced (Runner's `make_io`) by FakeKernelIO, a kernel
reduced to an inbox and a journal: it answers a replay request at once from what it has published.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import threading

import pytest

from trainbus.proto import DURABLE, Event, control, decode_control, encode_control, events as ev
from trainbus.proto.codec import event_to_map
from trainbus.proto.messages import SUMMARY_NAME
from trainbus.sdk.bz import Plugin as BzPlugin
from trainbus.sdk.plugin import KernelGoneInfo, Plugin
from trainbus.sdk.kernel_liveness import KERNEL_EXITED, KernelLiveness
from trainbus.sdk.runner import Runner

RUN = "r1"


def event(seq: int, type_: str) -> Event:
    return Event(seq=seq, run=RUN, type=type_, ts=0.0, step=0, epoch=0)


# One short run: its journal, seq 1..N.
JOURNAL = [event(seq, t) for seq, t in enumerate(
    ["start_training_session", "start_epoch", "heartbeat", "start_training_loop", "end_training_loop",
     "end_epoch", "heartbeat", "end_training_session"], start=1)]


class _Inbox(collections.deque):
    """The Runner's inbox; an item is handed to the fake kernel as the Runner takes it (`taken`)."""

    def __init__(self, taken):
        super().__init__()
        self.taken = taken

    def popleft(self):
        return self.taken(super().popleft())


class FakeKernelIO:
    """What the Runner uses of its I/O thread (sdk/plugin_io.py PluginIO), with a scripted kernel behind it.

    `live(seqs)`: the events the plugin receives live, in that order (a seq left out is one it missed); a
    durable plugin gets them after the answer to its first replay request (it caught up before the run
    began). A replay is answered in its place in the inbox, as the kernel would when it reads the request:
    the journal from `from_seq` up to the newest event published before the answer (the newest the Runner
    has taken live), in batches of `batch` events."""

    def __init__(self, events_endpoint, control_endpoint, topics, hello, handler_timeout_s, kernel_pid, secure,
                 resume_from: int = 1, batch: int = 2, journal: list[Event] = JOURNAL, session_seq: int = 1):
        self.topics, self.hello, self.journal = topics, hello, journal
        self.inbox = _Inbox(self._taken)
        self.wake = threading.Condition()
        self.closing = threading.Event()
        self.gone = self.refused = self.denied = self.busy_since = None
        self.lost_kernel = False
        self.liveness = KernelLiveness(kernel_pid, lambda text: None)  # what the Runner sets on it
        self.heartbeat_interval_s = 1.0
        self.received = self.dropped = self.malformed = 0
        self.replies_dropped: dict[str, int] = {}
        self.sent: list[dict] = []
        self.published = 0
        self.batch = batch
        self.pending: list = []  # live events held back until the first replay request (durable)
        self.inbox.append(("control", control("welcome", run=RUN, heartbeat_interval_s=1.0, resume_from=resume_from,
                                              session_seq=session_seq)))

    def live(self, seqs) -> FakeKernelIO:
        items = [("event", self.journal[seq - 1]) for seq in seqs]
        if self.hello["delivery"] == DURABLE:
            self.pending = items
        else:
            self.inbox.extend(items)
        return self

    def _taken(self, item):
        if item[0] == "event":
            self.published = max(self.published, item[1].seq)
        elif item[0] == "replay":
            start = item[1] - 1
            events = self.journal[start:max(start, min(start + self.batch, self.published))]
            done = start + len(events) >= self.published
            # as the I/O thread decodes it: the events as Event objects
            return "control", decode_control(encode_control(control("replay_batch", done=done,
                                                                    events=[event_to_map(e) for e in events])))
        return item

    # -- the PluginIO interface -------------------------------------------------------------------

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False  # an empty inbox ends the run: the kernel has nothing more

    def join(self, timeout=None) -> None:
        pass

    def still_working(self) -> None:
        pass

    def close(self) -> None:
        self.closing.set()

    def ack(self, seq: int, now: bool = False) -> None:
        if seq > max((m["seq"] for m in self.of("ack")), default=0):  # the real one: with its next message
            self.sent.append(control("ack", seq=seq))

    def send(self, msg: dict) -> None:
        self.sent.append(msg)
        if msg["type"] == "replay":
            self.inbox.append(("replay", msg["from_seq"]))
            self.inbox.extend(self.pending)
            self.pending = []

    def of(self, type_: str) -> list[dict]:
        return [m for m in self.sent if m["type"] == type_]


class Seen(Plugin):
    """Durable; what its handler saw, in order, as (seq, type)."""

    delivery = DURABLE

    def setup(self):
        self.seen = []

    def on_event(self, event):
        self.seen.append((event.seq, event.type))


class LiveSeen(Seen):
    delivery = "best_effort"


class Voter(Plugin):
    """Durable, handles end_epoch only, and the kernel waits for it there."""

    delivery = DURABLE
    votes = ("end_epoch",)

    def setup(self):
        self.seen = []

    def on_end_epoch(self, event):
        self.seen.append((event.seq, event.type))


def run(plugin: Plugin, live, **io) -> tuple[Runner, FakeKernelIO]:
    runner = Runner(plugin, "", "", make_io=lambda *args: FakeKernelIO(*args, **io).live(live))
    assert runner.run() == 0
    return runner, runner.io


ALL = [(e.seq, e.type) for e in JOURNAL]


def test_every_event_live_is_handled_once_in_order_with_no_replay_but_the_first():
    runner, io = run(Seen(), range(1, 9))
    assert runner.plugin.seen == ALL
    assert runner.gaps == 0
    assert [m["from_seq"] for m in io.of("replay")] == [1]  # a durable plugin asks once, at the start
    assert io.topics == [""]


def test_a_missed_event_is_a_gap_that_a_replay_fills_in_order():
    runner, io = run(Seen(), [1, 2, 4, 5, 6, 7, 8])  # 3 never arrived live
    assert runner.plugin.seen == ALL
    assert runner.gaps == 1
    # from the gap on, in batches of two: the live copies that came meanwhile are not handled twice
    assert [m["from_seq"] for m in io.of("replay")] == [1, 3, 5, 7]


def test_a_missed_heartbeat_is_a_gap_too():
    # a heartbeat may be all that shows a durable plugin it missed the event a vote waits for
    assert JOURNAL[6].type == "heartbeat"
    runner, io = run(Seen(), [1, 2, 3, 4, 5, 6, 8])
    assert runner.plugin.seen == ALL
    assert runner.gaps == 1
    assert [m["from_seq"] for m in io.of("replay")] == [1, 7]


def test_duplicates_live_and_from_replays_are_handled_once():
    runner, _ = run(Seen(), [1, 2, 2, 1, 3, 5, 4, 6, 6, 7, 8])
    assert runner.plugin.seen == ALL
    assert runner.gaps == 1  # 4 came after 5: a gap, filled by the replay; the late live 4 is dropped


# -- a durable plugin sent only some per-batch types: the envelope's `n` tells a jump from a gap ----------------

def counted(types: list[str], with_n: bool = True) -> list[Event]:
    """A journal of these types, each event with the `n` the kernel would give it."""
    counts, journal = dict.fromkeys(ev.COUNTED_BATCH_EVENTS, 0), []
    for seq, type_ in enumerate(types, start=1):
        if type_ in counts:
            counts[type_] += 1
        n = [counts[t] for t in ev.COUNTED_BATCH_EVENTS] if with_n else None
        journal.append(Event(seq=seq, run=RUN, type=type_, ts=0.0, step=0, epoch=1, n=n))
    return journal


BATCHES = counted(["start_training_session", "start_epoch", "start_training_loop",
                   "start_training_batch", "end_training_batch", "start_training_batch", "end_training_batch",
                   "heartbeat", "start_training_batch", "end_training_batch", "end_training_loop",
                   "start_validation_loop", "start_validation_batch", "end_validation_batch", "end_validation_loop",
                   "end_epoch", "end_training_session"])


class StepsAndEpochs(Seen):
    """Durable; handles one per-batch type and end_epoch."""

    def on_event(self, event):
        self.seen.append((event.seq, event.type))

    def subscriptions(self):
        return ["end_training_batch", "end_epoch"]


def sent(journal: list[Event], plugin: Plugin, missing=()) -> list[int]:
    """The seqs a SUB with the plugin's subscriptions receives (the PUB filters by topic), less `missing`."""
    topics = Runner(plugin, "", "", make_io=lambda *args: FakeKernelIO(*args)).io.topics
    return [e.seq for e in journal if any(e.type.startswith(t) for t in topics) and e.seq not in missing]


def handled(journal: list[Event]) -> list[tuple[int, str]]:
    return [(e.seq, e.type) for e in journal if e.type in ("end_training_batch", "end_epoch", "end_training_session")]


def test_a_durable_plugin_is_sent_every_event_but_the_per_batch_types_it_does_not_handle():
    topics = set(Runner(StepsAndEpochs(), "", "", make_io=lambda *args: FakeKernelIO(*args)).io.topics)
    assert topics == set(ev.LIFECYCLE_EVENTS + ev.KERNEL_EVENTS) - {"start_training_batch", "start_validation_batch",
                                                                   "end_validation_batch"}


def test_the_per_batch_types_it_is_sent_are_matched_as_zeromq_does_by_prefix():
    class Ends(Seen):
        def subscriptions(self):
            return ["end_"]  # end_training_batch and end_validation_batch among the rest

    sent_counts = Runner(Ends(), "", "", make_io=lambda *args: FakeKernelIO(*args)).sent_counts
    assert sent_counts == {ev.COUNTED_INDEX["end_training_batch"], ev.COUNTED_INDEX["end_validation_batch"]}
    assert Runner(Seen(), "", "", make_io=lambda *args: FakeKernelIO(*args)).sent_counts == {0, 1, 2, 3}


def test_jumps_over_per_batch_types_it_is_not_sent_are_no_gap():
    live = sent(BATCHES, StepsAndEpochs())
    assert 4 not in live and 13 not in live  # start_training_batch, start_validation_batch
    runner, io = run(StepsAndEpochs(), live, journal=BATCHES)
    assert runner.plugin.seen == handled(BATCHES)
    assert runner.gaps == 0 and [m["from_seq"] for m in io.of("replay")] == [1]
    assert io.of("ack")[-1]["seq"] == len(BATCHES)


@pytest.mark.parametrize("missing", [7, 8, 16], ids=["a step it handles", "a heartbeat", "end_epoch"])
def test_a_missed_event_it_is_sent_is_a_gap_though_only_unsent_types_lie_beside_it(missing):
    runner, io = run(StepsAndEpochs(), sent(BATCHES, StepsAndEpochs(), missing=[missing]), journal=BATCHES)
    assert runner.plugin.seen == handled(BATCHES)
    assert runner.gaps > 0 and any(m["from_seq"] <= missing for m in io.of("replay")[1:])


def test_without_n_every_jump_is_a_gap_and_nothing_is_lost():
    """A journal from before the envelope had `n` (or a held-back heartbeat): no proof, so a replay each time."""
    old = counted([e.type for e in BATCHES], with_n=False)
    runner, io = run(StepsAndEpochs(), sent(old, StepsAndEpochs()), journal=old)
    assert runner.plugin.seen == handled(old)
    assert runner.gaps > 0


def test_resume_from_skips_what_was_acknowledged_before_a_restart():
    runner, io = run(Seen(), range(1, 9), resume_from=5)
    assert runner.plugin.seen == ALL[4:]
    assert io.of("replay")[0]["from_seq"] == 5


def test_a_durable_plugin_steps_over_what_it_does_not_handle_without_a_handler_call_and_acks_it_all():
    class EpochsOnly(Plugin):
        delivery = DURABLE

        def setup(self):
            self.calls = []

        def handle(self, event):  # every dispatch, handled type or not
            self.calls.append(event.type)
            super().handle(event)

        def on_end_epoch(self, event):
            pass

    runner, io = run(EpochsOnly(), [1, 2, 4, 5, 6, 7, 8])  # 3 (a heartbeat) missed: still a gap, replayed
    assert runner.plugin.calls == ["end_epoch", "end_training_session"]  # the final event always
    assert runner.gaps == 1 and runner.next_seq == 9 and io.of("ack")[-1]["seq"] == 8
    assert runner.last_event.seq == 8


def test_an_earlier_sessions_end_replayed_in_a_continued_run_is_not_the_end():
    # a run that failed, then went on in place (--resume, a group torchrun restarted): one journal, two sessions
    continued = JOURNAL[:3] + [event(4, "run_failed"), event(5, "start_training_session"),
                               event(6, "end_training_session")]
    runner, _ = run(Seen(), [5, 6], journal=continued, session_seq=5)
    # the earlier session's events rebuild state, but its end (run_failed) is not handed over: that session is over
    assert runner.plugin.seen == [(e.seq, e.type) for e in continued if e.seq != 4] and runner.finished


def test_this_sessions_final_event_ends_a_replay_though_heartbeats_were_numbered_after_it():
    ended = JOURNAL[:3] + [event(4, "end_training_session"), event(5, "heartbeat"), event(6, "heartbeat")]
    runner, _ = run(Seen(), [5, 6], journal=ended, batch=8)
    assert runner.plugin.seen == [(e.seq, e.type) for e in ended[:4]] and runner.finished


def test_acks_rise_and_end_at_the_last_event_handled():
    runner, io = run(Seen(), [1, 2, 4, 5, 6, 7, 8])
    acks = [m["seq"] for m in io.of("ack")]
    assert acks and acks == sorted(set(acks)) and acks[-1] == 8
    assert runner.acked == 8


def test_a_voter_acks_the_voted_event_itself_and_sees_only_its_handlers():
    runner, io = run(Voter(), range(1, 9))
    assert runner.plugin.seen == [(6, "end_epoch")]
    sent = io.sent
    vote = sent.index(control("ack", seq=6))
    # the vote goes out as the event is handled, before any later event could be acked
    assert all(m["seq"] <= 6 for m in sent[:vote] if m["type"] == "ack")
    assert io.of("ack")[-1]["seq"] == 8


class MetricThenRaise(Plugin):
    """Reports a metric at end_epoch, then fails there the first `failures` times it is tried."""

    delivery = DURABLE

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def on_end_epoch(self, event):
        self.metric("tries_left", self.failures)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("flaky")


@pytest.mark.parametrize("failures, sent", [(0, [0.0]), (1, [0.0]), (2, [0.0]), (5, [3.0])])
def test_an_events_replies_go_out_once_however_often_its_handler_was_tried(failures, sent, tmp_path, monkeypatch):
    """Those of the attempt that passed, or of the last one when all three failed: never one set per attempt."""
    monkeypatch.chdir(tmp_path)  # the run directory "": a dead letter goes to ./plugins/
    _, io = run(MetricThenRaise(failures), range(1, 9))
    assert [m["value"] for m in io.of("metric")] == sent


class TakesNoEvent(Plugin):
    def on_end_epoch(self):  # the event is passed: a TypeError before its first line
        pass


def test_a_handler_that_cannot_take_the_event_is_said_at_its_def_line_not_ours(tmp_path, monkeypatch):
    """The call itself failed, so the traceback had only the SDK's frames, and the console named Plugin.handle
    (`at plugin.py:177 in handle`) as where to look; it names the handler's own `def` line now."""
    import inspect

    from trainbus.plugins.console import _one_line

    monkeypatch.chdir(tmp_path)
    _, io = run(TakesNoEvent(), range(1, 9))
    [error] = [m["text"] for m in io.of("log") if m["level"] == "error"]
    line = inspect.getsourcelines(TakesNoEvent.on_end_epoch)[1]
    assert f'"{__file__}", line {line}, in on_end_epoch' in error, error
    assert error.rstrip().endswith("TypeError: TakesNoEvent.on_end_epoch() takes 1 positional argument but 2 were "
                                   "given"), error
    assert _one_line(error).endswith(f"(at test_sdk_runner.py:{line} in on_end_epoch)"), _one_line(error)
    assert f'Traceback (most recent call last):\n  File "{__file__}", line {line}' in error, error  # no SDK frame


class ReportsNaN(Plugin):
    def on_end_epoch(self, event):
        self.metric("val/ratio", float("nan"))  # refused by the protocol's check (proto/codec.py), not by sdk/


def test_a_reply_the_sdk_refuses_is_said_at_the_authors_line_not_in_the_protocols_check(tmp_path, monkeypatch):
    """The check that refuses a NaN metric is proto/codec.py's: its frames ended the traceback, and the console
    named `(at codec.py:272 in _check_metric)` as where to look, not the handler's self.metric line."""
    import inspect

    import trainbus.proto
    from trainbus.plugins.console import _one_line

    monkeypatch.chdir(tmp_path)
    _, io = run(ReportsNaN(), range(1, 9))
    [error] = [m["text"] for m in io.of("log") if m["level"] == "error"]
    line = inspect.getsourcelines(ReportsNaN.on_end_epoch)[1] + 1
    assert _one_line(error).endswith(f"(at test_sdk_runner.py:{line} in on_end_epoch)"), _one_line(error)
    assert os.path.dirname(inspect.getfile(trainbus.proto)) not in error, error
    assert error.rstrip().endswith("ProtocolError: metric.value must be finite, got nan"), error


class BzTakesNoContext(BzPlugin):
    def end_epoch(self):  # bz passes the context: a TypeError before its first line
        pass


def test_a_bz_hook_that_cannot_take_the_context_is_said_at_its_def_line_not_ours(tmp_path, monkeypatch):
    """The traceback was the runner's, Plugin.handle's and bz's _run_hook frames, and the console named
    `bz.py:... in _run_hook` as where to look; it is the hook's own def line, as for an SDK handler."""
    import inspect

    from trainbus.plugins.console import _one_line

    monkeypatch.chdir(tmp_path)
    _, io = run(BzTakesNoContext({}, run_id="r", run_dir=str(tmp_path)), range(1, 9))
    [error] = [m["text"] for m in io.of("log") if m["level"] == "error"]
    line = inspect.getsourcelines(BzTakesNoContext.end_epoch)[1]
    assert f'Traceback (most recent call last):\n  File "{__file__}", line {line}' in error, error
    assert _one_line(error).endswith(f"(at test_sdk_runner.py:{line} in end_epoch)"), _one_line(error)


class AsyncStop(Plugin):
    async def on_end_epoch(self, event):
        self.stop("never sent")


class BzAsyncStop(BzPlugin):
    async def end_epoch(self, context):
        context.should_stop_training = True


@pytest.mark.parametrize("make", [AsyncStop, lambda: BzAsyncStop({}, run_id="r", run_dir=".")])
def test_an_async_handler_fails_its_call_at_its_def_line_instead_of_doing_nothing(make, tmp_path, monkeypatch):
    """The coroutine its call made was dropped unawaited: the handler did nothing and the run went on as if it had."""
    monkeypatch.chdir(tmp_path)
    _, io = run(make(), range(1, 9))
    [error] = [m["text"] for m in io.of("log") if m["level"] == "error"]
    assert "are called, not awaited, so its body would never run" in error and f'File "{__file__}"' in error, error
    assert not io.of("stop")


def test_a_best_effort_plugin_counts_gaps_and_never_asks_for_a_replay():
    runner, io = run(LiveSeen(), [1, 2, 4, 5, 8])
    assert runner.plugin.seen == [ALL[i - 1] for i in (1, 2, 4, 5, 8)]
    assert not io.of("replay") and not io.of("ack")
    assert runner.gaps == 3  # 3, 6 and 7: seqs it was sent ("" topic) but never got
    warning = [m for m in io.of("log") if m["level"] == "warning"]
    assert warning and "missed" in warning[0]["text"]


# the kernel gone: the last word


class LastWord(Seen):
    """Durable; records its on_kernel_gone (the info) and its teardown, in order."""

    def setup(self):
        super().setup()
        self.calls = []

    def on_kernel_gone(self, info):
        self.calls.append(info)

    def teardown(self):
        self.calls.append("teardown")


def run_until_gone(plugin: Plugin, live, gone: str = KERNEL_EXITED, lost_kernel: bool = True) -> Runner:
    """The scripted events, then the I/O thread's verdict as PluginIO gives it: gone (why), and whether the kernel
    was lost (died, fell silent) rather than left us (its SIGTERM, a refusal)."""
    def make_io(*args):
        io = FakeKernelIO(*args).live(live)
        io.gone, io.lost_kernel = gone, lost_kernel
        return io
    runner = Runner(plugin, "", "", make_io=make_io)
    runner.run()
    return runner


def test_a_kernel_lost_mid_run_gets_one_last_word_with_the_last_event_before_teardown(tmp_path):
    runner = run_until_gone(LastWord(run_dir=str(tmp_path)), range(1, 6))
    assert runner.plugin.calls == [KernelGoneInfo(reason=KERNEL_EXITED, run_id=RUN, run_dir=str(tmp_path),
                                                  last_seq=5, last_step=0, last_epoch=0), "teardown"]


@pytest.mark.parametrize("case", ["run ended", "kernel lives", "summary written"])
def test_no_last_word_when_the_run_ended_or_the_kernel_lives(tmp_path, case):
    if case == "summary written":  # the kernel ended the run, and we missed its final event
        (tmp_path / SUMMARY_NAME).write_text('{"status": "completed"}')
    live = range(1, 9) if case == "run ended" else range(1, 6)
    runner = run_until_gone(LastWord(run_dir=str(tmp_path)), live, lost_kernel=case != "kernel lives",
                            gone="terminated (SIGTERM)" if case == "kernel lives" else KERNEL_EXITED)
    assert runner.plugin.calls == ["teardown"]


class FailingLastWord(LastWord):
    def on_kernel_gone(self, info):
        raise RuntimeError("no mail server")


class HangingLastWord(LastWord):
    kernel_gone_timeout_s = 0.1
    release = threading.Event()

    def on_kernel_gone(self, info):
        self.release.wait(60)


def test_a_last_word_that_raises_or_hangs_is_logged_and_teardown_still_runs(tmp_path, capsys):
    failing = run_until_gone(FailingLastWord(run_dir=str(tmp_path)), range(1, 6))
    hanging = run_until_gone(HangingLastWord(run_dir=str(tmp_path)), range(1, 6))
    HangingLastWord.release.set()
    assert failing.plugin.calls == hanging.plugin.calls == ["teardown"]
    assert failing.failures == hanging.failures == 1
    err = capsys.readouterr().err
    assert "on_kernel_gone failed" in err and "RuntimeError: no mail server" in err
    assert "on_kernel_gone still running after kernel_gone_timeout_s 0.1 s" in err


def test_a_metric_from_a_handler_without_a_step_is_at_its_events_step():
    from trainbus.sdk import Harness, Plugin

    class Says(Plugin):
        def on_end_epoch(self, event):
            self.metric("seen", 1.0)
            self.metric("at", 2.0, step=7)

    h = Harness(Says())
    [seen, at] = h.feed("end_epoch", step=45, epoch=1)
    assert (seen["step"], seen["epoch"]) == (45, 1) and (at["step"], at["epoch"]) == (7, None)
    idle = Says()
    idle.metric("from_a_thread_of_its_own", 1.0)  # no handler running: the kernel's step when it arrives
    assert idle.outbox[-1]["step"] is None


def test_a_reply_too_long_for_one_control_message_goes_out_cut_not_lost():
    """PROTOCOL.md §3: the kernel's ROUTER drops the connection of a control message over 256 KiB, which never
    arrives. A `self.log` of a 300,000-character text (a dump, a long repr) vanished from a real run with no word, no
    counter and no marker, where §7.1 says a long text is cut; so did a metric of such a name. The SDK cuts the text
    of a reply that would not fit, saying how much (the kernel then cuts it to its [limits] and counts that)."""
    from trainbus.proto.codec import CONTROL_MAX_MESSAGE_BYTES
    from trainbus.sdk import Harness

    class Says(Plugin):
        def on_end_epoch(self, event):
            self.log("\u00e9" * 300_000)  # two bytes each in UTF-8
            self.metric("m" * 300_000, 1.0)
            self.stop("r" * 300_000)
            self.log("short")

    h = Harness(Says())
    replies = h.feed("end_epoch", step=45, epoch=1)
    assert [r["type"] for r in replies] == ["log", "metric", "stop", "log"]
    for reply in replies:
        raw = encode_control(reply)
        assert len(raw) <= CONTROL_MAX_MESSAGE_BYTES, (reply["type"], len(raw))
        assert decode_control(raw, 1024) == reply  # what the kernel reads
    log_, metric, stop, short = replies
    for text, field in ((log_["text"], "\u00e9"), (metric["name"], "m"), (stop["reason"], "r")):
        kept = len(text) - len(text.lstrip(field))
        assert kept > 100_000 and text == field * kept + f" [... truncated {300_000 - kept} chars]", text[-60:]
    assert short["text"] == "short"


def test_a_metric_given_an_epoch_and_no_step_is_refused_in_the_plugin_not_stamped_with_another_epoch():
    """`self.metric("best/loss", v, epoch=e)` in on_end_training_session went out at that event's step and epoch: the
    epoch given was replaced without a word (from a thread, the kernel dropped it: PROTOCOL.md §7.1 ignores an
    epoch without a step). It raises now, naming the fix."""
    from trainbus.proto import ProtocolError
    from trainbus.sdk import Harness, Plugin

    class Summarises(Plugin):
        def on_end_training_session(self, event):
            self.metric("best/loss", 0.5, epoch=2)

    h = Harness(Summarises())
    with pytest.raises(ProtocolError) as raised:
        h.feed("end_training_session", step=135, epoch=3)
    assert str(raised.value) == ("metric 'best/loss': epoch=2 without a step is not kept (a metric with no step is "
                                 "at the handled event's step and epoch, or the kernel's); give the step that epoch "
                                 "ended at too: self.metric(name, value, step=STEP, epoch=2)"), str(raised.value)
    assert h.replies == []
    idle = Summarises()
    with pytest.raises(ProtocolError):  # a thread of its own: the kernel would take its own epoch
        idle.metric("best/loss", 0.5, epoch=2)
    idle.metric("best/loss", 0.5, step=90, epoch=2)
    assert (idle.outbox[-1]["step"], idle.outbox[-1]["epoch"]) == (90, 2)


def test_a_plugin_catches_a_refused_metric_as_the_sdks_own_protocol_error():
    """README: a metric that is not finite "raises `ProtocolError` in the plugin"; a sampler thread guarding its
    reports catches it, importing it from where it imports Plugin."""
    from trainbus.sdk import Harness, Plugin, ProtocolError

    class Guarded(Plugin):
        def on_end_epoch(self, event):
            try:
                self.metric("ratio", float("nan"))
            except ProtocolError as refused:
                self.log(f"skipped: {refused}")

    h = Harness(Guarded())
    h.feed("end_epoch", epoch=1)
    assert [r["text"] for r in h.replies_of("log")] == ["skipped: metric.value must be finite, got nan"]


class SubscribesToATypo(Plugin):
    def subscriptions(self):  # end_epochs: no event type starts so
        return ["end_epochs"]

    def on_end_epoch(self, event):
        pass


class SubscribesInLightningsOrder(Plugin):
    def subscriptions(self):  # Lightning orders the words so: no near miss of end_epoch by letters
        return ["epoch_end"]

    def on_end_epoch(self, event):
        pass


class SubscribesToAString(Plugin):
    def subscriptions(self):  # a string, not a list: its letters were taken as topics
        return "end_epoch"

    def on_end_epoch(self, event):
        pass


@pytest.mark.parametrize("make, said", [
    (SubscribesToATypo, "SubscribesToATypo.subscriptions() names 'end_epochs', which no event type starts with "
                        "(did you mean 'end_epoch'?), so it is sent none; the types are proto/PROTOCOL.md §6's"),
    (SubscribesInLightningsOrder, "SubscribesInLightningsOrder.subscriptions() names 'epoch_end', which no event "
                                  "type starts with (did you mean 'end_epoch'?), so it is sent none; the types are "
                                  "proto/PROTOCOL.md §6's"),
    (SubscribesToAString, "SubscribesToAString.subscriptions() returned the string 'end_epoch', not a list of event "
                          "types: return ['end_epoch']"),
])
def test_subscriptions_naming_no_event_type_are_said_as_a_warning_not_sent_nothing_silently(make, said):
    """A typo there (or a string for the list) made the plugin handle nothing, or everything starting with one of a
    string's letters, and nothing said so: the run went on with the plugin idle."""
    _, io = run(make(), range(1, 9))
    assert [m["text"] for m in io.of("log") if m["level"] == "warning"] == [said]
    assert "end_epochs" not in io.topics and "e" not in io.topics


def test_the_run_directory_a_harness_makes_goes_with_its_plugin_or_the_process():
    """Each Harness without a run_dir made a /tmp/trainbus-harness-* directory and left it there: a plugin author's
    test suite left hundreds."""
    import gc
    import subprocess

    from trainbus.sdk import Harness, Plugin

    class Writes(Plugin):
        def on_end_epoch(self, event):
            with open(os.path.join(self.run_dir, "seen"), "w") as f:
                f.write(str(event.epoch))

    h = Harness(Writes())
    h.feed("end_epoch", epoch=1)
    made = h.plugin.run_dir
    assert os.path.isfile(os.path.join(made, "seen"))
    del h
    gc.collect()
    assert not os.path.exists(made)
    os.makedirs(made)
    kept = Harness(Writes(), run_dir=made)  # the caller's directory is the caller's
    kept.feed("end_epoch", epoch=1)
    del kept
    gc.collect()
    assert os.path.isfile(os.path.join(made, "seen"))
    shutil.rmtree(made)
    left = subprocess.run([sys.executable, "-c", "from trainbus.sdk import Harness, Plugin\n"
                           "h = Harness(Plugin())\nprint(h.plugin.run_dir)"], capture_output=True, text=True, timeout=60)
    assert left.returncode == 0 and not os.path.exists(left.stdout.strip()), (left.stdout, left.stderr)


def test_a_kernel_that_never_answers_is_a_failure_not_an_exit_0():
    """Nothing listening, or (over TCP) keys the kernel does not take: no welcome within the connect timeout. The
    process exits 1 (it exited 0, as a plugin whose run ended does), and setup never ran."""
    def make_io(*args):
        io = FakeKernelIO(*args)
        io.inbox.clear()  # no welcome
        io.gone, io.lost_kernel = "kernel unreachable: no kernel heartbeat within 30 s", True
        return io
    plugin = LastWord()
    runner = Runner(plugin, "", "", make_io=make_io)
    assert runner.run() == 1 and runner.unreached
    assert not hasattr(plugin, "calls"), "setup ran without a kernel"
