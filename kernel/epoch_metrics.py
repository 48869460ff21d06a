"""An epoch's numbers as the loop reports them: the batches it plans, a running total's mean, the flat metrics
(`training_loss`, `validation_accuracy`) that checkpoints rank by, and whether a validation loss is the run's best."""

from __future__ import annotations

import math
from typing import Any

import torch


def planned_batches(loader: Any) -> int | None:
    """The batches an epoch of this loader holds: its len() (a DataLoader over a sized dataset), else None."""
    try:
        return len(loader)
    except (TypeError, NotImplementedError):  # an iterable dataset, a generator: unknown until it runs out
        return None


def flat_metrics(train: dict[str, Any], validation: dict[str, Any]) -> dict[str, float]:
    """An epoch's losses and metrics (its end_training_loop's and end_validation_loop's summaries) under one name
    each, `training_loss`, `validation_accuracy`: what checkpoints rank by and TrainingSpec.metric_names says."""
    flat = {k: v for k, v in (("training_loss", train.get("training_loss")),
                              ("validation_loss", validation.get("validation_loss"))) if v is not None}
    for prefix, summary, key in (("training", train, "training_metrics"),
                                 ("validation", validation, "validation_metrics")):
        flat.update({f"{prefix}_{name}": value for name, value in (summary.get(key) or {}).items()
                     if value is not None})
    return flat


def is_better(loss: Any, best: float | None) -> bool:
    """A whole epoch's validation loss is the run's best so far: lower, or a number where the best is NaN (which
    compares less than nothing: a first epoch's NaN stayed the best through every later epoch)."""
    if not isinstance(loss, float):
        return False
    return best is None or loss < best or (math.isnan(best) and not math.isnan(loss))


def as_float(x: Any) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def mean(total: Any, count: int) -> float | None:
    return as_float(total) / count if count else None
