"""bz's JSON config file (bz_config.json) read as written: its sections and built-in plugins mapped to ours.

bz's form (https://github.com/dbuzinski/bz-cli, docs/usage.md)::

    {"training": {"epochs": 10, "device": "auto", "compile": true, "checkpoint_interval": 5, "batch_size": 64, ...},
     "plugins": {"console_out": {"enabled": true}, "tensorboard": {"enabled": true, "config": {...}},
                 "email_plugin": {"enabled": true, "target": "my_plugins:EmailNotificationPlugin",
                                  "config": {"smtp_server": "...", ...}}},
     "hyperparameters": {"lr": 0.001}}

becomes the tables parse_config reads. A custom plugin is named by its module path, `target`, as in TOML
(bz found its own by registry or entry point, which point at bz's classes). What has no meaning here is
said once, as a warning, rather than dropped in silence.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from trainbus.proto.text import near_miss

from .config import DEFAULT_PLUGINS, ConfigError

log = logging.getLogger("trainbus.kernel")

# bz's built-in plugin -> ours, and the config keys that mean the same there (bz's others do not apply:
# console_out's update_interval, as rich redraws on its own; tensorboard's log_dir, as its files stay in the run).
BUILTIN_PLUGINS: dict[str, tuple[str, dict[str, str]]] = {
    "console_out": ("console", {"show_progress": "show_batches"}),
    "tensorboard": ("visualization", {}),
    "early_stopping": ("early_stopping", {key: key for key in ("patience", "min_delta", "monitor", "mode")}),
}
# bz's `training` keys that are run settings here (compile: bz's trainer compiled the model, as [run] compile does).
# Its others (batch_size, learning_rate) go to the spec's build(hyperparameters), as bz's train.py read them.
TRAINING_TO_RUN = {"epochs": "epochs", "device": "device", "checkpoint_interval": "checkpoint_every_n_epochs",
                   "compile": "compile"}
TRAINING_TO_EARLY_STOPPING = {"early_stopping_patience": "patience", "early_stopping_min_delta": "min_delta"}
# A plugin's object: bz's two, then ours (a custom plugin's class, a program's command, settings as in TOML).
PLUGIN_KEYS = ("enabled", "config", "target", "command", "settings")
SECTIONS = ("training", "plugins", "hyperparameters", "metrics", "optuna", "environment")
NOT_READ = ("metrics", "environment")  # metrics are the spec's own; environment picked bz's config file


def in_bz_terms(message: str) -> str:
    """A mistake the config's checks found, said with the key the bz file holds (`training.checkpoint_interval`),
    not the one it became here (`checkpoint_every_n_epochs`), which its author never wrote."""
    for bz_key, ours in TRAINING_TO_RUN.items():
        message = re.sub(rf"\b(?:run\.)?{ours}(?= must )", f"training.{bz_key}", message)
    return message.replace("[run] epochs =", "training.epochs =").replace("[hyperparameters] epochs =",
                                                                          "hyperparameters.epochs =")


def from_bz(raw: Any, where: str) -> dict[str, Any]:
    """bz's config as the [run], [hyperparameters] and [plugins] tables of ours; ConfigError for what cannot be."""
    table = _table(raw, where)
    for key in table:
        if key not in SECTIONS:
            ours = f" ([{key}] is a table of trainbus's TOML config: write it in a .toml file)" \
                if key in ("run", "limits") else ""  # a .json file is bz's; ours written in JSON is no typo
            raise ConfigError(f"{where}: unknown key {key!r}{near_miss(key, SECTIONS) or ours}; a bz config has "
                              f"{', '.join(SECTIONS)}")
    if _table(table.get("optuna") or {}, f"{where}: optuna").get("enabled"):
        raise ConfigError(f"{where}: optuna.enabled: trainbus runs no hyperparameter sweeps; run one config per trial")
    ignored = [key for key in NOT_READ if table.get(key)]
    if ignored:
        log.warning("%s: %s not read (a trainbus spec computes its own metrics)", where, " and ".join(ignored))

    training = _table(table.get("training", {}), f"{where}: training")
    run = {TRAINING_TO_RUN[key]: value for key, value in training.items() if key in TRAINING_TO_RUN}
    hyperparameters = {key: value for key, value in training.items()
                       if key not in TRAINING_TO_RUN and key not in TRAINING_TO_EARLY_STOPPING}
    hyperparameters.update(_table(table.get("hyperparameters", {}), f"{where}: hyperparameters"))

    plugins: dict[str, Any] = {}
    given = table.get("plugins", {name: {} for name in DEFAULT_PLUGINS})
    for name, body in _table(given, f"{where}: plugins").items():
        ours, body = _plugin(name, _table(body, f"{where}: plugins.{name}"), where)
        if ours in plugins:
            raise ConfigError(f"{where}: plugins {name!r} and {ours!r} are the same plugin here; keep one")
        plugins[ours] = body
    early_stopping = {ours: training[key] for key, ours in TRAINING_TO_EARLY_STOPPING.items()
                      if training.get(key) is not None}
    if "patience" in early_stopping and "early_stopping" not in plugins:  # bz: a patience turns early stopping on
        plugins["early_stopping"] = {"config": early_stopping}
    if training.get("checkpoint_interval") and "checkpoint" not in plugins:
        # bz's trainer saved them itself; here the checkpoint plugin does, and without it the interval saved nothing
        plugins["checkpoint"] = {}
    return {"run": run, "hyperparameters": hyperparameters, "plugins": plugins}


def _plugin(name: str, body: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    body = {key: value for key, value in body.items() if key != "dependencies"}  # each runs in its own process
    for key in body:  # said here, in the file's terms: past here the table is [plugins.<our name>], not the file's
        if key not in PLUGIN_KEYS:  # a typo of one of them (`enable`) said as that, not moved into "config"
            where_it_goes = near_miss(key, PLUGIN_KEYS) or (
                f"; a bz plugin's settings go in its \"config\" object (\"{name}\": {{\"config\": {{\"{key}\": "
                f"...}}}})")
            raise ConfigError(f"{where}: plugins.{name}: unknown key {key!r}{where_it_goes}; its keys: "
                              f"{', '.join(PLUGIN_KEYS)}")
    if name not in BUILTIN_PLUGINS:
        return name, body
    ours, keys = BUILTIN_PLUGINS[name]
    config = _table(body.get("config", {}), f"{where}: plugins.{name}.config")
    unused = [key for key in config if key not in keys]
    if unused:
        log.warning("%s: plugins.%s.config: %s not used by trainbus's %s plugin", where, name, ", ".join(unused), ours)
    body["config"] = {keys[key]: value for key, value in config.items() if key in keys}
    return ours, body


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value
