"""GPUs through NVML on the monitor's own clock: utilisation, memory, temperature and power per device."""

from __future__ import annotations

import os
from typing import Any, Callable

from ._sampling import INTERVAL_S, SamplingPlugin

try:  # nvidia-ml-py; a machine without the package still runs the monitor, idle
    import pynvml
except ImportError:  # pragma: no cover - a declared dependency, but never a reason to crash
    pynvml = None

MILLIWATTS_PER_WATT = 1000.0


class GpuMonitorPlugin(SamplingPlugin):
    """GPUs every interval_s via NVML: utilisation, memory used/total, temperature, power; idle (saying why,
    once) without a GPU.

    Metrics per device N: gpu/gpu<N>_util_percent, gpu/gpu<N>_memory_util_percent,
    gpu/gpu<N>_memory_used_bytes, gpu/gpu<N>_memory_total_bytes, gpu/gpu<N>_temperature_c,
    gpu/gpu<N>_power_w. The devices are the ones CUDA_VISIBLE_DEVICES shows the run (every GPU when it is unset),
    N numbering them as CUDA does (gpu0 is the run's cuda:0). A reading a device does not support is left out for
    that device; a device that cannot be read (fallen off the bus) is said once and left out while the others go
    on. With no driver, no NVML library or no device, the monitor says so in one line and does nothing more: it
    never fails and never fails the run.
    """

    name = "gpu"
    settings = {"interval_s": INTERVAL_S}

    def prepare(self) -> str | None:
        self.initialised = False
        if pynvml is None:
            return "nvidia-ml-py (pynvml) is not installed"
        try:
            pynvml.nvmlInit()
            self.initialised = True
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            uuids = [_text(pynvml.nvmlDeviceGetUUID(h)) for h in handles] if visible and "-" in visible else []
        except pynvml.NVMLError as exc:
            return f"NVML unavailable ({exc}): no NVIDIA driver or GPU here"
        if not handles:
            return "NVML found no GPU"
        if visible is not None and visible.lstrip().startswith("MIG-"):  # instances of a GPU: NVML reads whole GPUs
            self.say_once(f"gpu monitor: CUDA_VISIBLE_DEVICES={visible} names MIG instances; reading every GPU "
                          f"whole, numbered as NVML does", level="info")
            shown = list(range(len(handles)))
        else:
            shown = visible_devices(visible, uuids or [str(i) for i in range(len(handles))])
        if not shown:
            return f"CUDA_VISIBLE_DEVICES={visible!r} shows this run none of the {len(handles)} GPU(s) NVML sees"
        self.handles = [handles[i] for i in shown]  # in CUDA's order: the list's index is the run's cuda:N
        # (device index, reading) pairs that raised NotSupported: asked once, then left out
        self.unsupported: set[tuple[int, str]] = set()
        self.unreadable: set[int] = set()  # devices whose error was said (once each)
        return None

    def teardown(self) -> None:
        super().teardown()
        if self.initialised:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def sample(self) -> dict[str, float]:
        readings: dict[str, float] = {}
        for index, handle in enumerate(self.handles):
            try:
                readings.update(self._device_readings(index, handle))
            except pynvml.NVMLError as exc:  # this device only (GpuIsLost, Unknown): the others' readings go on
                if index not in self.unreadable:
                    self.unreadable.add(index)
                    self.say_once(f"gpu monitor: gpu{index} cannot be read ({type(exc).__name__}: {exc}); its "
                                  f"readings are left out while it fails, the other GPUs' go on")
        return readings

    def _device_readings(self, index: int, handle: Any) -> dict[str, float]:
        readings: dict[str, float] = {}
        prefix = f"gpu/gpu{index}_"
        utilisation = self._read(index, "utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        if utilisation is not None:
            readings[prefix + "util_percent"] = utilisation.gpu
            readings[prefix + "memory_util_percent"] = utilisation.memory
        memory = self._read(index, "memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            readings[prefix + "memory_used_bytes"] = memory.used
            readings[prefix + "memory_total_bytes"] = memory.total
        temperature = self._read(index, "temperature", pynvml.nvmlDeviceGetTemperature, handle,
                                 pynvml.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            readings[prefix + "temperature_c"] = temperature
        power_mw = self._read(index, "power", pynvml.nvmlDeviceGetPowerUsage, handle)
        if power_mw is not None:
            readings[prefix + "power_w"] = power_mw / MILLIWATTS_PER_WATT
        return readings

    def _read(self, index: int, what: str, call: Callable[..., Any], *args: Any) -> Any:
        if (index, what) in self.unsupported:
            return None
        try:
            return call(*args)
        except pynvml.NVMLError_NotSupported:
            self.unsupported.add((index, what))
            return None


def visible_devices(visible: str | None, uuids: list[str]) -> list[int]:
    """The NVML indexes of the GPUs that CUDA_VISIBLE_DEVICES = `visible` shows a process, in the order CUDA numbers
    them (cuda:0 first); `uuids`: every GPU's UUID (`nvmlDeviceGetUUID`), by NVML index. Read as CUDA reads it (and
    torch's _parse_visible_devices): unset shows every GPU; each entry an index (as strtoul reads it, "1gpu" is 1) or
    a UUID or a unique start of one; the first entry that names no GPU ends the list, and one named twice shows none.
    An index is NVML's (PCI bus order), as the daemon gives them: CUDA's too where the GPUs are alike or
    CUDA_DEVICE_ORDER=PCI_BUS_ID (its default order puts faster unlike GPUs first)."""
    if visible is None:
        return list(range(len(uuids)))
    shown: list[int] = []
    for entry in visible.split(","):
        entry = entry.strip()
        if entry.startswith("GPU-"):
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
            index = matches[0] if len(matches) == 1 else -1
        else:
            digits = len(entry) - len(entry.lstrip("0123456789"))
            index = int(entry[:digits]) if digits else -1
            index = index if index < len(uuids) else -1
        if index < 0:
            break
        if index in shown:
            return []
        shown.append(index)
    return shown


def _text(value: Any) -> str:
    """pynvml gives a UUID as str or, in older versions, bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
