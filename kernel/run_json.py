"""A run's config.json and summary.json, read with each field the kernel writes checked for its type."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainbus.proto import kept_files

SUMMARY = "summary.json"
CONFIG = "config.json"
STATUSES = ("running", "completed", "stopped", "failed", "interrupted", "died")

# summary.json's fields as the kernel writes them (run_end.py RunResult), each of them may be null. One of another
# type (an edit by hand) makes the summary unreadable, as torn JSON does: what shows it would raise on it.
NUMBER = (float, int)
SUMMARY_FIELDS = {"duration_s": NUMBER, "outcome": dict, "plugins": dict, "undrained": dict, "bus": dict, "error": str}
OUTCOME_FIELDS = {"epochs_completed": int, "steps": int, "stop_reasons": list, "training_loss": NUMBER,
                  "validation_loss": NUMBER, "validation_metrics": dict, "training_metrics": dict,
                  "best_validation_loss": NUMBER, "best_epoch": int, "last_epoch_partial": bool}
PLUGIN_FIELDS = {"state": str, "reason": str, "restarts": int, "crashes": list, "crash_count": int,
                 "errors_logged": int, "checkpoints_failed": int}
TEXT_LISTS = ("stop_reasons", "crashes")  # shown joined: text items only


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file's contents; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# config.json's fields that reading a run goes by, as the kernel writes them (run_dir.py effective_config). One of
# another type (an edit by hand) is read as missing, as in a run from before trainbus recorded it: what shows it
# would raise on it, and one such run would hide every other run of the directory.
CONFIG_FIELDS = {"target": str, "epochs": int, "flags": dict, "hyperparameters": dict, "plugins": list,
                 "metrics": list, "launch": dict, "cwd": str}


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json, less each CONFIG_FIELDS field of another type; {} when it is missing, unreadable or
    not an object."""
    config = read_json(Path(run_dir) / CONFIG) or {}
    return {key: value for key, value in config.items()
            if key not in CONFIG_FIELDS or isinstance(value, CONFIG_FIELDS[key]) and not isinstance(value, bool)}


def config_problem(run_dir: Path) -> str | None:
    """What reading a run's config.json leaves out (read_config), as runs show warns of it; None when it is whole or
    there is none."""
    try:
        config = json.loads((Path(run_dir) / CONFIG).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{CONFIG} is unreadable ({exc}): runs show leaves out its target, flags and hyperparameters"
    if not isinstance(config, dict):
        return f"{CONFIG} holds {_json_kind(config)}, not an object: runs show leaves out its target, flags and " \
               f"hyperparameters"
    wrong = [f"{key} is {_json_kind(config[key])}, not {_json_kind(kind)}" for key, kind in CONFIG_FIELDS.items()
             if config.get(key) is not None and key not in read_config(run_dir)]
    return f"{CONFIG}'s {'; its '.join(wrong)}: runs show leaves them out" if wrong else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json's contents when it holds a run status and each field the kernel writes has its type; None
    otherwise (summary_file_problem says why)."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary if summary is not None and _summary_problem(summary) is None else None


def _summary_problem(summary: Any) -> str | None:
    """What is wrong with a summary.json's contents, as "holds no run status" or "is unreadable (its
    outcome.steps is text, not a number)"; None for a summary as the kernel writes them."""
    if not isinstance(summary, dict) or summary.get("status") not in STATUSES:
        return "holds no run status"
    checks = [("", summary, SUMMARY_FIELDS)]
    if isinstance(summary.get("outcome"), dict):
        checks.append(("outcome.", summary["outcome"], OUTCOME_FIELDS))
    for name, p in (summary["plugins"] if isinstance(summary.get("plugins"), dict) else {}).items():
        if not isinstance(p, dict):
            return f"is unreadable (its plugins.{name} is {_json_kind(p)}, not an object)"
        checks.append((f"plugins.{name}.", p, PLUGIN_FIELDS))
    for prefix, fields, types in checks:
        for key, kind in types.items():
            value = fields.get(key)
            if value is not None and not isinstance(value, kind):
                return f"is unreadable (its {prefix}{key} is {_json_kind(value)}, not {_json_kind(kind)})"
            if key in TEXT_LISTS and value and not all(isinstance(item, str) for item in value):
                return f"is unreadable (its {prefix}{key} holds an item that is not text)"
    duration = summary.get("duration_s")
    if isinstance(duration, float) and not math.isfinite(duration):  # json reads Infinity; no clock says it
        return f"is unreadable (its duration_s is {duration}, not a number of seconds)"
    return None


def _json_kind(value: Any) -> str:
    """What JSON calls a value's type, or a type's (NUMBER's too)."""
    kind = value[0] if isinstance(value, tuple) else value if isinstance(value, type) else type(value)
    return {dict: "an object", list: "a list", str: "text", bool: "true or false", int: "a whole number",
            float: "a number"}.get(kind, kind.__name__)


def kept_summary(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The summary this run's kernel kept in the temporary directory because the run directory's disk refused it
    (proto/kept_files.py), with its path, when it reads as a summary.json does; else None. A run whose disk filled
    up was listed `died`."""
    kept = kept_files.kept_summary(run_dir.name)
    return kept if kept is not None and _summary_problem(kept[1]) is None else None


def summary_file_problem(path: Path) -> str | None:
    """Why a summary.json that is there says nothing (torn, emptied, edited by hand); None when there is none."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"{path.name} is unreadable ({exc})"
    problem = _summary_problem(value)
    return f"{path.name} {problem}" if problem else None
