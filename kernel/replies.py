"""Replies become intentions: one pure function merges them, the loop acts on the result at a step boundary."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Control:
    """What the loop should do at the next step boundary. A fresh Control (all False) each boundary."""

    should_stop: bool = False  # finish this batch, then end_training_loop ... end_training_session
    checkpoint_now: bool = False  # take a checkpoint snapshot at this boundary
    reasons: tuple[str, ...] = field(default_factory=tuple)  # "plugin: reason", for events and the summary


NO_CONTROL = Control()  # the usual step boundary: nothing asked; shared so the hot path builds nothing


def merge_replies(replies) -> Control:
    """Any stop wins; any checkpoint_now asks for one checkpoint; reasons are kept in arrival order."""
    stop = any(r.type == "stop" for r in replies)
    checkpoint = any(r.type == "checkpoint_now" for r in replies)
    reasons = tuple(f"{r.plugin}: {r.type}: {r.reason}" for r in replies)
    return Control(should_stop=stop, checkpoint_now=checkpoint, reasons=reasons)
