"""Checkpoint snapshots: copy the training state into shared-memory buffers, describe it in plain data.

The training thread's only checkpoint cost is the memory copy here; a persister plugin (its own
process) maps the buffer, rebuilds the state and writes the file. Two buffers, so a new snapshot
never overwrites one still being written; when both are busy the snapshot is skipped with an event
(training never waits for a disk).
"""

from __future__ import annotations

import mmap
import os
import threading
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


def snapshot_directories(run_dir: Path, chosen: str = "") -> list[Path]:
    """Where buffers may go, in order: the user's choice alone; else /dev/shm, then the run directory."""
    return [Path(chosen)] if chosen else [SHM_DIR, Path(run_dir)]


@dataclass
class _Buffer:
    path: Path
    nbytes: int  # allocated
    tensor: torch.Tensor | None = None  # uint8, the whole file, mapped shared: by the training thread, at first use


class SnapshotBuffers:
    """Two reusable buffer files (the first of `directories` with room) and the copy into them.

    A buffer's space is allocated up front (posix_fallocate), so a full /dev/shm is an error the
    kernel reports (the snapshot is skipped) rather than a SIGBUS that kills training mid-copy; a
    /dev/shm too small for the state (Docker's default is 64 MB) falls back to the run directory.

    Fix (scripts/bench/checkpoint_stall.py): the first snapshot into each slot stalled training
    0.24-1.3 s (4-19x the copy): allocating 200,000 fresh pages as the copy touched them. Once the
    first snapshot has told the size, a background thread allocates the other slot's file (one
    fallocate, the GIL released), so only the run's first snapshot pays for that. The thread does
    nothing else: filling the page tables there too (madvise) or running it at idle priority made
    training's steps stall for up to a second (mmap_lock and the GIL held by a thread that the
    scheduler would not run).
    """

    def __init__(self, run_id: str, directories: list[Path]):
        self.directories = [d for d in map(Path, directories) if d.is_dir() and os.access(d, os.W_OK)]
        for directory in self.directories:
            remove_stale_buffers(directory)
        # The kernel's pid in the name: a buffer whose kernel died (kill -9) is found and removed later.
        self.name = f"trainbus-{os.getpid()}-{run_id}"
        self._buffers: list[_Buffer | None] = [None] * SLOTS
        self._preparing: threading.Thread | None = None
        self._next_id = 1

    def take(self, state: dict[str, Any], is_free: Callable[[int], bool]) -> Snapshot | None:
        """Copy state into a free buffer; None when both are still being persisted.

        Raises OSError (naming each place tried) when no buffer of the state's size can be allocated.
        """
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
        self._join_preparation()
        buffer = self._buffer(slot, offset)
        if buffer.tensor is None:
            buffer.tensor = _map(buffer)
        data = buffer.tensor
        data[:HEADER_BYTES].zero_()  # no id while the copy runs: a reader can tell a torn snapshot
        snapshot_id, self._next_id = self._next_id, self._next_id + 1
        for t, entry in zip(tensors, layout):
            view = data[entry["offset"]: entry["offset"] + entry["nbytes"]].view(t.dtype).view(t.shape)
            view.copy_(t.detach())
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()  # the persister reads the buffer as soon as the event arrives
        data[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(pack_header(snapshot_id)), dtype=torch.uint8))
        self._prepare_others(offset)
        return Snapshot(slot, snapshot_id, str(buffer.path), layout, tree)

    def _buffer(self, slot: int, nbytes: int) -> _Buffer:
        """The slot's buffer, a new file when it has none or a smaller one (Adam's state appears after step 1)."""
        current = self._buffers[slot]
        if current is None or current.nbytes < nbytes:
            self._buffers[slot] = None
            if current is not None:
                current.path.unlink(missing_ok=True)
            self._buffers[slot] = _Buffer(self._allocate(slot, nbytes), nbytes)
        return self._buffers[slot]

    def _allocate(self, slot: int, nbytes: int) -> Path:
        failures = []
        for directory in self.directories:
            path = directory / f"{self.name}-slot{slot}"
            path.unlink(missing_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                failures.append(f"{directory}: {exc.strerror}")
                continue
            try:
                _reserve(fd, nbytes)
            except OSError as exc:
                path.unlink(missing_ok=True)
                failures.append(f"{directory}: {exc.strerror}")
                continue
            finally:
                os.close(fd)
            return path
        raise OSError(f"no room for a {nbytes / 1e6:.0f} MB snapshot buffer ({'; '.join(failures) or 'no writable directory'})")

    def _prepare_others(self, nbytes: int) -> None:
        slots = [i for i, b in enumerate(self._buffers) if b is None or b.nbytes < nbytes]
        if slots:
            self._preparing = threading.Thread(target=self._prepare, args=(slots, nbytes), daemon=True,
                                               name="trainbus-snapshot-prepare")
            self._preparing.start()

    def _prepare(self, slots: list[int], nbytes: int) -> None:
        for slot in slots:
            try:
                self._buffer(slot, nbytes)
            except OSError:  # no room: the snapshot that needs this slot tries again and reports it
                pass

    def _join_preparation(self) -> None:
        if self._preparing is not None:
            self._preparing.join()  # done long before the next snapshot, unless snapshots come back to back
            self._preparing = None

    def close(self) -> None:
        self._join_preparation()
        for buffer in self._buffers:
            if buffer is not None:
                buffer.path.unlink(missing_ok=True)
        self._buffers = [None] * SLOTS


def _reserve(fd: int, nbytes: int) -> None:
    """Give the file its size with the space allocated (ENOSPC now, not SIGBUS during the copy)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # macOS: a sparse file; a full disk would show during the copy
        os.ftruncate(fd, nbytes)
    else:
        fallocate(fd, 0, nbytes)


def _map(buffer: _Buffer) -> torch.Tensor:
    fd = os.open(buffer.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapping = mmap.mmap(fd, buffer.nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)


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
