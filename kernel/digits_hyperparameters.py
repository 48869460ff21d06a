"""The digits demo's hyperparameters and how each is checked, without torch: `trainbus run` checks them before it
imports torch (seconds), so a mistake is told at once."""

from __future__ import annotations

import math

from trainbus.proto.text import near_miss

from .flags import option_of_run
from .spec import SpecError

DEFAULTS = {"lr": 1e-3, "batch_size": 32, "hidden": 128, "validation_fraction": 0.2, "model": "mlp"}
EPOCHS = 10  # unless `epochs` is given (a flag like the others; recorded only when given, as --epochs is)
# what its every epoch reports (build's TrainingSpec.metric_names(): a validation split always, and accuracy)
METRICS = ["training_loss", "training_accuracy", "validation_loss", "validation_accuracy"]
# What each hyperparameter must be: a test of the value, said in words, and a value that would do.
_RULES = {
    "lr": (lambda v: _number(v) and 0 < v < math.inf, "a positive number", "0.001"),
    "batch_size": (lambda v: _whole(v) and v >= 1, "a whole number of at least 1", "32"),
    "hidden": (lambda v: _whole(v) and v >= 1, "a whole number of at least 1", "128"),
    "validation_fraction": (lambda v: _number(v) and 0 < v < 1, "a number above 0 and below 1", "0.2"),
    "model": (lambda v: v in ("mlp", "cnn"), "mlp or cnn", "cnn"),
    "epochs": (lambda v: _whole(v) and v >= 1, "a whole number of at least 1", "10"),
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parsed(text: str):
    """The number text spells, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def checked(hyperparameters: dict) -> dict:
    """The demo's hyperparameters over its defaults; SpecError naming the first bad one and a value that works."""
    unknown = sorted(set(hyperparameters) - set(_RULES))
    if unknown:  # a typo (lrr=0.1) would otherwise train with the default and say nothing
        option = option_of_run(unknown[0], hyperparameters[unknown[0]])
        said = f" ({unknown[0]} is an option of trainbus run: {option})" if option else near_miss(unknown[0], _RULES)
        raise SpecError(f"the demo has no hyperparameter {unknown[0]!r}{said}; it takes {', '.join(_RULES)} "
                        f"(e.g. --set lr=0.01)", flag=unknown[0])
    hp = {**DEFAULTS, **hyperparameters}
    for name, (ok, what, example) in _RULES.items():
        if name in hp and not ok(hp[name]):
            got = repr(hp[name])
            if isinstance(hp[name], str) and ok(_parsed(hp[name])):  # lr = "0.01" in a config: quoted, so text
                got = f"the text {got}: write it without quotes"
            raise SpecError(f"the demo's {name} must be {what}, got {got} (e.g. --set {name}={example})", flag=name)
    return hp
