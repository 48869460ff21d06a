"""A config file read into a RunConfig: TOML, or bz's JSON; every key checked, every error one line."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from trainbus.proto.settings_format import BOOL_WORDS_SAID, bool_word
from trainbus.proto.text import near_miss

from .bz_config import from_bz, in_bz_terms
from .config import DEFAULT_PLUGINS, PLUGIN_NAME, ConfigError, PluginConfig, RunConfig
from .config_checks import check_run
from .flags import option_of_run
from .limits import PeerLimits
from .plugin_names import registered_plugins, resolve_plugin
from .target import full_target

# The smallest journal segment a config file may set. Each rotation gzips, fsyncs and renames a file on the bus
# thread and leaves one more file every reader opens; at 0.001 MiB a segment held ~7 events (14 files for a
# 45-step demo epoch). At 1 MiB it holds ~6,500 events of ~160 B, a rotation ~5 ms (docs/architecture.md). A
# RunConfig made in Python goes lower (check_run takes any size > 0): the tests' short runs rotate a few KiB.
JOURNAL_SEGMENT_MIN_MB = 1.0

RUN_KEYS = {f.name: f.type for f in fields(RunConfig)
            if f.name not in ("hyperparameters", "plugins", "limits", "plugins_off")}
_PATH_KEYS = ("target", "runs_dir", "snapshot_dir", "keys_dir", "resume")  # [run]'s paths: a ~ in them is the home
_LIMIT_KEYS = {f.name: f.type for f in fields(PeerLimits)}
_TOP_KEYS = ("run", "hyperparameters", "plugins", "limits")
_PLUGIN_KEYS = ("enabled", "target", "command", "settings", "config")  # `config` is bz's spelling of settings


def defaults_left_out(path: Path) -> str | None:
    """A note when a TOML config's [plugins] table names neither default plugin: it is the run's whole list, so
    console and metrics_log are off, and a table added for one plugin (the checkpoint example) must not turn off
    the run's output without a word. Naming a default (`enabled = false` too) says it was meant. None otherwise."""
    if Path(path).suffix == ".json":  # bz's format lists its plugins whole
        return None
    try:
        named = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("plugins")
    except (OSError, ValueError):  # load_config said what is wrong with it
        return None
    if not isinstance(named, dict) or set(named) & set(DEFAULT_PLUGINS):
        return None
    tables = " and ".join(f"[plugins.{name}]" for name in DEFAULT_PLUGINS)
    return (f"{path}'s [plugins] table is the run's whole plugin list, so the default plugins "
            f"({', '.join(DEFAULT_PLUGINS)}) are off; add {tables} to keep them, or give one `enabled = false` "
            f"to say you meant it")


def load_config(path: Path | None) -> RunConfig:
    """Read a TOML config, or bz's JSON one (a .json file); no file means every default (and the default plugins)."""
    if path is None:
        return RunConfig(plugins=[resolve_plugin(n, {}) for n in DEFAULT_PLUGINS])
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give --config a TOML file (or bz's .json one)")
    if path.exists() and not path.is_file():  # a FIFO would block the read, /dev/zero never end it
        raise ConfigError(f"config file {path} is not a regular file; give --config a TOML file (or bz's .json one)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the path given to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    if text.startswith("\ufeff"):  # a byte-order mark some editors write: TOML and JSON take none
        raise ConfigError(f"config file {path} starts with a byte-order mark; save it as UTF-8 without BOM")
    if path.suffix == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        except RecursionError:  # a hostile or generated file: the reader recurses a level a bracket
            raise ConfigError(_TOO_DEEP.format(path=path)) from None
        except _DuplicateKey as exc:  # TOML refuses them; JSON would keep the last one without a word
            raise ConfigError(f"{path}: key {exc.args[0]!r} is given twice in one object; keep one") from None
        try:
            return parse_config(from_bz(raw, str(path)), where=str(path))
        except ConfigError as exc:
            raise ConfigError(in_bz_terms(str(exc))) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(_TOO_DEEP.format(path=path)) from None
    return parse_config(raw, where=str(path))


_TOO_DEEP = "{path} nests arrays or tables too deeply to be read (RecursionError); flatten it"


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    _no_unknown(raw, _TOP_KEYS, where)
    cfg = RunConfig()
    run = _table(raw.get("run", {}), f"{where}: [run]")
    _no_unknown(run, RUN_KEYS, f"{where}: [run]")
    for key, value in run.items():
        if key == "precision":  # Lightning's integers too: check_run takes them by our name
            cfg.precision = value
            continue
        value = typed(value, RUN_KEYS[key], f"{where}: run.{key}")
        if key in _PATH_KEYS and value.startswith("~"):  # the home, as on the command line, where the shell expands
            value = os.path.expanduser(value)  # it: TOML does not, and `~/runs` became a folder named ~ right here
        setattr(cfg, key, value)
    cfg.target = full_target(cfg.target)
    cfg.hyperparameters = dict(_table(raw.get("hyperparameters", {}), f"{where}: [hyperparameters]"))
    if "epochs" in run and "epochs" in cfg.hyperparameters and cfg.hyperparameters["epochs"] != cfg.epochs:
        # [run]'s would win without a word, as the later of a flag given twice would: which was meant is unsaid
        raise ConfigError(f"{where}: epochs given twice, as [run] epochs = {cfg.epochs} and [hyperparameters] epochs "
                          f"= {cfg.hyperparameters['epochs']!r}: give it once")
    limits = _table(raw.get("limits", {}), f"{where}: [limits]")
    _no_unknown(limits, _LIMIT_KEYS, f"{where}: [limits]")
    for key, value in limits.items():
        cfg.limits[key] = typed(value, _LIMIT_KEYS[key], f"{where}: limits.{key}")
        if not cfg.limits[key] > 0:  # NaN too
            raise ConfigError(f"{where}: limits.{key} must be > 0, got {value!r}")
    plugins = _table(raw.get("plugins", {name: {} for name in DEFAULT_PLUGINS}), f"{where}: [plugins]")
    for name, body in plugins.items():
        if not PLUGIN_NAME.fullmatch(name):  # it names the plugin's log file, plugins/NAME.log, and its peer
            raise ConfigError(f"{where}: plugin name {name!r} is not one trainbus takes: letters, digits, _ . and - "
                              f"(starting with a letter or digit, at most 64); it names the plugin's log file")
        body = _table(body, f"{where}: [plugins.{name}]")
        _no_unknown(body, _PLUGIN_KEYS, f"{where}: [plugins.{name}]")
        enabled = typed(body.get("enabled", True), "bool", f"{where}: plugins.{name}.enabled")
        if "settings" in body and "config" in body:  # bz's spelling and ours: one of them would be dropped
            raise ConfigError(f"{where}: plugins.{name} has both settings and config (bz's name for settings); "
                              f"keep one")
        settings = _table(body.get("settings", body.get("config", {})), f"{where}: plugins.{name}.settings")
        target = body.get("target")
        if target is not None:
            target = typed(target, "str", f"{where}: plugins.{name}.target")
        command = body.get("command")
        if command is not None and target is not None:  # one of them would be dropped without a word
            raise ConfigError(f"{where}: plugins.{name} has both target (a Python plugin class) and command (a program "
                              f"speaking PROTOCOL.md); keep one")
        if command is not None:
            if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
                raise ConfigError(f"{where}: plugins.{name}.command must be a non-empty list of strings")
            plugin = PluginConfig(name=name, target="", settings=dict(settings), command=command)
        elif not enabled:  # resolved once --plugins names it: a table kept off may name what is not installed here
            plugin = PluginConfig(name=name, target=target or "", settings=dict(settings))
        else:
            plugin = resolve_plugin(name, settings, target, where=f"{where}: [plugins.{name}]")
        if enabled:
            cfg.plugins.append(plugin)
        else:
            cfg.plugins_off[name] = plugin
    if not JOURNAL_SEGMENT_MIN_MB <= cfg.journal_segment_mb < math.inf:
        raise ConfigError(f"{where}: journal_segment_mb must be a finite number >= {JOURNAL_SEGMENT_MIN_MB:g} (MiB: "
                          f"each segment is a gzipped file the kernel writes as it trains; default 8), got "
                          f"{cfg.journal_segment_mb}")
    check_run(cfg, where)
    return cfg


def _no_unknown(table: dict, known, where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}{_where_it_goes(str(key), known, table[key])}; known keys: "
                              f"{', '.join(known)}")


# Lightning's Trainer arguments a [run] table may be given by a Lightning user (its precision, accumulation and
# clipping keys are [run]'s own), and what each is here.
LIGHTNING_TRAINER = {
    "max_epochs": "is epochs here",
    "accelerator": "is device here: auto, cpu or cuda",
    "devices": "is --nproc N here, processes on this machine, one GPU each on CUDA; or device = \"cuda:N\" for one GPU",
    "num_nodes": "is --nnodes N here, with --rdzv-endpoint",
    "strategy": "has nothing to set here: DDP under --nproc, torchrun or srun",
    "gradient_clip_algorithm": "is \"norm\" here, what gradient_clip_val clips; there is no other",
    "enable_checkpointing": "is the checkpoint plugin here, [plugins.checkpoint]",
}


def _where_it_goes(key: str, known, value: Any = None) -> str:
    """A hint for a key in the wrong place: a near miss of a known one, a key of another table, a plugin's setting
    written in its table, an option of the command line, or, in [run] or at the top, a hyperparameter (what an
    unknown name there most often is). Which table it was found in, `known` says."""
    if known is RUN_KEYS and key in LIGHTNING_TRAINER:  # before a near miss: `devices` is no typo of `device`
        return f" (Lightning's {key} {LIGHTNING_TRAINER[key]})"
    # how it launches (cli_launch.py): the command line's alone, recorded in config.json as `launch`
    if known is RUN_KEYS and (option := option_of_run(key, value)):
        return f" ({key} is an option of trainbus run, not a [run] key: {option})"
    near = near_miss(key, known)
    if near:
        return near
    for table, keys in (("run", RUN_KEYS), ("limits", _LIMIT_KEYS)):
        if key in keys:
            return f" (it belongs in [{table}])"
    if key in registered_plugins():
        return f" (a plugin's table is [plugins.{key}])"
    if known is _PLUGIN_KEYS:
        return " (a plugin's settings go in its [plugins.NAME.settings] table)"
    if known is RUN_KEYS or known is _TOP_KEYS:
        return " (a hyperparameter goes in [hyperparameters])"
    return ""


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
    return value


def typed(value: Any, annotation: Any, where: str) -> Any:
    text = str(annotation)
    if "int" in text and "float" not in text:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif "float" in text:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
        value = float(value) if ok else value
    elif "bool" in text:  # or a word a flag takes for one, as a file written for the command line has it
        said = bool_word(value) if isinstance(value, str) else None
        if type(value) is int and value in (0, 1):  # TOML's `compile = 1`, a word the message lists
            said = bool(value)
        value = value if said is None else said
        ok, expected = isinstance(value, bool), BOOL_WORDS_SAID
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        if expected == "a string" and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(f"{where} must be a string; {value!r} was read as a number: quote it (\"{value}\")")
        raise ConfigError(f"{where} must be {expected}, got {value!r}")
    if isinstance(value, str) and "\0" in value:  # TOML's and JSON's \u0000: the OS refuses it in a path or argv
        raise ConfigError(f"{where} holds a NUL character (\\u0000), which no path, target or name takes; remove it")
    return value
