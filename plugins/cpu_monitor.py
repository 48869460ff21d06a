"""CPU utilisation on the monitor's own clock: system-wide, per core, and the training process's own."""

from __future__ import annotations

import psutil

from trainbus.sdk import Setting

from ._sampling import INTERVAL_S, PID, SamplingPlugin


class CpuMonitorPlugin(SamplingPlugin):
    """CPU utilisation every interval_s: system-wide, per core, and the training process with its children.

    Metrics: cpu/system_percent and cpu/core<N>_percent (0-100), cpu/process_percent (100 = one core
    busy, so up to 100 x cores; includes child processes such as data-loader workers). `pid` 0 watches
    the kernel's process; on another machine than the kernel only the system readings are published.
    """

    name = "cpu"
    settings = {
        "interval_s": INTERVAL_S,
        "per_core": Setting(True, "also publish each core's percent (cpu/core<N>_percent)"),
        "pid": PID,
    }

    def prepare(self) -> str | None:
        self.process = self.watched_process()
        self.children: dict[int, psutil.Process] = {}
        return None

    def prime(self) -> None:
        # psutil measures CPU between two calls: the first call of each counter only starts the measurement
        # (and returns a meaningless 0.0), so it is made here and dropped. psutil keeps the system counters
        # per calling thread, so this runs on the sampler thread; the Process objects are kept between samples.
        psutil.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None, percpu=True)
        if self.process is not None:
            self._process_percent()

    def sample(self) -> dict[str, float]:
        readings = {"cpu/system_percent": psutil.cpu_percent(interval=None)}
        if self.settings["per_core"]:
            for core, percent in enumerate(psutil.cpu_percent(interval=None, percpu=True)):
                readings[f"cpu/core{core}_percent"] = percent
        if self.process is not None:
            percent = self._process_percent()
            if percent is not None:
                readings["cpu/process_percent"] = percent
        return readings

    def _process_percent(self) -> float | None:
        """The training process's CPU % plus its children's; a child seen for the first time only primes."""
        try:
            total = self.process.cpu_percent(interval=None)
            current = {child.pid: child for child in self.process.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self.process = None  # the run is over, or the process is not ours to read
            return None
        for pid, child in current.items():
            known = self.children.get(pid)
            try:
                if known is None:
                    child.cpu_percent(interval=None)  # priming: counted from the next sample on
                else:
                    total += known.cpu_percent(interval=None)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.children = {pid: self.children.get(pid, child) for pid, child in current.items()}
        return total
