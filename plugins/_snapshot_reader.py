"""Rebuilds the training state from a kernel snapshot buffer (format: trainbus.proto.checkpoint_format)."""

from __future__ import annotations

import os
from typing import Any

import torch

from trainbus.proto.checkpoint_format import HEADER_BYTES, ITEMS_KEY, MAGIC, TENSOR_KEY, TUPLE_KEY, parse_header

class SnapshotError(Exception):
    """The buffer does not hold what the event describes: gone, overwritten, or not that layout."""


def read_snapshot(data: dict[str, Any]) -> Any:
    """The state tree of a save_checkpoint event with its tensors, copied out of the buffer."""
    path, wanted = data.get("buffer"), data.get("snapshot_id")
    try:
        size = os.stat(path).st_size
        buffer = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)  # private map: read-only use
    except (OSError, RuntimeError, TypeError) as exc:
        raise SnapshotError(f"snapshot buffer {path} cannot be read: {exc}") from None
    found = _header_id(buffer)
    if found is None:
        raise SnapshotError(f"snapshot buffer {path} holds no snapshot (no {MAGIC.decode()} header)")
    if found != wanted:
        raise SnapshotError("snapshot overwritten before it could be persisted")
    tensors = [_copy_tensor(buffer, i, spec, size) for i, spec in enumerate(data.get("tensors") or [])]
    if _header_id(buffer) != wanted:  # re-read: a buffer reused while we copied is not this snapshot
        raise SnapshotError("snapshot overwritten before it could be persisted")
    try:
        return rebuild(data["state"], tensors)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SnapshotError(f"malformed snapshot state tree: {type(exc).__name__}: {exc}") from None


def _header_id(buffer: torch.Tensor) -> int | None:
    return parse_header(bytes(buffer[:HEADER_BYTES].numpy()) if buffer.numel() >= HEADER_BYTES else b"")


def _copy_tensor(buffer: torch.Tensor, index: int, spec: dict[str, Any], size: int) -> torch.Tensor:
    try:
        dtype = getattr(torch, spec["dtype"])
        offset, nbytes, shape = int(spec["offset"]), int(spec["nbytes"]), list(spec["shape"])
        if not isinstance(dtype, torch.dtype) or offset < HEADER_BYTES or offset + nbytes > size:
            raise ValueError(f"{spec['dtype']} at {offset}+{nbytes} in a {size}-byte buffer")
        # clone: one tensor per storage, so torch.save does not write one buffer viewed as many dtypes
        return buffer[offset: offset + nbytes].view(dtype).view(shape).clone()
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
