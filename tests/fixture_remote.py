"""A plugin the remote tests run on the far side of a TCP + CURVE connection (python -m trainbus.sdk --connect)."""

from __future__ import annotations

from fixture_plugins import Recorder


class RemoteRecorder(Recorder):
    """Records every event (durable, fsynced) and asks to stop once the run reaches `stop_at_step` (0: never)."""

    settings = {**Recorder.settings, "stop_at_step": 0}

    def on_event(self, event):
        super().on_event(event)
        if event.type == "end_training_batch" and event.step == self.settings["stop_at_step"]:
            self.stop(f"remote stop at step {event.step}")


class GoneWatcher(RemoteRecorder):
    """RemoteRecorder that writes `kernel_gone_path` when the SDK says the run died (on_kernel_gone)."""

    settings = {**RemoteRecorder.settings, "kernel_gone_path": ""}

    def on_kernel_gone(self, info):
        with open(self.settings["kernel_gone_path"], "w") as f:
            f.write("died\n")
