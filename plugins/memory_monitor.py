"""Memory on the monitor's own clock: system used/total, swap, the training process's RSS and USS."""

from __future__ import annotations

import time

import psutil

from trainbus.sdk import Setting

from ._sampling import INTERVAL_S, PID, SamplingPlugin

GIB = 1024 ** 3
# USS (memory unique to the process) is read from /proc/<pid>/smaps, which costs time in proportion to the
# process's mappings; a read slower than this is not cheap, and USS is then left out for the rest of the run.
USS_MAX_COST_S = 0.05
REARM_MARGIN_PERCENT = 5.0  # warn again only after memory fell this far below the threshold


class MemoryMonitorPlugin(SamplingPlugin):
    """Memory every interval_s: system used/total/percent, swap, the training process's RSS (and USS); warns near exhaustion.

    Metrics: memory/used_bytes, memory/total_bytes, memory/available_bytes, memory/percent,
    memory/swap_used_bytes, memory/swap_percent, memory/process_rss_bytes (with children),
    memory/process_uss_bytes (when cheap to read). A warning goes to the kernel's log once when
    memory/percent reaches warn_percent, and again only after it fell 5 points below it (0: never).
    """

    name = "memory"
    settings = {
        "interval_s": INTERVAL_S,
        "warn_percent": Setting(90.0, "warn once when system memory use reaches this percent (0: never)", min=0,
                                max=100),
        "uss": Setting(True, "also read the process's USS (memory unique to it), while that read is cheap"),
        "pid": PID,
    }

    def prepare(self) -> str | None:
        self.process = self.watched_process()
        self.read_uss = self.settings["uss"]
        self.warned = False
        return None

    def sample(self) -> dict[str, float]:
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
        readings = {
            "memory/used_bytes": memory.used,
            "memory/total_bytes": memory.total,
            "memory/available_bytes": memory.available,
            "memory/percent": memory.percent,
            "memory/swap_used_bytes": swap.used,
            "memory/swap_percent": swap.percent,
        }
        if self.process is not None:
            readings.update(self._process_readings())
        self._check_exhaustion(memory, readings.get("memory/process_rss_bytes"))
        return readings

    def _process_readings(self) -> dict[str, float]:
        try:
            rss = self.process.memory_info().rss
            for child in self.process.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self.process = None
            return {}
        readings = {"memory/process_rss_bytes": rss}
        if self.read_uss:
            started = time.monotonic()
            try:
                readings["memory/process_uss_bytes"] = self.process.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
                self.read_uss = False  # not readable here (another user's process, or no smaps)
            if time.monotonic() - started > USS_MAX_COST_S:
                self.read_uss = False
                self.say_once(f"memory: reading USS took {time.monotonic() - started:.2f} s; "
                              f"left out from now on (RSS goes on)", level="info")
        return readings

    def _check_exhaustion(self, memory, process_rss: float | None) -> None:
        threshold = self.settings["warn_percent"]
        if threshold == 0:  # off, as 0 is for the other monitors' and plugins' thresholds (it warned at any use)
            return
        if memory.percent < threshold - REARM_MARGIN_PERCENT:
            self.warned = False
        if memory.percent < threshold or self.warned:
            return
        self.warned = True
        process = f"; training process RSS {process_rss / GIB:.1f} GiB" if process_rss else ""
        self.log(f"memory nearly exhausted: {memory.percent:.0f} % of {memory.total / GIB:.1f} GiB used, "
                 f"{memory.available / GIB:.2f} GiB available{process}", level="warning")
