"""`trainbus run --resume RUN`: the run it names, and whether it can go on in place as it trained."""

from __future__ import annotations

import json
from pathlib import Path

from .cli_common import UserError
from .cli_launch import under_a_launcher


def run_to_continue(resume: str, runs_dir: Path) -> Path | None:
    """The run directory `--resume` names (a run id under runs_dir, a unique start of one, or a run directory: one
    whose config.json is gone too, which config_of_run refuses rather than have it taken for a checkpoint
    directory and a new run started); None for anything else, which find_checkpoint reads (a checkpoint file or
    directory) or says is not there. UserError for a start of more than one run id."""
    from . import runs

    if Path(resume).is_file():  # a checkpoint file wins over run ids that start with its name
        return None
    for candidate in (Path(resume), runs_dir / resume):
        if candidate.is_dir() and runs.is_run_dir(candidate):
            return candidate.resolve()
    if Path(resume).exists() or (runs_dir / resume).exists():
        return None
    try:
        run_dir = runs.resolve_run(resume, runs_dir)
    except runs.AmbiguousRunError as exc:
        raise UserError(f"--resume: {exc}") from None
    except runs.RunLookupError:
        return None
    return run_dir


def check_resumable(run_dir: Path, epochs: int | None, detach: bool) -> None:
    """UserError for a run that cannot be resumed now (kernel/daemon_queue.py why_not_resumable)."""
    from .daemon_queue import why_not_resumable

    why = why_not_resumable(run_dir, epochs, rank=under_a_launcher(), detach=detach)
    if why:
        raise UserError(why)


def same_target(given: str, recorded: str) -> bool:
    """Whether a target given with `--resume RUN` is the one RUN trained: the same module and function, or the same
    file's (by its name: given from another directory, or the project moved with its runs)."""
    from .target import is_file_target

    given_part, _, given_function = given.rpartition(":")
    recorded_part, _, recorded_function = recorded.rpartition(":")
    if given_function != recorded_function or is_file_target(given_part) != is_file_target(recorded_part):
        return False
    return Path(given_part).name == Path(recorded_part).name if is_file_target(given_part) else \
        given_part == recorded_part


def check_trained_as_recorded(run_dir: Path, given: dict) -> None:
    """UserError for a flag (or --set hyperparameter) of a run continued in place that is not what it trained with:
    its config.json, the registry and `runs compare` would say the new value for the whole run, and its
    checkpoint's optimizer state puts back the old one where a flag set it (an lr): the record and the training
    would part. `epochs` is the exception: more of them is what a continued run is for."""
    try:
        recorded = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # config_of_run has read it; a file gone since is the resume's to say
    if not isinstance(recorded, dict):
        return  # config_of_run says what is wrong with it
    trained = {key: value for part in ("hyperparameters", "flags") if isinstance(recorded.get(part), dict)
               for key, value in recorded[part].items()}  # flags win, as they did

    def plain(value):  # as config.json holds it: a Path as text, a tuple as a list
        return json.loads(json.dumps(value, default=str))

    for name, value in given.items():
        if name != "epochs" and (name not in trained or plain(value) != plain(trained[name])):
            was = f"with {name}={json.dumps(plain(trained[name]))}" if name in trained else f"without {name}"
            raise UserError(f"--resume {run_dir.name} continues that run as it trained, {was}: "
                            f"{name}={json.dumps(plain(value))} would change it midway, while its record would say "
                            f"that for all of it; leave {name} out to continue it, or start a new run with it")
