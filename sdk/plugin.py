"""The Plugin base class: do-nothing handlers named after the events, settings, and reply helpers."""

from __future__ import annotations

import inspect
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable

from trainbus.proto import BEST_EFFORT, DELIVERY_CLASSES, Event, ProtocolError, control, events as ev
from trainbus.proto.codec import fit_control
from trainbus.proto.messages import CAPABILITIES
from trainbus.proto.text import near_miss

from .settings import HOST_PATH, Setting, SettingsError, check_value, declared

# Every event a plugin can handle, as `on_<name>`: not bus_closing, which comes after the kernel waited for its
# plugins to exit (they leave at the final event); attach clients end on it.
HANDLED_EVENTS: tuple[str, ...] = tuple(t for t in ev.LIFECYCLE_EVENTS + ev.KERNEL_EVENTS if t != ev.BUS_CLOSING)


@dataclass(frozen=True)
class KernelGoneInfo:
    """What a plugin knows when its kernel died mid-run (Plugin.on_kernel_gone): why it thinks so, and the
    last event it handled in order (None for each if it handled none)."""

    reason: str  # "the kernel process exited", "no kernel heartbeat for 3.2 s"
    run_id: str
    run_dir: str
    last_seq: int | None
    last_step: int | None
    last_epoch: int | None


class EventData(dict):
    """An event's data as its handler reads it: a dict whose missing key raises a KeyError naming the event type
    and the keys it has (`event.data["validation_accuracy"]` of an end_epoch, whose accuracy is in
    validation_metrics, said only 'validation_accuracy')."""

    def __init__(self, event_type: str, data: dict[str, Any]):
        super().__init__(data)
        self.event_type = event_type

    def __missing__(self, key: Any) -> Any:
        keys = ", ".join(map(str, self)) or "none"
        raise KeyError(f"{key!r}: {self.event_type}'s data has no such key; it has: {keys} (proto/PROTOCOL.md §6)")

    def __reduce__(self):  # pickled (a thread pool, a multiprocessing queue) as the plain dict it holds
        return dict, (dict(self),)


def _check_strings(cls: type, attr: str, what: str, example: str) -> None:
    """A class attribute that must be a tuple of strings: a string there is each of its letters (votes at 'e', 'n',
    'd', ...), said with the one-element tuple it was meant to be."""
    given = getattr(cls, attr)
    if isinstance(given, str) or not isinstance(given, (tuple, list)) or not all(isinstance(x, str) for x in given):
        fix = f"{attr} = ({given!r},)" if isinstance(given, str) else example
        raise SettingsError(f"{cls.__name__}.{attr} = {given!r} is not allowed; it must be a tuple of {what}: {fix}")


def _check_capabilities(cls: type) -> None:
    """A string where a tuple goes declared each letter; a near miss of a capability declared nothing the kernel acts
    on: either way the plugin was silently never a persister."""
    _check_strings(cls, "capabilities", "capabilities", "capabilities = ('checkpoint',)")
    given = cls.capabilities
    for name in given:
        if name not in CAPABILITIES:
            known = ", ".join(CAPABILITIES)
            raise SettingsError(f"{cls.__name__}.capabilities = {given!r} is not allowed: {name!r} is no "
                                f"capability{near_miss(name, CAPABILITIES)}; the kernel knows: {known}")


class Plugin:
    """Subclass, override the handlers you need, run with `python -m trainbus.sdk module:Class`.

    Example::

        class LossPrinter(Plugin):
            '''Prints the validation loss after every epoch.'''
            settings = {"prefix": "val"}

            def on_end_epoch(self, event):
                print(self.settings["prefix"], event.data["validation_loss"])
                if event.data["validation_loss"] < 0.01:
                    self.stop("good enough")

    A handler that raises is reported to the kernel with its traceback and the plugin goes on.
    Handlers run one at a time, in seq order. Keep each one shorter than `handler_timeout_s` (a minute)
    or the supervisor treats the plugin as hung; do long work in a thread of your own.
    """

    name: str = ""  # defaults to the class name in snake_case, less a "_plugin" ending (MyPlugin: "my")
    delivery: str = BEST_EFFORT  # or DURABLE: every event in order, across restarts, at least once (dedupe by seq)
    # name -> Setting(default, help, min=, max=, choices=, kind=), or a plain default (its type inferred);
    # the run's config overrides them per key, each value checked against its declaration
    settings: dict[str, Setting | Any] = {}
    handler_timeout_s: float = 60.0  # a handler running longer than this counts as a hang
    # A durable plugin's plugins/<name>.deadletter.jsonl (each event its handler failed on, with the traceback) past
    # this size moves to <name>.deadletter.jsonl.1 (the previous one removed): a handler failing on every batch would
    # otherwise fill the disk in a multi-day run (~1 kB a line, a line a step).
    dead_letters_max_bytes: int = 64 * 1024 * 1024
    # on_kernel_gone gets this long; then teardown runs and the process exits, whether or not the hook returned
    kernel_gone_timeout_s: float = 10.0
    # Event types at which the kernel waits (at most its vote_timeout_s) for this plugin to handle the
    # event before going on, so a stop decided there lands at that boundary: ("end_epoch",) for early stopping,
    # the one type the kernel waits at (a vote at another is never waited for; kernel.log says so).
    votes: tuple[str, ...] = ()
    # What this plugin does for the kernel: "checkpoint" = persists save_checkpoint snapshots (the
    # kernel takes snapshots only while such a plugin is live, and reuses a buffer once it acks).
    capabilities: tuple[str, ...] = ()
    # Accept setting keys that `settings` does not declare (the bz adapter: bz plugins read free-form config).
    open_settings: bool = False
    # Setting names refused with the plugin's own one-line why and fix, not as an unknown setting (email's password:
    # a secret never goes in the config).
    refused_settings: dict[str, str] = {}
    # A durable plugin in a continued run (`--resume`) is replayed the run's earlier sessions first. True: its
    # handlers see them (to rebuild what it keeps: a best value, a patience count), but what they reply is not
    # sent (stop, metric, log: that session is over) and no earlier session's final event is handed over.
    # False: it sees only this session's events.
    catch_up: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A delivery, votes, capabilities, subscriptions or check_settings declared wrong fails the class, at its line,
        as a Setting declared wrong does: the plugin crashed at every start (delivery, a subscriptions list), voted at
        each letter of a string, waited for nowhere (votes), was never the persister it meant to be (capabilities),
        or failed every check of its settings (a check_settings that is no classmethod)."""
        super().__init_subclass__(**kwargs)
        if cls.delivery not in DELIVERY_CLASSES:
            raise SettingsError(f"{cls.__name__}.delivery = {cls.delivery!r} is not allowed; it must be DURABLE or "
                                f"BEST_EFFORT (from trainbus.sdk import DURABLE), the strings 'durable' and "
                                f"'best_effort'")
        _check_strings(cls, "votes", "event types", "votes = ('end_epoch',), or () for none")
        _check_capabilities(cls)
        if "check_settings" in cls.__dict__ and not isinstance(cls.__dict__["check_settings"],
                                                              (classmethod, staticmethod)):
            # it is called on the class (merge_settings, --describe): every check failed in a TypeError naming no fix
            raise SettingsError(f"{cls.__name__}.check_settings is not a classmethod; it is called on the class, "
                                f"before the plugin is made: put @classmethod above it, def check_settings(cls, "
                                f"settings)")
        if not callable(cls.subscriptions):  # a list where the SDK calls a method: every start failed in our frames
            listed = cls.subscriptions if isinstance(cls.subscriptions, (list, tuple)) else ["end_epoch"]
            first = next((t for t in listed if isinstance(t, str) and t), "end_epoch")
            raise SettingsError(f"{cls.__name__}.subscriptions = {cls.subscriptions!r} is not allowed; a plugin is "
                                f"sent the events it has handlers for (def on_{first}(self, event)), or those a method "
                                f"returns: def subscriptions(self): return {list(listed)!r}")

    def __init__(self, settings: dict[str, Any] | None = None, run_id: str = "", run_dir: str = "."):
        cls = type(self)
        self.name = cls.name or _snake(cls.__name__)
        if self.delivery not in DELIVERY_CLASSES:  # set on the instance, or the class changed after its creation
            raise SettingsError(f"{cls.__name__}.delivery must be one of {DELIVERY_CLASSES}")
        self.settings = named_settings(cls, settings or {})
        self.run_id = run_id
        self.run_dir = run_dir
        self.outbox: list[dict[str, Any]] = []  # replies waiting to be sent (or inspected in tests)
        # Bound by the runner (bind_sender): replies made on a thread of the plugin's own go out through it.
        self._send_now: Callable[[dict[str, Any]], None] | None = None
        self._handler_thread: threading.Thread | None = None
        self.handling: Event | None = None  # the event a handler is running for (set by whoever dispatches)
        # The first seq this kernel numbered (the runner sets it at the welcome): an event before it is a continued
        # run's earlier session, replayed (catch_up), whose kernel and what it held (snapshot buffers) are gone.
        self.session_seq = 1
        self._progress: Callable[[], None] | None = None
        # event type -> the handler to call: the class's own on_<type>, or on_event for the rest
        self._handlers = {name: getattr(self, f"on_{name}") if _overrides(cls, f"on_{name}") else self.on_event
                          for name in HANDLED_EVENTS}

    # methods to override.

    def setup(self) -> None:
        """Called once in the plugin process before the first event."""

    def teardown(self) -> None:
        """Called once at the end of the run, or when the kernel is gone, if setup() ran: flush and close here."""

    def on_kernel_gone(self, info: KernelGoneInfo) -> None:
        """Called once, before teardown, when the kernel died without ending the run (killed, out of memory,
        the node went down): the run is `died` in `trainbus runs list`. The last word a plugin gets (an
        alert, say); it runs on a thread of its own for at most `kernel_gone_timeout_s`, and an exception
        is logged. Not called when the run ended (the plugin saw end_training_session or run_failed), when
        the kernel stopped this plugin, or before setup."""

    def on_event(self, event: Event) -> None:
        """Called for events that have no handler of their own, when a plugin overrides it."""

    def expecting(self) -> bool:
        """True while this plugin waits for an event the kernel publishes after the run's final one: the last
        checkpoint's checkpoint_saved comes after end_training_session. The runner goes on receiving until it is
        False; the kernel ends the wait (SIGTERM) when its plugins' exit timeout runs out."""
        return False

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        """Raise SettingsError for values that are allowed one by one but not together (or not by a rule a
        Setting can say). Runs in the constructor and in `--describe`, so before the run starts."""

    # replies: from a handler they go out when it returns; from a thread of the plugin's own, at once

    def stop(self, reason: str) -> None:
        """Ask the kernel to end training cleanly at the next step boundary."""
        self._reply(control("stop", reason=str(reason)))

    def metric(self, name: str, value: float, step: int | None = None, epoch: int | None = None) -> None:
        """Publish a metric through the kernel, so every subscriber (log, TensorBoard, attach) sees it. Its step
        and epoch: `step` (and `epoch`, if given); else, from a handler, those of the event it handles (a metric of
        an end_epoch is that epoch's, however late it arrives); else (a thread of the plugin's own) the kernel's
        when the metric arrives. An `epoch` without a `step` raises ProtocolError: either would replace it."""
        if epoch is not None and step is None:  # replaced by the handled event's epoch, or by the kernel's: say so
            raise ProtocolError(f"metric {str(name)!r}: epoch={epoch} without a step is not kept (a metric with no "
                                f"step is at the handled event's step and epoch, or the kernel's); give the step that "
                                f"epoch ended at too: self.metric(name, value, step=STEP, epoch={epoch})")
        handling, on_handler = self.handling, self._handler_thread in (None, threading.current_thread())
        if step is None and handling is not None and on_handler:
            step, epoch = handling.step, handling.epoch
        self._reply(control("metric", name=str(name), value=float(value), step=step, epoch=epoch))

    def log(self, text: str, level: str = "info") -> None:
        self._reply(control("log", level=level, text=str(text)))

    def checkpoint_now(self, reason: str) -> None:
        """Ask the kernel for a checkpoint at the next step boundary."""
        self._reply(control("checkpoint_now", reason=str(reason)))

    def checkpoint_saved(self, event: Event, path: str, sha256: str, size: int) -> None:
        """A persister's report: the snapshot of this save_checkpoint event is durable at path."""
        self._reply(control("checkpoint_saved", seq=event.seq, path=str(path), step=event.step,
                            epoch=event.epoch, sha256=sha256, size=int(size)))

    def checkpoint_failed(self, event: Event, reason: str) -> None:
        """A persister's report: this snapshot could not be written; earlier checkpoints stand."""
        self._reply(control("checkpoint_failed", seq=event.seq, reason=str(reason)))

    def bind_sender(self, send: Callable[[dict[str, Any]], None], progress: Callable[[], None] | None = None) -> None:
        """Called by the runner on the handler thread: `send` queues a message for its I/O thread, thread-safely;
        `progress` restarts the handler's hang clock (still_working)."""
        self._send_now = send
        self._handler_thread = threading.current_thread()
        self._progress = progress

    def still_working(self) -> None:
        """From a long handler: it is getting somewhere. Its hang clock (handler_timeout_s) starts again,
        so a handler that moves slowly but surely (a large checkpoint at idle priority) is not taken
        for hung; one that stops calling this is, handler_timeout_s later."""
        if self._progress is not None:
            self._progress()

    def _reply(self, message: dict[str, Any]) -> None:
        message = fit_control(message)  # a longer one would be lost with the connection the kernel drops for it
        send = self._send_now
        if send is not None and threading.current_thread() is not self._handler_thread:
            send(message)  # a sampler thread: no handler will return to drain the outbox for it
        else:
            self.outbox.append(message)

    # dispatch

    def handle(self, event: Event) -> None:
        if type(event.data) is dict:  # a key the event lacks is said with those it has (EventData)
            object.__setattr__(event, "data", EventData(event.type, event.data))
        refuse_awaitable(self._handlers.get(event.type, self.on_event)(event), "handlers")

    def subscriptions(self) -> list[str]:
        """The event types this instance is sent: handled_events(), unless overridden to leave out types
        that this instance, with its settings, has no use for (each one is a wake-up per burst)."""
        return self.handled_events()

    @classmethod
    def handled_events(cls) -> list[str]:
        """Event types this class overrides a handler for; [""] (everything) if it overrides on_event."""
        if _overrides(cls, "on_event"):
            return [""]
        return [name for name in HANDLED_EVENTS if _overrides(cls, f"on_{name}")]

    def handler_of(self, event_type: str) -> Any:
        """The function of the author's that `handle` calls for an event of this type (what a failure names)."""
        return self._handlers.get(event_type, self.on_event)

    @classmethod
    def warnings(cls) -> list[str]:
        """What is likely a mistake in the class, said by `trainbus run` before it starts: a handler that cannot
        take the event it is called with, so every call fails (bz: a method named like a hook that is none)."""
        said = []
        for event_type in cls.handled_events():
            said += call_warnings(cls, f"on_{event_type or 'event'}", "event", "handlers")
        return said + _constructor_warnings(cls) + [
            warning for name in _unknown_handlers(cls) if (warning := _never_called(cls, name))]

    @classmethod
    def description(cls) -> str:
        # its own, or a base of its author's: never the SDK's (how to write a plugin is no plugin's description)
        doc = next((k.__dict__["__doc__"] for k in cls.__mro__ if k.__dict__.get("__doc__")
                    and not k.__module__.startswith(("trainbus.sdk", "builtins"))), "")
        # the summary is the first paragraph: a sentence wrapped onto a second line is not cut where the line ends
        return " ".join(inspect.cleandoc(doc).strip().split("\n\n")[0].split())


for _name in HANDLED_EVENTS:  # do-nothing handlers, one per event: on_start_epoch(event), ...
    def _noop(self, event: Event) -> None:
        """Override to handle this event."""
    _noop.__name__ = f"on_{_name}"
    setattr(Plugin, _noop.__name__, _noop)


def check_constructed(plugin: Plugin) -> None:
    """TypeError when the plugin's own __init__ never called Plugin's: it has none of the SDK's state, and failed at
    every start in the SDK's frames (`no attribute 'outbox'`), with no word of the missing call."""
    if "_handlers" not in vars(plugin):
        raise TypeError(f"{type(plugin).__name__}.__init__ does not call super().__init__(*args, **kwargs), so the "
                        f"plugin has none of the SDK's state (its settings, name, replies); call it first in __init__")


def near_event_type(word: str) -> str:
    """` (did you mean 'end_epoch'?)` for a typo of an event type, or its words in another order (`epoch_end`,
    as Lightning orders them), else ""."""
    same_words = [t for t in ev.LIFECYCLE_EVENTS + ev.KERNEL_EVENTS if sorted(t.split("_")) == sorted(word.split("_"))]
    return f" (did you mean {same_words[0]!r}?)" if same_words else near_miss(word, ev.ALL_EVENTS)


def checked_subscriptions(plugin: Plugin) -> tuple[list[str], list[str]]:
    """plugin.subscriptions() as the topics to subscribe to, and what is wrong with it, as warnings to say: a string
    for the list (its letters were each taken as a topic) is taken as its one type; a type no event starts with (a
    typo: the plugin was sent none, silently) is left out."""
    wanted, cls = plugin.subscriptions(), type(plugin).__name__
    if isinstance(wanted, str):
        return [wanted], [f"{cls}.subscriptions() returned the string {wanted!r}, not a list of event types: return "
                          f"[{wanted!r}]"]
    wanted = list(wanted)
    unknown = [t for t in wanted if not any(known.startswith(t) for known in ev.ALL_EVENTS)]
    return [t for t in wanted if t not in unknown], [
        f"{cls}.subscriptions() names {t!r}, which no event type starts with{near_event_type(str(t))}, so "
        f"it is sent none; the types are proto/PROTOCOL.md §6's" for t in unknown]


def _constructor_warnings(cls: type) -> list[str]:
    """A constructor of the plugin's own that cannot take what the runner gives every plugin (settings, run_id,
    run_dir): the process would crash before its hello at every start, restarted until given up. A class made
    by a metaclass of its own (bz's Plugin) is constructed its own way."""
    if cls.__init__ is Plugin.__init__ or type(cls).__call__ is not type.__call__:
        return []
    try:
        inspect.signature(cls.__init__).bind(None, {}, run_id="", run_dir=".")
    except TypeError:
        return [f"{cls.__name__}.__init__{inspect.signature(cls.__init__)} cannot take what every plugin is made "
                f"with (settings, run_id=..., run_dir=...), so the plugin fails at every start; define it as def "
                f"__init__(self, *args, **kwargs) that calls super().__init__(*args, **kwargs), or do the work in "
                f"setup(){_defined_at(cls.__init__)}"]
    except ValueError:  # no signature to read: it is tried when the plugin starts
        pass
    return []


def named_settings(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """merge_settings, its SettingsError naming the plugin."""
    try:
        return merge_settings(cls, given)
    except SettingsError as exc:
        raise SettingsError(f"plugin {cls.name or _snake(cls.__name__)}: {exc}") from None


def merge_settings(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """The class's defaults with `given` on top, every value checked and converted (sdk/settings.py), then
    check_settings; SettingsError in one line, naming the setting, the value and what is allowed."""
    specs = declared(cls.settings)
    # a default is a value like any given one: a HOST_PATH's `~` (and a relative one) made absolute as a given one is
    merged = {key: check_value(key, spec, spec.default) if spec.kind == HOST_PATH else spec.default
              for key, spec in specs.items()}
    for key, value in given.items():
        if key in specs:
            merged[key] = check_value(key, specs[key], value)
        elif getattr(cls, "open_settings", False):
            merged[key] = value
        elif key in getattr(cls, "refused_settings", {}):  # a bz plugin class has none
            raise SettingsError(cls.refused_settings[key])
        else:
            raise SettingsError(f"no setting {key!r}{near_miss(str(key), specs)} (known: "
                                f"{', '.join(sorted(specs)) or 'none'})")
    cls.check_settings(merged)
    return merged


def call_warnings(cls: type, name: str, argument: str, what: str) -> list[str]:
    """What makes every call of method `name` (a handler, a bz hook) fail or do nothing: it cannot take the one
    `argument` it is called with, or it is async def."""
    function = getattr(cls, name)
    # (self, argument); a staticmethod, or a classmethod bound to its class, takes the argument alone
    given = (None,) if isinstance(inspect.getattr_static(cls, name), (staticmethod, classmethod)) else (None, None)
    said = []
    try:
        inspect.signature(function).bind(*given)
    except TypeError:
        said.append(f"{cls.__name__}.{name}{inspect.signature(function)} cannot take the {argument}, so every call "
                    f"of it fails; define it as def {name}(self, {argument}){_defined_at(function)}")
    except ValueError:  # no signature to read (a builtin): it is tried when it is first called
        pass
    return said + [warning for warning in [async_warning(cls, name, what)] if warning]


def async_warning(cls: type, name: str, what: str) -> str | None:
    """The warning for an `async def` handler (or bz hook): calling it makes a coroutine that nothing awaits."""
    function = getattr(cls, name)
    if not (inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function)):
        return None
    return (f"{cls.__name__}.{name} is async def: {what} are called, not awaited, so its body would never run; define "
            f"it with def{_defined_at(function)}")


def refuse_awaitable(result: Any, what: str) -> None:
    """A handler's call that made a coroutine (async def) ran none of its body: a failure, not a silent no-op."""
    if inspect.iscoroutine(result) or inspect.isasyncgen(result):
        name = getattr(result, "__qualname__", type(result).__name__)
        if inspect.iscoroutine(result):
            result.close()  # else a "never awaited" RuntimeWarning at our line; an async generator's never started
        raise TypeError(f"{name} is async def: {what} are called, not awaited, so its body would never run; define "
                        f"it with def")


def _defined_at(function: Any) -> str:
    """" (at hooks.py:12)" where a function is defined; "" when Python cannot tell."""
    try:
        return f" (at {os.path.basename(inspect.getsourcefile(function))}:{inspect.getsourcelines(function)[1]})"
    except (OSError, TypeError):
        return ""


# Lightning's, Keras's and HF Trainer's callback names people carry over, and the event each one means here.
_CALLBACK_NAMES = {
    "on_train_start": ev.START_TRAINING_SESSION, "on_train_begin": ev.START_TRAINING_SESSION,
    "on_fit_start": ev.START_TRAINING_SESSION, "on_train_end": ev.END_TRAINING_SESSION,
    "on_fit_end": ev.END_TRAINING_SESSION, "on_epoch_begin": ev.START_EPOCH, "on_epoch_start": ev.START_EPOCH,
    "on_train_epoch_start": ev.START_EPOCH, "on_epoch_end": ev.END_EPOCH, "on_train_epoch_end": ev.END_EPOCH,
    "on_train_batch_start": ev.START_TRAINING_BATCH, "on_train_batch_begin": ev.START_TRAINING_BATCH,
    "on_step_begin": ev.START_TRAINING_BATCH, "on_train_batch_end": ev.END_TRAINING_BATCH,
    "on_batch_end": ev.END_TRAINING_BATCH, "on_step_end": ev.END_TRAINING_BATCH,
    "on_validation_start": ev.START_VALIDATION_LOOP, "on_validation_epoch_start": ev.START_VALIDATION_LOOP,
    "on_validation_end": ev.END_VALIDATION_LOOP, "on_validation_epoch_end": ev.END_VALIDATION_LOOP,
    "on_evaluate": ev.END_VALIDATION_LOOP, "on_validation_batch_end": ev.END_VALIDATION_BATCH,
    "on_exception": ev.RUN_FAILED, "on_save": ev.CHECKPOINT_SAVED,
}


def _unknown_handlers(cls: type) -> list[str]:
    """Methods of the plugin's own classes named like a handler for no event this kernel publishes. None for a
    class with its own on_event: it may dispatch to names of its own."""
    if _overrides(cls, "on_event"):
        return []
    known = {f"on_{name}" for name in HANDLED_EVENTS} | {name for name in vars(Plugin) if name.startswith("on_")}
    names = {name for klass in cls.__mro__[:-1] if issubclass(klass, Plugin) and klass is not Plugin
             for name, value in vars(klass).items() if callable(value) and name.startswith("on_")}
    return sorted(names - known)


def _never_called(cls: type, name: str) -> str | None:
    """The warning for an on_* method no event calls when it is surely a handler meant: a misspelt one
    (on_end_epochs), another framework's callback (on_train_epoch_end), bus_closing's; None for any other name (a
    hook of the class's own, for its subclasses)."""
    import difflib

    if name == f"on_{ev.BUS_CLOSING}":
        return (f"{cls.__name__}.{name} is never called: bus_closing comes after the kernel waited for its plugins to "
                f"exit (they leave at the run's final event); use on_end_training_session and teardown")
    near = [f"on_{_CALLBACK_NAMES[name]}"] if name in _CALLBACK_NAMES else \
        difflib.get_close_matches(name, [f"on_{t}" for t in HANDLED_EVENTS], n=1, cutoff=0.8)
    if not near:
        return None
    return (f"{cls.__name__}.{name}{_defined_at(getattr(cls, name))} handles no event, so it is never called; did "
            f"you mean {near[0]}?")


def _overrides(cls: type, attr: str) -> bool:
    return getattr(cls, attr, None) is not getattr(Plugin, attr, None)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().removesuffix("_plugin")
