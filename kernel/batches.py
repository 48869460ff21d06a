"""What a loader's batch is to the loop: (inputs, targets), each any nesting of tensors, moved to the device.

A batch is the pair `(inputs, targets)` as a DataLoader over a (x, y) dataset yields it; either side may be a
tensor, a tuple, list or dict of them, or an object with its own `.to(device)`, moved as a whole. A batch of
another shape (a dict, a 3-tuple, a dataclass) is split by the spec's `unpack_batch`, which the user gives;
without one, it is one line naming what the batch was and that field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import torch


class BatchError(ValueError):
    """A batch the loop cannot take; the message names what it was and the fix."""


def split(batch: Any, unpack: Callable[[Any], Any] | None, where: str) -> tuple[Any, Any]:
    """(inputs, targets) of a batch: unpack's, or the batch itself when it is that pair."""
    pair = unpack(batch) if unpack is not None else batch
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return pair[0], pair[1]
    what = describe(pair)
    if unpack is not None:
        raise BatchError(f"unpack_batch returned {what} for a batch of {where}; it must return (inputs, targets)")
    raise BatchError(f"a batch of {where} is {what}, not (inputs, targets): give TrainingSpec(unpack_batch=...) "
                     f"a function that splits it, e.g. unpack_batch=lambda batch: {_example(pair)}")


def _example(batch: Any) -> str:
    """An unpack_batch body for this batch's shape: by index for a sequence, by its own keys for a dict (a list's
    batch told to use batch['x'] fails with a TypeError of its own), by its fields for a dataclass, the inputs
    themselves for inputs alone."""
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return "(batch[0], batch[1])"
    # inputs alone (an autoencoder's data; a TensorDataset of one tensor yields a list of 1)
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return "(batch[0], batch[0]) (the inputs as their own targets), or (batch[0], None) for no targets"
    if isinstance(batch, torch.Tensor):
        return "(batch, batch) (the inputs as their own targets), or (batch, None) for no targets"
    # a mapping that is no dict too: transformers' BatchEncoding (a UserDict)
    if isinstance(batch, Mapping) and len(batch) >= 2 and all(isinstance(k, str) for k in batch):
        first, second = list(batch)[:2]
        return f"(batch[{first!r}], batch[{second!r}])"
    fields = [f.name for f in dataclasses.fields(batch)] if dataclasses.is_dataclass(batch) else []
    if len(fields) >= 2:  # a custom collate's dataclass, which batch['x'] fails on: not subscriptable
        return f"(batch.{fields[0]}, batch.{fields[1]})"
    return "(batch['x'], batch['y'])"


def describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:8]) + (", ..." if len(value) > 8 else "")
        return f"a dict with keys {keys}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"one tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def to_device(value: Any, device: torch.device) -> Any:
    """value with every tensor in it on `device` (non-blocking: pinned memory copies overlap)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    return _each(value, lambda v: to_device(v, device), lambda v: v.to(device))


def floats_to(value: Any, dtype: torch.dtype) -> Any:
    """value with every floating-point tensor in it cast to dtype (bf16-true's inputs)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if torch.is_floating_point(value) else value
    return _each(value, lambda v: floats_to(v, dtype), lambda v: v)


def _each(value: Any, inner: Callable[[Any], Any], other: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        return {k: inner(v) for k, v in value.items()}
    if isinstance(value, tuple):
        items = [inner(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a namedtuple keeps its type
    if isinstance(value, list):
        return [inner(v) for v in value]
    if callable(getattr(value, "to", None)) and not isinstance(value, (str, bytes, type)):
        return other(value)  # an object that knows how to move itself (a batch dataclass, a PackedSequence)
    return value


def batch_size(inputs: Any, targets: Any) -> int | None:
    """The samples in a batch: the first dimension of the first tensor found (targets first), else a length. Targets
    that are a dict per sample (torchvision's detection collate: boxes and labels of each image) count the dicts, not
    the first one's rows."""
    if isinstance(targets, (tuple, list)) and targets and all(isinstance(t, dict) for t in targets):
        return len(targets)
    for side in (targets, inputs):
        found = _first_tensor(side)
        if found is not None and found.dim():
            return int(found.shape[0])
    try:
        return len(targets)
    except TypeError:
        return None


def _first_tensor(value: Any, depth: int = 0) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if depth > 8:
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item, depth + 1)
        if found is not None:
            return found
    return None
