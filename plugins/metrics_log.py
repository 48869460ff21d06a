"""JSON Lines in the run directory: one record per epoch and every N steps, readable with pandas."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from trainbus.proto import DURABLE, Event
from trainbus.proto.strict_json import strict_dumps
from trainbus.sdk import PATH, Plugin, Setting, SettingsError

# On restart we look for the last written seq in this much of the file's end: records are a few
# hundred bytes, so it holds thousands of them.
TAIL_BYTES = 1 << 20
# Records held while the disk refuses writes (full, quota): they go out with the next write that fits.
# Past this many, the handler fails (retried, then dead-lettered) rather than hold more.
MAX_HELD_RECORDS = 10_000
# Records are written (the OS has them: a crash of this process loses none) as they come; fsync, for a crash of
# the machine, follows an epoch's record at most this often: a small model's 0.05-0.2 s epochs made it 5-20
# fsyncs a second, the largest part of this plugin's CPU (docs/benchmarks.md). As the kernel's journal does.
FSYNC_INTERVAL_S = 1.0
SESSION_PREFIX = b'{"kind": "session"'  # how a `session` record starts (strict_dumps keeps the keys' order)


class MetricsLogPlugin(Plugin):
    """JSON Lines in the run directory: one record per epoch and every N steps, readable with pandas.

    Every record is flat (`training_accuracy`, not `{"training_metrics": {"accuracy": ...}}`) and
    carries `kind` and the `seq` of the event it came from, so
    `pandas.read_json(path, lines=True).query("kind == 'epoch'")` gives one column per metric. An epoch
    that a stop cut short (Ctrl-C, a plugin's stop) is a `partial_epoch` record: its means are over
    `training_batch_count` of `batches_planned` batches, so it is not mixed in with the whole epochs.
    `time` is the event's wall time in seconds since the epoch. Non-finite numbers are written as null.
    """

    delivery = DURABLE  # a log with holes is worse than a late one
    settings = {
        "filename": Setting("metrics.jsonl", "the JSON Lines file, in the run directory", kind=PATH),
        "every_n_steps": Setting(50, "a step record every this many steps (0: none)", min=0),
    }
    _fd: int | None = None
    _next_fsync = 0.0

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        name = settings["filename"]
        if name.strip() in ("", ".") or name.endswith("/"):  # the run directory, or a folder: no file to append to
            raise SettingsError(f"filename = {name!r} names a folder: give a file's name, e.g. 'metrics.jsonl'")

    def setup(self) -> None:
        self.path = Path(self.run_dir) / self.settings["filename"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A restarted durable plugin is replayed from its last ack, which may trail what it wrote.
        self.last_seq = _recover(self.path) if self.path.exists() else 0
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size  # the end of the last whole line
        self._held: list[bytes] = []
        start = self.session_seq
        if start > 1 and (self.last_seq < start or _last_session(self.path) != start):
            # A continued run's kernel numbers from `start` on (PROTOCOL.md §12): records here at or past it were
            # written under an earlier kernel, of events a power loss took from the journal, whose seqs it gives to
            # new events. They stay (what happened), and the seqs are written again; the record says from where.
            self.last_seq = min(self.last_seq, start - 1)
            self._append({"kind": "session", "session_seq": start, "after_seq": self.last_seq, "time": time.time()})

    def teardown(self) -> None:
        if self._fd is not None:
            self._write_held()
            self._fsync()
            os.close(self._fd)
            self._fd = None

    # records

    def on_end_training_batch(self, event: Event) -> None:
        every = self.settings["every_n_steps"]
        if not every or event.step % every:
            return
        data = event.data
        self._write(event, "step", loss=data.get("loss"), batch_index=data.get("batch_index"),
                    training_loss_mean=_mean(data.get("training_loss_total"), data.get("training_batch_count")))

    def on_end_epoch(self, event: Event) -> None:
        data = event.data
        kind = "partial_epoch" if data.get("partial") is True else "epoch"
        self._write(event, kind, training_loss=data.get("training_loss"),
                    validation_loss=data.get("validation_loss"), lr=data.get("lr"),
                    training_batch_count=data.get("training_batch_count"), batches_planned=data.get("batches_planned"),
                    **_flatten("training", data.get("training_metrics")),
                    **_flatten("validation", data.get("validation_metrics")))
        if time.monotonic() >= self._next_fsync:  # what people come back for; at most once a second (0.05 s epochs)
            self._fsync()

    def on_metric(self, event: Event) -> None:
        data = event.data
        # the step (epoch) it is about, as the plugin said it; the envelope's are the kernel's as it arrived
        self._write(event, "metric", name=data.get("name"), value=data.get("value"), plugin=data.get("plugin"),
                    step=event.step if data.get("step") is None else data["step"],
                    epoch=data["epoch"] if isinstance(data.get("epoch"), int) else event.epoch)

    def on_end_training_session(self, event: Event) -> None:
        data = event.data
        reasons = data.get("stop_reasons") or []
        self._write(event, "session_end", epochs_completed=data.get("epochs_completed"), steps=data.get("steps"),
                    stopped_early=data.get("stopped_early"), stop_reasons="; ".join(str(r) for r in reasons),
                    training_loss=data.get("training_loss"), validation_loss=data.get("validation_loss"),
                    **_flatten("training", data.get("training_metrics")),
                    **_flatten("validation", data.get("validation_metrics")))

    def _write(self, event: Event, kind: str, **fields: Any) -> None:
        if event.seq <= self.last_seq:
            return  # written before a restart; the replay brings it again
        record = {"kind": kind, "seq": event.seq, "step": event.step, "epoch": event.epoch, "time": event.ts}
        record.update(fields)
        self._append(record)
        self.last_seq = event.seq

    def _append(self, record: dict[str, Any]) -> None:
        line = strict_dumps(record)  # NaN as null: pandas reads it as NaN, and strict parsers read it at all
        if len(self._held) >= MAX_HELD_RECORDS:
            raise OSError(f"{self.path}: {len(self._held)} records wait for room on the disk; no more are held")
        self._held.append((line + "\n").encode())
        self._write_held()  # in the OS's hands now: a crash of this process loses nothing

    def _write_held(self) -> None:
        """All or nothing: a refused write is cut back to the last whole line, and the lines wait for the next
        write (never a torn line, never a line twice)."""
        if not self._held:
            return
        blob = b"".join(self._held)
        try:
            done = 0
            while done < len(blob):
                done += os.pwrite(self._fd, blob[done:], self._size + done)
        except OSError as exc:
            os.ftruncate(self._fd, self._size)
            if len(self._held) == 1:  # the first record held back: say so once per outage
                self.log(f"cannot write {self.path} ({exc.strerror}); holding records until there is room",
                         level="warning")
            return
        self._size += len(blob)
        self._held.clear()

    def _fsync(self) -> None:
        self._next_fsync = time.monotonic() + FSYNC_INTERVAL_S
        try:
            os.fsync(self._fd)
        except OSError:  # the data is in the page cache; the next fsync (or the OS) writes it
            pass


def _recover(path: Path) -> int:
    """The seq of the last complete record; a torn last line (a crash mid-write) is cut off first."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_BYTES)
        f.seek(start)
        tail = f.read()
        complete = tail.rfind(b"\n") + 1
        if start + complete < size and (complete or not start):
            f.truncate(start + complete)
    for line in reversed(tail[:complete].splitlines()):
        try:
            record = json.loads(line)
            return int(record["after_seq"] if record.get("kind") == "session" else record["seq"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # the first line of the tail may be partial
    return 0


def _last_session(path: Path) -> int:
    """The session_seq of the file's last `session` record (1: none, a run's first kernel wrote it all). Read back
    from the end a MiB at a time: at a plugin's start in a continued run, past the records of this kernel alone."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - TAIL_BYTES)
            f.seek(start)
            # a record whose start the chunk's end cuts is found whole in it; the file's start counts as a line's
            chunk = (b"\n" if start == 0 else b"") + f.read(end - start + len(SESSION_PREFIX))
            at = chunk.rfind(b"\n" + SESSION_PREFIX)
            if at >= 0:
                f.seek(start + at + (0 if start == 0 else 1))
                try:
                    return int(json.loads(f.readline())["session_seq"])
                except (ValueError, KeyError, TypeError):
                    return 1
            end = start
    return 1


def _flatten(prefix: str, metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        return {}
    # A metric named "loss" or "batch_count" would overwrite the loop's own column of that name.
    return {f"{prefix}_{name}": value for name, value in metrics.items() if name not in ("loss", "batch_count")}


def _mean(total: Any, count: Any) -> float | None:
    if not isinstance(total, (int, float)) or not isinstance(count, int) or count <= 0:
        return None
    return float(total) / count
