"""A plugin author's frames, not ours: tracebacks and stacks with the SDK's own frames (and runpy's) left out in front.

A handler's failure used to show `python -m`'s runpy frames, then the runner's and Plugin.handle's, before the one
line the author needs."""

from __future__ import annotations

import os
import traceback
from types import FrameType, TracebackType
from typing import Any

import trainbus.proto

_SDK_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# The protocol's checks raise for the SDK what an author's line asked of it (a NaN metric, an unknown log level):
# ours too, or the console named `codec.py:272 in _check_metric` as the place to fix.
_PROTO_DIR = os.path.dirname(os.path.abspath(trainbus.proto.__file__)) + os.sep


def _ours(entry: traceback.FrameSummary) -> bool:
    return entry.filename.startswith((_SDK_DIR, _PROTO_DIR, "<frozen runpy>"))


def _theirs(stack: traceback.StackSummary, to_their_last: bool = False) -> traceback.StackSummary:
    """`stack` from the first frame that is not ours (to_their_last: through the last such frame, leaving out where
    the SDK raised what the author's line asked of it: context.model, a reply it refuses); all of it when every frame
    is ours (the SDK's own bug)."""
    theirs = [i for i, entry in enumerate(stack) if not _ours(entry)]
    if not theirs:
        return stack
    return traceback.StackSummary.from_list(stack[theirs[0]:theirs[-1] + 1 if to_their_last else len(stack)])


def user_traceback(exc: BaseException, called: Any = None) -> str:
    """Python's traceback of `exc` (chained causes included), the SDK's frames before the author's first and after
    their last left out.

    called: the author's function the SDK called (a handler). When the exception has none of the author's frames, the
    call itself failed (`def on_end_epoch(self):`, given the event: a TypeError raised before its first line), and
    the traceback ended in Plugin.handle, which the console named as where it happened: the function's own `def`
    line is added as its innermost frame, the place to fix."""
    shown = traceback.TracebackException.from_exception(exc)
    shown.stack = _theirs(shown.stack, to_their_last=True)
    code = getattr(called, "__code__", None)
    if code is not None and all(_ours(entry) for entry in shown.stack) and not code.co_filename.startswith(_SDK_DIR):
        # the author's frames start (and end) there: ours that led to the call are no place to fix
        shown.stack = traceback.StackSummary.from_list(
            [traceback.FrameSummary(code.co_filename, code.co_firstlineno, code.co_name)])
    return "".join(shown.format()).rstrip()


def user_stack(frame: FrameType) -> str:
    """Where a thread is now, outermost first, from the first frame that is not ours ("" when nothing is known)."""
    return "".join(_theirs(traceback.extract_stack(frame)).format()).rstrip()


def from_authors_frames(exc: BaseException, called: Any = None) -> TracebackType | None:
    """`exc`'s traceback from the author's first frame to their last: a handler's exception as a plugin's test sees it
    out of a Harness, as user_traceback shows it in a run (all of it when every frame is ours, the SDK's own bug).

    called: the author's function the SDK called. When the call itself failed (none of the author's frames), there is
    no frame of theirs to show: a note names the function's `def` line, the place to fix, and no frame is left."""
    entries = []
    tb = exc.__traceback__
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    theirs = [entry for entry in entries if not entry.tb_frame.f_code.co_filename.startswith((_SDK_DIR, _PROTO_DIR))]
    if theirs:
        theirs[-1].tb_next = None  # where the SDK raised what their line asked of it: a NaN metric, context.model
        return theirs[0]
    code = getattr(called, "__code__", None)
    if code is not None and not code.co_filename.startswith(_SDK_DIR):
        exc.add_note(f"(at {code.co_filename}:{code.co_firstlineno} in {code.co_name}, its def line)")
        return None
    return exc.__traceback__
