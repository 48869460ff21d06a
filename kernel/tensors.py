"""Tensor values in event data become plain floats in the bus thread, with one device read per flush."""

from __future__ import annotations

import collections
from typing import Any


def materialize_tensors(batch: list[tuple]) -> None:
    """Turn tensor values in event data into floats with one device read per device per flush.

    The loop leaves per-step CUDA losses on the device (a .item() each step would sync the host);
    they are read here, together, off the training thread.
    """
    found = [(data, key, value) for *_, data in batch for key, value in data.items()
             if hasattr(value, "detach") and hasattr(value, "device")]
    if not found:
        return
    import torch

    by_device: dict[Any, list] = collections.defaultdict(list)
    for item in found:
        by_device[item[2].device].append(item)
    for items in by_device.values():
        values = torch.stack([v.detach().reshape(()).double() for _, _, v in items]).tolist()
        for (data, key, _), value in zip(items, values):
            data[key] = value
