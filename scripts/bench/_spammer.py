"""A plugin with a bug scripts/bench/control_flood.py --from plugin measures: a thread reporting a metric in a loop
(or, with send = false, a thread that only spins: the plugin's own CPU, apart from what the kernel reads)."""

from __future__ import annotations

import threading

from trainbus.sdk import Plugin, Setting


class Spammer(Plugin):
    """Reports a metric as fast as it can from a thread of its own, from its setup on."""

    settings = {"send": Setting(True, "report a metric each turn of the loop; false: spin without sending")}

    def on_start_training_session(self, event) -> None:
        pass

    def setup(self) -> None:
        threading.Thread(target=self._spam if self.settings["send"] else self._spin, name="spammer",
                         daemon=True).start()

    def _spam(self) -> None:
        value = 0.0
        while True:
            self.metric("spam", value)
            value += 1.0

    @staticmethod
    def _spin() -> None:
        while True:
            pass
