"""Memory on the monitor's own clock: system used/total, swap, the training process's RSS and USS, and the limit of
its memory cgroup (a SLURM job's, a container's), which ends the run's processes long before the machine runs out."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from trainbus.sdk import Setting

from ._sampling import INTERVAL_S, PID, SamplingPlugin

GIB = 1024 ** 3
# USS (memory unique to the process) is read from /proc/<pid>/smaps, which costs time in proportion to the
# process's mappings; a read slower than this is not cheap, and USS is then left out for the rest of the run.
USS_MAX_COST_S = 0.05
REARM_MARGIN_PERCENT = 5.0  # warn again only after memory fell this far below the threshold
CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 2**62  # cgroup v1 says "no limit" with a number near 2**63 (rounded down to a page); v2 with "max"


class MemoryMonitorPlugin(SamplingPlugin):
    """Memory every interval_s: system used/total/percent, swap, the training process's RSS (and USS), its cgroup's
    limit; warns near exhaustion.

    Metrics: memory/used_bytes, memory/total_bytes, memory/available_bytes, memory/percent,
    memory/swap_used_bytes, memory/swap_percent, memory/process_rss_bytes (with children),
    memory/process_uss_bytes (when cheap to read); where the watched process's memory cgroup (or one above it) has a
    limit, memory/limit_bytes, memory/limit_used_bytes and memory/limit_percent (the tightest limit). A warning goes
    to the kernel's log once when memory/percent or memory/limit_percent reaches warn_percent, and again only after
    it fell 5 points below it (0: never).
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
        limit = cgroup_memory(self.process.pid) if self.process is not None else None
        if limit is not None:
            readings.update({"memory/limit_bytes": limit[0], "memory/limit_used_bytes": limit[1],
                             "memory/limit_percent": 100.0 * limit[1] / limit[0]})
        self._check_exhaustion(memory, readings.get("memory/process_rss_bytes"), limit)
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

    def _check_exhaustion(self, memory, process_rss: float | None, limit: tuple[int, int] | None) -> None:
        threshold = self.settings["warn_percent"]
        if threshold == 0:  # off, as 0 is for the other monitors' and plugins' thresholds (it warned at any use)
            return
        limit_percent = 100.0 * limit[1] / limit[0] if limit else 0.0
        percent = max(memory.percent, limit_percent)
        if percent < threshold - REARM_MARGIN_PERCENT:
            self.warned = False
        if percent < threshold or self.warned:
            return
        self.warned = True
        process = f"; training process RSS {process_rss / GIB:.1f} GiB" if process_rss else ""
        if limit_percent >= threshold:
            self.log(f"memory nearly exhausted within the limit of the run's memory cgroup (a SLURM job's or a "
                     f"container's): {limit_percent:.0f} % of {limit[0] / GIB:.1f} GiB used{process}; past it the "
                     f"out-of-memory killer ends the run's processes", level="warning")
            return
        self.log(f"memory nearly exhausted: {memory.percent:.0f} % of {memory.total / GIB:.1f} GiB used, "
                 f"{memory.available / GIB:.2f} GiB available{process}", level="warning")


def cgroup_memory(pid: int, root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, used) bytes of the tightest memory limit over the process `pid`: its memory cgroup's or one above it
    (SLURM sets the job's, a level above the task's), cgroup v2 or v1; None where there is none or none can be
    read. Inside a container the cgroup names "/" and `root` is the container's own."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy for all
            base, names = root / path.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, names = root / "memory" / path.lstrip("/"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        top = root if controllers == "" else root / "memory"
        for directory in (base, *[p for p in base.parents if p.is_relative_to(top)]):
            try:
                limit = (directory / names[0]).read_text().strip()
                used = int((directory / names[1]).read_text())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and 0 < int(limit) < NO_LIMIT:
                found.append((int(limit), used))
    return min(found) if found else None
