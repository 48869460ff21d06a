"""What a run directory recorded of how it was started (its config.json): the config to continue it with, and how
it was launched."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, PluginConfig, RunConfig
from .config_checks import check_run
from .config_file import RUN_KEYS, typed
from .target import is_file_target


def _is_cwd(directory: str) -> bool:
    """Whether `directory` is the one this process runs in (by the file, not the spelling)."""
    try:
        return os.path.samefile(directory, os.getcwd())
    except OSError:  # gone (the project moved), or the working directory deleted
        return False


def config_of_run(run_dir: Path) -> RunConfig:
    """The config a run was started with (its config.json), to continue it in place."""
    path = Path(run_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
        problem = _recorded_problem(raw)
        if problem is not None:
            raise ValueError(problem)
        raw.pop("launch", None)  # how `run --nproc` launched it: launch_of_run's
        raw.pop("metrics", None)  # what the built spec reported: built again, it says again
        raw.pop("plugins_off", None)  # a config file's, never recorded: one edited in would be taken for a table
        started_in = raw.pop("cwd", None)
        file_part, colon, function = str(raw.get("target", "")).rpartition(":")
        if colon and is_file_target(file_part) and started_in and not Path(file_part).is_absolute() \
                and not _is_cwd(started_in):  # resumed from another directory: named as typed where it still names it
            raw["target"] = f"{Path(started_in) / file_part}:{function}"
        raw["plugins"] = [PluginConfig(**p) for p in raw.get("plugins", [])]
        if started_in and Path(started_in).is_dir():  # resumed from another directory too
            for plugin in raw["plugins"]:
                plugin.cwd = plugin.cwd or started_in
        if "flags" in raw:  # what the spec function was called with (kernel/flags.py): given to it again
            raw["hyperparameters"] = raw.pop("flags")
        cfg = RunConfig(**raw)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot continue {run_dir}: {path} is unreadable ({exc}); resume from one of its "
                          f"checkpoint files instead: --resume {Path(run_dir) / 'checkpoints' / 'last.pt'}") from None
    check_run(cfg, str(path))
    return cfg


def _recorded_problem(raw: Any) -> str | None:
    """What in a run's config.json is not as effective_config wrote it (an edit by hand): a field of another type,
    said before RunConfig takes it (its checks compare numbers, call str methods) as a traceback would."""
    if not isinstance(raw, dict):
        return f"it holds {'null' if raw is None else type(raw).__name__}, not a JSON object"
    for key, annotation in RUN_KEYS.items():
        if raw.get(key) is not None and key != "precision":  # precision: Lightning's integers too, check_run's
            try:
                typed(raw[key], annotation, key)
            except ConfigError as exc:
                return str(exc)
    for key, kind in (("hyperparameters", dict), ("flags", dict), ("limits", dict), ("launch", dict),
                      ("plugins", list), ("metrics", list)):
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            return f"{key} must be {'an object' if kind is dict else 'a list'}, got {raw[key]!r}"
    for plugin in raw.get("plugins") or []:
        if not (isinstance(plugin, dict) and isinstance(plugin.get("name"), str)
                and isinstance(plugin.get("target", ""), str) and isinstance(plugin.get("settings", {}), dict)
                and isinstance(plugin.get("command", []), list) and isinstance(plugin.get("cwd", ""), str)):
            return f"plugins holds {plugin!r}, not a plugin's name, target, settings and command"
    return None


def launch_of_run(run_dir: Path) -> dict[str, Any]:
    """How `trainbus run --nproc` launched the run in run_dir (nproc, nnodes, max_restarts, rdzv_endpoint); {} for
    a run started in one process, or under a launcher of the user's own (torchrun, srun)."""
    try:
        launch = json.loads((Path(run_dir) / "config.json").read_text()).get("launch")
    except (OSError, ValueError, AttributeError):  # AttributeError: a config.json that is no object
        return {}
    return launch if isinstance(launch, dict) else {}
