"""What a run is configured with: RunConfig, its plugins' PluginConfig, ConfigError for a mistake in one; and
--set on top."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .limits import PeerLimits
from .target import DEFAULT_TARGET

DEFAULT_PLUGINS = ("console", "metrics_log")
# A plugin's name makes a file name (its log, plugins/NAME.log) and its peer's name: no separators, no dot first.
PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(Exception):
    """A configuration mistake; the message names the key and the fix."""


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
