"""A run's directory: made, or a continued run's reopened and held against a second kernel; and its config.json,
the config as the run used it (what a resume builds the same run from)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from trainbus.proto import JOURNAL_NAME

from .cluster import LAUNCH
from .config import ConfigError, RunConfig
from .runs_dir_check import check_runs_dir_private
from .journal import JournalInUse, check_free
from .private_dirs import make_dirs
from .run_end import reason
from .spec import TrainingSpec


def make_run_dir(run_dir: Path, runs_dir: str, continue_run: bool) -> None:
    """The runs directory (made if missing) and the run's own: made, or a continued run's going again. ConfigError
    when either cannot be made, or others could change the runs directory."""
    _make_runs_dir(run_dir.parent, runs_dir)
    if continue_run:
        (run_dir / "summary.json").unlink(missing_ok=True)  # the run is going again
    else:
        _make_dir(run_dir, runs_dir)


def write_config(run_dir: Path, cfg: RunConfig, spec: TrainingSpec, flags: dict[str, Any], started_in: str,
                 continue_run: bool) -> None:
    """config.json, as effective_config makes it (a continued run's target as it was recorded)."""
    recorded = _recorded_config(run_dir) if continue_run else None  # read before it is written again
    (run_dir / "config.json").write_text(json.dumps(effective_config(cfg, spec, flags, started_in, recorded),
                                                    indent=2, default=str) + "\n")


def check_not_running(run_dir: Path) -> int:
    """ConfigError when a kernel still holds the run's journal (two kernels must never write one run), or another
    kernel continuing it is between this check and taking the journal: a kernel takes its journal only once it has
    set the run up, rewriting kernel.pid and config.json, so two resumes at once both passed the check, and the
    second to the journal failed having put its own pid in kernel.pid. Returns the run directory's descriptor,
    locked (flock) until the caller holds the journal and closes it."""
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no config.json)")
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"--resume {run_dir.name}: another process holds this run (a kernel starting to continue "
                          f"it, or `trainbus runs delete`); wait for it to end, or stop it (`trainbus runs stop "
                          f"{run_dir.name}`)") from None
    except OSError:  # a filesystem that locks no directory: the journal's lock below stands alone
        pass
    try:
        check_free(run_dir / JOURNAL_NAME)
    except JournalInUse as exc:
        os.close(fd)
        raise ConfigError(f"--resume {run_dir.name}: {exc}; wait for it to end, or stop it (Ctrl-C)") from None
    return fd


def effective_config(cfg: RunConfig, spec: TrainingSpec, flags: dict[str, Any],
                     started_in: str | None = None, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as the run used it, for config.json: the hyperparameters and epochs of the built spec.

    A build() fills in its own defaults (the digits demo's lr, batch size, ...), so the spec's
    hyperparameters are what trained; those given that the spec does not name are kept. `flags` are the
    arguments the spec function was called with (kernel/flags.py): a run continued from this file is given
    them again (config_of_run), so it builds the same spec."""
    config = cfg.to_dict()
    config["hyperparameters"] = {**cfg.hyperparameters, **spec.hyperparameters}
    config["flags"] = flags
    config["epochs"] = spec.epochs
    config["metrics"] = spec.metric_names()  # what a plugin attached later may name (`plugins attach` checks)
    if os.environ.get(LAUNCH):  # launched by `trainbus run --nproc`: how, for a resume to launch it alike
        config["launch"] = json.loads(os.environ[LAUNCH])
    # what a relative target file is relative to, for a resume from elsewhere: where the command ran (`started_in`),
    # whatever directory the user's build() changed to
    config["cwd"] = started_in or os.getcwd()
    if recorded is not None and _same_target_file(recorded, config["target"]):
        # a continued run: its target as it was typed, with the directory it is relative to, not the absolute path
        # config_of_run made of it to import it from wherever the resume ran
        config["target"], config["cwd"] = recorded["target"], recorded["cwd"]
    return config


def _same_target_file(recorded: dict[str, Any], target: str) -> bool:
    """Whether `recorded` (a run's config.json) names `target` with a file path relative to its own cwd."""
    was, cwd = recorded.get("target"), recorded.get("cwd")
    if not isinstance(was, str) or not isinstance(cwd, str) or was == target:
        return False
    file_part, _, function = was.rpartition(":")
    target_file, _, target_function = target.rpartition(":")
    return bool(file_part) and not os.path.isabs(file_part) and function == target_function and \
        os.path.normpath(os.path.join(cwd, file_part)) == os.path.normpath(target_file)


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config.json a continued run was recorded with (None when it cannot be read: config_of_run said so)."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _make_runs_dir(path: Path, runs_dir: str) -> None:
    """The runs directory, made if missing; a ConfigError when it cannot be, or when others could change it."""
    try:
        make_dirs(path)
    except OSError as exc:
        raise _cannot_create(path, runs_dir, exc) from None
    check_runs_dir_private(path, runs_dir)


def _make_dir(path: Path, runs_dir: str) -> None:
    """mkdir, or a ConfigError naming runs_dir: a read-only mount, no permission, a file in the way (exit 2)."""
    try:
        path.mkdir()
    except OSError as exc:
        raise _cannot_create(path, runs_dir, exc) from None


def _cannot_create(path: Path, runs_dir: str, exc: OSError) -> ConfigError:
    return ConfigError(f"runs_dir {runs_dir}: cannot create {path} ({reason(exc)}); pick a writable place "
                       f"with --runs-dir or [run] runs_dir")
