"""Says when the training loop stops moving (no seam reached for `[run] stalled_after_s`) and where its thread waits.

A multi-day run that hangs (a DataLoader worker deadlocked, a collective waiting on a rank that froze, a filesystem
that stopped answering) keeps its kernel alive: heartbeats go on, plugins see nothing wrong, and the run burns its
allocation doing nothing. The bus thread, which sees every event the loop publishes, notices instead, publishes
`training_stalled` with the training thread's stack, and `training_resumed` if the loop moves again.
"""

from __future__ import annotations

import linecache
import sys

STACK_FRAMES_MAX = 40  # the innermost; outer frames (the CLI, the session) say nothing about the wait


class StallWatch:
    """The loop's progress against a deadline, driven by the bus thread's clock: `moved(now)` at each loop event,
    `tick(now)` at each heartbeat. Quiet until the loop's first event and after its final one."""

    def __init__(self, after_s: float):
        self.after_s = after_s  # 0: never said
        self.last_moved: float | None = None  # None: before the loop's first event, or after its last
        self.said_at_move: float | None = None  # the last move before a stall that was said (until it moves)

    def moved(self, now: float) -> float | None:
        """The loop reached a seam. Returns how long it stood still when that stall was said, else None."""
        stalled = None if self.said_at_move is None else now - self.said_at_move
        self.last_moved, self.said_at_move = now, None
        return stalled

    def ended(self) -> None:
        """The loop's final event: what follows (draining plugins) is not training standing still."""
        self.last_moved = self.said_at_move = None

    def tick(self, now: float) -> float | None:
        """Seconds the loop has stood still, the first time that reaches after_s (once a stall); else None."""
        if not self.after_s or self.last_moved is None or self.said_at_move is not None:
            return None
        if now - self.last_moved < self.after_s:
            return None
        self.said_at_move = self.last_moved
        return now - self.last_moved


def thread_stack(thread_id: int | None, is_user_file) -> tuple[list[str], str]:
    """The thread's stack as Python formats frames (innermost last) and where in the user's code it is ("FILE, line
    N", the innermost of their frames; "" when none is theirs).

    No file is read: a source line is shown only when Python has it cached already. The stall may be a file system
    that stopped answering, and the bus thread, which calls this, must not hang on it too."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    frames = []
    while frame is not None and len(frames) < STACK_FRAMES_MAX:
        frames.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    frames.reverse()
    lines, where = [], ""
    for filename, lineno, name in frames:
        cached = linecache.cache.get(filename)
        source = cached[2][lineno - 1].strip() if cached and len(cached) > 2 and 0 < lineno <= len(cached[2]) else ""
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n' + (f"    {source}\n" if source else ""))
        if not filename.startswith("<") and is_user_file(filename):
            where = f"{filename}, line {lineno}"
    return lines, where
