"""One run in full, as `trainbus runs show` shows it: its overview, what only the whole journal holds (epochs,
plugins, checkpoints), and the run directory's files.

`show` reads the whole journal, streamed, for the per-epoch table and the plugins' history.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from trainbus.proto import JOURNAL_NAME
from trainbus.proto.run_state import CLIENT_PREFIX
from trainbus.proto.journal_format import FREQUENT_TYPES, as_event, closed_segments, stream_journal

from .config import PLUGIN_NAME
from .journal_history import LIVE_PLUGIN_STATES, JournalHistory
from .run_json import config_problem, read_config, read_summary
from .run_overview import event_brief, run_overview

PROGRESS_EVERY_RECORDS = 65_536  # run_details's progress: a call per this many records read


def run_details(run_dir: Path, now: float | None = None, progress: Callable[[int], None] | None = None
                ) -> dict[str, Any]:
    """run_overview plus what only the whole journal (streamed) holds: epochs, plugins, checkpoints; and files.

    Added keys: sessions (one per start_training_session: a continued run has several), device, model,
    parameters, cluster (the latest session's: where it trained), hyperparameters, epoch_table (one row per epoch;
    a repeated epoch's latest row), best
    (the lowest validation loss and its epoch), plugins ({name: state, restarts, crashes, log, ...}),
    checkpoints (saved paths, and counts of failed, skipped and unwritten: taken, never answered), undrained, bus,
    files. `progress`: called with the seq reached every PROGRESS_EVERY_RECORDS records (a run of days: 10^7).
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir).resolve()
    info = run_overview(run_dir, now)
    summary = read_summary(run_dir) or {}
    config = read_config(run_dir)
    history = JournalHistory(p["name"] for p in config.get("plugins") or []
                             if isinstance(p, dict) and isinstance(p.get("name"), str))
    journal = run_dir / JOURNAL_NAME
    last_record: dict[str, Any] | None = None
    damage: list[str] = []
    for read, record in enumerate(stream_journal(journal, damage) if journal.is_file() else (), start=1):
        last_record = record
        if progress is not None and read % PROGRESS_EVERY_RECORDS == 0:
            progress(record["seq"])
        if record["type"] not in FREQUENT_TYPES:
            history.read(as_event(record))
    plugins, sessions, saved = history.plugins, history.sessions, history.saved
    for name, p in (summary.get("plugins") or {}).items():  # the supervisor's own account wins where there is one
        if isinstance(p, dict):
            plugins.setdefault(name, {}).update({k: p[k] for k in ("state", "restarts", "crashes", "crash_count",
                                                                  "errors_logged", "checkpoints_failed", "left_early",
                                                                  "greeted", "detached", "hello_trouble",
                                                                  "metric_dropped", "log_dropped", "votes_missed")
                                                   if k in p})
    if info["status"] != "running":  # over: what the journal last said of a peer is no longer what it does
        told = summary.get("plugins") or {}  # a peer attached by hand whose bye came late or never, or a died run's
        for name, p in plugins.items():
            if name not in told and p.get("state") in LIVE_PLUGIN_STATES:
                died = info["status"] == "died"
                p["state"] = "gone with the kernel" if died else "gone with the run (no bye journaled)"
    undrained = summary.get("undrained") or {}
    # `trainbus attach` clients come and go as peers too: views of the run, listed apart from its plugins
    attached = sorted(name for name in plugins if name.startswith(CLIENT_PREFIX))
    for name in attached:
        del plugins[name]
    for name, p in plugins.items():
        # only a plugin the run spawned has a log, under a name its config checked; a peer attached by hand says hello
        # under any string (300 characters, "../kernel"), which names no file of ours, or one too long to stat
        log_file = run_dir / "plugins" / f"{name}.log"
        p["log"] = str(log_file) if PLUGIN_NAME.fullmatch(name) and log_file.is_file() else None
        if name in undrained:
            p["undrained_acked_seq"] = undrained[name]
    for c in saved:  # the checkpoint plugin's retention (save_top_k, max_total) removes most as the run goes
        c["path"] = _where_now(c["path"], run_dir)
        c["present"] = isinstance(c["path"], str) and os.path.isfile(c["path"])
    session = sessions[-1] if sessions else {}
    rows = [history.epochs[k] for k in sorted(history.epochs)]
    # the best of whole epochs, as the loop's (summary.json's) is: a partial epoch's validation is not comparable
    losses = [(row["validation_loss"], row["epoch"]) for row in rows
              if isinstance(row.get("validation_loss"), float) and not row["partial"]]
    losses = [pair for pair in losses if not math.isnan(pair[0])] or losses  # NaN, less than nothing, is no best
    best = dict(zip(("validation_loss", "epoch"), min(losses))) if losses else None
    journal_lost = damage or not journal.is_file()
    if journal_lost and info.get("best"):  # epochs the journal lost: the loop's own best (summary.json) saw them all
        best = info["best"]
    if not journal.is_file() and info["status"] != "running":  # a kernel starting has not made it yet
        # deleted (an `rm`, a cleanup script): what only the journal held is left out, which must not pass for none
        damage.append(f"the journal {journal} is not there (deleted?): the run's per-epoch metrics, its plugins' "
                      f"history and its checkpoints are in it")
    info.update(
        sessions=sessions, device=session.get("device"), model=session.get("model"), cluster=session.get("cluster"),
        parameters=session.get("parameters"),
        hyperparameters=session.get("hyperparameters", config.get("hyperparameters")),
        epoch_table=rows, best=best, plugins=plugins, attached=attached,
        checkpoints={"saved": saved, **history.checkpoint_counts, "unwritten": len(history.unanswered_saves)},
        undrained=undrained,
        bus=summary.get("bus") or {}, files=_files(run_dir), journal_damage=damage,
        journal_compacted=_compacted(journal),
        config_damage=config_problem(run_dir))
    if info["error"] is None and history.error is not None:
        info["error"] = history.error
    last = as_event(last_record) if last_record is not None else None
    if last is not None and info["status"] in ("running", "died"):
        info["last_event"] = event_brief(last, now)
        if info["status"] == "running":  # the streamed read went further than the overview's tail
            info["steps"] = last.step
    if info["status"] in ("running", "died") and rows:
        info["epochs_completed"] = max(info["epochs_completed"] or 0, rows[-1]["epoch"])
    return info


def _where_now(path: Any, run_dir: Path) -> Any:
    """A path the journal holds of a file inside the run's directory as it was then, inside run_dir now: a runs
    directory moved or copied elsewhere keeps its checkpoints, under the path they were saved at no longer."""
    if not isinstance(path, str):
        return path
    parts = Path(path).parts
    if Path(path).is_relative_to(run_dir) or run_dir.name not in parts:
        return path
    return str(run_dir.joinpath(*parts[parts.index(run_dir.name) + 1:]))


def _compacted(journal: Path) -> dict[str, int]:
    """How much of the journal compaction thinned (PROTOCOL.md §13): its closed segments, those compacted, and the
    last seq of the newest compacted one (0: none)."""
    segments = closed_segments(journal)
    compacted = [s for s in segments if s.compacted]
    return {"segments": len(segments), "compacted": len(compacted),
            "through_seq": compacted[-1].last if compacted else 0}


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
