"""A plugin with a bug scripts/bench/control_flood.py --from plugin measures: a thread reporting a metric in a loop."""

from __future__ import annotations

import threading

from trainbus.sdk import Plugin


class Spammer(Plugin):
    """Reports a metric as fast as it can from a thread of its own, from its setup on."""

    def on_start_training_session(self, event) -> None:
        pass

    def setup(self) -> None:
        threading.Thread(target=self._spam, name="spammer", daemon=True).start()

    def _spam(self) -> None:
        value = 0.0
        while True:
            self.metric("spam", value)
            value += 1.0
