"""The user's spec built for a run: its target imported and built under the run's seed, with the flags its function
was called with, and the config's relative paths kept the command's when the user's build() changes directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import RunConfig
from .config_checks import check_metric_settings
from .interrupts import Interrupts
from .spec import TrainingSpec, build_with_flags
from .target import load_target
from .training_state import seed_everything
from .user_errors import user_code_error


def build_for_run(cfg: RunConfig, interrupts: Interrupts, started_in: str, runs_path: Path,
                  metric_settings: dict[str, str] | None) -> tuple[TrainingSpec, dict[str, Any], str]:
    """The user's spec built under the seed, with the flags its function was called with, and runs_dir as the
    lines that name it give it (absolute once their build() changed directory)."""
    try:
        # The target is imported under the seed, then the build starts from it again: as when the command line
        # imported it first, to read its flags (kernel/cli_run_flags.py apply_flags), so a script's top-level draws
        # (a model made there) and its build's are the seed's either way.
        load_target(cfg.target)
        seed_everything(cfg.seed)
        spec, flags = build_with_flags(cfg.target, dict(cfg.hyperparameters), cfg.epochs)
    except KeyboardInterrupt as exc:
        if interrupts.count or not interrupts.installed:  # our second Ctrl-C; or Python's own, a raise alike
            raise
        raise user_code_error(exc, cfg.target) from None  # the user's code raised it: their error, shown as one
    runs_given = cfg.runs_dir  # as given, for the lines that name it; absolute once a chdir made that another place
    if os.getcwd() != started_in:
        _from_where_it_ran(cfg, started_in)
        runs_given = str(runs_path)
    if cfg.epochs is not None:
        spec.epochs = cfg.epochs
        spec.check_loaders_last()
    check_metric_settings(spec.metric_names(), metric_settings or {})
    return spec, flags, runs_given


def _from_where_it_ran(cfg: RunConfig, started_in: str) -> None:
    """The config's relative paths made absolute from `started_in`, the command's directory, which the user's build()
    changed: a --resume path, snapshot_dir, keys_dir, and where each plugin's process starts."""
    if cfg.resume and os.path.exists(os.path.join(started_in, cfg.resume)):  # a checkpoint or run directory's path
        cfg.resume = os.path.join(started_in, cfg.resume)
    if cfg.snapshot_dir:
        cfg.snapshot_dir = os.path.join(started_in, cfg.snapshot_dir)
    if cfg.keys_dir:
        cfg.keys_dir = os.path.join(started_in, os.path.expanduser(cfg.keys_dir))
    for plugin in cfg.plugins:
        plugin.cwd = os.path.normpath(os.path.join(started_in, plugin.cwd))  # "": the command's directory itself
