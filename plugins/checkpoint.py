"""Writes the kernel's checkpoint snapshots to disk atomically, with top-k/last/max-total retention.

The kernel copies the training state into a buffer file and publishes save_checkpoint. This plugin
maps the buffer and rebuilds the state around it (_snapshot_reader: no copy), then makes it durable
(_durable_files: direct I/O, hashed on the way, its thread at the lowest priority) in this order:
temp file, fsync, check that the buffer still holds the snapshot, rename, fsync of the directory,
then one manifest line (fsynced). A checkpoint exists once its manifest line does; resume
(kernel/checkpointing.py) trusts only files that match their line's size and sha256.

Retention, after ModelCheckpoint in PyTorch Lightning:
- save_top_k: -1 keeps every checkpoint; k > 0 keeps the k best by `monitor` (the k newest without
  one); 0 keeps none for its rank. A snapshot that would not be kept is not written at all.
- save_last: the newest checkpoint is always kept, and `last.pt` is a hard link to it (a copy where
  the filesystem has none), replaced atomically and listed in the manifest, so
  `--resume <run>/checkpoints/last.pt` works like any other file.
- max_total: at most this many checkpoints (last.pt not counted); the oldest go first, never the
  newest (with save_last) nor the best.
Old files are deleted only after the new one is durable. Only files named in the manifest are ever
deleted; their lines stay, and resume skips a line whose file is gone. Past MANIFEST_STALE_LINES lines of
files gone (a run checkpointing every few steps for days), the manifest is rewritten atomically with the
lines of the files on disk, last.pt's latest and the RETIRED_KEPT newest of the rest (a replayed snapshot
already saved and since deleted is recognised by its line, and not written again).
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import math
import os
import string
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainbus.proto import DURABLE, Event
from trainbus.proto.checkpoint_format import CHECKPOINT_DIR, MANIFEST
from trainbus.proto.messages import PERSISTS
from trainbus.proto.process import started_while_training
from trainbus.proto.settings_format import template_fields
from trainbus.sdk import METRIC, METRIC_FIELDS, PATH, Plugin, Setting, SettingsError

from ._durable_files import (
    append_manifest,
    read_manifest,
    remove_stale_temporaries,
    replace_with_link,
    rewrite_manifest,
    write_atomically,
)

# The checkpoint directory's layout, shared with kernel/checkpointing.py's find_checkpoint.
LAST = "last.pt"  # a hard link to the newest checkpoint
MANIFEST_STALE_LINES = 1000  # lines no longer needed before the manifest is rewritten without them
RETIRED_KEPT = 100  # lines of deleted checkpoints kept at a rewrite: replays reach back no further than that
SUFFIX = ".pt"
MODES = ("min", "max")
PRIORITIES = ("background", "low", "idle")  # the writing thread: nice 19; the plugin's nice 10; SCHED_IDLE
BACKGROUND_NICE = 19
TORCH_PYTHON_LIBRARY = "libtorch_python.so"  # in torch/lib: its dependencies are the libraries torch's import loads
# A filled-in name (.pt included) at most this long: the file system's 255 (NAME_MAX) less the temp file's
# ".tmp-" and "-PID", a repeated name's "-step000000-N" (unique_name) and metric values wider than 0.0.
NAME_MAX_BYTES = 200


class CheckpointPlugin(Plugin):
    """Writes the kernel's checkpoint snapshots to disk atomically, with top-k/last/max-total retention.

    Example settings: {"monitor": "validation_loss", "mode": "min", "save_top_k": 3, "max_total": 5,
    "filename": "epoch{epoch:03d}-{validation_loss:.4f}"}. Files load with
    torch.load(path, weights_only=True).
    """

    delivery = DURABLE  # a missed snapshot is a lost checkpoint; the kernel reuses a buffer once we answer
    capabilities = (PERSISTS,)
    handler_timeout_s = 600.0  # writing and fsyncing a large model can take minutes on a slow disk
    settings = {
        # The kernel accepts a checkpoint_saved only for a file in <run_dir>/checkpoints or this dirpath
        # (kernel/checkpointing.py), so it is a PATH: inside the run directory.
        "dirpath": Setting("", f"where checkpoints go, relative to the run directory ('': {CHECKPOINT_DIR})",
                           kind=PATH),
        # a metric not measured yet reads "na", and a name an earlier checkpoint has gets "-step{step:06d}"
        # added (unique_name)
        "filename": Setting("epoch{epoch:03d}-step{step:06d}", "file name template; fields: epoch, step and any "
                            "metric, e.g. {validation_loss:.4f}; .pt is added",
                            kind=METRIC_FIELDS, rule=f"a plain file name (no '/', not starting with '.', not last.pt, "
                            f"at most {NAME_MAX_BYTES} bytes) whose {{fields}} are epoch, step or metrics the run "
                            "produces"),
        "monitor": Setting("", "the metric checkpoints are ranked by for save_top_k ('': none, the newest are kept)",
                           kind=METRIC),
        "mode": Setting("min", "min: lower monitor is better; max: higher is better", choices=MODES),
        "save_top_k": Setting(-1, "keep the k best by monitor (the k newest without one); -1: keep all", min=-1),
        "save_last": Setting(True, f"always keep the newest, linked as {LAST}"),
        "max_total": Setting(0, "at most this many checkpoints (last.pt not counted), oldest removed first but never "
                             "the newest (with save_last) nor the best by monitor (0: unlimited)", min=0),
        # The writing thread, on a box where training keeps every core busy (docs/benchmarks.md):
        # "background": nice 19: all the CPU training leaves idle, and ~1.5 % of a busy core, so a
        # checkpoint always lands (805 MB: ~13 s on 2 busy cores) and training loses 2-8 % meanwhile.
        # "low": nice 10 like every plugin: checkpoints land sooner, training loses more meanwhile.
        # "idle": SCHED_IDLE, only CPU that training leaves idle: where training never leaves any,
        # a checkpoint waits (minutes) and the snapshots due meanwhile are skipped.
        "priority": Setting("background", "the writing thread: background (nice 19), low (nice 10) or idle "
                            "(SCHED_IDLE: only CPU training leaves idle)", choices=PRIORITIES),
    }

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        if settings["save_top_k"] == 0 and not settings["save_last"]:
            raise SettingsError("save_top_k = 0 with save_last = false would keep nothing; keep one of them")
        _check_filename(settings["filename"])

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # torch takes seconds to import (25-42 s at nice 10 beside training on a busy box, docs/benchmarks.md), and
        # the kernel takes no snapshot before a persister said hello. Started by the run before training, the plugin
        # imports it here, before its hello, while the kernel waits for it at the kernel's priority: the first
        # checkpoint finds it ready. Started while training runs (a restart, an attach: TRAINBUS_TRAINING), it says
        # hello first and setup() loads torch on a thread; a save_checkpoint that comes first waits for the import
        # in its handler, its snapshot held in its buffer meanwhile. (The module imports torch lazily either way:
        # `trainbus run` loads this class for its settings before every run that has the plugin.)
        self.torch_after_hello = started_while_training()
        if not self.torch_after_hello:
            from . import _snapshot_reader  # noqa: F401
        self.writer: ThreadPoolExecutor | None = None  # bind_sender: writes go to a thread below training

    def setup(self) -> None:
        if self.torch_after_hello:
            threading.Thread(target=load_torch, name="checkpoint-load-torch", daemon=True).start()
        s = self.settings
        self.directory = Path(self.run_dir) / (s["dirpath"] or CHECKPOINT_DIR)
        self.fields_told: set[str] = set()  # filename fields said to be no metric of the run (_tell_unknown_fields)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.directory)
        except OSError as exc:  # not fatal here: each save will report the cause as checkpoint_failed
            self.log(f"checkpoint directory {self.directory}: {_describe(exc)}", level="warning")

    def bind_sender(self, send, progress=None) -> None:
        # The runner binds its sender only in a process of the plugin's own (a Harness never does): from then on
        # each snapshot is written on a thread lowered below training, the handler thread waiting for it. Lowered,
        # a thread is never raised again, and all else the handler thread runs would crawl with it on a busy box:
        # the other handlers, teardown, and the interpreter's exit at the run's end (12 s beside two busy cores).
        super().bind_sender(send, progress)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer", initializer=yield_to_training,
                                         initargs=(self.settings["priority"],))

    def teardown(self) -> None:
        if self.writer is not None:
            self.writer.shutdown()

    def on_save_checkpoint(self, event: Event) -> None:
        # Never raises: a handler that raises is retried, and a full disk would only fill up again.
        try:
            from ._snapshot_reader import SnapshotError  # waits for load_torch's import, if it is still running
        except Exception as exc:  # a broken torch: every save would fail alike, each one said
            self._fail(event, f"cannot import torch: {type(exc).__name__}: {exc}")
            return
        try:
            self._save(event)
        except SnapshotError as exc:
            if event.seq < self.session_seq:  # replayed from a session whose kernel (and its buffers) are gone
                print(f"[{self.name}] save_checkpoint seq {event.seq} (step {event.step}) of the run's earlier "
                      f"session, not saved then: its snapshot went with that session's kernel", file=sys.stderr)
                return
            self._fail(event, str(exc))
        except OSError as exc:  # the directory or the manifest: name what could not be touched
            self._fail(event, f"{_describe(exc)} at {exc.filename or self.directory}")
        except Exception as exc:  # a bug must not cost every later checkpoint
            print(traceback.format_exc(), file=sys.stderr)
            self._fail(event, f"unexpected {type(exc).__name__}: {exc}")

    # -- one snapshot -----------------------------------------------------------------------------

    def _save(self, event: Event) -> None:
        s, data, directory = self.settings, event.data, self.directory
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        entries = read_manifest(manifest)
        retired = _saved_entry(entries, event)
        if retired is not None and not (directory / retired["file"]).exists():
            # Replayed after a restart, but saved before and since deleted by retention (a later checkpoint was
            # saved after it): its buffer holds another snapshot by now, and writing it again would undo retention.
            self.log(f"save_checkpoint seq {event.seq}: saved earlier as {retired['file']}, since removed by "
                     f"retention; not written again", level="debug")
            return
        done = _already_saved(entries, event, directory)
        if done is not None:  # replayed after a crash between the manifest line and the ack
            self.checkpoint_saved(event, str(directory / done["file"]), done["sha256"], done["size"])
            # The crash may also have cut short what follows the manifest line (last.pt re-linked but
            # its line not yet written, or old files not yet deleted). Finish both; they are idempotent.
            if s["save_last"]:
                current = current_entries(entries, directory)
                if current and current[-1]["file"] == done["file"] and not self._last_is(done, entries):
                    self._link_last(done)
            self._retain(directory, read_manifest(manifest))
            return
        metrics = data.get("metrics") or {}
        taken = {e["file"] for e in current_entries(entries, directory)} | {LAST}
        name = unique_name(self._file_name(event, metrics), event.step, taken)
        entry = {"file": name, "step": event.step, "epoch": event.epoch,
                 "metrics": metrics, "run": event.run, "seq": event.seq,
                 "snapshot_id": data.get("snapshot_id"), "reason": data.get("reason", "")}
        if entry["file"] not in self._keep(current_entries(entries, directory), entry):
            self.log(self._not_kept(metrics), level="info")
            return
        path = directory / entry["file"]
        try:
            # on the writer thread, waited for, its exception raised here (no writer in a Harness: here)
            sha256, size = (self._persist(data, path) if self.writer is None
                            else self.writer.submit(self._persist, data, path).result())
        except OSError as exc:
            self._fail(event, f"{_describe(exc)} writing {path}{self._room_hint(exc, entries, directory)}")
            return
        entry.update(sha256=sha256, size=size, time=time.time())
        try:
            append_manifest(manifest, entry)
        except OSError as exc:  # not durable without its line, and nothing would ever delete it
            path.unlink(missing_ok=True)
            self._fail(event, f"{_describe(exc)} writing {manifest}")
            return
        self.checkpoint_saved(event, str(path), sha256, size)
        # the new checkpoint is durable: from here on a failure costs only tidiness
        if s["save_last"]:
            self._link_last(entry)
        self._retain(directory, read_manifest(manifest))

    def _room_hint(self, exc: OSError, entries: list[dict[str, Any]], directory: Path) -> str:
        """On a full disk (or quota), what the kept checkpoints take and the fix: by default every one is kept, and
        a run of days fills its disk with them, after which none lands, the newest state included."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return ""
        kept = [e for e in current_entries(entries, directory) if isinstance(e.get("size"), int)]
        many = len(kept) != 1
        taken = (f"the {len(kept)} checkpoint{'s' * many} kept there take{'s' * (not many)} "
                 f"{_size(sum(e['size'] for e in kept))}; ") if kept else ""
        s = self.settings
        if s["save_top_k"] == -1 and s["max_total"] == 0:
            return f" ({taken}free space, or keep fewer: checkpoint settings save_top_k or max_total)"
        return f" ({taken}free space on that disk)"

    def _persist(self, data: dict[str, Any], path: Path) -> tuple[str, int]:
        from ._snapshot_reader import read_snapshot

        snapshot = read_snapshot(data)
        return write_atomically(snapshot.state, path, before_replace=snapshot.check, progress=self.still_working)

    def _file_name(self, event: Event, metrics: dict[str, Any]) -> str:
        fields = {**metrics, "epoch": event.epoch, "step": event.step}
        self._tell_unknown_fields(metrics)
        try:
            name = render_filename(self.settings["filename"], fields)
        except (ValueError, TypeError) as exc:  # a metric of an unexpected type: fall back, never lose the save
            name = render_filename(CheckpointPlugin.settings["filename"].default, fields)
            self.log(f"checkpoint filename {self.settings['filename']!r}: {exc}; saved as {name}", level="warning")
        return name

    def _tell_unknown_fields(self, metrics: dict[str, Any]) -> None:
        """A field that an epoch's metrics lack is a typo, or a metric this run does not have: it is written "na"
        like a metric not measured yet, so say it once. Before the first epoch ends there are no metrics (and the
        run's metric names are not known here): there, "na" is the whole story."""
        unknown = [name for name in template_fields(self.settings["filename"])
                   if name not in (*metrics, "epoch", "step", *self.fields_told)]
        if metrics and unknown:
            self.fields_told.update(unknown)
            self.log(f"checkpoint filename {self.settings['filename']!r}: {', '.join(unknown)} is not among the "
                     f"metrics an epoch reported ({', '.join(metrics)}), so it is written {NOT_MEASURED}; "
                     f"fix the template", level="warning")

    def _keep(self, entries: list[dict[str, Any]], new: dict[str, Any] | None = None) -> set[str]:
        s = self.settings
        if new is not None:
            entries = [e for e in entries if e["file"] != new["file"]] + [new]
        return files_to_keep(entries, s["monitor"], s["mode"], s["save_top_k"], s["save_last"], s["max_total"])

    def _not_kept(self, metrics: dict[str, Any]) -> str:
        s, value = self.settings, metric_value(metrics, self.settings["monitor"])
        if value is None:
            return f"snapshot not written: {s['monitor']!r} is not among its metrics ({', '.join(metrics) or 'none'})"
        return f"snapshot not written: {s['monitor']} {value:.6g} is not among the best {s['save_top_k']}"

    def _link_last(self, entry: dict[str, Any]) -> None:
        try:
            replace_with_link(self.directory / entry["file"], self.directory / LAST)
            append_manifest(self.directory / MANIFEST, {**entry, "file": LAST, "alias_of": entry["file"]})
        except OSError as exc:
            self.log(f"could not update {self.directory / LAST}: {_describe(exc)}", level="warning")

    def _last_is(self, entry: dict[str, Any], entries: list[dict[str, Any]]) -> bool:
        """last.pt names entry's file and its latest manifest line says so."""
        lines = [e for e in entries if e["file"] == LAST]
        try:
            linked = os.path.samefile(self.directory / LAST, self.directory / entry["file"])
        except OSError:
            return False
        return (linked and bool(lines) and lines[-1].get("seq") == entry.get("seq")
                and lines[-1].get("run") == entry.get("run"))

    def _retain(self, directory: Path, entries: list[dict[str, Any]]) -> None:
        current = current_entries(entries, directory)
        keep = self._keep(current)
        for entry in current:
            if entry["file"] not in keep:
                try:
                    (directory / entry["file"]).unlink(missing_ok=True)
                except OSError as exc:
                    self.log(f"could not delete old checkpoint {entry['file']}: {_describe(exc)}", level="warning")
        needed = manifest_needed(entries, directory)
        if len(entries) - len(needed) > MANIFEST_STALE_LINES:
            try:
                rewrite_manifest(directory / MANIFEST, needed)
            except OSError as exc:  # it stays as it was, correct and longer
                self.log(f"could not compact {directory / MANIFEST}: {_describe(exc)}", level="warning")

    def _fail(self, event: Event, reason: str) -> None:
        # The kernel logs checkpoint_failed as a warning; the plugin's own log gets it too.
        print(f"[{self.name}] checkpoint at step {event.step} failed: {reason}", file=sys.stderr)
        self.checkpoint_failed(event, reason)


def load_torch() -> None:
    """Import _snapshot_reader, and with it torch, its shared libraries loaded first without holding the GIL.

    Python holds the GIL while an extension module's libraries are loaded, relocated and their static initializers
    run (libtorch_cpu: 0.25-0.8 s here, seconds when starved), and the I/O thread cannot heartbeat meanwhile: the
    supervisor would take the plugin for hung. A foreign call through ctypes lets the GIL go, so dlopen is called
    that way first, and the import finds them loaded: its longest hold of the GIL fell from 0.4-1.2 s to 0.05-0.15 s
    (docs/benchmarks.md). Where that cannot be done (no dlopen to call, a torch laid out otherwise, a library that
    does not load), the import loads them itself.
    """
    try:
        spec = importlib.util.find_spec("torch")
        libraries = Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None
        dlopen = ctypes.CDLL(None).dlopen
    except (ImportError, ValueError, OSError, AttributeError):
        libraries = None
    if libraries is not None and (libraries / TORCH_PYTHON_LIBRARY).is_file():
        dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
        dlopen(bytes(libraries / TORCH_PYTHON_LIBRARY), os.RTLD_NOW)  # NULL on failure: the import says why
    from . import _snapshot_reader  # noqa: F401


def yield_to_training(priority: str) -> None:
    """Lower the calling thread (the one that writes a checkpoint) below training, and give it one torch thread.

    Only this thread: the plugin's I/O and handler threads stay at the plugin's nice (10, SCHED_BATCH).
    Measured (scripts/bench/checkpoint_stall.py, 2 cores both busy with training; training's step
    next to a persist, x alone): at training's priority with torch's thread pool 0.54x; nice 10
    0.85x; nice 19 0.93x (0.92-1.0x in real runs), an 805 MB checkpoint landing in ~13 s. SCHED_IDLE
    0.95x, but a training that never leaves a core idle starves it: no checkpoint lands until
    training pauses, so it is a choice, not the default. Lowering is always permitted; an
    unprivileged thread can never raise itself back (RLIMIT_NICE), so a setting picks one level.
    """
    import torch

    torch.set_num_threads(1)
    try:
        if priority == "idle" and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread
        elif priority == "background":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)  # Linux: this thread only
    except OSError:  # not permitted here: the plugin's nice stands
        pass


# -- what is on disk ------------------------------------------------------------------------------

def current_entries(entries: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """The checkpoints on disk now, oldest first: each file's latest entry; last.pt is not one of them."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry["file"] == LAST or "alias_of" in entry:
            continue
        latest.pop(entry["file"], None)  # a rewritten name counts from its latest write
        latest[entry["file"]] = entry
    return [e for e in latest.values() if (directory / e["file"]).is_file()]


def manifest_needed(entries: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """The lines a compacted manifest keeps, in their order: each file on disk's latest, last.pt's latest, and
    the RETIRED_KEPT newest of the others (checkpoints deleted by retention, names written again)."""
    on_disk = {id(e) for e in current_entries(entries, directory)}
    aliases = [e for e in entries if e["file"] == LAST or "alias_of" in e]
    retired = [e for e in entries if id(e) not in on_disk and not (e["file"] == LAST or "alias_of" in e)]
    kept = on_disk | {id(e) for e in aliases[-1:]} | {id(e) for e in retired[-RETIRED_KEPT:]}
    return [e for e in entries if id(e) in kept]


def _saved_entry(entries: list[dict[str, Any]], event: Event) -> dict[str, Any] | None:
    """The manifest line of this event's checkpoint (its run and seq), if one was ever written."""
    for entry in reversed(entries):
        if entry.get("run") == event.run and entry.get("seq") == event.seq and "alias_of" not in entry:
            return entry
    return None


def _already_saved(entries: list[dict[str, Any]], event: Event, directory: Path) -> dict[str, Any] | None:
    entry = _saved_entry(entries, event)
    if entry is None:
        return None
    file = directory / entry["file"]
    return entry if file.is_file() and file.stat().st_size == entry.get("size") else None


# -- retention ------------------------------------------------------------------------------------

def files_to_keep(entries: list[dict[str, Any]], monitor: str, mode: str, save_top_k: int,
                  save_last: bool, max_total: int) -> set[str]:
    """Which of these checkpoints (oldest first; the last is the newest) the settings keep."""
    if not entries:
        return set()
    files = [e["file"] for e in entries]
    newest = {files[-1]} if save_last else set()
    scored = [(metric_value(e.get("metrics") or {}, monitor), i) for i, e in enumerate(entries)] if monitor else []
    ranked = [files[i] for _, i in sorted((v if mode == "min" else -v, i) for v, i in scored if v is not None)]
    if save_top_k == -1:
        chosen = files
    elif monitor:
        chosen = ranked[:save_top_k]  # ties: the older stays, as in Lightning
    else:
        chosen = files[-save_top_k:] if save_top_k else []  # no ranking: the k newest (all of fewer)
    keep = newest | set(chosen)
    guarded = newest | (set(ranked[:1]) & keep)  # max_total never removes the newest nor the best
    for file in files:  # oldest first
        if max_total <= 0 or len(keep) <= max_total:
            break
        if file in keep and file not in guarded:
            keep.discard(file)
    return keep


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """A finite number to rank by, or None (missing, not a number, NaN: never among the best)."""
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


# -- file names -----------------------------------------------------------------------------------

NOT_MEASURED = "na"  # a template's metric with no value yet (a step checkpoint before the first validation)


def render_filename(template: str, fields: dict[str, Any]) -> str:
    """The template filled in, with SUFFIX; a field with no value (missing, None, NaN) is "na", whatever its format."""
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        value = fields.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            parts.append(NOT_MEASURED)
        else:
            parts.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    name = "".join(parts).format_map(fields)
    return name if name.endswith(SUFFIX) else name + SUFFIX


def unique_name(name: str, step: int, taken: set[str]) -> str:
    """`name`, or where a checkpoint on disk has it, the same with the step added (and a count, if need be).

    A template without {step} (epoch and loss, say) names every step checkpoint of an epoch alike; each
    one must still be a file of its own, not silently the last of them."""
    if name not in taken:
        return name
    stem = name[: -len(SUFFIX)]
    if f"step{step:06d}" not in stem:  # the default template has the step already
        stem = f"{stem}-step{step:06d}"
    candidate, count = stem + SUFFIX, 2
    while candidate in taken:
        candidate, count = f"{stem}-{count}{SUFFIX}", count + 1
    return candidate


def _check_filename(template: str) -> None:
    """A template that makes a plain file name in the checkpoint directory: no path of its own, so it stays there."""
    where = f"filename = {template!r} is not allowed"
    if not template or "/" in template or os.sep in template or template.startswith(".") or "\x00" in template:
        raise SettingsError(f"{where}; it must be a plain file name (no '/', not starting with '.', no NUL)")
    try:
        names = template_fields(template)  # Setting's METRIC_FIELDS check made them names
        name = render_filename(template, {**{n: 0.0 for n in names}, "epoch": 0, "step": 0})  # every format checked
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise SettingsError(f"{where} ({exc}); fields are epoch, step or a metric, "
                            f"e.g. {{validation_loss:.4f}}") from None
    if name == LAST:
        raise SettingsError(f"{where}; {LAST} is the link to the newest checkpoint, pick another name")
    if len(name.encode()) > NAME_MAX_BYTES:
        raise SettingsError(f"{where}; filled in it is {len(name.encode())} bytes ({name[:40]}...), and a checkpoint's "
                            f"name must be at most {NAME_MAX_BYTES} bytes: shorten it")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _describe(exc: OSError) -> str:
    """"No space left on device (errno 28)": what went wrong, in the words users search for."""
    if exc.errno is None:
        return str(exc)
    return f"{exc.strerror or os.strerror(exc.errno)} (errno {exc.errno})"
