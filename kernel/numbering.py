"""Numbers events: each queued event its seq and counts (`n`), encoded once for the journal and every socket, and
folded into the run's state. The bus thread's alone (kernel/bus.py)."""

from __future__ import annotations

import collections
from typing import Callable

from trainbus.proto import Event, ProtocolError, decode_event, encode_event, events as ev
from trainbus.proto.codec import MAX_MESSAGE_BYTES, N_COUNTS, new_packer
from trainbus.proto.run_state import RunState

from .journal import Journal

# The loop's per-step events carry only numbers it made (batch index and size, losses, counts): their bytes
# need no decode to prove a peer can read them. 2 us of the bus thread's GIL an event, each step twice.
STEP_EVENTS = frozenset({ev.START_TRAINING_BATCH, ev.END_TRAINING_BATCH})
FINAL_EVENTS = frozenset({ev.END_TRAINING_SESSION, ev.RUN_FAILED})


class Numbering:
    """Where the run's numbering stands. `on_final()` is called as the final event is numbered, `on_checkpoint(seq,
    data)` as a save_checkpoint is, `on_error(where)` from the handler of an exception an event survives."""

    def __init__(self, run_id: str, journal: Journal, on_final: Callable[[], None],
                 on_checkpoint: Callable[[int, dict], None], on_error: Callable[[str], None]):
        self.run_id = run_id
        self.on_final, self.on_checkpoint, self.on_error = on_final, on_checkpoint, on_error
        self.last_seq = journal.last_seq  # the last seq numbered
        self.position = (0, 0)  # (step, epoch) of the latest numbered event, for kernel events
        self.final_seq = 0  # seq of end_training_session or run_failed: what durable plugins drain to
        self.last_seq_of: dict[str, int] = {}  # event type -> seq of its latest instance
        self._counts = counts_at_end(journal)  # every envelope's `n`: per-batch events numbered so far in the run
        # What a `snapshot` answers (trainbus attach): every numbered event folded in, here on the bus thread.
        self.run_state = RunState(run_id, journal.last_seq)
        self._packer = new_packer()  # the bus thread's own: it encodes every event

    def number(self, batch: list, unpublished: collections.deque) -> list[bytes]:
        """`batch`'s events, (type, ts, step, epoch, data) each, numbered from last_seq + 1: their records, in order,
        each also appended to `unpublished` as (topic, record)."""
        records, counts = [], self._counts
        for type_, ts, step, epoch, data in batch:
            # A seq is taken only together with its record: an exception here (a kernel bug) costs its event, never
            # a gap in the journal, whose append would refuse every later batch (no event published again).
            try:
                if step is None:  # a kernel event (emit): where the event before it left the loop
                    step, epoch = self.position
                    if type_ == ev.METRIC and data["step"] is None:  # reported without a step: the kernel's
                        data["step"], data["epoch"] = step, epoch        # as it arrived (a step alone: epoch nil)
                seq, n, counted = self.last_seq + 1, counts[:], ev.COUNTED_INDEX.get(type_)
                if counted is not None:
                    n[counted] += 1
                event = Event.fast(seq, self.run_id, type_, ts, step, epoch, data, n)
                try:
                    raw = encode_event(event, check=type_ not in STEP_EVENTS, packer=self._packer)
                except ProtocolError as exc:  # a user metric of an odd type: keep the seq, say why
                    event = Event(seq, self.run_id, type_, ts, step, epoch,
                                  {"error": f"event data not encodable: {exc}"}, n=n)
                    raw = encode_event(event)
                records.append(raw)
                unpublished.append((type_.encode(), raw))
                self.last_seq = seq
                if counted is not None:
                    counts[counted] += 1
                self.last_seq_of[type_] = seq
                if type_ in FINAL_EVENTS:
                    self.final_seq = seq
                    self.on_final()
                self.position = (step, epoch)
                self.run_state.fold(event)
                if type_ == ev.SAVE_CHECKPOINT:
                    self.on_checkpoint(seq, data)
            except Exception:
                self.on_error(f"numbering a {type_} event")
        return records


def counts_at_end(journal: Journal) -> list[int]:
    """The `n` of the journal's last event, where a continued run's numbering goes on; zeros for a new journal (or
    one written before `n`: a plugin then sees its counts start afresh, does not take them for proof, and replays)."""
    if journal.written_seq >= 1:
        count, blob = journal.read_range(journal.written_seq, 1, MAX_MESSAGE_BYTES)
        if count:
            n = decode_event(blob).n
            if n is not None:
                return list(n)
    return [0] * N_COUNTS
