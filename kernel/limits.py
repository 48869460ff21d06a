"""What one peer may cost the kernel: rate buckets and size caps for metric, log and replay traffic."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from trainbus.proto.text import TRUNCATED

# Per-peer defaults ([limits] in the run's config overrides each). A monitor reports a few readings a
# second and a logger a few lines; ten times that is still far below what costs training anything
# (docs/benchmarks.md, "Hostile peers"), while a flood is cut at the bucket.
METRICS_PER_S = 200.0
LOGS_PER_S = 50.0
BYTES_PER_S = 256 * 1024  # metric + log payload bytes: a byte budget, whatever the message count
REPLAY_BATCHES_PER_S = 50.0  # 50 x 512 events: a crashed durable plugin still catches up at 25k events/s
BURST_S = 2.0  # a bucket holds this many seconds of its rate: short bursts pass untouched
# What one TCP key's metric and log messages may add to the journal over a kernel's life (MB): its byte budget
# is a rate, and a monitor key at it (256 KiB/s) would fill 22 GB a day until the run's disk was full, which stops
# training. A remote GPU monitor reporting 4 readings a second journals ~70 MB a day: two months to reach it.
KEY_JOURNAL_MB = 4096.0
EVENT_JOURNAL_BYTES = 160  # what a metric or log event costs the journal besides its name or text (envelope, fields)
METRIC_NAME_MAX_CHARS = 200
LOG_TEXT_MAX_CHARS = 16 * 1024  # a long traceback fits


@dataclass
class PeerLimits:
    """The configured per-peer limits; one instance per run, shared by every peer's buckets."""

    metrics_per_s: float = METRICS_PER_S
    logs_per_s: float = LOGS_PER_S
    bytes_per_s: float = BYTES_PER_S
    replay_batches_per_s: float = REPLAY_BATCHES_PER_S
    metric_name_max_chars: int = METRIC_NAME_MAX_CHARS
    log_text_max_chars: int = LOG_TEXT_MAX_CHARS
    key_journal_mb: float = KEY_JOURNAL_MB


class TokenBucket:
    """`rate` tokens a second, at most `rate * BURST_S` saved up (at least one token, unless `capacity` says what).
    Time is a parameter (tests pass a fake clock)."""

    def __init__(self, rate: float, now: float, capacity: float | None = None):
        self.rate = rate
        self.capacity = max(1.0, rate * BURST_S) if capacity is None else capacity
        self.tokens = self.capacity
        self.updated = now

    def refill(self, now: float) -> float:
        """The tokens there are at `now` (what has come back since the last look added)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are that many; False (nothing spent) otherwise."""
        if self.refill(now) < cost:
            return False
        self.tokens -= cost
        return True


class PeerBudget:
    """One peer's buckets: metric and log messages, their bytes, replay batches, and the lines its replies make; a TCP
    key's (`keyed`), also what its messages may add to the journal in all (key_journal_mb)."""

    def __init__(self, limits: PeerLimits, now: float, keyed: bool = False):
        self.limits = limits
        self.metrics = TokenBucket(limits.metrics_per_s, now)
        self.logs = TokenBucket(limits.logs_per_s, now)
        self.bytes = TokenBucket(limits.bytes_per_s, now)
        self.replays = TokenBucket(limits.replay_batches_per_s, now)
        self.journal_left = limits.key_journal_mb * 2**20 if keyed else None  # bytes; None: a local peer, no total
        self.said_spent_out = False
        # kernel.log's line for each stop and checkpoint_now of a remote key (kernel/control.py): at a log message's
        # rate, as each is a line too; a control key sending checkpoint_now in a loop wrote ~5 MB of them a second
        self.reply_lines = TokenBucket(limits.logs_per_s, now)

    def admit(self, kind: str, nbytes: int, now: float) -> bool:
        """A metric or log message of `nbytes` payload may go through (both its buckets had room, and the key's
        journal total). A refused one spends nothing: a count token spent on a message the byte bucket refused would
        starve the next one."""
        bucket, cost = self.metrics if kind == "metric" else self.logs, min(nbytes, self.bytes.capacity)
        journaled = nbytes + EVENT_JOURNAL_BYTES
        if bucket.refill(now) < 1 or self.bytes.refill(now) < cost or self.spent_out(journaled):
            return False
        bucket.tokens -= 1
        self.bytes.tokens -= cost
        if self.journal_left is not None:
            self.journal_left -= journaled
        return True

    def spent_out(self, journaled: int = 0) -> bool:
        """The key's journal total cannot take `journaled` more bytes (a local peer's never runs out)."""
        return self.journal_left is not None and self.journal_left < journaled


class WorkShare:
    """One kind of work held to `share` of the wall clock, up to BURST_S seconds' worth of it at once. Each round
    takes what `allowance` says; one that ran over (a piece of work cannot be cut) is paid back by waiting. Once the
    share is spent the work waits until `resume_s` of it is back: woken for each piece's worth of share, the rounds
    would cost more than the work. Time is a parameter (tests pass a fake clock)."""

    def __init__(self, share: float, resume_s: float, now: float):
        # seconds of work it may do now (below 0: a debt); a share below one second a second saves up less than one
        self.seconds = TokenBucket(share, now, capacity=share * BURST_S)
        self.resume_s = min(resume_s, self.seconds.capacity)
        self.waiting = False

    def allowance(self, now: float) -> float:
        """Seconds the work may take from `now` on: 0 while it waits."""
        left = self.seconds.refill(now)
        self.waiting = self.waiting and left < self.resume_s
        return 0.0 if self.waiting else left

    def took(self, started: float, ended: float) -> None:
        """A round of the work ran from `started` to `ended`: one that left less than `resume_s` waits for it.
        It owes at most what the bucket holds: a round ends at its allowance bar the piece it was doing (a control
        message: a few ms at most, docs/benchmarks.md), so a longer one was the thread not running (descheduled on a
        busy box, a garbage collection, a write its disk held up). Owed in full, a 1 s stall left the run's control
        socket unread for 18 s at 5 %, its plugins' votes, acks and heartbeats waiting with it."""
        self.seconds.refill(ended)
        self.seconds.tokens = max(self.seconds.tokens - (ended - started), -self.seconds.capacity)
        self.waiting = self.seconds.tokens < self.resume_s

    def resumes_at(self, now: float) -> float:
        """When the work may go on: `now` unless it waits."""
        if self.allowance(now) > 0:
            return now
        return now + (self.resume_s - self.seconds.tokens) / self.seconds.rate


class PacedReading:
    """A control socket read for at most a share of the bus thread's time (WorkShare): whether it is polled now, and
    who sent the most since its being held back was last said. Time is a parameter (tests pass a fake clock)."""

    SENDERS_MAX = 256  # senders counted between two sayings (keys, peer names): a flood of new ones is not memory

    def __init__(self, share: float, resume_s: float, said_every_s: float, now: float):
        self.work = WorkShare(share, resume_s, now)
        self.polled = True
        self.senders: collections.Counter = collections.Counter()
        self._said_every_s = said_every_s
        self._said_at = now - said_every_s

    def heard(self, sender: Any) -> None:
        if sender in self.senders or len(self.senders) < self.SENDERS_MAX:
            self.senders[sender] += 1

    def poll_changed(self, now: float) -> bool:
        """True when whether the socket is polled (`polled`, updated) changed: its share ran out, or came back."""
        polled = self.work.allowance(now) > 0
        changed, self.polled = polled != self.polled, polled
        return changed

    def to_say(self, now: float) -> tuple[int, Any, int] | None:
        """(messages counted since last said, the sender of most of them, how many) when a pause is to be said now,
        at most once every said_every_s; None otherwise."""
        if now - self._said_at < self._said_every_s:
            return None
        self._said_at = now
        top, count = (self.senders.most_common(1) or [(None, 0)])[0]
        total = sum(self.senders.values())
        self.senders.clear()
        return total, top, count


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to at most max_chars, the marker saying how much was cut included; (text, was_truncated)."""
    if len(text) <= max_chars:
        return text, False
    marker = TRUNCATED.format(len(text))  # as long as any marker this text can get
    if len(marker) >= max_chars:  # a limit too small for a marker: the cut alone
        return text[:max_chars], True
    keep = max_chars - len(marker)
    # the count it says, len(text) - keep, can have fewer digits than len(text): keep a character more for each, so
    # the cut is the limit long (PROTOCOL.md: "cut to that"); each step adds 0 or 1 to the length, never more
    while keep + len(TRUNCATED.format(len(text) - keep)) < max_chars:
        keep += 1
    return text[:keep] + TRUNCATED.format(len(text) - keep), True
