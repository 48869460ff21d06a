"""Units with fake clocks and a fake supervisor: rate buckets and caps (kernel/limits.py), who may say
hello and what a welcomed peer may do (kernel/peers.py, kernel/credentials.py), replies the bus cannot deliver
(kernel/bus.py, on real sockets), replay batches spliced from journal bytes (proto/codec.py), and the journal on
a real full tmpfs (kernel/journal.py).

Time is a parameter of everything here, so nothing sleeps except the journal's retry interval.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from trainbus.kernel.bus import Bus
from trainbus.kernel.control_reading import CONTROL_PER_WAKE, LOCAL, REMOTE
from trainbus.kernel.control import Dispatcher
from trainbus.kernel.credentials import CREDENTIAL_FILE, Credentials
from trainbus.kernel.journal import RETRY_INTERVAL_S, Journal, decode_records, read_events
from trainbus.kernel.limits import (BURST_S, EVENT_JOURNAL_BYTES, TRUNCATED, PacedReading, PeerBudget, PeerLimits,
                                    TokenBucket, WorkShare, truncate)
from trainbus.kernel.keys import ClientKey
from trainbus.kernel.peers import ALWAYS_ALLOWED, MAX_NAMES, MAX_PEERS, OWNER_ONLY, PERSISTER_MESSAGES, Peers, Refused
from trainbus.proto import (BEST_EFFORT, DURABLE, Event, control, decode_control, encode_control, encode_event,
                            encode_replay_batch, event_from_map, pack)
from trainbus.proto import events as ev
from trainbus.proto.journal_format import closed_segments, iter_records

from helpers import fill

LIVENESS_S = 3.0
T0 = 1000.0  # the fake clock's start


# -- TokenBucket -------------------------------------------------------------------------------------


def test_a_bucket_starts_full_with_burst_seconds_of_its_rate():
    bucket = TokenBucket(10.0, now=T0)
    assert bucket.capacity == 10.0 * BURST_S
    assert sum(bucket.take(T0) for _ in range(100)) == int(10.0 * BURST_S)  # the burst, then nothing
    assert not bucket.take(T0)


def test_a_bucket_refills_at_its_rate_and_never_past_its_capacity():
    bucket = TokenBucket(10.0, now=T0)
    while bucket.take(T0):
        pass
    assert not bucket.take(T0 + 0.05)  # half a token
    assert bucket.take(T0 + 0.1)  # 0.5 + 0.5: one
    assert not bucket.take(T0 + 0.1)
    assert [bucket.take(T0 + 0.6) for _ in range(6)] == [True] * 5 + [False]  # 0.5 s: five tokens
    # an hour idle saves up the capacity, no more
    assert sum(bucket.take(T0 + 3600) for _ in range(1000)) == bucket.capacity


def test_a_refused_take_spends_nothing_and_cost_counts():
    bucket = TokenBucket(100.0, now=T0)  # capacity 200
    assert bucket.take(T0, cost=150)
    assert not bucket.take(T0, cost=60)  # 50 left
    assert bucket.tokens == pytest.approx(50)
    assert bucket.take(T0, cost=50)
    assert not bucket.take(T0 + 0.1, cost=11)  # +10
    assert bucket.take(T0 + 0.1, cost=10)


def test_a_tiny_rate_still_lets_one_through():
    bucket = TokenBucket(0.1, now=T0)  # 0.2 tokens of burst would admit nothing, ever
    assert bucket.capacity == 1.0
    assert bucket.take(T0) and not bucket.take(T0 + 5)
    assert bucket.take(T0 + 10)


def test_a_clock_that_goes_nowhere_gives_nothing():
    bucket = TokenBucket(5.0, now=T0)
    taken = sum(bucket.take(T0) for _ in range(20))
    assert taken == 10 and not any(bucket.take(T0) for _ in range(100))


# -- PeerBudget and truncate -------------------------------------------------------------------------


def test_the_byte_budget_holds_whatever_the_message_count():
    limits = PeerLimits(metrics_per_s=1000.0, bytes_per_s=1000.0)  # 2000 messages, 2000 bytes of burst
    budget = PeerBudget(limits, T0)
    assert budget.admit("metric", 1500, T0)
    assert not budget.admit("metric", 600, T0)  # 500 bytes left
    assert budget.admit("metric", 500, T0)
    assert not budget.admit("metric", 1, T0)
    assert not budget.admit("metric", 200, T0 + 0.1)  # 100 bytes back
    assert budget.admit("metric", 100, T0 + 0.1)
    assert budget.admit("metric", 1000, T0 + 1.1)  # a second: 1000 bytes


def test_one_message_larger_than_the_byte_bucket_passes_when_it_is_full_and_then_empties_it():
    budget = PeerBudget(PeerLimits(bytes_per_s=100.0), T0)  # capacity 200 bytes
    assert budget.admit("log", 10**6, T0)
    assert not budget.admit("log", 1, T0)
    assert budget.admit("log", 10**6, T0 + 2.0)  # full again after BURST_S


def test_a_message_the_byte_bucket_refuses_spends_no_count_token():
    budget = PeerBudget(PeerLimits(metrics_per_s=1.0, bytes_per_s=100.0), T0)  # 2 messages, 200 bytes
    assert budget.admit("metric", 200, T0)
    assert not budget.admit("metric", 50, T0)  # no bytes left: refused, and its count token is not spent either
    # half a second on: 50 bytes back and half a count token, so 1.5 left (0.5 if the refusal had spent one)
    assert budget.admit("metric", 50, T0 + 0.5)


def test_metric_and_log_messages_have_separate_count_buckets_and_share_the_bytes():
    limits = PeerLimits(metrics_per_s=1.0, logs_per_s=2.0, bytes_per_s=10**6)
    budget = PeerBudget(limits, T0)
    assert [budget.admit("metric", 1, T0) for _ in range(3)] == [True, True, False]  # capacity 2
    assert [budget.admit("log", 1, T0) for _ in range(5)] == [True] * 4 + [False]  # capacity 4
    shared = PeerBudget(PeerLimits(metrics_per_s=100.0, logs_per_s=100.0, bytes_per_s=50.0), T0)  # 100 bytes
    assert shared.admit("metric", 60, T0)
    assert not shared.admit("log", 60, T0)  # the metric took the log's bytes


def test_a_keys_metrics_and_logs_stop_at_what_they_may_add_to_the_journal_and_a_local_peers_never_do():
    """Rates bound a TCP key's journal growth per second, not in all: a monitor key at its byte budget (256 KiB/s)
    would fill 22 GB a day, and a full disk stops training. key_journal_mb bounds the total (payload + the event's
    own ~160 bytes); a local plugin, the user's own process, has no such total."""
    limits = PeerLimits(metrics_per_s=10**6, logs_per_s=10**6, bytes_per_s=10**9,
                        key_journal_mb=10 * (1000 + EVENT_JOURNAL_BYTES) / 2**20)  # room for ten 1,000-byte logs
    keyed, local = PeerBudget(limits, T0, keyed=True), PeerBudget(limits, T0)
    assert [keyed.admit("log", 1000, T0 + i) for i in range(11)] == [True] * 10 + [False]
    assert keyed.spent_out(1) and not keyed.admit("metric", 1, T0 + 3600)  # an hour on: a total, not a rate
    assert all(local.admit("log", 1000, T0 + i) for i in range(1000)) and not local.spent_out(10**12)


def test_truncate_marks_how_much_was_cut():
    assert truncate("short", 10) == ("short", False)
    assert truncate("x" * 10, 10) == ("x" * 10, False)
    long = "abcdefghij" * 30
    text, cut = truncate(long, 200)  # at most the limit, the marker included
    assert cut and len(text) == 200 and text == long[:174] + TRUNCATED.format(126), (len(text), text)
    assert text.endswith(" [... truncated 126 chars]")
    assert truncate(long, 12) == (long[:12], True)  # no room for the marker: the limit holds all the same


def test_a_cut_text_is_exactly_the_limit_long_whatever_the_digits_of_its_count():
    """PROTOCOL.md §7.1: a log text over 16,384 characters "is cut to that", a metric name to 200. A 20,000-character
    text came back 16,383 long: the marker was sized for "20000" and then said "3644", a digit shorter."""
    for length, limit in ((20_000, 16_384), (10_050, 10_000), (1_000_100, 1_000_000), (301, 200), (1_099, 1_000)):
        text, cut = truncate("T" * length, limit)
        kept = text.index(" [... truncated")
        assert cut and len(text) == limit, (length, limit, len(text))
        assert text.endswith(TRUNCATED.format(length - kept)), text[-40:]



def _worked(share: WorkShare, start: float, end: float, piece_s: float) -> tuple[float, int]:
    """A worker with endless work in pieces of `piece_s` that it cannot cut, polled as the bus thread polls: each
    round does pieces while its allowance lasts, and a round that is told to wait sleeps until resumes_at. Returns
    the seconds of work done and the rounds (wake-ups) it took."""
    now, worked, rounds = start, 0.0, 0
    while now < end:
        allowance = share.allowance(now)
        if allowance == 0:
            now = max(share.resumes_at(now), now + 1e-6)
            continue
        rounds += 1
        began = now
        while now - began < allowance:
            now += piece_s
        share.took(began, now)
        worked += now - began
    return worked, rounds


@pytest.mark.parametrize("piece_s", [10e-6, 400e-6, 0.03])
def test_work_held_to_a_share_takes_that_share_of_the_clock_in_a_few_rounds_a_second(piece_s):
    """The bus thread's TCP control reading (kernel/control_reading.py, REMOTE_CONTROL_SHARE) under a flood:
    whatever a message costs, the work takes its share of the time, give or take one piece and the saved-up burst,
    and it is woken a few times a second, not once per piece's worth of share."""
    share, resume_s, seconds = 0.05, 0.01, 600.0
    worked, rounds = _worked(WorkShare(share, resume_s, T0), T0, T0 + seconds, piece_s)
    assert share * seconds - 0.1 <= worked <= share * seconds + share * BURST_S + piece_s * rounds / 1000 + piece_s
    assert rounds <= seconds * share / resume_s + 1, rounds


def test_a_round_that_ran_over_is_paid_back_before_the_next():
    share = WorkShare(0.05, 0.01, T0)
    assert share.allowance(T0) == pytest.approx(0.05 * BURST_S)
    share.took(T0, T0 + 0.15)  # one piece of 0.15 s: 0.05 s over what there was
    assert share.allowance(T0 + 0.15) == 0 and share.waiting
    back = share.resumes_at(T0 + 0.15)  # the debt paid (0.05 s at 5 %: 1 s) and 0.01 s more saved up (0.2 s)
    assert back == pytest.approx(T0 + 0.15 + 1.0 + 0.2)
    assert share.allowance(back - 0.01) == 0  # still waiting: the debt paid, not yet 0.01 s back
    assert share.allowance(back) == pytest.approx(0.01) and not share.waiting
    assert share.resumes_at(back) == back


@pytest.mark.parametrize("stalled_s", [0.5, 1.0, 30.0])
def test_a_round_the_thread_was_stalled_in_owes_at_most_what_the_bucket_holds(stalled_s):
    """A round ends at its allowance bar one message (a few ms); one that lasted seconds was the bus thread not
    running (descheduled, a garbage collection, a disk holding a write up). Owed in full, the ipc control socket was
    left unread for 20 times the stall, the run's plugins' heartbeats, votes and acks with it. It owes one bucket at
    most: back in (capacity + resume) / share, 2.2 s at 5 %, however long the stall."""
    share = WorkShare(0.05, 0.01, T0)
    share.took(T0, T0 + stalled_s)
    assert share.allowance(T0 + stalled_s) == 0 and share.waiting
    assert share.resumes_at(T0 + stalled_s) == pytest.approx(T0 + stalled_s + (0.05 * BURST_S + 0.01) / 0.05)


def test_work_that_never_used_its_share_is_never_told_to_wait():
    share, now = WorkShare(0.05, 0.01, T0), T0
    for _ in range(10_000):  # 1 ms of work every 100 ms: 1 %
        assert share.allowance(now) > 0
        share.took(now, now + 0.001)
        now += 0.1
    assert not share.waiting


def test_a_paced_socket_is_unpolled_once_its_share_is_spent_polled_when_it_is_back_and_said_once_a_minute():
    """kernel/control_reading.py _pace: whether a control socket is polled follows its share
    (PacedReading.poll_changed), and a pause is said at most once every said_every_s with who sent the most since;
    new senders past SENDERS_MAX are not counted (a flood of connections each with a new routing id or name is not
    memory)."""
    paced = PacedReading(0.05, 0.01, 60.0, T0)
    for sender in ["hog"] * 5 + ["operator"]:
        paced.heard(sender)
    assert not paced.poll_changed(T0) and paced.polled
    paced.work.took(T0, T0 + 0.2)  # twice the saved-up 0.1 s: spent, and 0.1 s in debt
    assert paced.poll_changed(T0 + 0.2) and not paced.polled
    assert paced.to_say(T0 + 0.2) == (6, "hog", 5)
    assert paced.to_say(T0 + 30.0) is None  # said a minute at most
    back = paced.work.resumes_at(T0 + 0.2)
    assert not paced.poll_changed(back - 0.01) and paced.poll_changed(back) and paced.polled
    for number in range(2 * PacedReading.SENDERS_MAX):
        paced.heard(f"peer-{number}")
    assert len(paced.senders) == PacedReading.SENDERS_MAX
    assert paced.to_say(T0 + 60.2) == (PacedReading.SENDERS_MAX, "peer-0", 1)


# -- Peers: hello ------------------------------------------------------------------------------------


class FakeSupervision:
    """The supervisor as Peers sees it: spawned names with the pid of their live process (None while down)."""

    def __init__(self, **current: int | None):
        self.current = dict(current)  # spawned name -> live pid, or None
        self.restarting: set[str] = set()  # spawned names that are down and will be started again
        self.seen_calls: list[tuple[str, int, float]] = []
        self.still_starting: list[str] = []  # spawned names that have not said hello yet

    def starting(self) -> list[str]:
        return list(self.still_starting)

    def unannounced(self) -> list[str]:
        return list(self.still_starting)

    def spawned(self, name: str) -> bool:
        return name in self.current

    def is_current(self, name: str, pid: int) -> bool:
        return self.current.get(name) is not None and self.current[name] == pid

    def coming_back(self, name: str) -> bool:
        return name in self.current and (self.current[name] is not None or name in self.restarting)

    def seen(self, name: str, pid: int, now: float) -> None:
        self.seen_calls.append((name, pid, now))

    def hello_not_taken(self, name: str, why: str) -> None:
        pass


def hello(name: str, pid: int, secret: str, delivery: str = DURABLE, replies=("stop", "metric"), votes=(),
          capabilities=()) -> dict:
    """A hello as the codec hands it to the kernel (checked against its schema)."""
    return control("hello", name=name, pid=pid, subscriptions=[""], replies=list(replies), delivery=delivery,
                   votes=list(votes), capabilities=list(capabilities), secret=secret)


@pytest.fixture
def table():
    credentials = Credentials()
    supervision = FakeSupervision(trainer_log=101, checkpoint=202)
    return Peers(credentials, supervision, PeerLimits(), LIVENESS_S), credentials, supervision


def refusal(peers: Peers, identity: bytes, message: dict, now: float = T0) -> Refused:
    with pytest.raises(Refused) as caught:
        peers.welcome(identity, message, now)
    return caught.value


def test_a_spawned_plugin_with_its_own_token_is_welcomed(table):
    peers, credentials, supervision = table
    peer = peers.welcome(b"a", hello("trainer_log", 101, credentials.token_for("trainer_log")), T0)
    assert peer.spawned and peer.name == "trainer_log" and peers.get(b"a") is peer
    assert supervision.seen_calls == [("trainer_log", 101, T0)]  # the hello is a sign of life
    assert peers.welcomed_names() == {"trainer_log"}


def test_a_wrong_or_missing_secret_is_refused(table):
    peers, credentials, _ = table
    wrong = refusal(peers, b"a", hello("trainer_log", 101, "0" * 64))
    assert wrong.code == "hello_secret" and "wrong secret" in str(wrong)
    missing = refusal(peers, b"a", hello("trainer_log", 101, ""))
    assert missing.code == "hello_secret" and "no secret" in str(missing)
    # another plugin's token proves nothing about this name
    other = refusal(peers, b"a", hello("trainer_log", 101, credentials.token_for("checkpoint")))
    assert other.code == "hello_secret"
    # a token of another run's credentials neither
    assert refusal(peers, b"a", hello("trainer_log", 101, Credentials().token_for("trainer_log"))).code == "hello_secret"
    assert peers.get(b"a") is None and not peers.welcomed_names()


def test_the_attach_token_takes_free_names_only(table):
    peers, credentials, _ = table
    refused = refusal(peers, b"a", hello("checkpoint", 202, credentials.attach_token()))
    assert refused.code == "hello_name_spawned" and "belongs to a plugin this run spawned" in str(refused)
    peer = peers.welcome(b"b", hello("by_hand", 999, credentials.attach_token()), T0)
    assert not peer.spawned and peers.welcomed_names() == {"by_hand"}


def test_a_spawned_name_from_a_process_the_kernel_did_not_start_is_refused(table):
    peers, credentials, _ = table
    refused = refusal(peers, b"a", hello("trainer_log", 55, credentials.token_for("trainer_log")))
    assert refused.code == "hello_pid"


def test_a_name_held_by_a_live_peer_is_refused_and_a_dead_holder_is_replaced(table):
    peers, credentials, supervision = table
    attach = credentials.attach_token()
    first = peers.welcome(b"first", hello("by_hand", 1, attach), T0)
    taken = refusal(peers, b"second", hello("by_hand", 2, attach), T0 + LIVENESS_S - 0.1)
    assert taken.code == "hello_name_taken"
    assert peers.welcome(b"first", hello("by_hand", 1, attach), T0 + 1) is not first  # the holder itself may say hello again
    # silent past the liveness window: the name goes to the newcomer, the old connection is dropped
    second = peers.welcome(b"second", hello("by_hand", 2, attach), T0 + 1 + LIVENESS_S + 0.1)
    assert peers.get(b"second") is second and peers.get(b"first") is None
    # a spawned plugin restarted: its old process is not current any more, the new one takes the name
    token = credentials.token_for("checkpoint")
    peers.welcome(b"old", hello("checkpoint", 202, token), T0)
    supervision.current["checkpoint"] = 303
    new = peers.welcome(b"new", hello("checkpoint", 303, token), T0 + 0.5)
    assert peers.get(b"new") is new and peers.get(b"old") is None


def test_the_peer_table_is_bounded_and_dead_peers_make_room(table):
    peers, credentials, _ = table
    attach = credentials.attach_token()
    for i in range(MAX_PEERS):
        peers.welcome(b"p%d" % i, hello(f"p{i}", i, attach), T0)
    full = refusal(peers, b"late", hello("late", 7, attach), T0 + 1)
    assert full.code == "hello_table_full"
    peers.welcome(b"p0", hello("p0", 0, attach), T0 + 1)  # one already in the table is no newcomer
    # the rest fall silent; past twice the liveness window they are forgotten and the newcomer fits
    peers.seen(peers.get(b"p1"), T0 + 2 * LIVENESS_S + 1)
    late = peers.welcome(b"late", hello("late", 7, attach), T0 + 2 * LIVENESS_S + 1.5)
    assert peers.get(b"late") is late
    assert {p.name for p in peers} == {"p1", "late"}
    # those the hello made room by dropping went silent without a bye: the bus's next call reports them, once
    assert {p.name for p in peers.forget_dead(T0 + 2 * LIVENESS_S + 2)} == {f"p{i}" for i in range(MAX_PEERS)} - {"p1"}
    assert peers.forget_dead(T0 + 2 * LIVENESS_S + 2) == []


@pytest.mark.parametrize("remote", [False, True])
def test_an_attached_peers_silence_counts_while_its_socket_is_read_alone(tmp_path, remote):
    """The bus thread leaves a control socket unread while its share of the thread's time is spent
    (kernel/control_reading.py), up to 2.2 s, and records until when it read each one (heard_at, heard_remote_at):
    a peer's heartbeats waiting on it meanwhile are not silence, and the other socket's reading is not its."""
    key = ClientKey("k", "control", "K" * 40, tmp_path / "k.key")
    credentials = Credentials(OneKey(key))
    peers = Peers(credentials, FakeSupervision(), PeerLimits(), LIVENESS_S)
    peer = peers.welcome(b"p", hello("watcher", 8, "" if remote else credentials.attach_token()), T0,
                         user_id=key.public if remote else "")
    unread, read = ("heard_remote_at", "heard_at") if remote else ("heard_at", "heard_remote_at")
    setattr(peers, unread, T0 + 1.0)  # its socket was read last then
    setattr(peers, read, T0 + 3 * LIVENESS_S)  # the other one since
    assert peers.is_live(peer, T0 + 3 * LIVENESS_S) and peers.forget_dead(T0 + 3 * LIVENESS_S) == []
    setattr(peers, unread, T0 + LIVENESS_S)  # read again: silent for a window
    assert not peers.is_live(peer, T0 + 3 * LIVENESS_S)
    assert peers.forget_dead(T0 + 3 * LIVENESS_S) == []  # silent for less than twice the window, as it was heard
    setattr(peers, unread, T0 + 2 * LIVENESS_S + 0.01)
    assert peers.forget_dead(T0 + 3 * LIVENESS_S) == [peer]


def test_forget_dead_drops_gone_connections_and_keeps_their_positions(table):
    peers, credentials, supervision = table
    attach = credentials.attach_token()
    spawned = peers.welcome(b"s", hello("checkpoint", 202, credentials.token_for("checkpoint")), T0)
    attached = peers.welcome(b"h", hello("by_hand", 9, attach), T0)
    peers.ack(spawned, 5, published_seq=10)
    peers.ack(attached, 4, published_seq=10)
    assert peers.forget_dead(T0 + LIVENESS_S + 1) == []  # attached: silent, not yet twice the window; spawned: current
    assert {p.name for p in peers} == {"checkpoint", "by_hand"}
    assert peers.forget_dead(T0 + 2 * LIVENESS_S + 1) == [attached]  # gone without a bye: the bus says so
    assert {p.name for p in peers} == {"checkpoint"}
    supervision.current["checkpoint"] = None  # its process died
    assert peers.forget_dead(T0 + 2 * LIVENESS_S + 1) == []  # the supervisor tells a spawned one's end
    assert not list(peers)
    assert peers.position("checkpoint") == 5 and peers.position("by_hand") == 4  # names keep where they were
    # and a spawned plugin on its way back is still waited for, one that failed is not
    supervision.restarting.add("checkpoint")
    assert peers.durable_behind(10, T0 + 10) == {"checkpoint": 5}
    supervision.restarting.clear()
    assert peers.durable_behind(10, T0 + 10) == {}


def test_a_peer_attached_by_hand_holds_snapshot_buffers_and_the_drain_only_while_live(table):
    """PROTOCOL.md 6.3 and 8: a snapshot buffer (Checkpointer.slot_free asks Peers.named) and the end-of-run drain
    (durable_behind) wait for the persisters and durable plugins that may still return: a spawned one while its
    process runs or is being restarted, one attached by hand only while it is live, since no process of the
    kernel's comes back for it and its replacement is welcomed only once that window has passed (2)."""
    peers, credentials, supervision = table
    spawned = peers.welcome(b"s", hello("checkpoint", 202, credentials.token_for("checkpoint"),
                                        capabilities=["checkpoint"]), T0)
    by_hand = peers.welcome(b"h", hello("by_hand", 9, credentials.attach_token(), capabilities=["checkpoint"]), T0)
    peers.welcome(b"m", hello("watcher", 10, credentials.attach_token(), delivery=BEST_EFFORT), T0)  # neither
    peers.ack(spawned, 5, published_seq=10)
    peers.ack(by_hand, 4, published_seq=10)
    persisters = lambda now: sorted(p.name for p in peers.named("checkpoint", now))  # noqa: E731
    assert persisters(T0 + LIVENESS_S - 0.1) == ["by_hand", "checkpoint"]
    assert peers.durable_behind(10, T0 + LIVENESS_S - 0.1) == {"checkpoint": 5, "by_hand": 4}
    # silent for the window (the kernel reading its socket all along): it holds neither a buffer nor the drain
    assert persisters(T0 + LIVENESS_S + 0.1) == ["checkpoint"]
    assert peers.durable_behind(10, T0 + LIVENESS_S + 0.1) == {"checkpoint": 5}
    supervision.current["checkpoint"] = None  # its process died, and the supervisor restarts it
    supervision.restarting.add("checkpoint")
    assert persisters(T0 + 10 * LIVENESS_S) == ["checkpoint"]
    supervision.restarting.clear()  # given up: nothing comes back for its buffers
    assert persisters(T0 + 10 * LIVENESS_S) == [] and peers.durable_behind(10, T0 + 10 * LIVENESS_S) == {}


def test_remembered_names_are_bounded_oldest_first(table):
    peers, credentials, _ = table
    attach = credentials.attach_token()
    for i in range(MAX_NAMES + 1):
        now = T0 + i * 10 * LIVENESS_S  # each earlier peer is long dead by the next hello
        peer = peers.welcome(b"n%d" % i, hello(f"n{i}", i, attach), now)
        peers.ack(peer, i + 1, published_seq=10**6)
        peers.forget_dead(now)
    assert peers.position("n0") == 0  # forgotten
    assert peers.position("n1") == 2 and peers.position(f"n{MAX_NAMES}") == MAX_NAMES + 1


# -- Peers: acks and grants --------------------------------------------------------------------------


def test_an_ack_moves_only_the_peers_own_position_and_never_past_what_was_published(table):
    peers, credentials, supervision = table
    a = peers.welcome(b"a", hello("trainer_log", 101, credentials.token_for("trainer_log")), T0)
    b = peers.welcome(b"b", hello("checkpoint", 202, credentials.token_for("checkpoint")), T0)
    live = peers.welcome(b"c", hello("live", 3, credentials.attach_token(), delivery=BEST_EFFORT), T0)

    peers.ack(a, 10**9, published_seq=7)  # an ack from the future: clamped
    assert a.acked == 7 and peers.position("trainer_log") == 7
    assert b.acked == 0 and peers.position("checkpoint") == 0  # nobody else moved
    peers.ack(a, 3, published_seq=20)  # going back does not move it back
    assert peers.position("trainer_log") == 7
    peers.ack(a, 12, published_seq=20)
    assert peers.position("trainer_log") == 12 and peers.resume_from(a, 21) == 13
    peers.ack(live, 15, published_seq=20)
    assert live.acked == 15 and "live" not in peers.positions  # best-effort: no durable position
    assert peers.resume_from(live, 21) == 21
    # its restarted process resumes after the name's position, whatever its new connection acked
    supervision.current["trainer_log"] = 111
    again = peers.welcome(b"a2", hello("trainer_log", 111, credentials.token_for("trainer_log")), T0 + 1)
    assert again.acked == 0 and peers.resume_from(again, 21) == 13


def test_a_peer_may_send_only_what_its_hello_declared(table):
    peers, credentials, _ = table
    plain = peers.welcome(b"a", hello("trainer_log", 101, credentials.token_for("trainer_log"), replies=["metric"]), T0)
    for kind in ALWAYS_ALLOWED | {"metric"}:
        peers.check_allowed(plain, kind)
    for kind in ("stop", "log", "checkpoint_now"):
        with pytest.raises(Refused) as caught:
            peers.check_allowed(plain, kind)
        assert caught.value.code == "not_declared" and kind in str(caught.value)
    for kind in PERSISTER_MESSAGES:
        with pytest.raises(Refused) as caught:
            peers.check_allowed(plain, kind)
        assert caught.value.code == "not_persister"
    persister = peers.welcome(b"b", hello("checkpoint", 202, credentials.token_for("checkpoint"), replies=[],
                                          capabilities=["checkpoint"]), T0)
    for kind in PERSISTER_MESSAGES:
        peers.check_allowed(persister, kind)  # the capability grants them, no reply declaration needed
    with pytest.raises(Refused):
        peers.check_allowed(persister, "stop")


class RefusalWire:
    """What the dispatcher's refusals need of the bus: its counters, and the messages sent back to peers."""

    def __init__(self):
        self.counters: collections.Counter = collections.Counter()
        self.sent: list[tuple[bytes, dict]] = []

    def send(self, identity: bytes, raw: bytes) -> None:
        self.sent.append((identity, decode_control(raw)))


def test_a_refusal_is_told_for_each_message_type_outside_the_grant(table):
    """PROTOCOL.md §7.2: told once a second per peer, reason and message type: an undeclared stop right after an
    undeclared metric is told too (keyed on the reason's code alone, the stop went unanswered)."""
    peers, credentials, supervision = table
    wire = RefusalWire()
    dispatcher = Dispatcher(wire, supervision, peers)
    peers.welcome(b"a", hello("trainer_log", 101, credentials.token_for("trainer_log"), replies=["log"]),
                  time.monotonic())
    for kind, fields in (("metric", dict(name="m", value=1.0, step=None)), ("stop", dict(reason="r"))):
        dispatcher.handle(b"a", encode_control(control(kind, **fields)))
    told = [m["reason"] for identity, m in wire.sent if identity == b"a" and m["type"] == "refused"]
    assert len(told) == 2 and "metric" in told[0] and "stop" in told[1], told
    assert wire.counters["refused_not_declared"] == 2


def test_a_malformed_message_or_one_of_a_kernel_type_is_a_sign_of_life_too(table):
    """PROTOCOL.md §8: any control message counts as a sign of life (zguide: treat any incoming data as a heartbeat).
    One the kernel drops as malformed (a NaN metric), or a kernel-to-plugin type it only counts, still came from
    that live connection: a peer attached by hand sending only such messages every half second was forgotten as
    "silent for 6 s", and a spawned one would be declared hung."""
    peers, credentials, supervision = table
    wire = RefusalWire()
    dispatcher = Dispatcher(wire, supervision, peers)
    long_ago = time.monotonic() - 100 * LIVENESS_S
    by_hand = peers.welcome(b"a", hello("by_hand", 7, credentials.attach_token()), long_ago)
    peers.welcome(b"s", hello("trainer_log", 101, credentials.token_for("trainer_log")), long_ago)
    malformed = msgpack.packb({"v": 1, "type": "metric", "name": "m", "value": float("nan"), "step": None})
    unexpected = encode_control(control("welcome", run="r", heartbeat_interval_s=1.0, resume_from=1))
    for raw in (malformed, unexpected):
        by_hand.last_seen = long_ago
        supervision.seen_calls.clear()
        dispatcher.handle(b"a", raw)
        dispatcher.handle(b"s", raw)
        assert peers.is_live(by_hand, time.monotonic()), raw
        assert [call[:2] for call in supervision.seen_calls] == [("trainer_log", 101)], raw
    dispatcher.handle(b"stranger", malformed)  # from a connection never welcomed: nobody's sign of life
    assert wire.counters["malformed"] == 3 and wire.counters["unexpected"] == 2, wire.counters
    assert not wire.sent, "a malformed message is answered by nothing (§11)"


class OneKey:
    """A key ring holding one authorized client key (kernel/keys.py KeyRing's lookup)."""

    def __init__(self, key: ClientKey):
        self.key = key

    def lookup(self, public: str, now: float | None = None) -> ClientKey | None:
        return self.key if public == self.key.public else None


def test_only_the_runs_owner_may_attach_or_detach_plugins(tmp_path):
    """The owner is a local peer proving itself with the attach credential; a spawned plugin (its own token) and a
    remote key (even a control one) are refused, with welcome_lost false."""
    control_key = ClientKey("pilot", "control", "K" * 40, tmp_path / "pilot.key")
    credentials = Credentials(OneKey(control_key))
    peers = Peers(credentials, FakeSupervision(trainer_log=101), PeerLimits(), LIVENESS_S)
    owner = peers.welcome(b"o", hello("cli", 7, credentials.attach_token(), replies=[]), T0)
    spawned = peers.welcome(b"s", hello("trainer_log", 101, credentials.token_for("trainer_log")), T0)
    remote = peers.welcome(b"r", hello("pilot_peer", 8, "", replies=["stop"]), T0, user_id=control_key.public)
    for kind in OWNER_ONLY:
        peers.check_allowed(owner, kind)  # no reply declaration needed: the credential is the grant
        for peer in (spawned, remote):
            with pytest.raises(Refused) as caught:
                peers.check_allowed(peer, kind)
            assert caught.value.code == "not_owner" and not caught.value.welcome_lost
    peers.check_allowed(remote, "stop")  # what its role allows it still may


def test_a_hellos_votes_are_kept_as_the_types_the_kernel_waits_at_only(table):
    """voters_behind runs at every check of a vote wait: a 100k-entry votes list (~256 KiB hello) must not make
    each check walk it. Only the types the kernel waits at mean anything; duplicates collapse (PROTOCOL.md §7.1)."""
    peers, credentials, _ = table
    votes = ["end_epoch"] * 50_000 + [f"t{i}" for i in range(50_000)]
    peer = peers.welcome(b"v", hello("voter", 8, credentials.attach_token(), votes=votes), T0)
    assert sorted(peer.votes) == sorted(ev.VOTED_EVENTS)
    assert peers.voters_behind("end_epoch", 5, T0) == ["voter"] and peers.voters_behind("t7", 5, T0) == []


@pytest.mark.parametrize("role, counted", [("monitor", False), ("control", True)])
def test_only_a_control_keys_votes_make_the_kernel_wait(tmp_path, role, counted):
    """A vote holds training at that event (up to vote_timeout_s): a monitor key watches, it does not hold the run."""
    key = ClientKey("k", role, "K" * 40, tmp_path / "k.key")
    peers = Peers(Credentials(OneKey(key)), FakeSupervision(), PeerLimits(), LIVENESS_S)
    peers.welcome(b"r", hello("voter", 8, "", replies=[], votes=["end_epoch"]), T0, user_id=key.public)
    assert peers.voters_behind("end_epoch", 5, T0) == (["voter"] if counted else [])
    assert peers.has_voters("end_epoch") is counted


# -- Bus: replies nobody takes ------------------------------------------------------------------------


def served_bus(journal: Journal, tmp_path: Path, credentials: Credentials | None = None,
               limits: PeerLimits | None = None):
    """The real bus on `journal`, its peers and dispatcher, serving (its sockets bound, driven by the caller, not
    started): (bus, credentials, peers, dispatcher)."""
    credentials, supervision = credentials or Credentials(), FakeSupervision()
    bus = Bus("run-x", journal, tmp_path, 1.0)
    peers = Peers(credentials, supervision, limits or PeerLimits(), LIVENESS_S)
    dispatcher = Dispatcher(bus, supervision, peers)
    bus.serve(supervision, dispatcher)
    return bus, credentials, peers, dispatcher


def reader(ctx: zmq.Context, bus: Bus, credentials: Credentials) -> zmq.Socket:
    """A DEALER that sent its hello, as `reader`, to a served bus (which the caller drives to read it)."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"reader")
    dealer.connect(bus.control_endpoint)
    dealer.send(encode_control(hello("reader", 1, credentials.attach_token())))
    return dealer


def read_until_replay_asked(bus: Bus, peers: Peers) -> None:
    """Drive a served bus's reading until `reader` is welcomed and its replay request is read (at most 10 s)."""
    deadline = time.monotonic() + 10
    while (peer := peers.get(LOCAL + b"reader")) is None or peer.replay_from is None:
        assert time.monotonic() < deadline, "the bus did not read the hello and replay within 10 s"
        bus.router.poll(20)
        bus.reading.read(CONTROL_PER_WAKE)


def test_a_key_saying_hello_under_ever_new_names_leaves_no_count_of_theirs_behind(tmp_path):
    """The per-plugin counts the run's summary gives (errors logged, checkpoints failed, metrics and logs dropped past
    [limits]) were kept for any peer's name: a monitor key saying hello under a new name each time, its one budget
    spent, added an entry a name to the dropped table for the kernel's life. They are the run's own plugins' now,
    which the summary lists; a key's drops are counted in the bus's counters as before. The real bus and dispatcher,
    fed as the bus thread feeds them (not started)."""
    key = ClientKey("watcher", "monitor", "K" * 40, tmp_path / "k.key")
    bus, _, _, dispatcher = served_bus(Journal(tmp_path / "events"), tmp_path, Credentials(OneKey(key)),
                                       PeerLimits(metrics_per_s=1.0, logs_per_s=1.0))
    try:
        for number in range(300):
            identity = REMOTE + f"c{number}".encode()
            for message in [hello(f"name-{number}", 8, "", replies=["metric", "log"]),
                            *[control("metric", name="m", value=1.0, step=None)] * 3,
                            *[control("log", level="error", text="e")] * 3, control("bye", reason="done")]:
                dispatcher.handle(identity, encode_control(message), user_id=key.public)
        assert bus.counters["metric_dropped"] > 800 and bus.counters["log_dropped"] > 800, bus.counters
        assert not dispatcher.dropped and not dispatcher.errors_logged, (len(dispatcher.dropped),
                                                                        len(dispatcher.errors_logged))
    finally:
        bus.ctx.destroy(linger=0)  # bus.close() joins the bus thread, never started here


def test_a_reply_to_a_gone_or_stalled_peer_is_counted_unroutable_and_dropped(tmp_path):
    """PROTOCOL.md §11 [C72]: the bus thread, which shares training's GIL, never waits on a peer and never fails for
    one. A reply to a welcomed peer whose connection is gone, or whose queue is full because it stopped reading, is
    counted `unroutable` (summary.json's `bus`) and dropped, not queued for later: the peer asks again, and a peer
    that reads gets its replies all along. The real bus's sockets and dispatcher against real DEALERs, driven from
    this thread as the bus thread drives them (not started); the replay budget's clock is a parameter."""
    journal = Journal(tmp_path / "events")
    # ~16 KB a reply: what libzmq moves from the ROUTER's queue to the socket buffers (a few hundred KB) is far from
    # the half of SNDHWM (1000) that would make room in the queue, so a peer that reads nothing stays full
    journal.append([record(seq, 4000) for seq in range(1, 5)], 1)
    bus, credentials, peers, dispatcher = served_bus(journal, tmp_path)
    ctx = zmq.Context()
    clock = [time.monotonic()]

    def until(done) -> None:
        """Rounds of the bus thread's control reading until done() (10 s at most)."""
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, "the bus did not get there within 10 s"
            bus.router.poll(20)
            bus.reading.read(CONTROL_PER_WAKE)

    def connect(name: str, **options: int) -> tuple[zmq.Socket, object]:
        """A DEALER welcomed under `name` (its welcome read), and its peer."""
        dealer = ctx.socket(zmq.DEALER)
        for option, value in {"LINGER": 0, "ROUTING_ID": name.encode(), **options}.items():
            dealer.setsockopt(getattr(zmq, option), value)
        dealer.connect(bus.control_endpoint)
        dealer.send(encode_control(hello(name, 1, credentials.attach_token())))
        until(lambda: peers.get(LOCAL + name.encode()) is not None)
        assert dealer.poll(10_000) and decode_control(dealer.recv())["type"] == "welcome"
        return dealer, peers.get(LOCAL + name.encode())

    def replay(dealer: zmq.Socket, peer) -> None:
        """The peer asks for a replay; the bus serves it (a later round, within the replay budget)."""
        dealer.send(encode_control(control("replay", from_seq=1)))
        until(lambda: peer.replay_from is not None)
        clock[0] += 1.0
        dispatcher.serve_replays(clock[0])
        assert peer.replay_from is None

    def batches(dealer: zmq.Socket, expected: int) -> int:
        """The replay batches that reach this peer, each whole (every event from seq 1): as many as expected (10 s at
        most for each), then any more that come within 0.2 s."""
        count = 0
        while dealer.poll(10_000 if count < expected else 200):
            assert [e.seq for e in decode_control(dealer.recv())["events"]] == [1, 2, 3, 4]
            count += 1
        return count

    reader, reader_peer = connect("reader")
    stalled, stalled_peer = connect("stalled", RCVHWM=1)
    gone, gone_peer = connect("gone")
    try:
        # stalled: it asks, and reads no more; its queue fills (the ROUTER's SNDHWM and the socket buffers) ...
        served = 0
        while not bus.counters["unroutable"]:
            assert served < 5000, "a peer that reads nothing took 5000 replies"
            replay(stalled, stalled_peer)
            served += 1
        for _ in range(5):  # ... and what does not fit is dropped, each counted, with no wait and no error
            replay(stalled, stalled_peer)
        assert bus.counters["unroutable"] == 6, served
        replay(reader, reader_peer)  # a peer that reads is served meanwhile
        assert batches(reader, 1) == 1
        # what was counted never arrives: the stalled peer reads again and finds exactly what fitted
        assert batches(stalled, served - 1) == served - 1
        replay(stalled, stalled_peer)  # and it asks again
        assert batches(stalled, 1) == 1 and bus.counters["unroutable"] == 6

        # gone: its connection closed after it asked; libzmq's I/O thread tells the ROUTER soon after (until then a
        # reply goes down the dying connection), and from then on each reply to it is counted
        gone.send(encode_control(control("replay", from_seq=1)))
        until(lambda: gone_peer.replay_from is not None)
        gone.close()
        deadline, probe = time.monotonic() + 10, encode_control(control("refused", reason="probe", welcome_lost=True))
        while bus.counters["unroutable"] == 6:
            assert time.monotonic() < deadline, "a reply to a closed connection was not counted within 10 s"
            bus.router.poll(20)
            bus.send(gone_peer.identity, probe)
        unroutable = bus.counters["unroutable"]
        clock[0] += 1.0
        dispatcher.serve_replays(clock[0])  # its replay, asked before it went
        assert gone_peer.replay_from is None and bus.counters["unroutable"] == unroutable + 1
        replay(reader, reader_peer)
        assert batches(reader, 1) == 1
    finally:
        ctx.destroy(linger=0)
        bus.ctx.destroy(linger=0)  # bus.close() joins the bus thread, never started here
        journal.close()


@pytest.mark.parametrize("open_segment", [False, True], ids=["ends a closed segment", "ends in the open segment"])
def test_a_replay_batch_that_begins_after_a_lost_segment_and_reaches_the_end_says_done(tmp_path, open_segment):
    """PROTOCOL.md §12: a batch may begin after the seq asked for, where a damaged journal goes on; `done` says it
    reaches the last event published. It was reckoned from the seq asked for, so such a batch said not done and the
    client asked again for an empty round trip (or, when nothing followed, for empty batches, never done)."""
    path = tmp_path / "events"
    journal = Journal(path, segment_bytes=8 * 1024)  # ~1 KB records: segments of 8
    for seq in range(1, 41):  # a flush at a time: segments of 8, the last (33-40) closed at close
        journal.append([record(seq)], seq)
    journal.close()
    segments = closed_segments(path)
    if not open_segment:  # found missing as the journal opens: a replay into 25-32 is served 33-40, the end
        lost = segments[-2]
        lost.path.unlink()
    journal = Journal(path, segment_bytes=8 * 1024)
    if open_segment:  # found gone as it is read: a replay into 33-40 is served 41-42 (the open segment), the end
        journal.append([record(41), record(42)], 41)
        lost = segments[-1]
        lost.path.unlink()
    last = journal.written_seq
    bus, credentials, peers, dispatcher = served_bus(journal, tmp_path)
    ctx = zmq.Context()
    try:
        dealer = reader(ctx, bus, credentials)
        dealer.send(encode_control(control("replay", from_seq=lost.first + 1)))
        read_until_replay_asked(bus, peers)
        dispatcher.serve_replays(time.monotonic() + 1.0)
        messages = []
        while dealer.poll(10_000 if len(messages) < 2 else 0):
            messages.append(decode_control(dealer.recv()))
        batch = messages[-1]
        assert [m["type"] for m in messages] == ["welcome", "replay_batch"], messages
        seqs = [e.seq for e in batch["events"]]
        assert seqs[0] == lost.last + 1 and seqs[-1] == last, seqs
        assert batch["done"] is True
    finally:
        ctx.destroy(linger=0)
        bus.ctx.destroy(linger=0)  # bus.close() joins the bus thread, never started here
        journal.close()


# -- Credentials -------------------------------------------------------------------------------------


def test_the_attach_file_is_owner_only_whatever_the_umask(tmp_path):
    credentials = Credentials()
    old = os.umask(0)
    try:
        path = credentials.write_attach_file(tmp_path)
    finally:
        os.umask(old)
    assert path == tmp_path / CREDENTIAL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == credentials.attach_token() + "\n"
    assert credentials.check("any_free_name", path.read_text().strip(), spawned=False) is None
    # A continued run replaces it, and never writes through a link planted in its place.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("untouched")
    path.unlink()
    path.symlink_to(elsewhere)
    again = Credentials()
    again.write_attach_file(tmp_path)
    assert not path.is_symlink() and path.read_text() == again.attach_token() + "\n"
    assert elsewhere.read_text() == "untouched"


def test_tokens_differ_per_name_and_per_run():
    one, two = Credentials(), Credentials()
    assert one.token_for("a") != one.token_for("b") != one.attach_token()
    assert one.token_for("a") != two.token_for("a")
    assert one.token_for("a") == one.token_for("a")


# -- replay batches from journal bytes ---------------------------------------------------------------


def sample_events(n: int, run: str = "run-x") -> list[bytes]:
    kinds = ["end_training_batch", "metric", "log", "heartbeat", "end_epoch"]
    return [encode_event(Event(seq, run, kinds[seq % len(kinds)], 1.7e9 + seq / 7, seq * 3, seq // 10,
                               {"loss": seq / 3, "text": "é" * (seq % 4), "nested": {"xs": list(range(seq % 5))},
                                "none": None, "flag": seq % 2 == 0}))
            for seq in range(1, n + 1)]


@pytest.mark.parametrize("from_seq,max_events,max_bytes", [(1, 512, 1 << 22), (5, 7, 1 << 22), (1, 512, 600),
                                                         (30, 512, 1 << 22), (31, 512, 1 << 22), (99, 3, 1)])
def test_a_replay_batch_decodes_to_the_journals_events(tmp_path, from_seq, max_events, max_bytes):
    raws = sample_events(30)
    journal = Journal(tmp_path / "events")
    assert journal.append(raws, 1) == 30
    count, blob = journal.read_range(from_seq, max_events, max_bytes)
    expected = [event_from_map(m) for m in decode_records(b"".join(raws))][from_seq - 1:from_seq - 1 + count]
    assert count == len(expected) and (count == 0) == (from_seq > 30)
    for done in (True, False):
        raw = encode_replay_batch(count, blob, done)
        message = decode_control(raw)
        assert message["type"] == "replay_batch" and message["done"] is done
        assert message["events"] == expected
        # the same bytes as packing the decoded maps: splicing is only a shortcut
        maps = [msgpack.unpackb(r, raw=False) for r in raws[from_seq - 1:from_seq - 1 + count]]
        assert raw == pack({"v": 1, "type": "replay_batch", "done": done, "events": maps})
    journal.close()


def test_an_empty_replay_batch_is_valid():
    message = decode_control(encode_replay_batch(0, b"", True))
    assert message["events"] == [] and message["done"] is True


# -- the journal on a full disk ----------------------------------------------------------------------


def record(seq: int, size: int = 1000) -> bytes:
    return encode_event(Event(seq, "r", "metric", 1.5, seq, 1, {"name": "x", "value": seq / 3, "pad": "p" * size}))


def assert_whole(path: Path, seqs: list[int]) -> None:
    """The file holds exactly these seqs, whole, and ends at the last one's end."""
    records = list(iter_records(path))
    assert [r["seq"] for _, _, r in records] == seqs
    assert path.stat().st_size == (records[-1][1] if records else 0)
    with open(path, "rb") as f:
        assert [m["seq"] for m in msgpack.Unpacker(f, raw=False)] == seqs


def test_an_append_on_a_full_disk_keeps_the_file_whole_and_the_events_in_memory_until_space_returns(mount_tmpfs):
    disk = mount_tmpfs("journal", 64 << 10)
    path = disk / "events"
    journal = Journal(path, backlog_max_bytes=5000)
    assert journal.append([record(s) for s in range(1, 11)], 1) == 10  # ~10 KB: the last page part-used
    size = path.stat().st_size
    assert size % 4096, "the journal's last page must have room left, for a torn write to be possible"
    filler = fill(disk)

    # 4 KB that do not fit: the write is cut back to the last whole record, the events wait
    assert journal.append([record(s) for s in range(11, 15)], 11) == 0
    assert journal.error is not None and journal.error.errno == errno.ENOSPC
    assert (journal.written_seq, journal.last_seq) == (10, 14)
    assert_whole(path, list(range(1, 11)))
    assert journal.read_range(11, 10, 1 << 20) == (0, b"")  # nothing unwritten is ever served
    assert not journal.overflowing
    with pytest.raises(ValueError, match="journal gap"):  # numbering goes on behind the backlog
        journal.append([record(11)], 11)

    time.sleep(RETRY_INTERVAL_S + 0.05)
    assert journal.append([record(15), record(16)], 15) == 0  # tried again: still full
    assert_whole(path, list(range(1, 11)))
    assert journal.overflowing  # ~6 KB held, over the 5000-byte bound
    message = journal.overflow_message()
    assert str(path) in message and "No space left on device" in message
    assert "[run] journal_backlog_mb" in message and "[run] runs_dir" in message

    filler.unlink()
    time.sleep(RETRY_INTERVAL_S + 0.05)
    assert journal.append([record(17)], 17) == 7  # the backlog, oldest first, and the new one
    assert journal.error is None and journal.backlog_bytes == 0 and not journal.overflowing
    assert (journal.written_seq, journal.last_seq) == (17, 17)
    assert_whole(path, list(range(1, 18)))
    assert [e.seq for e in read_events(path)] == list(range(1, 18))
    count, blob = journal.read_range(11, 100, 1 << 20)
    assert count == 7 and [m["seq"] for m in decode_records(blob)] == list(range(11, 18))
    assert journal.close() is None

    reopened = Journal(path)  # and it reopens where it ended
    assert reopened.last_seq == 17
    reopened.close()


def test_appends_between_retries_only_queue(mount_tmpfs):
    disk = mount_tmpfs("journal", 32 << 10)
    path = disk / "events"
    journal = Journal(path)
    journal.append([record(1, 3000)], 1)
    filler = fill(disk)
    assert journal.append([record(2, 3000)], 2) == 0
    filler.unlink()  # space is back, but the next try waits for the retry interval
    assert journal.append([record(3)], 3) == 0
    assert journal.last_seq == 3 and journal.written_seq == 1
    time.sleep(RETRY_INTERVAL_S + 0.05)
    assert journal.append([], 4) == 2  # an empty append is a retry
    assert_whole(path, [1, 2, 3])
    journal.close()


def test_close_on_a_disk_that_stays_full_returns_the_error_and_leaves_whole_records(mount_tmpfs, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the events the disk refused are kept
    disk = mount_tmpfs("journal", 32 << 10)
    path = disk / "events"
    journal = Journal(path)
    journal.append([record(s) for s in range(1, 6)], 1)
    fill(disk)
    assert journal.append([record(s) for s in range(6, 12)], 6) == 0
    time.sleep(RETRY_INTERVAL_S + 0.05)  # close tries once more, and the disk still refuses
    error = journal.close()
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert journal.close() is error  # closing twice is harmless
    assert_whole(path, [1, 2, 3, 4, 5])
    kept = journal.kept_elsewhere  # not lost: rejoined at the next open (tests/test_disk_full.py)
    assert [r["seq"] for _, _, r in iter_records(kept)] == list(range(6, 12))
    kept.unlink()
    assert Journal(path).last_seq == 5
