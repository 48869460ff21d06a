"""Rebuilds the training state from a kernel snapshot buffer (format: trainbus.proto.checkpoint_format).

The tensors are views of one private mapping of the buffer file, not copies: the persister reads
each byte once, on its way to the file. Cloning them would cost 0.4-2.5 CPU-seconds per 805 MB
snapshot (fresh pages for every clone; scripts/bench/checkpoint_stall.py) and one more pass through
the memory bus that training shares.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

from trainbus.proto.checkpoint_format import HEADER_BYTES, ITEMS_KEY, MAGIC, TENSOR_KEY, TUPLE_KEY, parse_header


class SnapshotError(Exception):
    """The buffer does not hold what the event describes: gone, overwritten, or not that layout."""


@dataclass
class MappedSnapshot:
    """A save_checkpoint event's state tree, its tensors mapped from the buffer."""

    state: Any
    snapshot_id: int
    _mapping: mmap.mmap

    def check(self) -> None:
        """Raise SnapshotError unless the buffer still holds this snapshot: call it after reading the
        tensors, before trusting what was read (a buffer reused meanwhile is not this snapshot)."""
        if parse_header(self._mapping[:HEADER_BYTES]) != self.snapshot_id:
            raise SnapshotError("snapshot overwritten before it could be persisted")


def read_snapshot(data: dict[str, Any]) -> MappedSnapshot:
    """The state tree of a save_checkpoint event, its tensors viewing the buffer (read them, then check())."""
    path, wanted = data.get("buffer"), data.get("snapshot_id")
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            # Private and writable so torch takes the views without a read-only warning; nothing writes
            # them, so no page is ever copied: the pages are the kernel's, shared.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
    except (OSError, ValueError, TypeError) as exc:  # ValueError: an empty file cannot be mapped
        raise SnapshotError(f"snapshot buffer {path} cannot be read: {exc}") from None
    found = parse_header(mapping[:HEADER_BYTES])
    if found is None:
        raise SnapshotError(f"snapshot buffer {path} holds no snapshot (no {MAGIC.decode()} header)")
    if found != wanted:
        raise SnapshotError("snapshot overwritten before it could be persisted")
    tensors = [_view_tensor(mapping, i, spec, size) for i, spec in enumerate(data.get("tensors") or [])]
    try:
        state = rebuild(data["state"], tensors)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed snapshot state tree: {type(exc).__name__}: {exc}") from None
    return MappedSnapshot(state, wanted, mapping)


def _view_tensor(mapping: mmap.mmap, index: int, spec: dict[str, Any], size: int) -> torch.Tensor:
    try:
        dtype = getattr(torch, spec["dtype"])
        offset, nbytes, shape = int(spec["offset"]), int(spec["nbytes"]), list(spec["shape"])
        if not isinstance(dtype, torch.dtype) or offset < HEADER_BYTES or nbytes < 0 or offset + nbytes > size:
            raise ValueError(f"{spec['dtype']} at {offset}+{nbytes} in a {size}-byte buffer")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # One storage per tensor (frombuffer starts it at the offset), so torch.save writes each
        # tensor's bytes, never the whole buffer viewed as many dtypes.
        flat = torch.frombuffer(mapping, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
        return flat.view(shape)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise SnapshotError(f"snapshot tensor {index} does not fit its layout: {exc}") from None


def rebuild(node: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of the kernel's flattening: tensors, tuples and non-str-keyed dicts come back."""
    if isinstance(node, dict):
        if len(node) == 1:
            key, value = next(iter(node.items()))
            if key == TENSOR_KEY:
                return tensors[value]
            if key == TUPLE_KEY:
                return tuple(rebuild(v, tensors) for v in value)
            if key == ITEMS_KEY:
                return {rebuild(k, tensors): rebuild(v, tensors) for k, v in value}
        return {k: rebuild(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [rebuild(v, tensors) for v in node]
    return node
