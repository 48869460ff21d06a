"""When to snapshot, which buffer is free, and finding and loading a verified checkpoint to resume from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from trainbus.proto.checkpoint_format import CHECKPOINT_DIR, MANIFEST, read_manifest, sha256_of

from .snapshot import SnapshotBuffers


class CheckpointError(Exception):
    """No usable checkpoint where the user pointed; the message says what was looked at."""


class Checkpointer:
    """The kernel's half of checkpointing: a schedule and two snapshot buffers."""

    def __init__(self, buffers: SnapshotBuffers, bus, every_n_epochs: int, every_n_steps: int):
        self.buffers = buffers
        self.bus = bus
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps

    def has_persister(self) -> bool:
        """A checkpoint plugin said hello and was not given up; without one, no snapshot is taken."""
        return self.bus.has_persister()

    def due_at_step(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0 and self.has_persister()

    def due_at_epoch(self, epoch: int) -> bool:
        return self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0 and self.has_persister()

    def take(self, state: dict[str, Any]):
        """Copy the state into a free buffer (None if both are busy); the bus keeps it busy until persisted."""
        snapshot = self.buffers.take(state, self.bus.snapshot_slot_free)
        if snapshot is not None:
            self.bus.reserve_snapshot_slot(snapshot.slot)
        return snapshot

    def close(self) -> None:
        self.buffers.close()


def find_checkpoint(where: str, runs_dir: str) -> Path:
    """The newest checkpoint whose file matches its manifest entry, under a run id, run dir or file."""
    path = Path(where)
    if not path.exists():
        path = Path(runs_dir) / where
    if not path.exists():
        raise CheckpointError(f"--resume {where}: no such run id in {runs_dir} and no such path")
    if path.is_file():
        manifest, wanted = path.parent / MANIFEST, path.name
    else:
        directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        manifest, wanted = directory / MANIFEST, None
    if not manifest.is_file():
        raise CheckpointError(f"--resume {where}: no checkpoint manifest at {manifest}")
    entries = read_manifest(manifest)
    if wanted is not None:
        # A named file is verified by its bytes: it must match some manifest entry's size and sha256.
        # (Fix: last.pt is re-linked before its own manifest line is appended, so a crash between the
        # two left it holding the newest checkpoint under an older line, and `--resume .../last.pt`
        # refused a file identical to a verified checkpoint.)
        file = manifest.parent / wanted
        size = file.stat().st_size
        if any(e.get("size") == size for e in entries):  # hash only a file that could match
            digest = sha256_of(file)
            if any(e.get("size") == size and e.get("sha256") == digest for e in entries):
                return file
        raise CheckpointError(f"--resume {where}: {file.name} matches no entry of {manifest} "
                              f"(a checkpoint must match a manifest entry's size and sha256)")
    for entry in sorted(entries, key=lambda e: (e.get("step", 0), e.get("time", 0)), reverse=True):
        file = manifest.parent / entry["file"]
        if file.is_file() and file.stat().st_size == entry.get("size") and sha256_of(file) == entry.get("sha256"):
            return file
    raise CheckpointError(f"--resume {where}: no verified checkpoint in {manifest} "
                          f"(a file must exist and match its manifest entry's size and sha256)")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint carrying pickled code is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a pickle payload, anything for a damaged file
        reason = _unpickler_reason(exc)
        if reason is not None:
            # Fix: torch's first line ("...you have two options, <ANSI bold>...") named neither the cause
            # nor the object refused; say both, in one line.
            raise CheckpointError(f"refusing checkpoint {path}: it holds pickled Python objects, not only "
                                  f"tensors and plain data ({reason}); trainbus loads checkpoints with "
                                  f"weights_only=True and runs no code from them") from None
        raise CheckpointError(f"refusing checkpoint {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict) or "trainbus" not in state:
        raise CheckpointError(f"{path} is not a trainbus checkpoint (no 'trainbus' resume state)")
    return state


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message, without terminal escape codes (torch bolds some words)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _unpickler_reason(exc: Exception) -> str | None:
    """torch's "Unsupported global: GLOBAL mod.Cls was not an allowed global by default" clause, if that is the cause."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. |\.?$)", str(exc), re.MULTILINE)
    return found.group(1).strip() if found else None
