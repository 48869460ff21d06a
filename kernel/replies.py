"""Replies become intentions: held until the loop's next step boundary, merged there by one pure function."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from trainbus.proto.run_state import MAX_STOP_REASONS


@dataclass
class Reply:
    """A reply the training loop acts on at a step boundary."""

    type: str  # stop | checkpoint_now
    plugin: str
    reason: str
    more: int = 0  # of its kind that came after it, not kept (PENDING_REPLIES_MAX)


@dataclass(frozen=True)
class Control:
    """What the loop should do at the next step boundary. A fresh Control (all False) each boundary."""

    should_stop: bool = False  # finish this batch, then end_training_loop ... end_training_session
    checkpoint_now: bool = False  # take a checkpoint snapshot at this boundary
    reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: stop: reason" of each stop, in arrival order
    checkpoint_reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: reason" of each checkpoint_now


NO_CONTROL = Control()  # the usual step boundary: nothing asked; shared so the hot path builds nothing
PENDING_REPLIES_MAX = 64  # stops, and checkpoint_nows, held for the next step boundary (which lists MAX_STOP_REASONS)


class HeldReplies:
    """The stops and checkpoint_nows for the loop's next step boundary: the bus thread adds, the training thread
    takes (the Bus hands out both methods as its own, `reply` and `take_replies`)."""

    def __init__(self):
        # each kind at most PENDING_REPLIES_MAX
        self._stops: collections.deque[Reply] = collections.deque()
        self._checkpoint_asks: collections.deque[Reply] = collections.deque()

    def add(self, type_: str, plugin: str, reason: str) -> None:
        """A stop or checkpoint_now for the loop's next step boundary. Past PENDING_REPLIES_MAX of its kind, it is
        counted on the last one queued (Reply.more), whose boundary says how many more came: each was held until
        then, and a peer that may stop the run sending them through a long validation grew the kernel by GBs."""
        pending = self._stops if type_ == "stop" else self._checkpoint_asks
        if len(pending) < PENDING_REPLIES_MAX:
            pending.append(Reply(type_, plugin, reason))
            return
        try:
            pending[-1].more += 1
        except IndexError:  # taken by the boundary this instant: the one it would have joined is being acted on
            pass

    def take(self) -> list[Reply]:
        """Called at every step boundary: the empty case is two truth tests (~100 ns)."""
        if not self._stops and not self._checkpoint_asks:
            return []
        # the bus thread only appends
        return [pending.popleft() for pending in (self._stops, self._checkpoint_asks) for _ in range(len(pending))]


def merge_replies(replies) -> Control:
    """Any stop wins; any checkpoint_now asks for one checkpoint; each kind keeps its own reasons, the first
    MAX_STOP_REASONS distinct ones and one saying how many more came. All of them, summary.json's stop_reasons, the
    registry's row, `runs show` and a daemon's status were 30 MB each after a peer that may stop the run sent 30,000
    stops of 1,000 characters while a step lasted."""
    stops = _first(f"{r.plugin}: stop: {r.reason}" for r in replies if r.type == "stop")
    more = max(0, len(stops) - MAX_STOP_REASONS) + sum(r.more for r in replies if r.type == "stop")
    if more > 0:
        stops = (*stops[:MAX_STOP_REASONS], f"kernel: stop: {more:,} more stop requests at this step boundary, not "
                                            f"listed")
    checkpoints = _first(f"{r.plugin}: {r.reason}" for r in replies if r.type == "checkpoint_now")
    return Control(should_stop=bool(stops), checkpoint_now=bool(checkpoints), reasons=stops,
                   checkpoint_reasons=checkpoints[:MAX_STOP_REASONS])


def _first(reasons) -> tuple[str, ...]:
    """The reasons in arrival order, each once: a client resending its stop (a reconnect) says it once."""
    return tuple(dict.fromkeys(reasons))
