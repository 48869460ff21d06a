"""The training spec a user provides, checked, and built by calling their function with its flags (its target
loaded by target.py; their exceptions said by user_errors.py)."""

from __future__ import annotations

import collections.abc
import json
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from trainbus.proto.codec import ProtocolError, fits_msgpack, pack, unpack
from trainbus.proto.text import printable

if TYPE_CHECKING:  # torch loads with the user's code: the CLI's other commands start without it (1.4 s)
    import torch


class SpecError(Exception):
    """The user's target cannot be loaded or does not return a TrainingSpec; the message says the fix."""

    def __init__(self, message: str = "", flag: str | None = None):
        super().__init__(message)
        self.flag = flag  # the hyperparameter it is about, when one is: the CLI names where it was given


class UserCodeError(SpecError):
    """The user's own code raised while their target was imported or called. The message is one line; `trace` is
    the traceback trimmed to their frames (the kernel's and libraries' frames around it left out)."""

    def __init__(self, message: str, trace: str):
        super().__init__(message)
        self.trace = trace


@dataclass
class TrainingSpec:
    """Everything the loop needs. Built by a user function; the kernel owns it from then on.

    Example (`train.py:build`, run with `trainbus run train.py:build lr=0.05`; its parameters are the run's
    flags, kernel/flags.py; a function taking one `hyperparameters` dict works too)::

        def build(lr: float = 0.1, epochs: int = 3):
            model = torch.nn.Linear(4, 2)
            return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                loss_fn=torch.nn.functional.cross_entropy,
                                train_loader=..., validation_loader=..., epochs=epochs)
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Any, Any], torch.Tensor]  # (outputs, targets) -> the batch's loss, one number
    # re-iterable, a batch each step: (inputs, targets), each a tensor or any nesting of them (kernel/batches.py);
    # a torch DataLoader usually
    train_loader: Any
    validation_loader: Any = None
    epochs: int = 1
    metrics: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)  # (outputs, targets) -> one number
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    scheduler: Any = None  # torch.optim.lr_scheduler.*
    scheduler_interval: str = "epoch"  # "epoch": stepped after each epoch; "step": after each optimizer step
    # ReduceLROnPlateau is stepped with this metric of the epoch (one of metric_names())
    scheduler_monitor: str = "validation_loss"
    unpack_batch: Callable[[Any], tuple[Any, Any]] | None = None  # a batch of another shape -> (inputs, targets)

    def metric_names(self) -> list[str]:
        """The metrics every epoch of this spec reports (end_epoch's, and what checkpoints are ranked by: the
        kernel/epoch_metrics.py flat_metrics), which a plugin's monitor setting may name."""
        groups = ("training", "validation") if self.validation_loader is not None else ("training",)
        return [f"{group}_{name}" for group in groups for name in ("loss", *self.metrics)]

    def check(self) -> None:
        import torch

        for name in ("model", "optimizer", "loss_fn", "scheduler"):  # the common slip: the class, not one made from it
            value = getattr(self, name)
            if isinstance(value, type):
                raise SpecError(f"TrainingSpec.{name} is the class {value.__name__}, not one made from it: call it "
                                f"({value.__name__}(...))")
        if not isinstance(self.model, torch.nn.Module):
            raise SpecError(f"TrainingSpec.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise SpecError(f"TrainingSpec.optimizer must be a torch.optim.Optimizer, "
                            f"got {type(self.optimizer).__name__}")
        if not callable(self.loss_fn):
            raise SpecError("TrainingSpec.loss_fn must be callable(outputs, targets) -> loss tensor")
        if not any(p.requires_grad for group in self.optimizer.param_groups for p in group["params"]):
            # else torch's own words at the first backward: "element 0 of tensors does not require grad"
            raise SpecError("TrainingSpec.optimizer holds no parameter that requires a gradient, so nothing would "
                            "train: give it the model's trainable parameters (model.parameters()), and check that "
                            "they are not all frozen (requires_grad=False)")
        self._check_parameters_are_the_models()
        for name in ("train_loader", "validation_loader"):
            loader = getattr(self, name)
            if (loader is not None or name == "train_loader") and not hasattr(loader, "__iter__"):
                raise SpecError(f"TrainingSpec.{name} must be iterable (a torch DataLoader, or any re-iterable of "
                                f"batches), got {type(loader).__name__}")
            several = list(loader.values()) if isinstance(loader, dict) else loader
            if isinstance(several, (list, tuple)) and several and all(
                    isinstance(item, torch.utils.data.DataLoader) for item in several):
                # Lightning's several loaders (a list or dict from val_dataloader): taken for one loader, each
                # DataLoader was a "batch", failing at the first validation, an epoch in, with advice that did not fit
                raise SpecError(f"TrainingSpec.{name} is a {type(loader).__name__} of {len(several)} DataLoaders; it "
                                f"takes one loader: give one, or one over their datasets together "
                                f"(torch.utils.data.ConcatDataset([...]))")
        shape = "TrainingSpec.metrics must be a dict of name -> callable(outputs, targets) -> one number, got"
        if not isinstance(self.metrics, dict):
            raise SpecError(f"{shape} {type(self.metrics).__name__}")
        for name, fn in self.metrics.items():
            if not isinstance(name, str):
                raise SpecError(f"{shape} dict with a name that is not a string: {name!r} "
                                f"({with_article(type(name).__name__)})")
            if not callable(fn):
                raise SpecError(f"{shape} dict whose {name!r} is {with_article(type(fn).__name__)}, not "
                                f"callable")
            if not name or not name.isprintable():  # said raw in the run's summary line, and as training_NAME
                raise SpecError(f"TrainingSpec.metrics names a metric {printable(repr(name))}: a metric's name is "
                                f"printable text, not empty (it is said as training_NAME and validation_NAME)")
        if "loss" in self.metrics:
            raise SpecError("TrainingSpec.metrics names a metric 'loss', the name of the loss itself (training_loss, "
                            "validation_loss), whose values its values would take the place of: name it otherwise")
        if not isinstance(self.hyperparameters, dict):  # else a failure after the build, in the kernel's own code
            raise SpecError(f"TrainingSpec.hyperparameters must be a dict of name -> value, got "
                            f"{type(self.hyperparameters).__name__}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise SpecError(f"TrainingSpec.epochs must be a positive integer, got {self.epochs!r}")
        self.check_loaders_last()
        if self.unpack_batch is not None and not callable(self.unpack_batch):
            raise SpecError("TrainingSpec.unpack_batch must be callable(batch) -> (inputs, targets)")
        if self.scheduler is not None:  # else an epoch trained, then "'str' object has no attribute 'step'"
            needed = ("step", "state_dict", "load_state_dict")  # stepped, saved with checkpoints, restored
            missing = [m for m in needed if not callable(getattr(self.scheduler, m, None))]
            if missing:
                raise SpecError(f"TrainingSpec.scheduler must be a torch.optim.lr_scheduler scheduler (or anything "
                                f"with step, state_dict and load_state_dict), got {type(self.scheduler).__name__} "
                                f"without {', '.join(missing)}")
            if getattr(self.scheduler, "optimizer", self.optimizer) is not self.optimizer:
                raise SpecError("TrainingSpec.scheduler steps another optimizer than TrainingSpec.optimizer, "
                                "which would train at an unchanged rate: make it from the spec's optimizer")
        if self.scheduler_interval not in ("epoch", "step"):
            raise SpecError(f"TrainingSpec.scheduler_interval must be 'epoch' or 'step', "
                            f"got {self.scheduler_interval!r}")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if self.scheduler_interval != "epoch":
                raise SpecError("ReduceLROnPlateau steps on an epoch's metric: leave scheduler_interval 'epoch'")
            if self.scheduler_monitor not in self.metric_names():
                raise SpecError(f"TrainingSpec.scheduler_monitor {self.scheduler_monitor!r} (what ReduceLROnPlateau "
                                f"steps on) is not a metric of this spec; one of: {', '.join(self.metric_names())}")

    def _check_parameters_are_the_models(self) -> None:
        """What the optimizer trains must be the model's: checkpoints, final.pt and a resume hold the model's state
        alone (a loss's learned weights outside it were lost, and a resume started them over, not exact)."""
        import torch

        own = {id(p) for p in self.model.parameters()}
        outside = [p for group in self.optimizer.param_groups for p in group["params"] if id(p) not in own]
        if not outside:
            return
        losses = {id(p) for p in self.loss_fn.parameters()} if isinstance(self.loss_fn, torch.nn.Module) else set()
        of_loss = all(id(p) in losses for p in outside)
        one = len(outside) == 1
        values = sum(p.numel() for p in outside)
        it, they = ("it", "it") if one else ("they", "them")
        fix = "model.loss_fn = loss_fn: a submodule is saved, moved to the device and resumed with the model" \
            if of_loss else "model.extra = torch.nn.Parameter(...), or a submodule holding them"
        whose = " (loss_fn's own)" if of_loss else ""
        raise SpecError(f"TrainingSpec.optimizer trains {len(outside)} parameter{'' if one else 's'} ({values:,} "
                        f"value{'' if values == 1 else 's'}) that {'is' if one else 'are'} not TrainingSpec.model's"
                        f"{whose}: checkpoints and final.pt hold the model's state alone, so what {it} "
                        f"learn{'s' if one else ''} would be lost and a resume would start {they} over; make {they} "
                        f"the model's ({fix})")

    def check_loaders_last(self) -> None:
        """A one-shot iterator (a generator, iter(loader)) gives its batches to the first epoch only; the loop would
        find it used up an epoch in, after training the next epoch's batches."""
        if self.epochs <= 1:
            return
        for name in ("train_loader", "validation_loader"):
            loader = getattr(self, name)
            if _one_shot(loader):
                raise SpecError(f"TrainingSpec.{name} is a {type(loader).__name__}, a one-shot iterator that the "
                                f"first of the run's {self.epochs} epochs uses up: give a DataLoader or a list, or an "
                                f"object whose __iter__ makes a fresh iterator each epoch")


def _one_shot(loader: Any) -> bool:
    """A generator, or an iterator of Python's or torch's own (iter(list), map, iter(DataLoader)): used up once gone
    through. A class of the user's own with __next__ may start again in its __iter__ (`self.i = 0; return self`): taken.
    Nothing here calls __iter__, which on a DataLoader would start its workers."""
    if isinstance(loader, types.GeneratorType):
        return True
    module = type(loader).__module__
    return isinstance(loader, collections.abc.Iterator) and (
        module in ("builtins", "itertools") or module.startswith("torch.utils.data"))


def build_spec(target: str, hyperparameters: dict[str, Any]) -> TrainingSpec:
    """Call the user's function with its flags (or the hyperparameters dict) and check its result."""
    return build_with_flags(target, hyperparameters)[0]


def build_with_flags(target: str, hyperparameters: dict[str, Any],
                     epochs: int | None = None) -> tuple[TrainingSpec, dict[str, Any]]:
    """build_spec, and the arguments the function was called with (its flags, defaults filled in: kernel/flags.py),
    as recorded (flags.plain).

    epochs: `--epochs` (or a resumed run's), also the function's `epochs` flag when it has one: it builds for the
    epochs that train, and its recorded flags say them (they said its default beside fewer epochs trained).
    A flag that is unknown or of the wrong type raises FlagError (a SpecError) before the user's function runs."""
    from . import flags  # here: flags, target and user_errors build on this module's SpecError
    from .target import load_target
    from .user_errors import user_code_error

    func = load_target(target)
    signature = flags.signature_of(func)
    if epochs is not None and "epochs" in {flag.name for flag in signature.flags}:
        hyperparameters = {**hyperparameters, "epochs": epochs}
    arguments = flags.resolve(signature, hyperparameters, target)
    try:
        spec = flags.call(func, signature, arguments)
    except (SpecError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # SystemExit, GeneratorExit, a library's own BaseException
        raise user_code_error(exc, target) from None
    if not isinstance(spec, TrainingSpec):
        raise SpecError(f"{target} returned {type(spec).__name__}; it must return trainbus.kernel.TrainingSpec")
    spec.check()
    # as the records carry them (a Path flag as its text, an Enum's as its value), and a resume reads them back
    recorded = {name: flags.plain(value) for name, value in arguments.items()}
    if not signature.takes_dict:  # build(lr=..., epochs=...) seldom restates its flags: they are what it trained with
        spec.hyperparameters = {**{name: _plain(value) for name, value in recorded.items()}, **spec.hyperparameters}
    # events, checkpoints and records carry them: a value JSON cannot say (a class, a Path, a dtype) as its text,
    # which start_training_session's encoding and a checkpoint's snapshot refused (the run failed at its first)
    spec.hyperparameters = {str(name): _plain_within(value) for name, value in spec.hyperparameters.items()}
    return spec, recorded


# What one hyperparameter may take of an event: start_training_session and every end_epoch carry them all, so a value
# past the protocol's limits (an array of over 100,000 items, a string over 1 MiB) or this large made each of those
# events "event data not encodable", its losses and metrics lost with it. Such a value goes in events as a description.
EVENT_HYPERPARAMETER_BYTES = 256 * 1024


def hyperparameters_for_events(hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The hyperparameters as events carry them, and the names of those described instead (config.json and the
    checkpoints keep them whole)."""
    carried, described = {}, []
    for name, value in hyperparameters.items():
        try:
            raw = pack(value)
            unpack(raw)  # under the limits every peer decodes with
            fits = len(raw) <= EVENT_HYPERPARAMETER_BYTES
        except ProtocolError:
            fits = False
        if fits:
            carried[name] = value
            continue
        size = f"{len(value):,} items" if isinstance(value, (list, dict)) else f"{len(str(value)):,} characters"
        carried[name] = (f"{with_article(type(value).__name__)} of {size}, more than an event carries: config.json "
                         f"holds it whole")
        described.append(name)
    return carried, described


def with_article(noun: str) -> str:
    """`a float`, `an int`: a type's name with its article."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _plain_within(value: Any, depth: int = 0) -> Any:
    """_plain of a value and of each one inside it (a dict's, a list's or tuple's): a list of layer sizes stays one."""
    if depth < 16 and isinstance(value, dict):
        return {str(k): _plain_within(v, depth + 1) for k, v in value.items()}
    if depth < 16 and isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_plain_within(v, depth + 1) for v in value]
    return _plain(value)


def _plain(value: Any) -> Any:
    """A flag's value as events and checkpoints carry it: itself when JSON and msgpack can say it, else its text."""
    # JSON says any integer, but an event holding one msgpack cannot was journaled as "event data not encodable", its
    # losses and metrics lost with it
    if isinstance(value, int) and not fits_msgpack(value):
        return str(value)
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)
