"""Votes (PROTOCOL.md §7.3): at a voted event the training thread waits, at most the vote's time, until every live
voter acked it; who did not is said, counted, and not waited for again until it acks what it missed."""

from __future__ import annotations

import collections
import logging
import time

from trainbus.proto import events as ev

log = logging.getLogger("trainbus.kernel")


class Votes:
    """The bus's votes: `missed` counts, per plugin name, the votes it did not ack in time (summary.json)."""

    def __init__(self, bus):
        self.bus = bus
        self.missed: collections.Counter = collections.Counter()

    def wait(self, type_: str, timeout_s: float, flush_wait_s: float) -> list[str]:
        """Wait until every live plugin voting at `type_` acked its latest instance; return who did not.
        `flush_wait_s`: how long a flush may take to number it (the bus's flush_now wait)."""
        bus = self.bus
        peers = bus.control.peers
        if timeout_s <= 0 or not peers.has_voters(type_):
            return []
        # The vote is at the seq a flush gives the event. Until one has numbered it the latest of its type is the one
        # before, which every voter acked long ago: a flush held up past flush_now's wait (an fsync behind a
        # checkpoint being written) is waited for within the vote's time too, and what it leaves is the vote's.
        out, end = bus.doorbell.ring(), time.monotonic() + flush_wait_s + timeout_s
        if not bus.wait(out.is_set, end - time.monotonic()):
            late = [p.name for p in peers if type_ in p.votes and peers.is_live(p, time.monotonic())]
            log.warning("no vote from %s at %s: no flush numbered it within %.3g s (the journal's disk?); training "
                        "went on", ", ".join(late), type_, flush_wait_s + timeout_s)
            if late:  # kernel.log is no one's console: the journal's event is what the console and `runs show` read
                self.missed.update(late)
                bus.emit(ev.VOTE_MISSED, {"plugins": late, "at": type_, "seq": 0,
                                          "timeout_s": flush_wait_s + timeout_s})
            return late
        seq = bus.numbering.last_seq_of.get(type_, 0)
        bus.wait(lambda: not peers.voters_behind(type_, seq, time.monotonic()), min(timeout_s, end - time.monotonic()))
        late = peers.voters_behind(type_, seq, time.monotonic())
        if late:
            peers.mark_missed_vote(late, seq)
            log.warning("no vote from %s at %s (seq %d) within vote_timeout_s (%.3g s): training went on, and waits "
                        "for no vote of theirs until they ack seq %d", ", ".join(late), type_, seq, timeout_s, seq)
            # kernel.log is no one's console: the journal's event is what the console and `runs show` read
            self.missed.update(late)
            bus.emit(ev.VOTE_MISSED, {"plugins": late, "at": type_, "seq": seq, "timeout_s": timeout_s})
        return late
