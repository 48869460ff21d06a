"""A run resumed from a checkpoint: its state put into the built model and optimizer, what the user should know
about it (settings replaced, another number of processes), and how to resume one that does not fit."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import torch

from .checkpointing import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig
from .training_state import DamagedCheckpoint, restore_weights, resume_problem
from .spec import TrainingSpec


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings (lr, weight_decay, betas, ...): what a checkpoint's optimizer state replaces."""
    return [{k: v for k, v in group.items() if k != "params" and isinstance(v, (bool, int, float, str, tuple))}
            for group in optimizer.param_groups]


def settings_replaced(built: list[dict[str, Any]], restored: list[dict[str, Any]]) -> str:
    """'lr 0.001 (built 0.1), ...': the settings a checkpoint's state changed from what the build gave, once each."""
    said: dict[str, str] = {}
    for before, after in zip(built, restored):
        for key, value in before.items():
            if key in after and after[key] != value and key not in said:
                said[key] = f"{key} {after[key]!r} (built {value!r})"
    return ", ".join(said.values())


def restore_checkpoint(spec: TrainingSpec, resume_from: Path, cfg: RunConfig, flags: dict[str, Any], world_size: int,
              continue_run: bool, warnings: list[str]) -> dict[str, Any]:
    """The checkpoint's state, its weights and optimizer state put into the spec's; CheckpointError for one that is
    not trainbus's, or whole, or does not fit the model, ConfigError for one a new run would train nothing from.
    What the user should know (settings the optimizer goes on with, another number of processes) goes to warnings."""
    resume_state = load_checkpoint(resume_from)
    built = optimizer_settings(spec.optimizer)
    try:
        restore_weights(spec, resume_state)
    except DamagedCheckpoint as exc:
        raise CheckpointError(f"refusing checkpoint {resume_from}: {exc}; is it a checkpoint trainbus wrote, and "
                              f"whole?") from None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {resume_from} does not fit {cfg.target}'s model: {exc}; "
                              f"{_trained_with(Path(resume_from), cfg.target, flags)}") from None
    problem = resume_problem(resume_state["trainbus"])
    if problem is not None:
        raise CheckpointError(f"refusing checkpoint {resume_from}: {problem}; is it a checkpoint trainbus wrote, "
                              f"and whole?")
    # A new run from a checkpoint with other flags (continued in place, a run keeps its own: the CLI refuses
    # others); with the same, a scheduler's moves of the lr are the saved state's, rightly
    saved = resume_state.get("hyperparameters") or {}
    flags_differ = any(saved.get(k) != spec.hyperparameters.get(k)
                       for k in set(saved) | set(spec.hyperparameters) if k != "epochs")
    replaced = settings_replaced(built, optimizer_settings(spec.optimizer)) if flags_differ else ""
    if replaced and not continue_run:
        warnings.append(f"the optimizer goes on as {resume_from} saved it, its settings with its state: "
                        f"{replaced}, not what this run's build gave it; a new run without --resume trains "
                        f"with those")
    trained = resume_state.get("trainbus") or {}
    saved_world = len(trained.get("rank_rng") or []) or 1  # a checkpoint of one process has none
    if saved_world != world_size:  # allowed (4 GPUs, then 2), but not the run it would have been
        warnings.append(f"{resume_from} was saved by {_processes(saved_world)} and this run trains in "
                        f"{_processes(world_size)}: an epoch is shared out anew (a step counts each "
                        f"process's batch), and the data order and random streams are not those "
                        f"{saved_world} would have had; resume in {saved_world} (--nproc {saved_world}, or as "
                        f"many torchrun or srun ranks) to go on exactly")
    if not continue_run and trained.get("epoch_complete") and trained.get("epoch", 0) >= spec.epochs:
        raise ConfigError(f"checkpoint {resume_from} ends epoch {trained['epoch']} and this run trains "
                          f"{spec.epochs}: a new run from it would train nothing; give --epochs above "
                          f"{trained['epoch']}")
    return resume_state


def _processes(count: int) -> str:
    return f"{count} process{'es' * (count != 1)}"


def _trained_with(checkpoint: Path, target: str, flags: dict[str, Any]) -> str:
    """How to resume a checkpoint that does not fit `target` built with `flags`: with the target its run's
    config.json names (a checkpoint in RUN_DIR/checkpoints/), and the flags of that run that differ from these
    (`hidden=64` against a run of hidden=32 was told to give the target it was trained with: the same one); else
    with the target it was trained with."""
    try:
        config = json.loads((checkpoint.parent.parent / "config.json").read_text())
        trained, trained_flags = config.get("target"), config.get("flags")
    except (OSError, ValueError, AttributeError):
        trained, trained_flags = None, None
    if isinstance(trained, str) and trained and trained != target:
        return f"its run trained {trained}: `trainbus run {trained} --resume {checkpoint}`"
    if trained == target and isinstance(trained_flags, dict):
        words = [f"{name}={value if isinstance(value, str) else json.dumps(value)}"
                 for name, value in trained_flags.items()
                 # epochs: what the new run trains, beyond the checkpoint's (its own epochs would train none)
                 if name in flags and flags[name] != value and name != "epochs"]
        if words:
            return (f"its run trained {target} with {' '.join(words)}: `trainbus run {target} "
                    f"{' '.join(map(shlex.quote, words))} --resume {checkpoint}`")
    return f"give the target it was trained with: `trainbus run TARGET --resume {checkpoint}`"
