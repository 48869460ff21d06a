"""The run's configuration: TOML file, then CLI flags on top; every key checked, every error one line."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from trainbus.proto import ProtocolError, pack
from trainbus.proto.codec import fits_msgpack
from trainbus.proto.settings_format import BOOL_WORDS_SAID, bool_word
from trainbus.proto.text import near_miss, not_utf8, printable

from .flags import option_of_run
from .limits import PeerLimits
from .private_dirs import others_can_write
from .target import DEFAULT_TARGET, full_target, is_file_target

PLUGIN_ENTRY_POINT_GROUP = "trainbus.plugins"
BUILTIN_DISTRIBUTION = "trainbus"  # its entry points are the built-in plugins, whose names no package can take
DEFAULT_PLUGINS = ("console", "metrics_log")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N, one GPU by its index (device_index)
PRECISIONS = ("32", "bf16-mixed", "16-mixed", "bf16-true")
# Lightning's other names for these (its Trainer(precision=...) and _PRECISION_INPUT_STR_ALIAS_CONVERSION), taken
# as ours so a config written for Lightning runs; the run records ours
LIGHTNING_PRECISIONS = {"32-true": "32", "16": "16-mixed", "bf16": "bf16-mixed"}
SEED_LIMIT = 2**32  # numpy and torch take 32-bit seeds: [0, 2**32)
# The most epochs (and steps between checkpoints, batches accumulated) a run takes: far past any real run, and
# steps = epochs x batches stay within the 64 bits of SQLite's integers and of msgpack's (a count past 2**64 made
# start_training_session unencodable and the run registry unwritable).
MAX_COUNT = 10**9
# The smallest journal segment a config file may set. Each rotation gzips, fsyncs and renames a file on the bus
# thread and leaves one more file every reader opens; at 0.001 MiB a segment held ~7 events (14 files for a
# 45-step demo epoch). At 1 MiB it holds ~6,500 events of ~160 B, a rotation ~5 ms (docs/architecture.md). A
# RunConfig made in Python goes lower (check_run takes any size > 0): the tests' short runs rotate a few KiB.
JOURNAL_SEGMENT_MIN_MB = 1.0
# A plugin's settings reach its process in one environment variable (TRAINBUS_PLUGIN_SETTINGS, msgpack as hex: two
# characters a byte), and `trainbus run` checks them in one argument (JSON); Linux refuses any one string over
# 128 KiB (MAX_ARG_STRLEN) and the plugin could not start. 60 KiB encoded leaves room for the variable's name.
PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SETTINGS_MAX_BYTES = 60 * 1024


class ConfigError(Exception):
    """A configuration mistake; the message names the key and the fix."""


def check_metric_settings(produced: list[str], metric_settings: dict[str, str]) -> None:
    """ConfigError for a plugin setting ("plugin: setting = value" -> metric, _check_plugin_settings's) naming a
    metric not among `produced`, the metrics every epoch of the run reports."""
    for where, metric in metric_settings.items():
        if metric not in produced:
            raise ConfigError(f"plugin {where} is not a metric this run produces; use one of: {', '.join(produced)}")


@dataclass
class PluginConfig:
    name: str
    target: str  # module:Class, run by the SDK; or "" when command is given
    settings: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)  # any program speaking PROTOCOL.md, any language
    # Where its process starts: "" the kernel's working directory; in a continued run, the one its first session was
    # started in, where a relative program or file of its command (`./monitor-bin`, `python raw_example.py`) is
    cwd: str = ""
    # The capabilities its class declares, as `trainbus run` describes it before the run (None: not described, as a
    # command's); not recorded in config.json: the installed code says, each time it is described
    capabilities: list[str] | None = None


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
    # The loop reaching no seam (no batch, no epoch's end) this long is said: training_stalled, with where its thread
    # waits (kernel/stall_watch.py). Ten minutes: past a slow first batch, a checkpoint's copy, a long validation.
    stalled_after_s: float = 600.0
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
    # The journal's active file is compressed into a closed segment at this size (kernel/journal.py).
    journal_segment_mb: float = 8.0
    # Closed segments every durable plugin acked and a saved checkpoint covers keep only their lifecycle, metric, log,
    # plugin and kernel events and some steps' end_training_batch (proto/journal_format.py kept_by_compaction,
    # PROTOCOL.md §13); false: every event.
    journal_compact: bool = True
    # How a batch becomes an optimizer step, as Lightning names them (kernel/stepping.py)
    precision: str = "32"  # "32", "bf16-mixed", "16-mixed" (CUDA), "bf16-true"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0  # the gradients' 2-norm clipped to this; 0: off
    compile: bool = False  # torch.compile the model's forward
    # Across ranks (torchrun, srun): each loader's sampler replaced by a DistributedSampler, as Lightning does
    distributed_sampler: bool = True
    # HOST:PORT: also serve control (PORT) and events (PORT + 1; PORT 0: a free pair) on TCP, CURVE only, for
    # remote plugins and `trainbus attach` (kernel/remote.py); "" = ipc only. Needs keys (`trainbus keys`).
    listen: str = ""
    keys_dir: str = ""  # "" = $TRAINBUS_KEYS_DIR, else ~/.config/trainbus/keys
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginConfig] = field(default_factory=list)
    limits: dict[str, float] = field(default_factory=dict)  # [limits]: per-peer rate and size caps (PeerLimits)
    # A config's [plugins.NAME] tables with `enabled = false`: not run, but `--plugins NAME` runs one as its table
    # says (target, settings), as it does an enabled one. The file's own, never recorded (to_dict leaves it out).
    plugins_off: dict[str, PluginConfig] = field(default_factory=dict, repr=False)

    def peer_limits(self) -> PeerLimits:
        return PeerLimits(**self.limits)

    def to_dict(self) -> dict[str, Any]:
        recorded = asdict(self)
        del recorded["plugins_off"]
        for plugin in recorded["plugins"]:
            del plugin["capabilities"]
        return recorded


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
    for key, annotation in _RUN_KEYS.items():
        if raw.get(key) is not None and key != "precision":  # precision: Lightning's integers too, check_run's
            try:
                _typed(raw[key], annotation, key)
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


_RUN_KEYS = {f.name: f.type for f in fields(RunConfig)
             if f.name not in ("hyperparameters", "plugins", "limits", "plugins_off")}
_PATH_KEYS = ("target", "runs_dir", "snapshot_dir", "keys_dir", "resume")  # [run]'s paths: a ~ in them is the home
_LIMIT_KEYS = {f.name: f.type for f in fields(PeerLimits)}
_TOP_KEYS = ("run", "hyperparameters", "plugins", "limits")
_PLUGIN_KEYS = ("enabled", "target", "command", "settings", "config")  # `config` is bz's spelling of settings


def plugin_entry_points() -> dict[str, list[tuple[str, str]]]:
    """Plugin name -> every (distribution, "module:Class") that registers it in the `trainbus.plugins` entry-point
    group, the built-ins' first; read from installed metadata, nothing imported."""
    found: dict[str, list[tuple[str, str]]] = {}
    for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append((ep.dist.name if ep.dist else "?", ep.value))
    for sources in found.values():
        sources.sort(key=lambda source: source[0] != BUILTIN_DISTRIBUTION)
    return found


# Names a user reaches for that no plugin has, and where what they want is: what README calls the output
# (TensorBoard files), the built-ins' module names (plugins/gpu_monitor.py), and the dashboard, which is a command.
OTHER_NAMES = {
    **{name: "TensorBoard files and PNG plots are the visualization plugin's: name it visualization"
       for name in ("tensorboard", "plots")},
    **{f"{name}_monitor": f"the built-in {what} monitor is named {name}"
       for name, what in (("cpu", "CPU"), ("gpu", "GPU"), ("memory", "memory"), ("disk", "disk"), ("perf", "perf"))},
    "email_alert": "the built-in e-mail plugin is named email",
    "dashboard": "the live dashboard is a command, not a plugin: trainbus attach RUN, while the run trains",
}


def unknown_plugin_hint(name: str, known) -> str:
    """` (did you mean 'console'?)` for a typo of a known name, or where what an unknown name asks for is."""
    if name in OTHER_NAMES and name not in known:
        return f" ({OTHER_NAMES[name]})"
    return near_miss(name, known)


def registered_plugins() -> dict[str, str]:
    """Plugin name -> "module:Class" from installed distributions' `trainbus.plugins` entry points. A built-in's
    name is reserved (another package's entry point of that name is left out), and a name two other packages
    both register is left out: which one `--plugins NAME` meant cannot be told (plugin_name_clashes says why)."""
    return {name: sources[0][1] for name, sources in plugin_entry_points().items()
            if len(sources) == 1 or sources[0][0] == BUILTIN_DISTRIBUTION}


def plugin_name_clashes() -> dict[str, str]:
    """Plugin name -> one line on the packages that all register it: which one runs, and how to fix it."""
    clashes = {}
    for name, sources in plugin_entry_points().items():
        if len(sources) < 2:
            continue
        who = " and ".join(f"{dist} ({target})" for dist, target in sources)
        others = [dist for dist, _ in sources if dist != BUILTIN_DISTRIBUTION]
        if sources[0][0] == BUILTIN_DISTRIBUTION:
            table = f'[project.entry-points."{PLUGIN_ENTRY_POINT_GROUP}"]'
            clashes[name] = (f"plugin name {name!r} is registered by {who}: the built-in one runs; rename the entry "
                             f"point in {' and '.join(others)}'s {table}")
        else:
            clashes[name] = (f"plugin name {name!r} is registered by {who}, so it names neither; rename one of the "
                             f"entry points, or name the class: [plugins.{name}] target = \"{sources[0][1]}\"")
    return clashes


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
        raise ConfigError(f"config file {path} does not exist")
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
        from .bz_config import from_bz, in_bz_terms  # here, not above: bz_config builds on this module

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
    _no_unknown(run, _RUN_KEYS, f"{where}: [run]")
    for key, value in run.items():
        if key == "precision":  # Lightning's integers too: check_run takes them by our name
            cfg.precision = value
            continue
        value = _typed(value, _RUN_KEYS[key], f"{where}: run.{key}")
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
        cfg.limits[key] = _typed(value, _LIMIT_KEYS[key], f"{where}: limits.{key}")
        if not cfg.limits[key] > 0:  # NaN too
            raise ConfigError(f"{where}: limits.{key} must be > 0, got {value!r}")
    plugins = _table(raw.get("plugins", {name: {} for name in DEFAULT_PLUGINS}), f"{where}: [plugins]")
    for name, body in plugins.items():
        if not PLUGIN_NAME.fullmatch(name):  # it names the plugin's log file, plugins/NAME.log, and its peer
            raise ConfigError(f"{where}: plugin name {name!r} is not one trainbus takes: letters, digits, _ . and - "
                              f"(starting with a letter or digit, at most 64); it names the plugin's log file")
        body = _table(body, f"{where}: [plugins.{name}]")
        _no_unknown(body, _PLUGIN_KEYS, f"{where}: [plugins.{name}]")
        enabled = _typed(body.get("enabled", True), "bool", f"{where}: plugins.{name}.enabled")
        if "settings" in body and "config" in body:  # bz's spelling and ours: one of them would be dropped
            raise ConfigError(f"{where}: plugins.{name} has both settings and config (bz's name for settings); "
                              f"keep one")
        settings = _table(body.get("settings", body.get("config", {})), f"{where}: plugins.{name}.settings")
        target = body.get("target")
        if target is not None:
            target = _typed(target, "str", f"{where}: plugins.{name}.target")
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


def resolve_plugin(name: str, settings: dict[str, Any], target: str | None = None, where: str = "") -> PluginConfig:
    """The plugin NAME runs as; `where` it was named (a config file's table, --plugins) begins a ConfigError."""
    if target is None:
        if ":" in name:  # an author's own class, where a name goes: say where a target goes
            table = re.sub(r"(?<!^)(?=[A-Z])", "_", name.rpartition(":")[2]).lower() or "mine"
            raise ConfigError(f"{where + ': ' if where else ''}{name!r} is a module:Class, not a plugin name; run your "
                              f"own class from a config file (trainbus run -c FILE) with [plugins.{table}] target = "
                              f"\"{name}\"")
        known = registered_plugins()
        if name not in known and name in (clashes := plugin_name_clashes()):
            raise ConfigError(clashes[name])
        if name not in known:
            hint = unknown_plugin_hint(name, known)
            raise ConfigError(f"{where + ': ' if where else ''}unknown plugin {name!r}{hint}; "
                              f"known: {', '.join(sorted(known))} (or give a target = \"module:Class\" for your own)")
        target = known[name]
    return PluginConfig(name=name, target=target, settings=dict(settings))


# cuda:N where processes each train on a GPU: each takes its local rank's, as torchrun and srun lay them out
ONE_GPU_PER_RANK = ("--device {device} picks one GPU, but each process of a distributed run trains on its own (its "
                    "local rank's): use --device cuda, and CUDA_VISIBLE_DEVICES to choose which GPUs the processes see")


def device_index(device: str) -> int | None:
    """N of a device given as cuda:N (as torch names one GPU); None for auto, cpu and cuda."""
    kind, colon, index = device.partition(":")  # as torch parses it: no leading zero, within 31 bits
    canonical = index.isascii() and index.isdigit() and str(int(index)) == index and int(index) < 2**31
    return int(index) if colon and kind == "cuda" and canonical else None


def check_run(cfg: RunConfig, where: str = "config", programs: bool = True) -> None:
    """ConfigError for a value no run takes; a precision Lightning spells is put by our name, as the run records.
    programs: also what would keep a plugin's process from starting (_check_plugin), which the command line says
    before the run; in the kernel such a plugin fails by itself and the run goes on."""
    if cfg.device not in DEVICES and device_index(cfg.device) is None:
        raise ConfigError(f"{where}: device must be one of {', '.join(DEVICES)} or cuda:N (the GPU of index N), "
                          f"got {cfg.device!r}")
    if not cfg.runs_dir.strip():  # as `--runs-dir ""`: the current directory would take the runs and the registry
        raise ConfigError(f"{where}: runs_dir is empty: name a directory, or leave runs_dir out for ./runs")
    if cfg.epochs is not None and not 1 <= cfg.epochs <= MAX_COUNT:
        raise ConfigError(f"{where}: epochs must be 1 to {MAX_COUNT:,} (a run that goes until it is stopped: a "
                          f"large count and `trainbus runs stop`), got {cfg.epochs}")
    for key in ("ready_timeout_s", "drain_timeout_s", "vote_timeout_s"):
        if not getattr(cfg, key) >= 0:  # NaN too: every wait on it would end at once, or never
            raise ConfigError(f"{where}: {key} must be a number of seconds >= 0 (0: no waiting), got "
                              f"{getattr(cfg, key)}")
    for key in ("checkpoint_every_n_epochs", "checkpoint_every_n_steps"):
        if not 0 <= getattr(cfg, key) <= MAX_COUNT:
            raise ConfigError(f"{where}: {key} must be 0 to {MAX_COUNT:,} (0 turns it off), got {getattr(cfg, key)}")
    cfg.precision = precision_by_our_name(cfg.precision, where)
    if not 1 <= cfg.accumulate_grad_batches <= MAX_COUNT:
        raise ConfigError(f"{where}: accumulate_grad_batches must be 1 to {MAX_COUNT:,}, got "
                          f"{cfg.accumulate_grad_batches}")
    if not 0 <= cfg.gradient_clip_val < math.inf:  # a NaN bound trains to NaN; inf pays for a norm that clips nothing
        raise ConfigError(f"{where}: gradient_clip_val must be a finite number >= 0 (0 turns clipping off), got "
                          f"{cfg.gradient_clip_val}")
    if not 0 <= cfg.stalled_after_s < math.inf:
        raise ConfigError(f"{where}: stalled_after_s must be a number of seconds >= 0 (0: never said), got "
                          f"{cfg.stalled_after_s}")
    for key in ("journal_backlog_mb", "journal_segment_mb"):  # inf: no byte count to open the journal with
        if not 0 < getattr(cfg, key) < math.inf:
            raise ConfigError(f"{where}: {key} must be a finite number > 0, got {getattr(cfg, key)}")
    values = [*((f"hyperparameter {k!r}", v) for k, v in cfg.hyperparameters.items()),
              *((f"plugin {p.name!r}: setting {k!r}", v) for p in cfg.plugins for k, v in p.settings.items())]
    for name, value in values:
        if _nested_past(value, MAX_NESTING):  # every copy and record of it recursed out (a RecursionError's traceback)
            raise ConfigError(f"{where}: {name} nests lists or tables more than {MAX_NESTING} levels deep; put such "
                              f"data in a file and give its path")
    names = [p.name for p in cfg.plugins]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: plugin {dupes[0]!r} is named twice; name each plugin once (a second one of the "
                          f"same class: a [plugins.OTHER_NAME] table in a config file with its target)")
    if not 0 <= cfg.seed < SEED_LIMIT:
        raise ConfigError(f"{where}: seed must be between 0 and {SEED_LIMIT - 1} (numpy and torch take 32-bit seeds), "
                          f"got {cfg.seed}")
    for plugin in cfg.plugins if programs else ():
        _check_plugin(plugin, where)


# How deep a hyperparameter's or setting's lists and tables may nest: what parses (Python's readers take about a
# thousand levels) was then copied, recorded and sent by code that recurses a level a bracket too
MAX_NESTING = 100


def _nested_past(value: Any, levels: int) -> bool:
    """Whether `value` nests lists or dicts deeper than `levels` (walked without recursion)."""
    frontier = [value]
    for _ in range(levels + 1):
        frontier = [item for v in frontier if isinstance(v, (list, dict))
                    for item in (v.values() if isinstance(v, dict) else v)]
        if not frontier:
            return False
    return any(isinstance(v, (list, dict)) for v in frontier)


def precision_by_our_name(precision: Any, where: str) -> str:
    """One of PRECISIONS for a precision given as trainbus or Lightning names it (32-true, 16, bf16, and the integers
    32 and 16, as a TOML file or Lightning's Trainer has them); ConfigError for any other."""
    if type(precision) is int:
        precision = str(precision)
    if isinstance(precision, str):
        precision = LIGHTNING_PRECISIONS.get(precision, precision)
    if precision == "16-true":  # Lightning's float16 weights: no loss scaler, and nothing here casts to them
        raise ConfigError(f"{where}: precision 16-true (float16 weights) is not supported; use 16-mixed (CUDA) or "
                          f"bf16-true")
    if precision in ("64", "64-true"):  # Lightning's float64: nothing here casts to it, and 32 casts nothing away
        raise ConfigError(f"{where}: precision {precision} (float64 weights) is not a precision here: make the model "
                          f"and its batches float64 in the spec (model.double()) and give precision 32, which casts "
                          f"nothing")
    if precision not in PRECISIONS or not isinstance(precision, str):
        raise ConfigError(f"{where}: precision must be one of {', '.join(PRECISIONS)} (or Lightning's "
                          f"{', '.join(LIGHTNING_PRECISIONS)}), got {precision!r}")
    return precision


def _check_plugin(p: PluginConfig, where: str) -> None:
    """What would keep the plugin's process from starting: settings too big for its environment, no program."""
    unsendable = _unsendable(p.settings)
    if unsendable:
        raise ConfigError(f"{where}: plugin {p.name!r}: {unsendable}")
    try:
        size = max(len(pack(p.settings)), len(json.dumps(p.settings, default=str).encode()))
    except (ProtocolError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: plugin {p.name!r}: its settings cannot be sent to it ({exc}); use strings, "
                          f"numbers, booleans, lists and tables") from None
    if size > SETTINGS_MAX_BYTES:
        raise ConfigError(f"{where}: plugin {p.name!r}: its settings take {size:,} bytes encoded, over the "
                          f"{SETTINGS_MAX_BYTES:,} that fit in the environment variable its process gets them in; "
                          f"put large data in a file and give its path as a setting")
    if p.command and shutil.which(os.path.join(p.cwd, p.command[0]) if p.cwd and os.sep in p.command[0]
                                  else p.command[0]) is None:
        program = p.command[0]
        if os.sep in program:
            why = "is not an executable file" if os.path.exists(program) else "does not exist"
            fix = f"fix the path in plugins.{p.name}.command"
        else:
            why = "is not on PATH"
            fix = f"install it, or give its path in plugins.{p.name}.command (./{program} for one in this folder)"
        raise ConfigError(f"{where}: plugin {p.name!r}: program {program!r} {why}; {fix}")


def _unsendable(value: Any, key: str = "") -> str | None:
    """What keeps a setting in `value` from reaching the plugin's process in msgpack, and the fix, naming it: an
    integer past 64 bits, text that is not UTF-8 (a file name of another encoding, from the command line); None."""
    if isinstance(value, int) and not isinstance(value, bool) and not fits_msgpack(value):
        return (f"{key} = {value} does not fit in 64 bits (msgpack's integers, which its process is sent its settings "
                f"in); give a smaller one")
    if isinstance(value, str) and not_utf8(value):
        return f"{key} = {printable(repr(value))} is not UTF-8 text ({not_utf8(value)}); give it in UTF-8"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        found = _unsendable(item, f"{key}.{name}" if key else str(name))
        if found:
            return found
    return None


def apply_set(cfg: RunConfig, key: str, value: Any) -> None:
    """One `--set KEY=VALUE`. A KEY with a dot sets a plugin of this run's setting: `NAME.SETTING` or
    `plugins.NAME.settings.SETTING`; `hyperparameters.KEY` is a hyperparameter whose name has dots; any
    other KEY is a hyperparameter."""
    where = f"--set {key}"
    head, dot, rest = key.partition(".")
    if not dot:
        cfg.hyperparameters[key] = value
        return
    if head == "hyperparameters" and rest:
        cfg.hyperparameters[rest] = value
        return
    if head == "plugins":
        name, _, tail = rest.partition(".")
        section, _, setting = tail.partition(".")
        if not (name and section == "settings" and setting):
            raise ConfigError(f"{where}: a plugin's setting is set as plugins.NAME.settings.SETTING=VALUE "
                              f"(or NAME.SETTING=VALUE)")
    else:
        name, setting = head, rest
    plugin = next((p for p in cfg.plugins if p.name == name), None)
    if plugin is None:
        configured = ", ".join(p.name for p in cfg.plugins) or "none"
        raise ConfigError(f"{where}: {name!r} is not a plugin of this run (its plugins: {configured}); add it with "
                          f"--plugins or the config, or set a hyperparameter whose name has a dot as "
                          f"hyperparameters.{key}=VALUE")
    if not setting:
        raise ConfigError(f"{where}: name the setting: {name}.SETTING=VALUE")
    plugin.settings[setting] = value


def loop_of_links(path: str | Path) -> bool:
    """`path`, or a folder on the way to it, is a symbolic link that leads back to itself (ELOOP): os.path.exists
    says no such path, and pathlib's resolve() raises RuntimeError."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


LOOP_OF_LINKS = "is a loop of symbolic links (each leads to the next, and the last back): name a directory"


def check_runs_dir(runs_dir: str) -> None:
    """ConfigError unless run directories can be made under runs_dir. Tried for real (a directory made and removed
    in its nearest existing folder): mode bits do not stop root, a read-only mount or a file in the path does."""
    if loop_of_links(runs_dir):
        raise ConfigError(f"runs_dir {runs_dir} {LOOP_OF_LINKS}")
    path = Path(runs_dir).absolute()
    existing = next(p for p in (path, *path.parents) if os.path.exists(p))
    fix = "pick a writable place with --runs-dir or [run] runs_dir"
    if not existing.is_dir():
        raise ConfigError(f"runs_dir {runs_dir}: {existing} is a file, not a directory; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".trainbus-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"runs_dir {runs_dir}: cannot create directories in {existing} "
                          f"({exc.strerror or exc}); {fix}") from None
    check_runs_dir_private(path, runs_dir)


def check_runs_dir_private(path: Path, runs_dir: str) -> None:
    """ConfigError when users other than this one could change the runs directory (kernel/private_dirs.py)."""
    why = others_can_write(path)
    if why:
        raise ConfigError(f"runs_dir {runs_dir}: {why}")


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
    if known is _RUN_KEYS and key in LIGHTNING_TRAINER:  # before a near miss: `devices` is no typo of `device`
        return f" (Lightning's {key} {LIGHTNING_TRAINER[key]})"
    # how it launches (cli_launch.py): the command line's alone, recorded in config.json as `launch`
    if known is _RUN_KEYS and (option := option_of_run(key, value)):
        return f" ({key} is an option of trainbus run, not a [run] key: {option})"
    near = near_miss(key, known)
    if near:
        return near
    for table, keys in (("run", _RUN_KEYS), ("limits", _LIMIT_KEYS)):
        if key in keys:
            return f" (it belongs in [{table}])"
    if key in registered_plugins():
        return f" (a plugin's table is [plugins.{key}])"
    if known is _PLUGIN_KEYS:
        return " (a plugin's settings go in its [plugins.NAME.settings] table)"
    if known is _RUN_KEYS or known is _TOP_KEYS:
        return " (a hyperparameter goes in [hyperparameters])"
    return ""


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
    return value
