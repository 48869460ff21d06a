"""The checkpoint contracts between kernel and persister: snapshot buffer layout, state-tree markers, manifest."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

# Snapshot buffer (PROTOCOL.md §6.3): a 64-byte header, then tensors, each 64-byte aligned.
HEADER_BYTES = 64
MAGIC = b"TRAINBUS"  # then the snapshot id as a little-endian int64, then zero padding
ALIGN = 64  # every tensor starts on a 64-byte boundary, so any dtype can view it

# How the state tree of a save_checkpoint event marks what msgpack cannot carry.
TENSOR_KEY = "__tensor__"  # {"__tensor__": index into the event's "tensors" list}
TUPLE_KEY = "__tuple__"  # {"__tuple__": [items]}
ITEMS_KEY = "__items__"  # {"__items__": [[key, value], ...]}: a dict whose keys are not all str

# The persister's record of durable checkpoints: one JSON object per line, appended after the file is durable.
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.jsonl"


def pack_header(snapshot_id: int) -> bytes:
    return MAGIC + struct.pack("<q", snapshot_id) + bytes(HEADER_BYTES - len(MAGIC) - 8)


def parse_header(header: bytes) -> int | None:
    """The snapshot id a buffer holds now, or None when it holds none (being written, or not a buffer)."""
    if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
        return None
    return struct.unpack("<q", header[len(MAGIC): len(MAGIC) + 8])[0]


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first; a missing manifest is empty and a torn last line (a crash mid-append) is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            entries.append(entry)
    return entries


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
