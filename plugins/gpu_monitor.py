"""GPUs through NVML on the monitor's own clock: utilisation, memory, temperature and power per device."""

from __future__ import annotations

from typing import Any, Callable

from ._sampling import INTERVAL_S, SamplingPlugin

try:  # nvidia-ml-py; a machine without the package still runs the monitor, idle
    import pynvml
except ImportError:  # pragma: no cover - a declared dependency, but never a reason to crash
    pynvml = None

MILLIWATTS_PER_WATT = 1000.0


class GpuMonitorPlugin(SamplingPlugin):
    """GPUs every interval_s via NVML: utilisation, memory used/total, temperature, power; idle (saying why, once) without a GPU.

    Metrics per device N: gpu/gpu<N>_util_percent, gpu/gpu<N>_memory_util_percent,
    gpu/gpu<N>_memory_used_bytes, gpu/gpu<N>_memory_total_bytes, gpu/gpu<N>_temperature_c,
    gpu/gpu<N>_power_w. A reading a device does not support is left out for that device. With no
    driver, no NVML library or no device, the monitor says so in one line and does nothing more: it
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
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            return f"NVML unavailable ({exc}): no NVIDIA driver or GPU here"
        if not self.handles:
            return "NVML found no GPU"
        # (device index, reading) pairs that raised NotSupported: asked once, then left out
        self.unsupported: set[tuple[int, str]] = set()
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
