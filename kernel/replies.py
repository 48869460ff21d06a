"""Replies become intentions: one pure function merges them, the loop acts on the result at a step boundary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Reply:
    """A reply the training loop acts on at a step boundary."""

    type: str  # stop | checkpoint_now
    plugin: str
    reason: str


@dataclass(frozen=True)
class Control:
    """What the loop should do at the next step boundary. A fresh Control (all False) each boundary."""

    should_stop: bool = False  # finish this batch, then end_training_loop ... end_training_session
    checkpoint_now: bool = False  # take a checkpoint snapshot at this boundary
    reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: stop: reason" of each stop, in arrival order
    checkpoint_reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: reason" of each checkpoint_now


NO_CONTROL = Control()  # the usual step boundary: nothing asked; shared so the hot path builds nothing


def merge_replies(replies) -> Control:
    """Any stop wins; any checkpoint_now asks for one checkpoint; each kind keeps its own reasons."""
    stops = tuple(f"{r.plugin}: stop: {r.reason}" for r in replies if r.type == "stop")
    checkpoints = tuple(f"{r.plugin}: {r.reason}" for r in replies if r.type == "checkpoint_now")
    return Control(should_stop=bool(stops), checkpoint_now=bool(checkpoints), reasons=stops,
                   checkpoint_reasons=checkpoints)
