"""Disk on the monitor's own clock: free/used space of the run directory's filesystem, read/write rates."""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from trainbus.sdk import HOST_PATH, Setting, SettingsError

from ._sampling import INTERVAL_S, SamplingPlugin

GIB = 1024 ** 3
REARM_FACTOR = 1.1  # after a low-space alarm, free space must climb 10 % above the threshold to re-arm it


class DiskMonitorPlugin(SamplingPlugin):
    """Disk every interval_s: free/used space where the run is written, read/write bytes/s; asks for a checkpoint
    when space runs low.

    Metrics: disk/free_bytes, disk/used_bytes, disk/total_bytes, disk/percent of the filesystem holding
    `path` (default: the run directory), and disk/read_bytes_per_s, disk/write_bytes_per_s for the
    whole machine. When free space drops below min_free_gib the monitor replies checkpoint_now once
    and warns, so the run's progress is saved while it still fits; it re-arms once space is back.
    """

    name = "disk"
    settings = {
        "interval_s": INTERVAL_S,
        "min_free_gib": Setting(1.0, "below this much free space, ask for a checkpoint once and warn", min=0),
        "path": Setting("", "a path on the filesystem watched, only read ('': the run directory)", kind=HOST_PATH),
    }

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        path = settings["path"]
        if path and not os.path.exists(path):  # checked before the run, on the kernel's machine (idle all run, else)
            raise SettingsError(f"path = {path!r} does not exist: give a path on the filesystem to watch ('': the "
                                f"run directory's)")

    def prepare(self) -> str | None:
        self.path = self.settings["path"] or self.run_dir
        try:
            psutil.disk_usage(self.path)
        except OSError as exc:
            return f"cannot read space of {self.path}: {exc}"
        self.low = False
        self.last_io = None
        return None

    def prime(self) -> None:
        self.last_io = self._io_counters()  # rates are differences between two samples

    def sample(self) -> dict[str, float]:
        usage = psutil.disk_usage(self.path)
        readings = {"disk/free_bytes": usage.free, "disk/used_bytes": usage.used,
                    "disk/total_bytes": usage.total, "disk/percent": usage.percent}
        io = self._io_counters()
        if io is not None and self.last_io is not None:
            (now, read, written), (then, read_before, written_before) = io, self.last_io
            if now > then:
                readings["disk/read_bytes_per_s"] = max(0, read - read_before) / (now - then)
                readings["disk/write_bytes_per_s"] = max(0, written - written_before) / (now - then)
        self.last_io = io
        self._check_space(usage.free)
        return readings

    def _check_space(self, free_bytes: int) -> None:
        threshold_bytes = self.settings["min_free_gib"] * GIB
        if self.low and free_bytes > threshold_bytes * REARM_FACTOR:
            self.low = False
        if self.low or free_bytes >= threshold_bytes:
            return
        self.low = True
        why = (f"free space on {self.path} is {free_bytes / GIB:.2f} GiB, below min_free_gib "
               f"{self.settings['min_free_gib']:g}")
        self.checkpoint_now(why)
        self.log(f"{why}: asked for a checkpoint while it still fits", level="warning")

    @staticmethod
    def _io_counters() -> tuple[float, int, int] | None:
        """(monotonic time, bytes read, bytes written) for the machine; None where the OS does not say."""
        try:
            counters = psutil.disk_io_counters(perdisk=False)
        except (OSError, RuntimeError):
            return None
        if counters is None:  # no /proc/diskstats (some containers)
            return None
        return time.monotonic(), counters.read_bytes, counters.write_bytes
