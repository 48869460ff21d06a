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


# A manifest line's fields as the checkpoint plugin writes them; a line with one of another type (an edit by hand,
# another tool's line) is skipped as a torn one is: resume sorts by step and time, retention compares sizes.
ENTRY_FIELDS = {"step": int, "epoch": int, "size": int, "sha256": str, "time": (int, float), "alias_of": str}


def _plain_name(name: Any) -> bool:
    """A file name in the manifest's own folder: no folder part, no '..', which retention would delete outside it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first; a missing manifest is empty and a torn last line (a crash mid-append) is skipped,
    as is a line whose fields are not of ENTRY_FIELDS' types or whose file is not a plain name."""
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
        if isinstance(entry, dict) and _plain_name(entry.get("file")) and all(
                entry.get(key) is None or isinstance(entry[key], kind) and not isinstance(entry[key], bool)
                for key, kind in ENTRY_FIELDS.items()):
            entries.append(entry)
    return entries


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
