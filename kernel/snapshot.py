"""Checkpoint snapshots: copy the training state into shared-memory buffers, describe it in plain data.

The training thread's only checkpoint cost is the memory copy here; a persister plugin (its own
process) maps the buffer, rebuilds the state and writes the file. Two buffers, so a new snapshot
never overwrites one still being written; when both are busy the snapshot is skipped with an event
(training never waits for a disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainbus.proto.checkpoint_format import ALIGN, HEADER_BYTES, ITEMS_KEY, TENSOR_KEY, TUPLE_KEY, pack_header

SLOTS = 2
SHM_DIR = Path("/dev/shm")


@dataclass
class Snapshot:
    slot: int
    snapshot_id: int
    buffer: str  # path of the buffer file
    tensors: list[dict[str, Any]]  # {"dtype", "shape", "offset", "nbytes"}
    state: Any  # the state tree with tensors replaced by TENSOR_KEY references

    def event_data(self) -> dict[str, Any]:
        return {"slot": self.slot, "snapshot_id": self.snapshot_id, "buffer": self.buffer,
                "tensors": self.tensors, "state": self.state}


class SnapshotBuffers:
    """Two reusable buffer files (in /dev/shm when it exists) and the copy into them."""

    def __init__(self, run_id: str, fallback_dir: Path):
        directory = SHM_DIR if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK) else Path(fallback_dir)
        remove_stale_buffers(directory)
        # The kernel's pid in the name: a buffer whose kernel died (kill -9) is found and removed later.
        self.paths = [directory / f"trainbus-{os.getpid()}-{run_id}-slot{i}" for i in range(SLOTS)]
        self._maps: list[torch.Tensor | None] = [None] * SLOTS
        self._next_id = 1

    def take(self, state: dict[str, Any], is_free: Callable[[int], bool]) -> Snapshot | None:
        """Copy state into a free buffer; None when both are still being persisted."""
        slot = next((i for i in range(SLOTS) if is_free(i)), None)
        if slot is None:
            return None
        tensors: list[torch.Tensor] = []
        tree = _flatten(state, tensors)
        layout, offset = [], HEADER_BYTES
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            layout.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                           "offset": offset, "nbytes": nbytes})
            offset += -(-nbytes // ALIGN) * ALIGN
        buffer = self._map(slot, offset)
        buffer[:HEADER_BYTES].zero_()  # no id while the copy runs: a reader can tell a torn snapshot
        snapshot_id, self._next_id = self._next_id, self._next_id + 1
        for t, entry in zip(tensors, layout):
            view = buffer[entry["offset"]: entry["offset"] + entry["nbytes"]].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # the persister reads the buffer as soon as the event arrives
        buffer[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(pack_header(snapshot_id)), dtype=torch.uint8))
        return Snapshot(slot, snapshot_id, str(self.paths[slot]), layout, tree)

    def _map(self, slot: int, nbytes: int) -> torch.Tensor:
        current = self._maps[slot]
        if current is None or current.numel() < nbytes:
            path = self.paths[slot]
            path.unlink(missing_ok=True)  # a larger layout (Adam's state appears after step 1): new file
            self._maps[slot] = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        return self._maps[slot]

    def close(self) -> None:
        self._maps = [None] * SLOTS
        for path in self.paths:
            path.unlink(missing_ok=True)


def remove_stale_buffers(directory: Path) -> None:
    """Delete buffers left by kernels that no longer run (memory in /dev/shm is not freed otherwise)."""
    for path in directory.glob("trainbus-*-slot*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The state as msgpack-able data; tensors collected in order and referenced by index."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {TENSOR_KEY: len(tensors) - 1}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}
        return {ITEMS_KEY: [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {TUPLE_KEY: [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars (numpy's RNG state)
    if tolist is not None:
        return tolist()
    raise TypeError(f"cannot snapshot a {type(obj).__name__} in the training state")
