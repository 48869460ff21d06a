"""The values a run config may hold: check_run and each check it makes, every error one line."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

from trainbus.proto import ProtocolError, pack
from trainbus.proto.codec import fits_msgpack
from trainbus.proto.text import not_utf8, printable

from .config import ConfigError, PluginConfig, RunConfig

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
# A plugin's settings reach its process in one environment variable (TRAINBUS_PLUGIN_SETTINGS, msgpack as hex: two
# characters a byte), and `trainbus run` checks them in one argument (JSON); Linux refuses any one string over
# 128 KiB (MAX_ARG_STRLEN) and the plugin could not start. 60 KiB encoded leaves room for the variable's name.
SETTINGS_MAX_BYTES = 60 * 1024


def check_metric_settings(produced: list[str], metric_settings: dict[str, str]) -> None:
    """ConfigError for a plugin setting ("plugin: setting = value" -> metric, _check_plugin_settings's) naming a
    metric not among `produced`, the metrics every epoch of the run reports."""
    for where, metric in metric_settings.items():
        if metric not in produced:
            raise ConfigError(f"plugin {where} is not a metric this run produces; use one of: {', '.join(produced)}")


# cuda:N where processes each train on a GPU: each takes its local rank's, as torchrun and srun lay them out
ONE_GPU_PER_RANK = ("--device {device} picks one GPU, but each process of a distributed run trains on its own (its "
                    "local rank's): use --device cuda, and CUDA_VISIBLE_DEVICES to choose which GPUs the processes see")


def check_precision_on_device(cfg: RunConfig) -> None:
    """ConfigError for 16-mixed asked of the CPU: said before torch is imported (the kernel says it too, once it has
    the device, after seconds of imports, and under --nproc after every rank's). Not in check_run: a config file's
    device may be the command line's to change."""
    if cfg.precision == "16-mixed" and cfg.device == "cpu":
        raise ConfigError("precision 16-mixed needs a CUDA device (float16 autocast with a loss scaler) and this run "
                          "asks for device cpu; use bf16-mixed on the CPU")


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
    program = p.command[0] if p.command else ""
    found = os.path.join(p.cwd, program) if p.cwd and os.sep in program else program  # as the plugin's start finds it
    if program and shutil.which(found) is None:
        if os.sep in program and os.path.isdir(found):
            why, fix = "is a directory", f"give the program's own path in plugins.{p.name}.command"
        elif os.sep in program and os.path.exists(found):  # there, but its mode lets no one run it
            why, fix = "is not executable", f"fix: chmod +x {found}"
        elif os.sep in program:
            why, fix = "does not exist", f"fix the path in plugins.{p.name}.command"
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
