"""When to snapshot, which buffer is free, and finding and loading a verified checkpoint to resume from."""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from trainbus.proto.checkpoint_format import CHECKPOINT_DIR, MANIFEST, read_manifest, sha256_of
from trainbus.proto.messages import PERSISTS

from .peers import Refused

if TYPE_CHECKING:  # torch comes with them; `trainbus` commands that only read runs start without it
    from .snapshot import SnapshotBuffers


class CheckpointError(Exception):
    """No usable checkpoint where the user pointed; the message says what was looked at."""


SLOT_RESERVED = -1  # a slot being filled: its save_checkpoint is queued, not yet numbered
RECENT_SAVES = 64  # save_checkpoint seqs a persister may still settle


class Checkpointer:
    """The kernel's half of checkpointing: the schedule, two snapshot buffers, and who has settled each.

    The training thread asks whether one is due and takes it; the bus thread numbers its event
    (`numbered`) and applies persisters' verdicts (`settle`). A buffer is reused once every persister
    acked its save_checkpoint or settled it; a persister that crashed mid-write keeps it busy, since
    restarted it replays that event and needs the bytes still there.
    """

    def __init__(self, buffers: SnapshotBuffers, peers, every_n_epochs: int, every_n_steps: int,
                 directories: list[Path], first_seq: int = 1):
        self.buffers = buffers
        self.peers = peers
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.directories = [Path(d).resolve() for d in directories]  # where a settled checkpoint may be
        self.first_seq = first_seq  # this kernel process numbers from here on (a resumed run's journal goes on)
        self._slot_seq: dict[int, int] = {}  # slot -> seq of the save_checkpoint using it
        self._settled: dict[int, set[str]] = {}  # save_checkpoint seq -> persisters that reported on it
        self._recent: collections.deque[int] = collections.deque(maxlen=RECENT_SAVES)
        # Set by the bus thread when a persister says hello; read by the training thread, which prepares the
        # buffers then (a persister importing torch is often not ready at the first step).
        self.persister_seen = False

    # -- the training thread ----------------------------------------------------------------------

    def has_persister(self) -> bool:
        """A checkpoint plugin said hello and was not given up; without one, no snapshot is taken."""
        return bool(self.peers.named("checkpoint", time.monotonic()))

    def why_none(self) -> str:
        """Why no snapshot can be taken (has_persister() is False), for the checkpoint_skipped a user reads."""
        starting = self.peers.starting()
        if starting:
            # what a plugin can do comes with its hello: the ones still starting are named, not called persisters
            return f"no checkpoint plugin has said hello yet (plugins still starting: {', '.join(starting)})"
        # a live run takes one without a restart: that fix first (a remote user at `attach --control` reads it)
        return ("no checkpoint plugin is attached (`trainbus plugins attach RUN checkpoint` on the run's host adds one "
                "to the live run; `--plugins checkpoint` to a run at its start)")

    def due_at_step(self, step: int) -> bool:
        return self.every_n_steps > 0 and step % self.every_n_steps == 0 and self._scheduled()

    def due_at_epoch(self, epoch: int) -> bool:
        return self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0 and self._scheduled()

    def _scheduled(self) -> bool:
        """A scheduled checkpoint is due with a persister, or while plugins are still starting (one may be a
        persister: the snapshot is skipped and said so, rather than a slow start looking checkpointed). In a run
        with no persister at all, nothing is said."""
        return self.has_persister() or bool(self.peers.starting())

    def prepare(self, state: dict[str, Any]) -> None:
        """Have the buffers made for snapshots of this state's size, away from the training thread."""
        if self.has_persister():
            self.buffers.prepare(state)

    def take(self, state: dict[str, Any]):
        """Copy the state into a free buffer (None if both are busy); it stays busy until persisted."""
        snapshot = self.buffers.take(state, self.slot_free)
        if snapshot is not None:
            self._slot_seq[snapshot.slot] = SLOT_RESERVED
        return snapshot

    def wait_for_a_free_buffer(self, timeout_s: float, in_vain: Callable[[], bool] = lambda: False) -> bool:
        """Block until a persister has freed a buffer (True), or timeout_s passed or in_vain() says no persister
        can free one (the journal's disk refuses the save events: none reached it); for the run's last checkpoint,
        when training is over and waiting costs it nothing."""
        from .snapshot import SLOTS

        end = time.monotonic() + timeout_s
        while not any(self.slot_free(slot) for slot in range(SLOTS)):
            if time.monotonic() >= end or not self.has_persister() or in_vain():
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self.buffers.close()

    # -- the bus thread ---------------------------------------------------------------------------

    def welcomed(self, peer) -> None:
        if PERSISTS in peer.capabilities:
            self.persister_seen = True

    def numbered(self, seq: int, data: dict[str, Any]) -> None:
        """A save_checkpoint event got its seq."""
        self._slot_seq[data["slot"]] = seq
        self._settled[seq] = set()
        self._recent.append(seq)
        held = set(self._slot_seq.values())  # what a slot no longer holds needs no verdicts: one entry a slot
        for stale in [s for s in self._settled if s not in held]:
            del self._settled[stale]

    def settle(self, peer, msg: dict[str, Any], published_seq: int) -> bool:
        """A persister's checkpoint_saved/failed: only for a save_checkpoint it was sent, only for a path
        inside the checkpoint directories (raises Refused otherwise). False when there is nothing to settle:
        a save_checkpoint of an earlier kernel process, replayed to a persister after a resume."""
        seq = msg["seq"]
        if 1 <= seq < self.first_seq:  # (seq 0 is no save_checkpoint of any session: refused below)
            return False
        if seq > published_seq or seq not in self._recent:
            raise Refused("settle_seq", f"{peer.name}: {msg['type']} for seq {seq}, which is no save_checkpoint "
                                        f"it was sent")
        if msg["type"] == "checkpoint_saved" and not self._inside(msg["path"]):
            raise Refused("settle_path", f"{peer.name}: checkpoint_saved names {msg['path']!r}, outside "
                                         f"{', '.join(map(str, self.directories))}")
        settled = self._settled.get(seq)
        if settled is not None:  # else its slot holds a newer snapshot already: the verdict frees nothing
            settled.add(peer.name)
        return True

    def slot_free(self, slot: int) -> bool:
        seq = self._slot_seq.get(slot)
        if seq is None:
            return True
        if seq == SLOT_RESERVED:
            return False
        settled = self._settled.get(seq, set())
        return all(p.name in settled or self.peers.position(p.name) >= seq
                   for p in self.peers.named("checkpoint", time.monotonic()))

    def _inside(self, path: str) -> bool:
        try:
            resolved = Path(path).resolve()
        except ValueError:  # a NUL byte: a valid msgpack str that names no file, so inside no directory either
            return False
        return any(resolved.is_relative_to(d) for d in self.directories)


def persister_directory(run_dir: Path, settings: dict[str, Any]) -> Path | None:
    """Where a persister with these settings writes besides the run's checkpoints/: the `dirpath` the checkpoint
    plugin declares a PATH setting (relative, inside the run directory); None when it sets none."""
    dirpath = settings.get("dirpath")
    return Path(run_dir) / dirpath if isinstance(dirpath, str) and dirpath else None


def persister_directory_inside(run_dir: Path, settings: dict[str, Any]) -> Path | None:
    """persister_directory, resolved, when it lies inside the run directory; else None. The owner's attach_plugin
    sends settings the kernel has not checked (the plugin checks them as it starts): a `dirpath` outside the run must
    not make paths there ones a persister may name, and one with a NUL byte resolves to nothing (ValueError)."""
    directory = persister_directory(run_dir, settings)
    try:
        resolved = directory.resolve() if directory is not None else None
        return resolved if resolved is not None and resolved.is_relative_to(Path(run_dir).resolve()) else None
    except (ValueError, OSError):
        return None


def _recorded_plugins(run_dir: Path) -> list:
    """The plugins list of the run's config.json; [] for one that is gone, torn or edited into another shape."""
    try:
        plugins = json.loads((Path(run_dir) / "config.json").read_text()).get("plugins") or []
    except (OSError, ValueError, AttributeError):
        return []
    return plugins if isinstance(plugins, list) else []


def checkpoint_directories(run_dir: Path) -> list[Path]:
    """Where a run's persisters wrote: its checkpoints/, and each `dirpath` its config.json gave a plugin."""
    run_dir = Path(run_dir)
    directories = [run_dir / CHECKPOINT_DIR]
    for plugin in _recorded_plugins(run_dir):
        settings = plugin.get("settings") if isinstance(plugin, dict) else None
        directory = persister_directory(run_dir, settings) if isinstance(settings, dict) else None
        # a PATH setting is checked relative and inside at start; an edited config.json is not trusted to be
        if directory is not None and directory.resolve().is_relative_to(run_dir.resolve()) \
                and directory not in directories:
            directories.append(directory)
    return directories


def has_checkpoints(run_dir: Path) -> bool:
    """Whether any of the run's checkpoint directories has a manifest (a checkpoint was written there)."""
    return any((d / MANIFEST).is_file() for d in checkpoint_directories(run_dir))


FINAL_WEIGHTS = "final.pt"  # the trained weights a run ends with (kernel/run_end.py saves them)


def _ran_the_checkpoint_plugin(run_dir: Path) -> bool:
    """Whether the run's config.json names the built-in checkpoint plugin among its plugins."""
    from .supervisor import BUILTIN_PERSISTER

    return any(isinstance(p, dict) and p.get("target") == BUILTIN_PERSISTER for p in _recorded_plugins(run_dir))


def no_checkpoints(where: str, run_dir: Path | None = None) -> str:
    """What a resume of a run that wrote no checkpoint is told (by its kernel, and before it is queued); where its
    full disk had its kernel keep the weights it trained in the temporary directory, where they are: run again, it
    would train them anew."""
    why = "it ran without the checkpoint plugin, or ended before its first"
    if run_dir is not None and _ran_the_checkpoint_plugin(Path(run_dir)):  # its snapshots skipped (no room) or failed
        why = (f"its checkpoint plugin wrote none: each was skipped or failed, or the run ended before its first; "
               f"`trainbus runs show {Path(run_dir).resolve()}` says which")
    said = f"--resume {where}: that run has no checkpoints ({why}); run it again instead"
    if run_dir is None:
        return said
    from trainbus.proto.kept_files import kept_dirs
    from trainbus.proto.messages import JOURNAL_NAME, kept_name

    run_dir = Path(run_dir).resolve()
    kept = [d / kept_name(run_dir.name, FINAL_WEIGHTS) for d in kept_dirs()]
    kept = [path for path in kept if path.is_file()]
    said += (f"; the weights it trained are kept in {kept[0]} (its disk was full): move them to "
             f"{run_dir / FINAL_WEIGHTS}" if kept else "")
    # its last events too: the kernel's line said a resume puts them back, but only a journal that opens again does
    events = sorted((p for d in kept_dirs() for p in d.glob(f"{kept_name(run_dir.name, JOURNAL_NAME)}.*-*")),
                    key=lambda p: (len(first := p.name.rpartition(".")[2].partition("-")[0]), first))  # by seq
    files = " ".join(map(str, events))
    return said + (f"; the events its disk refused are kept in {files}: append them to its journal once there is "
                   f"room: cat {files} >> {run_dir / JOURNAL_NAME}" if events else "")


def find_checkpoint(where: str, runs_dir: str, passed_over: list[str] | None = None) -> Path:
    """The newest checkpoint whose file matches its manifest entry, under a run id, run dir or file.
    `passed_over` gets a line for each newer one that is there but does not match (damaged, edited)."""
    path = Path(where)
    if not path.exists():
        path = Path(runs_dir) / where
    if not path.exists():
        raise CheckpointError(f"--resume {where}: no such run id (nor a start of one) in {runs_dir} and no such "
                              f"path (`trainbus runs list` shows the runs)")
    if path.is_file():
        manifests, wanted = [path.parent / MANIFEST], path.name
    elif (path / "config.json").is_file():  # a run directory: every place its persisters wrote
        manifests, wanted = [d / MANIFEST for d in checkpoint_directories(path)], None
    else:
        directory = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        manifests, wanted = [directory / MANIFEST], None
    manifests = [m for m in manifests if m.is_file()] or manifests[:1]
    manifest = manifests[0]
    if not manifest.is_file() and path.is_dir() and (path / "config.json").is_file():
        raise CheckpointError(no_checkpoints(where, path))
    if (path.suffix != ".pt" if path.is_file() else not manifest.is_file()):  # the checkpoint plugin's suffix
        what = ("is neither a checkpoint (.pt) nor a run directory" if path.is_file()
                else f"is neither a run directory (no config.json) nor a checkpoint directory (no {MANIFEST})")
        raise CheckpointError(f"--resume {where}: {path} {what}; --resume takes a run id (or a unique start of one), "
                              f"a run directory, or a checkpoint file (RUN_DIR/{CHECKPOINT_DIR}/NAME.pt)")
    if not manifest.is_file():
        if path.is_file():  # copied out of its run: nothing to check its bytes against; loading it says what it is
            return path
        raise CheckpointError(f"--resume {where}: no checkpoint manifest at {manifest}")
    if wanted is not None:
        # A named file is verified by its bytes: it must match some manifest entry's size and sha256
        # (last.pt is re-linked before its manifest line is appended, so its own line may not exist yet).
        entries = read_manifest(manifest)
        file = manifest.parent / wanted
        size = file.stat().st_size
        if any(e.get("size") == size for e in entries):  # hash only a file that could match
            digest = sha256_of(file)
            if any(e.get("size") == size and e.get("sha256") == digest for e in entries):
                return file
        raise CheckpointError(f"--resume {where}: {file.name} matches no entry of {manifest} "
                              f"(a checkpoint must match a manifest entry's size and sha256)")
    written = [(m.parent / e["file"], e) for m in manifests for e in read_manifest(m)]
    damaged: dict[tuple[int, int], Path] = {}  # by inode: last.pt is a link to a checkpoint, with a line of each
    gone = False
    for file, entry in sorted(written, key=lambda fe: (fe[1].get("step", 0), fe[1].get("time", 0)), reverse=True):
        if not file.is_file():
            gone = True
            continue  # removed by the plugin's retention: the usual case
        stat = file.stat()
        if stat.st_size == entry.get("size") and sha256_of(file) == entry.get("sha256"):
            return file
        inode = (stat.st_dev, stat.st_ino)
        if inode in damaged:
            continue
        damaged[inode] = file
        if passed_over is not None:
            passed_over.append(f"checkpoint {file} does not match its manifest entry (size or sha256): damaged or "
                               f"changed since it was written, so an older one is taken")
    newest = next(iter(damaged.values()), None)
    found = ("every file it lists is gone" if newest is None else
             f"{newest} does not match its manifest entry (size or sha256), damaged or changed since it was "
             f"written" if len(damaged) == 1 else
             f"{len(damaged)} on disk do not match their manifest entries (size or sha256), damaged or changed since "
             f"they were written (the newest: {newest})") + (", and the rest are gone" if newest and gone else "")
    raise CheckpointError(f"--resume {where}: no verified checkpoint in {', '.join(map(str, manifests))}: {found}; "
                          f"run it again instead")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint carrying pickled code is refused."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a pickle payload, anything for a damaged file
        reason = _unpickler_reason(exc)
        if reason is not None and reason.startswith("Unsupported global"):
            # torch's first line ("...you have two options, <ANSI bold>...") names neither the cause
            # nor the object refused; say both, in one line.
            raise CheckpointError(f"refusing checkpoint {path}: it holds pickled Python objects, not only "
                                  f"tensors and plain data ({reason}); trainbus loads checkpoints with "
                                  f"weights_only=True and runs no code from them") from None
        raise CheckpointError(f"refusing checkpoint {path}: torch.load cannot read it ({type(exc).__name__}: "
                              f"{reason or _first_line(exc)}); is it a checkpoint, and whole?") from None
    if not isinstance(state, dict) or "trainbus" not in state:
        path = Path(path)
        if path.name == FINAL_WEIGHTS and isinstance(state, dict) and "model_state_dict" in state:
            raise CheckpointError(f"{path} is a run's final weights, which hold no resume state: resume from a file in "
                                  f"{path.parent / 'checkpoints'}, or continue the run itself (`trainbus runs resume "
                                  f"{path.parent.name}`)")
        raise CheckpointError(f"{path} is not a trainbus checkpoint (no 'trainbus' resume state): give a file from a "
                              f"run's checkpoints/ directory, or the run's id to resume from its newest")
    from .training_state import checkpoint_problem  # torch's: loaded by now

    problem = checkpoint_problem(state)
    if problem is not None:
        raise CheckpointError(f"refusing checkpoint {path}: {problem}; is it a checkpoint trainbus wrote, and whole?")
    return state


def _first_line(exc: Exception) -> str:
    """The first line of an exception's message, without terminal escape codes (torch bolds some words)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _unpickler_reason(exc: Exception) -> str | None:
    """torch's "Unsupported global: GLOBAL mod.Cls was not an allowed global by default" clause, if that is
    the cause."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\. |\.?$)", str(exc), re.MULTILINE)  # its next line
    return (found.group(1).strip() or None) if found else None
