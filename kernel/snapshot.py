"""Checkpoint snapshots: copy the training state into shared-memory buffers, describe it in plain data.

The training thread's only checkpoint cost is the memory copy here; a persister plugin (its own
process) maps the buffer, rebuilds the state and writes the file. Two buffers, so a new snapshot
never overwrites one still being written; when both are busy the snapshot is skipped with an event
(training never waits for a disk).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainbus.proto.checkpoint_format import ALIGN, HEADER_BYTES, ITEMS_KEY, TENSOR_KEY, TUPLE_KEY, pack_header

from .buffer_files import buffer_name, hold, open_held, remove_stale_buffers

log = logging.getLogger(__name__)

SLOTS = 2
PREPARER = Path(__file__).with_name("_prepare_buffers.py")
PREPARE_TIMEOUT_S = 120.0  # a preparer that takes longer is killed; the first snapshot allocates for itself
MADV_POPULATE_WRITE = 23  # Linux 5.14+ (asm-generic/mman-common.h); older kernels say EINVAL and the copy faults
CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context (the adopter thread's too)


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


@dataclass
class _Buffer:
    path: Path
    nbytes: int  # allocated
    tensor: torch.Tensor  # uint8, the whole file, mapped shared
    fd: int  # the file, open and held (buffer_files.hold) while the buffer is ours: it is not a dead kernel's
    pinned: bool = False  # registered with CUDA as page-locked memory (_pin): unregistered before it is unmapped


class SnapshotBuffers:
    """Two reusable buffer files (the first of `directories` with room) and the copy into them.

    A buffer's space is allocated up front (posix_fallocate), so a full /dev/shm is an error the
    kernel reports (the snapshot is skipped) rather than a SIGBUS that kills training mid-copy; a
    /dev/shm too small for the state (Docker's default is 64 MB) falls back to the run directory.

    Both slots are allocated and their pages written by a process of their own (kernel/_prepare_buffers.py),
    started by prepare() once the state's size is known (the loop calls it after the first optimizer
    step, when Adam's moments exist, or later when a persister first says hello). A thread here waits
    for it, maps what it made and fills the mapping's page tables (MADV_POPULATE_WRITE, through ctypes,
    so without the GIL); the first snapshot joins that thread, normally long done. A fresh page costs
    its first writer, and a page not yet mapped here costs the copy a fault: measured
    (scripts/bench/checkpoint_stall.py, docs/benchmarks.md), allocating and paging in both slots inside
    the first snapshot stalled it 0.7-4.5 s (805 MB, 10-60x the copy); a background thread allocating
    them stalled training's steps instead (mmap_lock, the GIL); pages made by the preparer but faulted
    in by the copy, 2.1x the copy. Without prepare() (a snapshot before the first step), take()
    allocates both slots itself.

    A state on a GPU is copied by DMA: prepared buffers are registered with CUDA as pinned memory (by the
    same thread, once mapped), and every tensor's copy is queued on a side stream and waited for once (an
    H200: 18.7 ms for 805 MB; 45.9 ms into pageable memory, where the driver stages each copy through a bounce
    buffer of its own). A buffer take() allocates itself stays pageable: registering it on the training thread
    would stall training (0.3 s for two 805 MB buffers) and a refusal there would leave CUDA's last error for
    training's next kernel launch to raise.
    """

    def __init__(self, run_id: str, directories: list[Path]):
        self.directories = [d for d in map(Path, directories) if d.is_dir() and os.access(d, os.W_OK)]
        for directory in self.directories:
            remove_stale_buffers(directory)
        # The kernel's pid in the name: a buffer whose kernel died (kill -9) is found and removed later.
        self.name = buffer_name(run_id)
        self._buffers: list[_Buffer | None] = [None] * SLOTS
        self._next_id = 1
        self._preparer: subprocess.Popen | None = None
        self._adopter: threading.Thread | None = None  # waits for the preparer, maps and populates its buffers
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # the side stream a GPU's copies are queued on

    def prepare(self, state: dict[str, Any]) -> None:
        """Have both slots made for a state like this one, in another process, unless they exist or are underway."""
        if self._adopter is not None or any(self._buffers) or not self.directories:
            return
        tensors = _tensors(state)
        nbytes, pin = _layout(tensors)[1], any(t.is_cuda for t in tensors)
        self._preparer = subprocess.Popen([sys.executable, "-I", str(PREPARER), str(nbytes), self.name,
                                           *map(str, self.directories)], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
        self._adopter = threading.Thread(target=self._adopt_prepared, args=(self._preparer, nbytes, pin),
                                         name="trainbus-snapshot-buffers", daemon=True)
        self._adopter.start()

    def _adopt_prepared(self, process: subprocess.Popen, nbytes: int, pin: bool) -> None:
        """(Its own thread.) Map what the preparer made, fill the page tables and pin it for a GPU state; a slot it
        could not make is allocated by _buffer() as before, which names the places tried. take() reads the slots
        once this ends."""
        started = time.monotonic()
        try:
            out = process.communicate(timeout=PREPARE_TIMEOUT_S)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            self._remove_prepared()
            return
        if process.returncode != 0:  # killed by close(), or failed: whatever it made is not to be used
            self._remove_prepared()
            return
        for line in out.splitlines():
            slot, _, path = line.partition(" ")
            if slot.isdigit() and int(slot) < SLOTS and not path.startswith("error"):
                try:
                    fd = open_held(Path(path))
                except OSError:  # gone already: _buffer() allocates this slot as if the preparer had not
                    continue
                buffer = _Buffer(Path(path), nbytes, _map(fd, nbytes), fd)
                _populate(buffer.tensor)
                buffer.pinned = pin and _pin(buffer.tensor)
                self._buffers[int(slot)] = buffer
                log.info("snapshot buffer %s: %.0f MB, made before the first snapshot by a preparer process%s "
                         "(ready %.2f s after it was asked for)", path, nbytes / 1e6,
                         ", pinned for the GPU" if buffer.pinned else "", time.monotonic() - started)

    def _join_adopter(self) -> None:
        if self._adopter is not None:
            self._adopter.join()
            self._adopter = self._preparer = None

    def _remove_prepared(self) -> None:
        for directory in self.directories:
            for slot in range(SLOTS):
                try:
                    (directory / f"{self.name}-slot{slot}").unlink(missing_ok=True)
                except OSError:  # not ours: another user's file under that name, which the preparer could not make
                    pass
    def take(self, state: dict[str, Any], is_free: Callable[[int], bool]) -> Snapshot | None:
        """Copy state into a free buffer; None when both are still being persisted.

        Raises OSError (naming each place tried) when no buffer of the state's size can be allocated.
        """
        slot = next((i for i in range(SLOTS) if is_free(i)), None)
        if slot is None:
            return None
        self._join_adopter()
        tensors: list[torch.Tensor] = []
        tree = _flatten(state, tensors)
        layout, offset = _layout(tensors)
        devices = {t.device for t in tensors if t.is_cuda}
        if not any(self._buffers):
            log.info("snapshot buffers: %.0f MB each, allocated by the run's first snapshot (no persister was ready "
                     "to have them made before it)", offset / 1e6)
        buffer = self._buffer(slot, offset)
        data = buffer.tensor
        data[:HEADER_BYTES].zero_()  # no id while the copy runs: a reader can tell a torn snapshot
        snapshot_id, self._next_id = self._next_id, self._next_id + 1
        # One GPU: every copy queued on a side stream (after what training queued: the state's last writes), then
        # one wait for that stream alone. The persister reads the buffer as soon as the event arrives.
        stream = self._stream(next(iter(devices))) if len(devices) == 1 else None
        with torch.cuda.stream(stream):  # None: no stream, a no-op
            for t, entry in zip(tensors, layout):
                view = data[entry["offset"]: entry["offset"] + entry["nbytes"]].view(t.dtype).view(t.shape)
                view.copy_(t.detach(), non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()
        elif devices:  # a state on several GPUs
            torch.cuda.synchronize()
        data[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(pack_header(snapshot_id)), dtype=torch.uint8))
        for other in range(SLOTS):  # the run's first snapshot (or a grown state): the other slot now, not mid-persist
            if other != slot and is_free(other):
                try:
                    self._buffer(other, offset)
                except OSError:  # no room for it: the snapshot that needs it says so
                    pass
        return Snapshot(slot, snapshot_id, str(buffer.path), layout, tree)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        return stream

    def _buffer(self, slot: int, nbytes: int) -> _Buffer:
        """The slot's buffer, a new file when it has none or a smaller one (Adam's state appears after step 1)."""
        current = self._buffers[slot]
        if current is None or current.nbytes < nbytes:
            self._buffers[slot] = None
            if current is not None:
                _release(current)
            path, fd = self._allocate(slot, nbytes)
            self._buffers[slot] = _Buffer(path, nbytes, _map(fd, nbytes), fd)
        return self._buffers[slot]

    def _allocate(self, slot: int, nbytes: int) -> tuple[Path, int]:
        """A new buffer file of nbytes, and its open file, held."""
        failures = []
        for directory in self.directories:
            path = directory / f"{self.name}-slot{slot}"
            try:
                # ours from before; another user's (the name is on the preparer's command line) is not ours to
                # remove (EPERM in the sticky /dev/shm) and passed over like a full directory
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                failures.append(f"{directory}: {exc.strerror}")
                continue
            try:
                hold(fd)
                _reserve(fd, nbytes)
            except OSError as exc:
                os.close(fd)
                path.unlink(missing_ok=True)
                failures.append(f"{directory}: {exc.strerror}")
                continue
            return path, fd
        raise OSError(f"no room for a {nbytes / 1e6:.0f} MB snapshot buffer "
                      f"({'; '.join(failures) or 'no writable directory'})")

    def close(self) -> None:
        if self._preparer is not None:
            self._preparer.kill()  # the adopter thread sees it fail and removes what it made
        self._join_adopter()
        for buffer in self._buffers:
            if buffer is not None:
                _release(buffer)
        self._buffers = [None] * SLOTS


def _reserve(fd: int, nbytes: int) -> None:
    """Give the file its size with the space allocated (ENOSPC now, not SIGBUS during the copy)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:  # macOS: a sparse file; a full disk would show during the copy
        os.ftruncate(fd, nbytes)
    else:
        fallocate(fd, 0, nbytes)


def _map(fd: int, nbytes: int) -> torch.Tensor:
    """The whole file, mapped shared. Not MAP_POPULATE: filling 200,000 page-table entries up front took
    2.0-2.5 s here where the copy's own faults on the same pages took 0.3-0.4 s (805 MB on /dev/shm)."""
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _populate(data: torch.Tensor) -> None:
    """Map every page of a prepared buffer writable now, in this (non-training) thread: ctypes drops the GIL for
    the call, and the pages exist, so this is page-table work only. Not possible here: the copy faults them in."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(data.data_ptr()), ctypes.c_size_t(data.numel()), MADV_POPULATE_WRITE)
    except (OSError, AttributeError):  # no libc to load (not Linux)
        pass


def _pin(data: torch.Tensor) -> bool:
    """Register a mapped buffer with CUDA as page-locked memory (torch's binding drops the GIL for the call);
    False when the driver refuses it (a buffer on a disk's file system rather than /dev/shm: "invalid argument"
    on an H200's driver 580): copies then go through the driver's staging buffer, slower and still whole. Only
    ever called off the training thread: a refusal stays CUDA's last error in the thread that asked."""
    cudart = torch.cuda.cudart()
    error = cudart.cudaHostRegister(data.data_ptr(), data.numel(), CUDA_HOST_REGISTER_PORTABLE)
    if error != cudart.cudaError.success:
        log.warning("snapshot buffer: CUDA could not pin %.0f MB (%s); GPU snapshots copy through pageable memory",
                    data.numel() / 1e6, cudart.cudaGetErrorString(error))
        return False
    return True


def _release(buffer: _Buffer) -> None:
    """Unpin (before the mapping can be unmapped), delete a buffer's file and let go of it."""
    if buffer.pinned:
        torch.cuda.cudart().cudaHostUnregister(buffer.tensor.data_ptr())
        buffer.pinned = False
    buffer.path.unlink(missing_ok=True)
    os.close(buffer.fd)


def _tensors(state: Any) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    _flatten(state, tensors)
    return tensors


def _layout(tensors: list[torch.Tensor]) -> tuple[list[dict[str, Any]], int]:
    """Where each tensor goes in a buffer (ALIGN-aligned, after the header), and the buffer's size."""
    layout, offset = [], HEADER_BYTES
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        layout.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                       "offset": offset, "nbytes": nbytes})
        offset += -(-nbytes // ALIGN) * ALIGN
    return layout, offset


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
