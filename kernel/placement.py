"""GPU placement for the daemon: which queued runs start now and on which devices, and which devices there are.

Strict submission order. A job asks for `gpus` devices (None: one when the daemon has any, else
none); it starts when fewer than `max_concurrent` jobs run and that many of the daemon's devices are free, with
CUDA_VISIBLE_DEVICES naming exactly those (empty for a job that asked for none, so it cannot take a device
another run holds). A job that asks for more devices than the daemon has is failed at once, with the reason.
"""

from __future__ import annotations

import re
from typing import Any

from .daemon_files import DaemonError

# What CUDA_VISIBLE_DEVICES takes: an index, or a UUID as `nvidia-smi -L` prints it (GPU-..., MIG-... and the
# older MIG-GPU-.../GI/CI form).
DEVICE_PATTERN = re.compile(r"[0-9]+|GPU-[0-9A-Fa-f-]+|MIG-(GPU-)?[0-9A-Fa-f-]+(/[0-9]+/[0-9]+)?")


def wanted_devices(job: dict[str, Any], devices: list[str]) -> int:
    return job["gpus"] if job.get("gpus") is not None else (1 if devices else 0)


def place(queued: list[dict[str, Any]], busy: set[str], running: int, devices: list[str],
          max_concurrent: int) -> tuple[list[tuple[dict[str, Any], list[str]]], list[tuple[dict[str, Any], str]]]:
    """Which queued jobs start now and on which devices, and which can never start (with why).

    Strict submission order: the first job that must wait holds every job behind it, so a run asking for
    two GPUs is not starved by a stream of one-GPU runs."""
    starts: list[tuple[dict[str, Any], list[str]]] = []
    never: list[tuple[dict[str, Any], str]] = []
    free = [d for d in devices if d not in busy]
    for job in queued:
        if "unreadable" in job:  # damaged by hand or by the disk: said and failed, not a queue stalled behind it
            never.append((job, f"{job['unreadable']}: submit the run again"))
            continue
        want = wanted_devices(job, devices)
        if (why := unplaceable(want, devices)) is not None:
            never.append((job, why))
            continue
        if running >= max_concurrent or want > len(free):
            break
        starts.append((job, free[:want]))
        free = free[want:]
        running += 1
    return starts, never


def unplaceable(want: int, devices: list[str]) -> str | None:
    """Why a job asking for `want` GPUs can never start on a daemon placing runs on `devices`; None when it can."""
    if want <= len(devices):
        return None
    return (f"asks for {want} GPU{'s' * (want != 1)} and the daemon has {len(devices)} "
            f"({','.join(devices) or 'none'}); start the daemon with --gpus listing them")


def parse_devices(text: str) -> list[str]:
    """The devices of `--gpus`: comma-separated indices or UUIDs ('' for none), each once; DaemonError naming the
    first that is neither. Their existence is not checked: NVML may be absent, or the driver not up yet."""
    devices: list[str] = []
    for item in (d.strip() for d in text.split(",")):
        if not item:
            continue
        if not DEVICE_PATTERN.fullmatch(item):
            raise DaemonError(f"--gpus {item!r} is not a device: give indices (0,1) or UUIDs (GPU-..., MIG-...; "
                              f"`nvidia-smi -L` lists them), comma-separated, or '' for none")
        item = str(int(item)) if item.isdigit() else item  # 00 is CUDA's device 0 as much as 0 is
        if item in devices:
            raise DaemonError(f"--gpus lists {item} twice; two runs would share it: list each device once")
        devices.append(item)
    return devices


def detected_devices() -> list[str]:
    """Every GPU NVML sees, by index; none without NVML (no driver, or no GPU)."""
    return gpu_census()[0]


def gpu_census() -> tuple[list[str], str]:
    """Every GPU NVML sees, by index, and why it sees none ("" when it sees some), for a user told they have none."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml is not installed"
    try:
        pynvml.nvmlInit()
        try:
            found = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 -- NVMLError_*: either way, no GPUs to place
        said = str(exc) or type(exc).__name__
        # NVML's own words ("NVML Shared Library Not Found") do not say what is missing
        return [], f"NVML: {said}{'; no NVIDIA driver is installed' if 'Library Not Found' in said else ''}"
    return found, "" if found else "NVML found 0 GPUs"
