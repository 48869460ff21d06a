"""Which events of a replay batch a plugin takes, and when a replay asked for is asked again: the durable plugin's
runner (runner.py) and attach's client (attach.py) read replays alike."""

from __future__ import annotations

from typing import Any, Iterator

from trainbus.proto import Event

from .plugin_io import say

# A replay asked for and not answered in this long is asked for again: its answer was lost on the way (a connection
# dropped with it in flight, or the kernel could not route it). The kernel answers within a round of its bus thread
# (a closed segment's batch in ~50 ms, docs/benchmarks.md); a request repeated replaces the one it holds.
REPLAY_RESEND_S = 5.0


def skip_lost(batch: dict[str, Any], next_seq: int, who: str) -> int:
    """The seq to go on from after a replay batch: the batch's first when it begins after next_seq, which the
    kernel does only for events its journal lost (a segment deleted or garbled: PROTOCOL.md §12), said once, or
    compacted away (the batch says `compacted`: §13), said not at all."""
    events = batch["events"]
    if events and events[0].seq > next_seq:
        if not batch.get("compacted"):
            say(f"{who} events {next_seq}-{events[0].seq - 1} are lost from the run's journal: going on without "
                f"them")
        return events[0].seq
    return next_seq


def events_to_take(batch: dict[str, Any], next_seq: int, who: str) -> Iterator[Event]:
    """A replay batch's events to take, in order, for a reader that has taken every seq before next_seq (and goes
    on from each event it takes): past the loss skip_lost says, each at the next seq or, in a compacted batch (whose
    seqs jump over what compaction dropped), any after it. Repeats already taken are left out."""
    next_seq = skip_lost(batch, next_seq, who)
    compacted = bool(batch.get("compacted"))
    for event in batch["events"]:
        if event.seq == next_seq or (compacted and event.seq > next_seq):
            yield event
            next_seq = event.seq + 1
