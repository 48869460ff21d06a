"""Replies become intentions: one pure function merges them, the loop acts on the result at a step boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainbus.proto.run_state import MAX_STOP_REASONS


@dataclass
class Reply:
    """A reply the training loop acts on at a step boundary."""

    type: str  # stop | checkpoint_now
    plugin: str
    reason: str
    more: int = 0  # of its kind that came after it, not kept (kernel/bus.py PENDING_REPLIES_MAX)


@dataclass(frozen=True)
class Control:
    """What the loop should do at the next step boundary. A fresh Control (all False) each boundary."""

    should_stop: bool = False  # finish this batch, then end_training_loop ... end_training_session
    checkpoint_now: bool = False  # take a checkpoint snapshot at this boundary
    reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: stop: reason" of each stop, in arrival order
    checkpoint_reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: reason" of each checkpoint_now


NO_CONTROL = Control()  # the usual step boundary: nothing asked; shared so the hot path builds nothing


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
