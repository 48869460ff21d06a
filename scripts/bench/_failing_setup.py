"""A plugin that imports torch and whose setup raises (scripts/bench/plugin_restart.py): its exit is timed."""

import torch  # noqa: F401  -- what makes the interpreter's teardown slow

from trainbus.sdk import Plugin


class FailingSetup(Plugin):
    def setup(self) -> None:
        raise RuntimeError("setup fails on purpose")
