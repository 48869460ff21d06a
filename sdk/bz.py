"""bz compatibility: a plugin written for the bz CLI runs out of process with one changed import.

Change ``from bz.plugins import Plugin`` to ``from trainbus.sdk.bz import Plugin`` and run it with
``[plugins.mine] target = "mymodule:MyPlugin"`` and its ``config = {...}`` table (``settings`` works
too). The plugin is constructed from that table as bz's examples construct theirs (constructor_arguments):
an ``__init__(self, config=None)`` gets the whole table; any other parameters are filled by name from
its keys (``__init__(self, save_dir="checkpoints", max_checkpoints=5)``); and a constructor with one
required parameter that the table does not name gets the whole table as it (bz's e-mail example,
``__init__(self, email_config)``, configured with the e-mail settings themselves). Its hook methods
(``end_epoch(self, context)``, any of the 14) are called in event order with a ``context`` rebuilt from
the events, the way bz filled it in process:

- ``epoch`` counts from 0 inside the first epoch and goes up by one after each ``end_epoch``;
- ``training_loss_total``/``training_batch_count`` (and the validation pair) are the running totals,
  reset at the start of each loop; ``training_metrics``/``validation_metrics`` are the loop's means
  (per loop, not per batch: the kernel does not publish per-batch metrics);
- ``hyperparameters`` and ``extra`` (``run_id``, ``run_dir``, ``step``) as in bz; after a resume,
  ``load_checkpoint`` has ``epoch`` and ``extra["start_epoch"]`` the epochs done (and ``extra["checkpoint_path"]``
  the file resumed from);
- ``save_checkpoint`` runs when the checkpoint plugin reports the file written (``checkpoint_saved``), with
  ``extra["checkpoint_path"]`` that file and ``epoch`` the epoch saved, as bz's trainer called it after saving:
  the kernel snapshots and trains on, so it may come after that epoch's ``end_epoch``. The last epoch's file is
  written after the run's final event: ``end_training_session`` is held until then (``expecting``). A checkpoint
  that could not be written gets a warning instead of the hook;
- setting ``context.should_stop_training = True`` sends a stop reply; set at ``end_epoch`` it stops
  training at that epoch's end, since such a plugin votes there.

``context.model`` and ``context.optimizer`` do not exist out of process: touching them raises
``NotInThisProcess`` (an AttributeError, so ``hasattr(context, "model")`` is simply False), which
says where the weights are instead. It is not retried (the retry would run on an instance that already
acted on the event) and is reported once: the kernel's log and console, the plugin's log, and the
plugin's ``errors_logged`` in summary.json. ``self.config`` is the plugin's config table; ``self.logger``
records at INFO and above reach the kernel's log.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any

from trainbus.proto import DURABLE, Event, events as ev
from trainbus.proto.process import class_warning_level

from .plugin import Plugin as _SdkPlugin, SettingsError, call_warnings, refuse_awaitable
from .runner import NotRetryable

__all__ = ["Context", "NotInThisProcess", "Plugin", "PluginContext", "PluginError", "constructor_arguments"]

HOOKS: tuple[str, ...] = ev.LIFECYCLE_EVENTS  # bz's 14 hook names are the lifecycle event names
# Said first on the console's one line (160 characters), so the way out comes early.
OUT_OF_PROCESS_HINT = (
    "context.{name} is not in this process: bz plugins run in their own process here; attach the `checkpoint` "
    "plugin and load its files (<run_dir>/checkpoints/, the final weights <run_dir>/final.pt) with "
    "torch.load(path, weights_only=True): keys model_state_dict, optimizer_state_dict."
)
LOG_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning"}
SAVE_REPORTS = (ev.CHECKPOINT_SAVED, ev.CHECKPOINT_FAILED)  # a persister's word on a save_checkpoint's file


class PluginError(Exception):
    """bz's base exception for a plugin's errors (bz.plugins.PluginError), for plugins that raise or catch it."""


class NotInThisProcess(AttributeError, NotRetryable):
    """Something that lives in the training process (context.model, context.optimizer) was touched from a plugin."""


class Context:
    """bz's training context, rebuilt from the events in the plugin's own process."""

    def __init__(self) -> None:
        self.epoch = 0
        self.training_loss_total = 0.0
        self.training_batch_count = 0
        self.validation_loss_total = 0.0
        self.validation_batch_count = 0
        self.training_metrics: dict[str, float] = {}
        self.validation_metrics: dict[str, float] = {}
        self.hyperparameters: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.should_stop_training = False

    @property
    def model(self) -> Any:
        raise NotInThisProcess(OUT_OF_PROCESS_HINT.format(name="model"))

    @model.setter
    def model(self, value: Any) -> None:
        raise NotInThisProcess(OUT_OF_PROCESS_HINT.format(name="model"))

    @property
    def optimizer(self) -> Any:
        raise NotInThisProcess(OUT_OF_PROCESS_HINT.format(name="optimizer"))

    @optimizer.setter
    def optimizer(self, value: Any) -> None:
        raise NotInThisProcess(OUT_OF_PROCESS_HINT.format(name="optimizer"))

    def update(self, event: Event) -> None:
        """Bring the context to where bz's would be when the hook for this event runs."""
        data, kind = event.data, event.type
        self.extra.update(run_id=event.run, step=event.step)
        if kind == ev.START_TRAINING_SESSION:
            self.hyperparameters = dict(data.get("hyperparameters") or {})
            self.epoch = 0
        elif kind == ev.END_TRAINING_SESSION:
            self.epoch = int(data.get("epochs_completed") or self.epoch)
        elif kind == ev.LOAD_CHECKPOINT and isinstance(data.get("epoch"), int):
            self.epoch = max(data["epoch"] - 1, 0)  # bz: the epochs the checkpoint had done, where training goes on
            self.extra["start_epoch"] = self.epoch
        elif event.epoch:
            self.epoch = event.epoch - 1  # bz counts epochs from 0 and moves on after end_epoch
        if kind == ev.START_VALIDATION_LOOP:  # bz resets these before its hook, and training's after it
            self.validation_loss_total, self.validation_batch_count = 0.0, 0
            self.validation_metrics = {name: 0.0 for name in self.validation_metrics}
        for group in ("training", "validation"):
            if f"{group}_loss_total" in data and data[f"{group}_loss_total"] is not None:
                setattr(self, f"{group}_loss_total", float(data[f"{group}_loss_total"]))
            if isinstance(data.get(f"{group}_batch_count"), int):
                setattr(self, f"{group}_batch_count", data[f"{group}_batch_count"])
            if isinstance(data.get(f"{group}_metrics"), dict):
                setattr(self, f"{group}_metrics", dict(data[f"{group}_metrics"]))
        if kind == ev.END_EPOCH and isinstance(data.get("hyperparameters"), dict):
            self.hyperparameters = dict(data["hyperparameters"])
        if kind == ev.LOAD_CHECKPOINT and isinstance(data.get("path"), str):
            self.extra["checkpoint_path"] = data["path"]

    def after(self, event: Event) -> None:
        """What bz did to the context after the hook ran."""
        if event.type == ev.START_TRAINING_LOOP:
            self.training_loss_total, self.training_batch_count = 0.0, 0
            self.training_metrics = {name: 0.0 for name in self.training_metrics}
        elif event.type == ev.END_EPOCH:
            self.epoch = event.epoch


PluginContext = Context  # bz's name for it (bz.plugins.PluginContext), which its plugins' hooks are typed with


def constructor_arguments(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments a bz plugin class is constructed with, from its config table (this module's
    docstring says the rules); SettingsError, naming the parameters, when the table cannot fill them."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # past self
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in parameters if p.name in named and p.default is p.empty]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    if "config" in named:  # bz's own construction: cls(config=...)
        return {"config": config}
    if len(required) == 1 and config and not set(config) & set(named):
        return {required[0]: config}  # __init__(self, email_config) with the e-mail settings as its config
    signature = f"{cls.__name__}({', '.join(named + ['**kwargs'] * takes_any)})"
    missing = [name for name in required if name not in config]
    if missing:
        raise SettingsError(f"{signature} needs {', '.join(map(repr, missing))} in its config table "
                            f"(given: {', '.join(map(repr, config)) or 'nothing'})")
    unknown = [key for key in config if key not in named]
    if unknown and not takes_any:
        raise SettingsError(f"{signature} has no parameter {unknown[0]!r} for its config key of that name")
    return dict(config)


class _BzConstruction(type):
    """Builds a bz plugin from its config table (constructor_arguments) when the SDK's runner asks for
    `cls(settings, run_id=, run_dir=)`."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if set(kwargs) != {"run_id", "run_dir"} or len(args) > 1:  # the author's own call (a test's): bz's signature
            plugin = cls.__new__(cls)
            Plugin.__init__(plugin)  # the base first, as below: their __init__ need not call it (bz's do not)
            plugin.__init__(*args, **kwargs)
            return plugin
        config = dict(args[0] if args else {})
        arguments = constructor_arguments(cls, config)
        plugin = cls.__new__(cls)
        # bz's base first, so an __init__ that never calls super().__init__() (as bz's examples do not) still
        # gets it, and what that __init__ sets is not overwritten.
        Plugin.__init__(plugin, config=config)
        plugin.__init__(**arguments)
        plugin.settings = config
        plugin.run_id, plugin.run_dir = kwargs["run_id"], kwargs["run_dir"]
        _forward_logging(plugin)
        for warning in cls.warnings():  # for kernel.log; `trainbus run` said it on the terminal before the run
            plugin.log(warning, level=class_warning_level(os.environ.get("TRAINBUS_PLUGIN_NAME") or plugin.name))
        return plugin


class Plugin(_SdkPlugin, metaclass=_BzConstruction):
    """A bz plugin: override any of the 14 hooks, each taking `context` (see this module's docstring)."""

    delivery = DURABLE  # in bz every hook saw every batch, in order; so does a bz plugin here
    catch_up = False  # in bz a resumed run's callbacks start afresh: no hook sees an earlier session again
    open_settings = True  # bz config is free-form: self.config.get("patience", 3)
    settings: dict[str, Any] = {}

    @classmethod
    def warnings(cls) -> list[str]:
        return _hooks_without_context(cls) + [
            f"{cls.__name__}.{name} looks like a hook but is none of bz's 14, so it is never called; the hooks: "
            f"{', '.join(HOOKS)}" for name in _unknown_hooks(cls)]

    def handler_of(self, event_type: str) -> Any:
        hook = ev.SAVE_CHECKPOINT if event_type in SAVE_REPORTS else event_type
        return getattr(self, hook) if hook in HOOKS and _overrides_hook(type(self), hook) else self.handle

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _overrides_hook(cls, ev.END_EPOCH) and "votes" not in cls.__dict__:
            cls.votes = (ev.END_EPOCH,)  # bz ran hooks inline: a stop set at end_epoch lands at that epoch

    def __init__(self, name: str | None = None, config: dict[str, Any] | None = None):
        super().__init__({})
        if name:
            self.name = name
        self.config = config if config is not None else {}
        self.logger = logging.getLogger(f"bz.plugin.{self.name}")
        self.context = Context()
        self._stop_sent = False
        self._unsaved: set[int] = set()  # seqs of save_checkpoint events whose file is not written yet
        self._session_end: Event | None = None  # end_training_session, held until the last checkpoint is written

    # bz's hooks (do nothing; override the ones you need)

    def run_stage(self, stage: str, context: Context) -> None:
        method = getattr(self, stage, None)
        if method is not None:
            method(context)

    # dispatch

    @classmethod
    def handled_events(cls) -> list[str]:
        # the context needs every lifecycle event, whatever the hooks; save_checkpoint waits for the file's report
        return list(HOOKS) + (list(SAVE_REPORTS) if _overrides_hook(cls, ev.SAVE_CHECKPOINT) else [])

    def expecting(self) -> bool:
        return bool(self._unsaved)  # the last epoch's file is written after the run's final event

    def handle(self, event: Event) -> None:
        if event.type in SAVE_REPORTS:
            self._checkpoint_reported(event)
            return
        if event.type not in HOOKS:
            return
        context = self.context
        context.extra["run_dir"] = self.run_dir  # set by the runner, or by a Harness (a test's own directory)
        context.update(event)
        hook = _overrides_hook(type(self), event.type)
        if hook and event.type == ev.SAVE_CHECKPOINT:
            # bz called it with the file saved; here the checkpoint plugin writes it after this event
            self._unsaved.add(event.seq)
            hook = False
        elif hook and event.type == ev.END_TRAINING_SESSION and self._unsaved:
            self._session_end = event  # bz's order: the last save_checkpoint first
            return
        self._run_hook(event.type if hook else None, event)

    def teardown(self) -> None:
        """A run that ended before the last checkpoint's file was reported still gets end_training_session."""
        self._unsaved.clear()
        self._end_session()

    def _checkpoint_reported(self, report: Event) -> None:
        """A persister's checkpoint_saved (or _failed) for a save_checkpoint this plugin was sent: the hook runs
        now, with extra["checkpoint_path"] the file and context.epoch as it was at that save."""
        seq = report.data.get("seq")
        if seq not in self._unsaved:  # another persister's report of the same snapshot, or one before our start
            return
        self._unsaved.discard(seq)
        epoch = report.data.get("epoch")
        if report.type == ev.CHECKPOINT_FAILED:
            self.log(f"{self.name}.save_checkpoint not called for the checkpoint of epoch {epoch}: it could not be "
                     f"written ({report.data.get('reason')})", level="warning")
        else:
            context = self.context
            context.extra["checkpoint_path"] = report.data.get("path")
            now, context.epoch = context.epoch, max(int(epoch or 1) - 1, 0)
            try:
                self._run_hook(ev.SAVE_CHECKPOINT, report)
            finally:
                context.epoch = now
        if not self._unsaved:
            self._end_session()

    def _end_session(self) -> None:
        held, self._session_end = self._session_end, None
        if held is not None:
            self._run_hook(ev.END_TRAINING_SESSION, held)

    def _run_hook(self, hook: str | None, event: Event) -> None:
        context = self.context
        seen = context.epoch  # as the hook saw it: bz's count, from 0
        try:
            if hook is not None:
                refuse_awaitable(getattr(self, hook)(context), "hooks")
        finally:  # a hook that raises still leaves the context where bz's would be, and its stop stands
            if event.type in HOOKS:
                context.after(event)
            if context.should_stop_training and not self._stop_sent:
                self._stop_sent = True
                self.stop(f"{self.name} set context.should_stop_training at {hook or event.type} (context.epoch "
                          f"{seen}, the run's epoch {event.epoch})")


for _hook in HOOKS:  # do-nothing hooks taking context, as bz's base class has them
    def _noop(self, context: Context) -> None:
        """Override to act at this point of training."""
    _noop.__name__ = _hook
    setattr(Plugin, _hook, _noop)


def _unknown_hooks(cls: type) -> list[str]:
    """Methods of the plugin's own classes named like a hook that is not one: bz's names misremembered
    (save_model_checkpoint, end_batch) and other frameworks' callbacks (on_epoch_end, on_train_begin)."""
    names = {name for klass in cls.__mro__ if issubclass(klass, Plugin) and klass is not Plugin
             for name, value in vars(klass).items() if callable(value)}
    return sorted(name for name in names if name not in HOOKS and not name.startswith("_")
                  and (name.startswith(("start_", "end_", "on_")) or name.endswith(("_start", "_end", "_begin"))
                       or "checkpoint" in name))


def _hooks_without_context(cls: type) -> list[str]:
    """A hook that cannot take the context it is called with (`def end_epoch(self):`): every call of it fails."""
    return [warning for hook in HOOKS if _overrides_hook(cls, hook)
            for warning in call_warnings(cls, hook, "context", "hooks")]


def _overrides_hook(cls: type, hook: str) -> bool:
    return getattr(cls, hook, None) is not getattr(Plugin, hook, None)


class _ToKernel(logging.Handler):
    """Log records of the plugin's process become log replies, so they land in the kernel's log and journal."""

    def __init__(self, plugin: Plugin):
        super().__init__(level=logging.INFO)
        self.plugin = plugin

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = LOG_LEVELS.get(record.levelno, "error" if record.levelno > logging.WARNING else "info")
            self.plugin.log(f"{record.name}: {self.format(record)}", level=level)
        except Exception:
            self.handleError(record)


def _forward_logging(plugin: Plugin) -> None:
    root = logging.getLogger()
    if any(isinstance(h, _ToKernel) for h in root.handlers):
        return
    stderr = logging.StreamHandler(sys.stderr)  # the plugin's own log file keeps everything too
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    root.addHandler(_ToKernel(plugin))
    root.setLevel(logging.INFO)
