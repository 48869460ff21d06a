"""The stall watch (kernel/stall_watch.py) on the bus thread: moved by the loop's events as they are numbered,
ticked at each heartbeat, and a stall said in kernel.log and as `training_stalled`, with where the loop waits."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from trainbus.proto import events as ev

from .rank_stacks import described
from .user_errors import is_user_file
from .stall_watch import StallWatch, thread_stack

log = logging.getLogger("trainbus.kernel")


class LoopWatch:
    """`stalled_after_s`: the loop reaching no seam this long is said, with where it waits (0: never); `emit`
    publishes a kernel event (Bus.emit)."""

    def __init__(self, stalled_after_s: float, emit: Callable[[str, dict[str, Any]], None]):
        self.stall_watch = StallWatch(stalled_after_s)
        self.emit = emit
        # Under torchrun: where the other ranks of this machine wait (kernel/rank_stacks.py), asked at a stall
        self.ask_other_ranks: Callable[[], list[dict[str, Any]]] | None = None
        self.training_thread: int | None = None  # the thread that started the bus: the loop's
        self._last_loop_event = ""

    def started(self) -> None:
        """Called on the training thread as it starts the bus: whose stack a stall shows."""
        self.training_thread = threading.get_ident()

    def moved(self, batch: list, final: bool) -> None:
        """The loop's events (those with a step) move the stall watch; the first after a stall that was said is
        followed by training_resumed, numbered right behind it."""
        first = next((i for i, item in enumerate(batch) if item[2] is not None), None)
        if first is None:
            return
        self._last_loop_event = next(item[0] for item in reversed(batch) if item[2] is not None)
        stalled_s = self.stall_watch.moved(time.monotonic())
        if stalled_s is not None:
            log.warning("training moved again (%s) after standing still for %.0f s", batch[first][0], stalled_s)
            batch.insert(first + 1, (ev.TRAINING_RESUMED, time.time(), None, None,
                                     {"stalled_s": round(stalled_s, 1), "event": batch[first][0]}))
        if final:
            self.stall_watch.ended()

    def tick(self, now: float) -> None:
        """At each heartbeat: a stall that reached stalled_after_s is said, once."""
        stalled_s = self.stall_watch.tick(now)
        if stalled_s is not None:
            self._say_stalled(stalled_s)

    def _say_stalled(self, stalled_s: float) -> None:
        stack, where = thread_stack(self.training_thread, is_user_file)
        ranks = self.ask_other_ranks() if self.ask_other_ranks is not None else []
        others = "".join(f"\n{described(rank)}" for rank in ranks)
        log.warning("training has stood still for %.0f s (after %s)%s; its thread's stack:\n%s%s", stalled_s,
                    self._last_loop_event, f" in your code at {where}" if where else "", "".join(stack) or "-",
                    others)
        self.emit(ev.TRAINING_STALLED, {"stalled_s": round(stalled_s, 1), "after": self._last_loop_event,
                                        "where": where, "stack": stack, **({"ranks": ranks} if ranks else {})})
