"""`trainbus runs list` and `trainbus runs show`: what a runs directory holds, read without touching a live run.

A run's status comes from its `summary.json` (completed, stopped, failed, interrupted), written when the
kernel is done. Without one the run is `running` while the kernel named in `kernel.pid` is alive, and `died`
once it is gone (killed, out of memory, power loss: it never got to write its summary).

`list` reads, per run, only small files and a bounded part of the journal: summary.json, config.json, the
journal's head (when the run started, how many epochs it plans) and, for a run without a summary, its tail
(where it is now). A journal of many GB costs list no more than one of a few KB. `show` reads the whole
journal, streamed, for the per-epoch table and the plugins' history.

Nothing here writes into a run directory except `write_kernel_pid`, which the kernel calls.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import msgpack

from trainbus.proto import JOURNAL_NAME, Event, ProtocolError, event_from_map, event_to_map, pack
from trainbus.proto import events as ev
from trainbus.proto.codec import MAX_MESSAGE_BYTES, UNPACK_LIMITS

KERNEL_PID = "kernel.pid"  # the kernel's process id, written as the run directory is made (0600)
SUMMARY = "summary.json"
CONFIG = "config.json"
STATUSES = ("running", "completed", "stopped", "failed", "interrupted", "died")

HEAD_BYTES = 256 * 1024  # where start_training_session is: after the plugins' hellos (heartbeats at 100 ms)
TAIL_BYTES = 1024 * 1024  # where a run without a summary is now: thousands of events
SMALL_TAIL_BYTES = 64 * 1024  # an ended run's last event
EPOCH_SCAN_BYTES = 16 * 1024 * 1024  # how far back a running run's last end_epoch is looked for, bytes only
STALE_S = 10.0  # no kernel.pid (a run from before there was one): heartbeats every second, or it is gone

# Every journal record is an event envelope packed by proto.codec: a map whose first key is "v". Its first
# bytes mark where a record may start when reading from the middle of a journal (derived, not spelled out).
_RECORD_START = pack(event_to_map(Event(seq=1, run="", type="", ts=0.0, step=0, epoch=0)))[:3]


class RunLookupError(Exception):
    """No such run, or no runs directory: a mistake the user can fix (the CLI prints one line, exit 2)."""


# -- the kernel's pid file -----------------------------------------------------------------------

def write_kernel_pid(run_dir: Path) -> None:
    """Record this process as the run's kernel (owner-only; replaced whole when a run is continued)."""
    path = Path(run_dir) / KERNEL_PID
    temporary = path.with_name(f".{KERNEL_PID}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def kernel_process(run_dir: Path) -> tuple[int | None, bool | None]:
    """(pid, alive) of the run's kernel per its kernel.pid; (None, None) when there is no readable one.

    A process with that pid that started after the file was written is someone else (the pid was reused).
    """
    path = Path(run_dir) / KERNEL_PID
    try:
        text, written = path.read_text(), path.stat().st_mtime
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None, None
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or process.create_time() > written + 1.0:
            return pid, False
    except psutil.NoSuchProcess:
        return pid, False
    except psutil.AccessDenied:
        pass  # it exists; whose it is cannot be told: alive
    return pid, True


# -- finding runs --------------------------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / JOURNAL_NAME).is_file()


def find_runs(runs_dir: Path) -> list[Path]:
    """The run directories in runs_dir (folders with a config.json or a journal), in name order."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise RunLookupError(f"no runs directory {runs_dir.resolve()} (is --runs-dir right?)")
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and is_run_dir(p))


def resolve_run(run: str, runs_dir: Path) -> Path:
    """The run directory `run` names: a folder of runs_dir, a run directory's path, or a unique id prefix."""
    runs_dir = Path(runs_dir)
    path_like = os.sep in run or run.startswith(".")
    for candidate in (runs_dir / run, Path(run)) if path_like else (runs_dir / run,):
        if candidate.is_dir() and is_run_dir(candidate):
            return candidate.resolve()
    if not runs_dir.is_dir():
        raise RunLookupError(f"no run {run!r}: the runs directory {runs_dir.resolve()} does not exist "
                             f"(is --runs-dir right?)")
    if run and not path_like:
        matches = [p for p in find_runs(runs_dir) if p.name.startswith(run)]
        if len(matches) == 1:
            return matches[0].resolve()
        if matches:
            raise RunLookupError(f"run {run!r} is ambiguous in {runs_dir.resolve()}: "
                                 f"{', '.join(p.name for p in matches[:5])}{', ...' if len(matches) > 5 else ''}")
    if path_like:
        looked = f"neither {Path(run).resolve()} nor {(runs_dir / run).resolve()} is a run directory"
    else:
        looked = f"{(runs_dir / run).resolve()} does not exist, and no run id there starts with {run!r}"
    raise RunLookupError(f"no run {run!r}: {looked} (is --runs-dir right? `trainbus runs list` shows the runs)")


# -- reading a journal in bounded pieces ---------------------------------------------------------

_FREQUENT = ev.BATCH_EVENTS | {ev.HEARTBEAT}


def _records(unpacker: msgpack.Unpacker) -> Iterator[dict[str, Any]]:
    """The unpacker's whole, valid event maps, gap-free by seq, up to the first torn, garbled or out-of-order one.

    The per-batch events and heartbeats (nearly all of a long journal) get a check of their envelope's types
    inline, the rare kinds event_from_map's full one: a fifth of the cost of decoding every record to an Event.
    """
    previous = None
    try:
        for r in unpacker:
            if not (type(r) is dict and r.get("type") in _FREQUENT and type(r.get("seq")) is int
                    and type(r.get("step")) is int and type(r.get("epoch")) is int and type(r.get("data")) is dict
                    and type(r.get("ts")) is float and type(r.get("run")) is str and "v" in r):
                event_from_map(r)
            if previous is not None and r["seq"] != previous + 1:
                return
            previous = r["seq"]
            yield r
    except (ProtocolError, ValueError, msgpack.UnpackException):
        return


def _event(r: dict[str, Any]) -> Event:
    """A map _records passed as an Event."""
    return Event(seq=r["seq"], run=r["run"], type=r["type"], ts=float(r["ts"]), step=r["step"], epoch=r["epoch"],
                 data=r["data"], v=r["v"])


def _parse(data: bytes) -> list[Event]:
    """The whole, valid events at the start of `data`."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **UNPACK_LIMITS)
    unpacker.feed(data)
    return [_event(r) for r in _records(unpacker)]


def stream_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole event map of a journal, streamed (any size; what proto.journal_format.iter_records reads)."""
    with open(path, "rb") as f:
        yield from _records(msgpack.Unpacker(f, max_buffer_size=2 * MAX_MESSAGE_BYTES, **UNPACK_LIMITS))


def journal_head(path: Path, max_bytes: int = HEAD_BYTES) -> list[Event]:
    """The events in the journal's first max_bytes."""
    try:
        with open(path, "rb") as f:
            return _parse(f.read(max_bytes))
    except OSError:
        return []


def journal_tail(path: Path, max_bytes: int = TAIL_BYTES) -> list[Event]:
    """The events in the journal's last max_bytes, found without reading what comes before them."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return []
    if start == 0:
        return _parse(data)
    at, single = data.find(_RECORD_START), []
    while at != -1:
        events = _parse(data[at:])
        if len(events) >= 2:  # a false start inside a record does not go on as consecutive, valid events
            return events
        single = single or events
        at = data.find(_RECORD_START, at + 1)
    return single


def last_event_of(path: Path, type_: str, max_bytes: int = EPOCH_SCAN_BYTES) -> Event | None:
    """The journal's last event of one type within its last max_bytes, found by its bytes (no decoding)."""
    marker = pack("type") + pack(type_)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)
    except OSError:
        return None
    end = len(data)
    while (hit := data.rfind(marker, 0, end)) != -1:
        begin = data.rfind(_RECORD_START, max(0, hit - 4096), hit)
        if begin != -1:
            events = _parse(data[begin:begin + 1024 * 1024])
            if events and events[0].type == type_:
                return events[0]
        end = hit
    return None


# -- what a run is -------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _event_brief(event: Event | None, now: float) -> dict[str, Any] | None:
    if event is None:
        return None
    return {"type": event.type, "seq": event.seq, "epoch": event.epoch, "step": event.step, "at": _iso(event.ts),
            "age_s": round(max(0.0, now - event.ts), 1)}


def _plugin_trouble(plugins: dict[str, Any], undrained: dict[str, Any]) -> list[str]:
    trouble = []
    for name, p in sorted(plugins.items()):
        if not isinstance(p, dict):
            continue
        if p.get("state") == "failed":
            trouble.append(f"{name} failed" + (f" ({p['restarts']} restarts)" if p.get("restarts") else ""))
        elif p.get("restarts"):
            trouble.append(f"{name} {p['restarts']} restart{'s' if p['restarts'] != 1 else ''}")
    trouble += [f"{name} undrained (acked to seq {acked})" for name, acked in sorted(undrained.items())]
    return trouble


def run_overview(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """One run in brief, from summary.json, config.json and a bounded head and tail of its journal.

    Keys: id, dir, status (one of STATUSES), detail (why a run without a summary has its status), pid,
    target, started_at (ISO 8601) and started_ts (seconds since 1970), duration_s (of the latest session
    when the run was continued in place), epochs_completed,
    epochs (planned), steps, training_loss, validation_loss and validation_metrics (the last epoch's),
    stop_reasons, error, plugin_trouble, last_event (for a run without a summary: where the journal ends).
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir).resolve()
    journal = run_dir / JOURNAL_NAME
    config = _read_json(run_dir / CONFIG) or {}
    head = journal_head(journal)
    starts = [e for e in head if e.type == ev.START_TRAINING_SESSION]
    if head:
        started = head[0].ts
    else:
        try:
            started = (run_dir / CONFIG).stat().st_mtime
        except OSError:
            started = None
    info: dict[str, Any] = {
        "id": run_dir.name, "dir": str(run_dir), "status": None, "detail": None, "pid": None,
        "target": config.get("target"), "started_at": _iso(started), "started_ts": started, "duration_s": None,
        "epochs_completed": None, "epochs": starts[-1].data.get("epochs") if starts else config.get("epochs"),
        "steps": None, "training_loss": None, "validation_loss": None, "validation_metrics": {},
        "stop_reasons": [], "error": None, "plugin_trouble": [], "last_event": None,
    }
    summary = _read_json(run_dir / SUMMARY)
    if summary is None or summary.get("status") not in STATUSES:
        pid, alive = kernel_process(run_dir)
        tail = journal_tail(journal)
        summary = _read_json(run_dir / SUMMARY)  # the kernel may have ended meanwhile
        if summary is None or summary.get("status") not in STATUSES:
            _from_journal_tail(info, journal, tail, pid, alive, started, now)
            return info
    outcome = summary.get("outcome") or {}
    # a failed run's outcome says 0 steps (the loop counts them at its end): the journal's last event knows
    last = journal_tail(journal, SMALL_TAIL_BYTES)[-1:]
    steps = max([outcome.get("steps") or 0] + [e.step for e in last])
    info.update(
        status=summary["status"], duration_s=summary.get("duration_s"),
        epochs_completed=outcome.get("epochs_completed"), steps=steps,
        training_loss=outcome.get("training_loss"), validation_loss=outcome.get("validation_loss"),
        validation_metrics=outcome.get("validation_metrics") or {}, stop_reasons=outcome.get("stop_reasons") or [],
        error=summary.get("error"),
        plugin_trouble=_plugin_trouble(summary.get("plugins") or {}, summary.get("undrained") or {}))
    return info


def _from_journal_tail(info: dict[str, Any], journal: Path, tail: list[Event], pid: int | None, alive: bool | None,
                       started: float | None, now: float) -> None:
    """A run without a summary: running or died, and how far it got, from the journal's tail."""
    last = tail[-1] if tail else None
    age = None if last is None else max(0.0, now - last.ts)
    if alive:
        status, detail = "running", f"kernel pid {pid} is alive"
    elif pid is not None:
        status, detail = "died", f"kernel pid {pid} is gone and wrote no {SUMMARY}"
    elif age is not None and age < STALE_S:  # a run from before kernel.pid: heartbeats say it is going
        status, detail = "running", f"no {KERNEL_PID}; the journal grew {age:.0f} s ago"
    else:
        status, detail = "died", f"no {SUMMARY} and no {KERNEL_PID}" + (
            f"; the journal last grew {_duration(age)} ago" if age is not None else "; no events")
    info.update(status=status, detail=detail, pid=pid, last_event=_event_brief(last, now))
    if last is None:
        return
    end = now if status == "running" else last.ts
    info["duration_s"] = round(end - started, 3) if started is not None else None
    info["steps"] = last.step
    starts = [e for e in tail if e.type == ev.START_TRAINING_SESSION]
    if starts:
        info["epochs"] = starts[-1].data.get("epochs")
    epoch_end = next((e for e in reversed(tail) if e.type == ev.END_EPOCH), None)
    if epoch_end is None and last.epoch > 1:
        epoch_end = last_event_of(journal, ev.END_EPOCH)
    info["epochs_completed"] = max(epoch_end.epoch if epoch_end else 0, last.epoch - 1, 0)
    if epoch_end is not None:
        info["training_loss"] = epoch_end.data.get("training_loss")
        info["validation_loss"] = epoch_end.data.get("validation_loss")
        info["validation_metrics"] = epoch_end.data.get("validation_metrics") or {}
    failed = next((e for e in reversed(tail) if e.type == ev.RUN_FAILED), None)
    if failed is not None:
        info["error"] = failed.data.get("error")
    stop = next((e for e in reversed(tail) if e.type == ev.STOP_REQUESTED), None)
    if stop is not None:
        info["stop_reasons"] = list(stop.data.get("reasons") or [])
    # plugin trouble in the tail only: list stays bounded (show counts the whole journal)
    plugins: dict[str, dict[str, Any]] = {}
    for e in tail:
        name = e.data.get("plugin") if isinstance(e.data.get("plugin"), str) else None
        if name and e.type == ev.PLUGIN_RESTARTED:
            plugins.setdefault(name, {"restarts": 0})["restarts"] = e.data.get("restarts", 0)
        elif name and e.type == ev.PLUGIN_FAILED:
            plugins.setdefault(name, {"restarts": 0})["state"] = "failed"
    info["plugin_trouble"] = _plugin_trouble(plugins, {})


def list_runs(runs_dir: Path, now: float | None = None) -> list[dict[str, Any]]:
    """Every run of runs_dir in brief (run_overview), newest first."""
    now = time.time() if now is None else now
    runs = []
    for run_dir in find_runs(runs_dir):
        try:
            runs.append(run_overview(run_dir, now))
        except OSError as exc:  # someone else's run (0700), a disk error: one row that says so
            runs.append({"id": run_dir.name, "dir": str(run_dir.resolve()), "status": "unreadable",
                         "detail": f"{exc.strerror or exc}", "started_at": None, "started_ts": None})
    return sorted(runs, key=lambda r: (r.get("started_ts") or 0.0, r["id"]), reverse=True)


def run_details(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """run_overview plus what only the whole journal (streamed) holds: epochs, plugins, checkpoints; and files.

    Added keys: sessions (one per start_training_session: a continued run has several), device, model,
    parameters, hyperparameters, epoch_table (one row per epoch; a repeated epoch's latest row), best
    (the lowest validation loss and its epoch), plugins ({name: state, restarts, crashes, log, ...}),
    checkpoints (saved paths, and counts of failed and skipped), undrained, bus, files.
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir).resolve()
    info = run_overview(run_dir, now)
    summary = _read_json(run_dir / SUMMARY) or {}
    config = _read_json(run_dir / CONFIG) or {}
    epochs: dict[int, dict[str, Any]] = {}
    epoch_started: dict[int, float] = {}
    sessions: list[dict[str, Any]] = []
    plugins: dict[str, dict[str, Any]] = {}
    for p in config.get("plugins") or []:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            plugins[p["name"]] = {"state": "not started", "restarts": 0, "crashes": []}
    saved: list[dict[str, Any]] = []
    checkpoint_counts = {"failed": 0, "skipped": 0}
    error = None
    journal = run_dir / JOURNAL_NAME
    last_record: dict[str, Any] | None = None
    for record in stream_journal(journal) if journal.is_file() else ():
        last_record = record
        if record["type"] in _FREQUENT:
            continue
        e = _event(record)
        type_, data = e.type, e.data
        if type_ == ev.START_EPOCH:
            epoch_started[e.epoch] = e.ts
        elif type_ == ev.END_EPOCH:
            epochs[e.epoch] = _epoch_row(e, epoch_started.get(e.epoch))
        elif type_ == ev.START_TRAINING_SESSION:
            error = None  # a continued run: an earlier session's failure is not this one's
            sessions.append({"started_at": _iso(e.ts), "epochs": data.get("epochs"), "device": data.get("device"),
                             "model": data.get("model"), "parameters": data.get("parameters"),
                             "hyperparameters": data.get("hyperparameters"), "resumed_from": None})
        elif type_ == ev.LOAD_CHECKPOINT and sessions:
            sessions[-1]["resumed_from"] = data.get("path")
        elif type_ == ev.RUN_FAILED:
            error = data.get("error")
        elif type_ == ev.CHECKPOINT_SAVED:
            saved.append({"path": data.get("path"), "epoch": data.get("epoch", e.epoch), "step": data.get("step", e.step),
                          "at": _iso(e.ts)})
        elif type_ == ev.CHECKPOINT_FAILED:
            checkpoint_counts["failed"] += 1
        elif type_ == ev.CHECKPOINT_SKIPPED:
            checkpoint_counts["skipped"] += 1
        elif type_.startswith("plugin_") and isinstance(data.get("plugin"), str):
            _plugin_event(plugins.setdefault(data["plugin"], {"state": "not started", "restarts": 0, "crashes": []}),
                          type_, data)
    for name, p in (summary.get("plugins") or {}).items():  # the supervisor's own account wins where there is one
        if isinstance(p, dict):
            plugins.setdefault(name, {}).update({k: p[k] for k in ("state", "restarts", "crashes") if k in p})
    undrained = summary.get("undrained") or {}
    for name, p in plugins.items():
        p["log"] = str(run_dir / "plugins" / f"{name}.log") if (run_dir / "plugins" / f"{name}.log").is_file() else None
        if name in undrained:
            p["undrained_acked_seq"] = undrained[name]
    session = sessions[-1] if sessions else {}
    rows = [epochs[k] for k in sorted(epochs)]
    losses = [(row["validation_loss"], row["epoch"]) for row in rows if isinstance(row.get("validation_loss"), float)]
    best = min(losses) if losses else None
    info.update(
        sessions=sessions, device=session.get("device"), model=session.get("model"),
        parameters=session.get("parameters"), hyperparameters=session.get("hyperparameters", config.get("hyperparameters")),
        epoch_table=rows, best={"validation_loss": best[0], "epoch": best[1]} if best else None,
        plugins=plugins, checkpoints={"saved": saved, **checkpoint_counts}, undrained=undrained,
        bus=summary.get("bus") or {}, files=_files(run_dir))
    if info["error"] is None and error is not None:
        info["error"] = error
    last = _event(last_record) if last_record is not None else None
    if last is not None and info["status"] in ("running", "died"):
        info["last_event"] = _event_brief(last, now)
        if info["status"] == "running":  # the streamed read went further than the overview's tail
            info["steps"] = last.step
    if info["status"] in ("running", "died") and rows:
        info["epochs_completed"] = max(info["epochs_completed"] or 0, rows[-1]["epoch"])
    return info


def _epoch_row(e: Event, started: float | None) -> dict[str, Any]:
    data = e.data
    return {"epoch": e.epoch, "step": e.step, "training_loss": data.get("training_loss"),
            "validation_loss": data.get("validation_loss"),
            "training_metrics": data.get("training_metrics") or {},
            "validation_metrics": data.get("validation_metrics") or {}, "lr": data.get("lr"),
            "duration_s": round(e.ts - started, 3) if started is not None else None, "ended_at": _iso(e.ts)}


def _plugin_event(p: dict[str, Any], type_: str, data: dict[str, Any]) -> None:
    """A plugin's state as the supervisor's events tell it (for a run with no summary to say so)."""
    if type_ == ev.PLUGIN_STARTED:
        p["state"], p["pid"] = "starting", data.get("pid")
    elif type_ == ev.PLUGIN_READY:
        p["state"] = "running"
    elif type_ == ev.PLUGIN_RESTARTED:
        p["state"], p["pid"], p["restarts"] = "starting", data.get("pid"), data.get("restarts", p["restarts"] + 1)
    elif type_ in (ev.PLUGIN_CRASHED, ev.PLUGIN_HUNG):
        p["state"] = "hung" if type_ == ev.PLUGIN_HUNG else "backoff"
        if type_ == ev.PLUGIN_CRASHED and not data.get("hung"):
            p["crashes"].append(str(data.get("cause")))
        elif type_ == ev.PLUGIN_HUNG:
            p["crashes"].append(f"hung ({data.get('reason')})")
    elif type_ == ev.PLUGIN_FAILED:
        p["state"], p["reason"] = "failed", data.get("reason")
    elif type_ == ev.PLUGIN_EXITED:
        p["state"] = "exited"


def _files(run_dir: Path) -> list[dict[str, Any]]:
    """What the run directory holds: its files and folders at the top, and each plugin's files."""
    found = []
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return found
    for path in entries:
        try:
            if path.is_dir():
                files = [p for p in path.rglob("*") if p.is_file()]
                found.append({"path": str(path), "kind": "folder", "files": len(files),
                              "bytes": sum(p.stat().st_size for p in files)})
                if path.name == "plugins":
                    found += [{"path": str(p), "kind": "file", "bytes": p.stat().st_size} for p in sorted(files)]
            elif path.is_file():
                found.append({"path": str(path), "kind": "file", "bytes": path.stat().st_size})
        except OSError:
            continue
    return found


# -- printing ------------------------------------------------------------------------------------

STATUS_STYLE = {"completed": "green", "stopped": "yellow", "running": "cyan", "interrupted": "magenta",
                "failed": "red", "died": "red", "unreadable": "red"}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"


def _when(iso: str | None) -> str:
    return "-" if not iso else iso[:19].replace("T", " ")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _short_target(target: str | None) -> str:
    """/long/path/to/train.py:build -> train.py:build; a module target as it is."""
    if not target:
        return "-"
    module, sep, function = target.rpartition(":")
    return (Path(module).name + sep + function) if "/" in module else target


def _epochs(run: dict[str, Any]) -> str:
    done, planned = run.get("epochs_completed"), run.get("epochs")
    if done is None:
        return "-"
    return f"{done}/{planned}" if planned else str(done)


def _validation(run: dict[str, Any]) -> str:
    parts = [f"loss {_num(run['validation_loss'])}"] if run.get("validation_loss") is not None else []
    parts += [f"{k} {_num(v)}" for k, v in (run.get("validation_metrics") or {}).items()]
    return ", ".join(parts) or "-"


def _print_table(console, table) -> None:
    """A table; to a file or a pipe without the padding rich gives each row's last cell."""
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    console.out("\n".join(line.rstrip() for line in captured.get().splitlines()), highlight=False)


def print_list(console, runs: list[dict[str, Any]], runs_dir: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not runs:
        console.print(f"no runs in {escape(str(Path(runs_dir).resolve()))}")
        return
    from rich.table import Column

    fixed = dict(no_wrap=True)
    table = Table(Column("run", **fixed), Column("status", **fixed), Column("target", overflow="fold"),
                  Column("started", **fixed), Column("duration", **fixed), Column("epochs", **fixed),
                  Column("val loss", **fixed), Column("val metrics"), Column("plugin trouble"),
                  box=None, pad_edge=False)
    for run in runs:
        style = STATUS_STYLE.get(run["status"], "")
        metrics = ", ".join(f"{k} {_num(v)}" for k, v in (run.get("validation_metrics") or {}).items())
        table.add_row(escape(run["id"]), f"[{style}]{run['status']}[/{style}]" if style else run["status"],
                      escape(_short_target(run.get("target"))), _when(run.get("started_at"))[:16],
                      _duration(run.get("duration_s")), _epochs(run), _num(run.get("validation_loss")),
                      escape(metrics) or "-", escape("; ".join(run.get("plugin_trouble") or [])) or "-")
    _print_table(console, table)


def print_show(console, run: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    def line(label: str, text: str) -> None:
        console.print(f"  {label:<12}{text}")

    style = STATUS_STYLE.get(run["status"], "")
    console.print(f"[bold]run {escape(run['id'])}[/bold]: [{style}]{run['status']}[/{style}]"
                  + (f" ({escape(run['detail'])})" if run.get("detail") else ""))
    line("directory", escape(run["dir"]))
    line("target", escape(run.get("target") or "-"))
    if run.get("device") or run.get("model"):
        line("model", escape(f"{run.get('model') or '?'}, {run.get('parameters') or '?'} parameters, "
                             f"on {run.get('device') or '?'}"))
    if run.get("hyperparameters"):
        line("hyperparams", escape(", ".join(f"{k}={json.dumps(v)}" for k, v in run["hyperparameters"].items())))
    latest = " (the latest session)" if len(run.get("sessions") or []) > 1 and run["status"] != "running" else ""
    line("started", f"{_when(run.get('started_at'))}, {'running for' if run['status'] == 'running' else 'lasted'} "
                    f"{_duration(run.get('duration_s'))}{latest}")
    resumed = [s for s in run.get("sessions") or [] if s.get("resumed_from")]
    if len(run.get("sessions") or []) > 1 or resumed:
        line("sessions", escape(f"{len(run['sessions'])}; latest resumed from {resumed[-1]['resumed_from']}"
                                if resumed else str(len(run["sessions"]))))
    line("epochs", f"{_epochs(run)}, {run.get('steps') if run.get('steps') is not None else '-'} steps")
    if run.get("last_event"):
        e = run["last_event"]
        line("last event", escape(f"{e['type']} (seq {e['seq']}, epoch {e['epoch']}, step {e['step']}) "
                                  f"{_duration(e['age_s'])} ago"))
    if run.get("stop_reasons"):
        line("stopped by", escape("; ".join(run["stop_reasons"])))
    if run.get("error"):
        line("error", f"[red]{escape(run['error'])}[/red]")
    line("validation", escape(_validation(run) + " (last epoch)" if _validation(run) != "-" else "-"))
    if run.get("best"):
        line("best", f"validation loss {_num(run['best']['validation_loss'])} at epoch {run['best']['epoch']}")

    rows = run.get("epoch_table") or []
    if rows:
        metric_names = list(dict.fromkeys(k for row in rows for k in row["validation_metrics"]))
        table = Table("epoch", "steps", "train loss", "val loss", *[f"val {m}" for m in metric_names], "lr", "time",
                      box=None, pad_edge=False, title="epochs", title_justify="left")
        best_epoch = run["best"]["epoch"] if run.get("best") else None
        for row in rows:
            mark = "*" if row["epoch"] == best_epoch else ""
            table.add_row(f"{row['epoch']}{mark}", str(row["step"]), _num(row["training_loss"]),
                          _num(row["validation_loss"]), *[_num(row["validation_metrics"].get(m)) for m in metric_names],
                          f"{row['lr']:.3g}" if isinstance(row.get("lr"), (int, float)) else "-",
                          _duration(row.get("duration_s")))
        console.print()
        _print_table(console, table)

    plugins = run.get("plugins") or {}
    if plugins:
        table = Table("plugin", "state", "restarts", "trouble", "log", box=None, pad_edge=False, title="plugins",
                      title_justify="left")
        for name, p in plugins.items():
            trouble = list(p.get("crashes") or [])[-3:]
            if p.get("reason"):
                trouble.append(p["reason"])
            if "undrained_acked_seq" in p:
                trouble.append(f"did not catch up (acked to seq {p['undrained_acked_seq']})")
            state = p.get("state") or "-"
            table.add_row(escape(name), f"[red]{state}[/red]" if state == "failed" else escape(state),
                          str(p.get("restarts", 0)), escape("; ".join(trouble)) or "-", escape(p.get("log") or "-"))
        console.print()
        _print_table(console, table)

    checkpoints = run.get("checkpoints") or {}
    if checkpoints.get("saved") or checkpoints.get("failed") or checkpoints.get("skipped"):
        console.print()
        console.print(f"checkpoints: {len(checkpoints['saved'])} saved, {checkpoints['failed']} failed, "
                      f"{checkpoints['skipped']} skipped")
        for c in checkpoints["saved"][-3:]:
            console.print(escape(f"  {c['path']} (epoch {c['epoch']}, step {c['step']})"))

    files = run.get("files") or []
    if files:
        console.print()
        console.print("files")
        for f in files:
            size = (f"{f['files']} file{'' if f['files'] == 1 else 's'}, {_bytes(f['bytes'])}" if f["kind"] == "folder"
                    else _bytes(f["bytes"]))
            console.print(escape(f"  {f['path']}{'/' if f['kind'] == 'folder' else ''}  ({size})"))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def as_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
