"""Plugins that load torch and whose setup (or constructor) raises, in a process whose interpreter teardown takes
minutes: a module-level finalizer waits, as torch's teardown takes seconds at nice 10 on a busy box."""

import time

import torch  # noqa: F401  -- as a real plugin that fails in setup would have it loaded

from trainbus.sdk import Plugin

TEARDOWN_S = 600.0  # longer than any test waits: an exit that runs the interpreter's teardown is not seen


class _SlowAtTeardown:
    def __del__(self):
        time.sleep(TEARDOWN_S)


_held = _SlowAtTeardown()  # finalized only by the interpreter's teardown of this module


class SetupFails(Plugin):
    """Raises in setup, every time it is started."""

    def setup(self) -> None:
        raise RuntimeError("setup fails on purpose")


class InitFails(Plugin):
    """Raises in its constructor, before any socket."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raise RuntimeError("constructor fails on purpose")
