"""The run's configuration: TOML file, then CLI flags on top; every key checked, every error one line."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .limits import PeerLimits
from .spec import DEFAULT_TARGET

PLUGIN_ENTRY_POINT_GROUP = "trainbus.plugins"
DEFAULT_PLUGINS = ("console", "metrics_log")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(Exception):
    """A configuration mistake; the message names the key and the fix."""


@dataclass
class PluginConfig:
    name: str
    target: str  # module:Class, run by the SDK; or "" when command is given
    settings: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # any program speaking PROTOCOL.md, any language


@dataclass
class RunConfig:
    target: str = DEFAULT_TARGET
    epochs: int | None = None  # None: what the spec says
    seed: int = 0
    runs_dir: str = "runs"
    device: str = "auto"
    ready_timeout_s: float = 15.0  # wait this long for every plugin's hello before training starts
    drain_timeout_s: float = 30.0  # at the end, wait this long for durable plugins to catch up
    vote_timeout_s: float = 5.0  # at end_epoch, wait at most this long for plugins that vote there
    # The kernel owns the model, so it decides when to snapshot; the checkpoint plugin decides what to keep.
    checkpoint_every_n_epochs: int = 1
    checkpoint_every_n_steps: int = 0  # 0: off
    resume: str = ""  # run id, run dir or checkpoint file: continue from its newest verified checkpoint
    # Where the kernel's two snapshot buffers live (each the size of the training state): "" = /dev/shm,
    # or the run directory when /dev/shm is missing or too small (Docker's default is 64 MB).
    snapshot_dir: str = ""
    # While training runs, malloc keeps the CPU memory training frees for its next step instead of giving it
    # back to the OS and page-faulting it in again (kernel/memory.py); false: glibc's defaults throughout.
    keep_freed_memory: bool = True
    # Events held in memory while the journal's disk refuses writes (full, quota, I/O error); past this the
    # run stops cleanly, naming the disk (kernel/journal.py).
    journal_backlog_mb: float = 64.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginConfig] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # [limits]: per-peer rate and size caps (PeerLimits)

    def peer_limits(self) -> PeerLimits:
        return PeerLimits(**self.limits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_RUN_KEYS = {f.name: f.type for f in fields(RunConfig) if f.name not in ("hyperparameters", "plugins", "limits")}
_LIMIT_KEYS = {f.name: f.type for f in fields(PeerLimits)}
_TOP_KEYS = ("run", "hyperparameters", "plugins", "limits")
_PLUGIN_KEYS = ("enabled", "target", "command", "settings", "config")  # `config` is bz's spelling of settings


def registered_plugins() -> dict[str, str]:
    """Plugin name -> "module:Class" from installed distributions' `trainbus.plugins` entry points."""
    return {ep.name: ep.value for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP)}


def load_config(path: Path | None) -> RunConfig:
    """Read a TOML config; no file means every default (and the default plugins)."""
    if path is None:
        return RunConfig(plugins=[resolve_plugin(n, {}) for n in DEFAULT_PLUGINS])
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, where=str(path))


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    _no_unknown(raw, _TOP_KEYS, where)
    cfg = RunConfig()
    run = _table(raw.get("run", {}), f"{where}: [run]")
    _no_unknown(run, _RUN_KEYS, f"{where}: [run]")
    for key, value in run.items():
        setattr(cfg, key, _typed(value, _RUN_KEYS[key], f"{where}: run.{key}"))
    cfg.hyperparameters = dict(_table(raw.get("hyperparameters", {}), f"{where}: [hyperparameters]"))
    limits = _table(raw.get("limits", {}), f"{where}: [limits]")
    _no_unknown(limits, _LIMIT_KEYS, f"{where}: [limits]")
    for key, value in limits.items():
        cfg.limits[key] = _typed(value, _LIMIT_KEYS[key], f"{where}: limits.{key}")
        if cfg.limits[key] <= 0:
            raise ConfigError(f"{where}: limits.{key} must be > 0, got {value!r}")
    plugins = _table(raw.get("plugins", {name: {} for name in DEFAULT_PLUGINS}), f"{where}: [plugins]")
    for name, body in plugins.items():
        body = _table(body, f"{where}: [plugins.{name}]")
        _no_unknown(body, _PLUGIN_KEYS, f"{where}: [plugins.{name}]")
        if not _typed(body.get("enabled", True), "bool", f"{where}: plugins.{name}.enabled"):
            continue
        settings = _table(body.get("settings", body.get("config", {})), f"{where}: plugins.{name}.settings")
        target = body.get("target")
        if target is not None:
            target = _typed(target, "str", f"{where}: plugins.{name}.target")
        command = body.get("command")
        if command is not None:
            if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
                raise ConfigError(f"{where}: plugins.{name}.command must be a non-empty list of strings")
            cfg.plugins.append(PluginConfig(name=name, target="", settings=dict(settings), command=command))
            continue
        cfg.plugins.append(resolve_plugin(name, settings, target))
    check_run(cfg, where)
    return cfg


def resolve_plugin(name: str, settings: dict[str, Any], target: str | None = None) -> PluginConfig:
    if target is None:
        known = registered_plugins()
        if name not in known:
            raise ConfigError(f"unknown plugin {name!r}; known: {', '.join(sorted(known))} "
                              f"(or give a target = \"module:Class\" for your own)")
        target = known[name]
    return PluginConfig(name=name, target=target, settings=dict(settings))


def check_run(cfg: RunConfig, where: str = "config") -> None:
    if cfg.device not in DEVICES:
        raise ConfigError(f"{where}: device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ConfigError(f"{where}: epochs must be >= 1, got {cfg.epochs}")
    for key in ("checkpoint_every_n_epochs", "checkpoint_every_n_steps"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}: {key} must be >= 0 (0 turns it off), got {getattr(cfg, key)}")
    if cfg.journal_backlog_mb <= 0:
        raise ConfigError(f"{where}: journal_backlog_mb must be > 0, got {cfg.journal_backlog_mb}")
    names = [p.name for p in cfg.plugins]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: plugin {dupes[0]!r} is configured twice")


def _no_unknown(table: dict, known, where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(known)}")


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
    return value


def _typed(value: Any, annotation: Any, where: str) -> Any:
    text = str(annotation)
    if "int" in text and "float" not in text:
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif "float" in text:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
        value = float(value) if ok else value
    elif "bool" in text:
        ok, expected = isinstance(value, bool), "true or false"
    else:
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{where} must be {expected}, got {value!r}")
    return value
