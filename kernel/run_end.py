"""What a run leaves as it ends: its final weights and summary.json (with the plugins' and the bus's accounts), each
whole, and kept in the temporary directory ($TMPDIR, /tmp) when the run directory's disk refuses them."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainbus.proto.kept_files import kept_dir, kept_dirs
from trainbus.proto.messages import SUMMARY_NAME, kept_name

from .bus import Bus
from .checkpointing import FINAL_WEIGHTS
from .loop import Loop

log = logging.getLogger("trainbus.kernel")


@dataclass
class RunResult:
    run_id: str
    run_dir: str
    status: str  # completed | stopped | failed | interrupted
    duration_s: float
    outcome: dict[str, Any]
    plugins: dict[str, Any]
    undrained: dict[str, int] = field(default_factory=dict)  # durable plugins that did not catch up
    bus: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    trace: str = ""  # a failure's traceback trimmed to the user's frames ("" when none of their code raised it)
    cluster: dict[str, Any] = field(default_factory=dict)  # kernel/cluster.py: launcher, rank, world size, node


def write_summary(run_dir: Path, result: RunResult, final_in_place: bool) -> None:
    """summary.json, whole or not at all: on a full disk it goes where the weights and the held events go, and the
    terminal says where."""
    run_id, status = result.run_id, result.status
    summary, text = run_dir / "summary.json", json.dumps(asdict(result), indent=2) + "\n"
    try:
        summary.write_text(text)
        _drop_superseded(run_id, final_in_place)
    except OSError as exc:
        summary.unlink(missing_ok=True)  # never a torn summary
        # kept where the weights and the held events go, where `runs list` finds it (run_json.kept_summary)
        kept = None
        try:
            kept = kept_dir() / kept_name(run_id, SUMMARY_NAME)
            kept.write_text(text)
            moved = (f"; it is in {kept}: move it to {summary} once the disk has space (`runs list` reads it "
                     f"where it is till then)")
        except OSError:
            if kept is not None:
                kept.unlink(missing_ok=True)
            moved = ""
        print(f"trainbus: could not write {summary} ({reason(exc)}); the run ended {status}{moved}", file=sys.stderr)


def save_final_weights(spec, loop: Loop, run_dir: Path, run_id: str, status: str, error: str | None,
                       journal_failed: bool) -> tuple[str, str | None, bool]:
    """The run's status and error once its final weights are saved, and whether they are in the run directory. A
    full disk at the end of a long run fails it, saying where the weights were kept instead; after the journal's
    disk failed (the run failed already) the error says where the weights are."""
    final = run_dir / FINAL_WEIGHTS
    saved_to, why = _keep_final_weights(spec, loop, final, run_id)
    if journal_failed:
        error = f"{error}; the weights as trained to step {loop.step} are in {saved_to}" if saved_to else error
    elif why is not None:
        moved = f"; they were saved to {saved_to} instead: move them to {final} once its disk has space" if saved_to \
            else ""
        error = f"training {status}, but the final weights could not be saved to {final}: {why}{moved}"
        status = "failed"
        log.error("%s", error)
    return status, error, saved_to == final


def _keep_final_weights(spec, loop: Loop, path: Path, run_id: str) -> tuple[Path | None, str | None]:
    """Where the trained weights went, and why not to `path` (None when they are there): when the run directory's
    disk refuses them, the temporary directory ($TMPDIR, /tmp) is tried rather than lose them."""
    try:
        _save_final_weights(spec, loop, path)
        return path, None
    except (OSError, RuntimeError) as exc:
        why = reason(exc)
    try:
        elsewhere = kept_dir() / kept_name(run_id, path.name)
        _save_final_weights(spec, loop, elsewhere)
    except (OSError, RuntimeError) as exc:
        log.error("the final weights could not be kept in the temporary directory either: %s", reason(exc))
        return None, why
    return elsewhere, why


def _drop_superseded(run_id: str, final_in_place: bool) -> None:
    """An earlier session of this run kept its summary (and final weights) in kept_dir, its run directory's disk
    being full; this one wrote its own in place, so those are stale, and left there they are what the earlier
    session's message still tells the user to move back over the new ones."""
    stale = [kept_name(run_id, SUMMARY_NAME)] + ([kept_name(run_id, FINAL_WEIGHTS)] if final_in_place else [])
    for path in [directory / name for directory in kept_dirs() for name in stale]:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("could not remove %s, which this session supersedes: %s", path, reason(exc))
            continue
        log.info("removed %s, kept there by an earlier session of this run: this one wrote its own", path)


def _save_final_weights(spec, loop: Loop, path: Path) -> None:
    """torch.save to a temporary name, then rename: never a partial file under the final name."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        # a file object: torch's error then carries the OSError (ENOSPC) as its context
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            torch.save({"model_state_dict": spec.model.state_dict(),
                        "optimizer_state_dict": spec.optimizer.state_dict(), "epoch": loop.epoch, "step": loop.step}, f)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def reason(exc: Exception) -> str:
    """What went wrong in the words users search for; torch wraps a failed write's OSError in a RuntimeError."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.strerror:
        return f"{cause.strerror} (errno {cause.errno})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plugin_summary(bus: Bus) -> dict[str, dict[str, Any]]:
    """The supervisor's account of each plugin, with the errors it reported (a failed handler's log reply)."""
    summary = bus.supervisor.summary()
    for name, entry in summary.items():
        entry["errors_logged"] = bus.control.errors_logged[name]
        if bus.control.checkpoints_failed[name]:  # a full disk, say: the run completed, its checkpoints did not
            entry["checkpoints_failed"] = bus.control.checkpoints_failed[name]
        for kind in ("metric", "log"):  # past its [limits]: what it reported is not all in the journal
            if bus.control.dropped[name, kind]:
                entry[f"{kind}_dropped"] = bus.control.dropped[name, kind]
        if bus.votes.missed[name]:  # training went on without its vote: a stop it decided there came late
            entry["votes_missed"] = bus.votes.missed[name]
    return summary


def bus_counters(bus: Bus) -> dict[str, int]:
    """What the bus counted (events, refusals by reason, drops), plus the journal's refused writes."""
    counters = {k: v for k, v in bus.counters.items() if v}
    if bus.journal.failed_writes:
        counters["journal_write_errors"] = bus.journal.failed_writes
    return counters
