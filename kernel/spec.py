"""The training spec a user provides, and loading it from `file.py:function` or `package.module:function`."""

from __future__ import annotations

import ast
import collections.abc
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import sys
import sysconfig
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from trainbus.proto import __file__ as trainbus_proto_file
from trainbus.proto.codec import ProtocolError, fits_msgpack, pack, unpack
from trainbus.proto.text import ERROR_CHARS, exception_message, printable

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
            raise SpecError(f"TrainingSpec.optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
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
                raise SpecError(f"{shape} dict with a name that is not a string: {name!r} ({_a(type(name).__name__)})")
            if not callable(fn):
                raise SpecError(f"{shape} dict whose {name!r} is {_a(type(fn).__name__)}, not callable")
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
                raise SpecError(f"TrainingSpec.scheduler must be a torch.optim.lr_scheduler scheduler (or anything with "
                                f"step, state_dict and load_state_dict), got {type(self.scheduler).__name__} without "
                                f"{', '.join(missing)}")
            if getattr(self.scheduler, "optimizer", self.optimizer) is not self.optimizer:
                raise SpecError("TrainingSpec.scheduler steps another optimizer than TrainingSpec.optimizer, which would "
                                "train at an unchanged rate: make it from the spec's optimizer")
        if self.scheduler_interval not in ("epoch", "step"):
            raise SpecError(f"TrainingSpec.scheduler_interval must be 'epoch' or 'step', got {self.scheduler_interval!r}")
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


DEFAULT_TARGET = "trainbus.kernel.digits:build"


def is_file_target(module_part: str) -> bool:
    """The part before ':' of a target names a file (path/to/file.py), not a module (package.module)."""
    return module_part.endswith(".py") or "/" in module_part


DEFAULT_FUNCTION = "build"  # what a file named alone stands for: `trainbus run train.py`, as `guild run train.py`


def full_target(target: str) -> str:
    """`train.py` as `train.py:build`, so that the run records, lists and resumes the function it called."""
    return f"{target}:{DEFAULT_FUNCTION}" if ":" not in target and is_file_target(target) else target


def load_target(target: str) -> Callable[..., TrainingSpec]:
    """Resolve `path/to/file.py:function` or `package.module:function` to the function. A path (a / in it, or .py
    at its end) is read as Python source whatever its name ends with."""
    module_part, sep, func_name = full_target(target).rpartition(":")
    if not sep or not module_part or not func_name:
        meant = f" (did you mean {target}.py?)" if ":" not in target and Path(f"{target}.py").is_file() else ""
        raise SpecError(f"target {target!r} must look like path/to/file.py:function or package.module:function"
                        f"{meant}")  # `trainbus run train` for train.py, as `guild run train` finds it
    if ":" in module_part and not is_file_target(module_part):  # no module's name holds one; a path may
        raise SpecError(f"target {target!r} has more than one ':'; it must look like path/to/file.py:function or "
                        f"package.module:function")
    if is_file_target(module_part):
        path = Path(module_part)
        if not path.is_file():  # a folder or a device exists: "does not exist" would send the user looking for it
            why = ("is a directory, not a Python file" if path.is_dir() else
                   "is not a regular file (a device, a pipe)" if path.exists() else "does not exist")
            if not path.exists() and Path(f"{module_part}.py").is_file():  # the script named without its .py
                why += f" (did you mean {module_part}.py:{func_name}?)"
            raise SpecError(f"target file {path} {why}; check the path before ':{func_name}'")
        _refuse_without(path, func_name)  # before its code runs: a script may train as it is imported
        module = _loaded_files.get(_file_key(path))  # the CLI read its flags: its code runs once, not twice
        if module is None:
            sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
            name = _module_name(path)
            # Python source whatever the file's name, as `python trainscript` runs one: importlib alone knows no
            # loader for a name without .py
            loader = importlib.machinery.SourceFileLoader(name, str(path))
            module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except KeyboardInterrupt:
                raise  # a Ctrl-C, or theirs: the command tells them apart
            except BaseException as exc:  # SystemExit: a script's argparse, reading trainbus's arguments; any
                raise user_code_error(exc, f"importing {path}") from None  # BaseException of theirs
            _loaded_files[_file_key(path)] = module
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` and the plugins' processes have it
            sys.path.append(os.getcwd())  # after what is installed: a local directory shadows nothing
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            if exc.name and module_part.startswith(exc.name):
                if Path(module_part).is_file():  # `trainbus run train:build` for a script named train
                    raise SpecError(f"cannot import module {module_part!r}; {module_part} is a file here: name it "
                                    f"./{module_part}:{func_name} to load it as Python source") from None
                raise SpecError(f"cannot import module {module_part!r}; is it installed or on PYTHONPATH?") from None
            raise user_code_error(exc, f"importing {module_part}") from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit, GeneratorExit, a library's own BaseException
            raise user_code_error(exc, f"importing {module_part}") from None
    func = getattr(module, func_name, None)
    if func is None:
        own = [name for name, value in vars(module).items() if inspect.isfunction(value)
               and value.__module__ == module.__name__ and not name.startswith("_")]
        named = f"name one of its functions: {', '.join(f'{module_part}:{name}' for name in own)}" if own else \
            "name a function that returns a TrainingSpec"
        raise SpecError(f"{module_part} has no function {func_name!r}; {named}")
    if not callable(func) or isinstance(func, type):
        raise SpecError(f"{target} is not a function (it is {_a(type(func).__name__)}); name a function that returns a "
                        f"TrainingSpec")
    return func


def _module_name(path: Path) -> str:
    """The name a target file's module gets: its own (train for train.py), the name another process imports it by to
    unpickle what it defines (a DataLoader's workers under multiprocessing_context "spawn" or "forkserver", a
    multiprocessing Pool's) from its folder, first on sys.path there too, and the name its neighbours import it by
    (`from train import CONFIG`: the same module, not a second copy). trainbus_user_STEM where that name finds
    another module (a builtin's, json.py beside an imported json) or none (a file not named NAME.py), and where a
    module of that name is imported already, this file's too (run_training called where the file was imported:
    re-run under its name, it would replace the module its importers hold), unless that is what we loaded of it."""
    imported = sys.modules.get(path.stem)
    if imported is not None and all(imported is not loaded for loaded in _loaded_files.values()):
        return f"trainbus_user_{path.stem}"
    try:
        found = importlib.util.find_spec(path.stem) if path.stem.isidentifier() else None
    except (ImportError, ValueError):  # a module of that name already imported without a spec (__main__'s kind)
        found = None
    origin = getattr(found, "origin", None)
    if origin and os.path.exists(origin) and os.path.samefile(origin, path):
        return path.stem
    return f"trainbus_user_{path.stem}"


def _refuse_without(path: Path, function: str) -> None:
    """SpecError when the file binds no `function` anywhere, read and not run (a Guild script: flags as globals,
    training at its top level). Anything that might bind it (an import, an assignment, a star import, a module
    __getattr__) is left to the import, as is a file that is no Python."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return
    if any(_might_bind(node, function) for node in ast.walk(tree)):
        return
    functions = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and not node.name.startswith("_")]
    if functions:
        raise SpecError(f"{path} has no function {function!r}; name one of its functions: "
                        f"{', '.join(f'{path}:{name}' for name in functions)}")
    flags = [f"{node.targets[0].id}={ast.unparse(node.value)}" for node in tree.body
             if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
             and isinstance(node.value, ast.Constant) and not node.targets[0].id.startswith("_")][:4]
    raise SpecError(f"{path} has no function {function!r}: trainbus calls a function that returns a TrainingSpec, its "
                    f"parameters the flags; define one in it, as {function}({', '.join(flags)}), or name yours, "
                    f"{path}:FUNCTION")


def _might_bind(node: ast.AST, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name in (name, "__getattr__")
    if isinstance(node, ast.Name):
        return node.id == name
    if isinstance(node, ast.alias):
        return name in (node.asname, node.name.split(".")[0], "*")
    return False


_loaded_files: dict[tuple[str, int, int], Any] = {}  # (path, mtime_ns, size) -> module: an edited file loads anew


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


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
    from . import flags  # here: flags builds on this module's SpecError

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
        carried[name] = (f"{_a(type(value).__name__)} of {size}, more than an event carries: config.json holds it "
                         f"whole")
        described.append(name)
    return carried, described


def _a(noun: str) -> str:
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


# Where frames are not the user's: the standard library, installed packages, this kernel and the protocol it uses
# (outside site-packages in an editable install: ./scripts/setup's).
_NOT_USER_ROOTS = tuple({os.path.abspath(p) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                         if (p := sysconfig.get_paths().get(key))}
                        | {os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, trainbus_proto_file)})


def is_user_file(path: str) -> bool:
    """Whether an absolute path is the user's code: not the standard library, an installed package or trainbus."""
    return not path.startswith(_NOT_USER_ROOTS)


def user_code_error(exc: BaseException, what: str) -> UserCodeError:
    """The user's exception as one line, and its traceback trimmed to their frames (their files)."""
    where, trace = user_trace(exc)
    if isinstance(exc, SystemExit):
        return UserCodeError(f"{what}: {_exited(exc)}{where}", trace)
    text = printable((exception_message(exc).strip().splitlines() or [""])[0], ERROR_CHARS)
    return UserCodeError(f"{what} raised {type(exc).__name__}{': ' + text if text else ''}{where}", trace)


def _exited(exc: SystemExit) -> str:
    """A sys.exit() in the user's code, said with its fix: it would end the kernel, and the run, with no word."""
    by_argparse = any(os.path.basename(frame.filename) == "argparse.py"
                      for frame in traceback.extract_tb(exc.__traceback__))
    fix = ("argparse read trainbus's own command line: parse arguments under `if __name__ == \"__main__\":` and take "
           "them as the function's parameters (flags: NAME=VALUE)" if by_argparse
           else "a training function returns, or raises an exception, to end")
    return f"sys.exit({printable(repr(exc.code), ERROR_CHARS)}) would end the process; {fix}"


TRACE_MESSAGE_CHARS = 5000  # the exception's message under the user's frames on the terminal (kernel.log has it all)

# torch re-raises an exception from a DataLoader worker process with the worker's traceback as text in its message
_WORKER = re.compile(r"\A(Caught \w+ in (DataLoader worker process \d+))\.\nOriginal Traceback \(most recent call "
                     r"last\):\n(?P<trace>.*)\Z", re.S)
_TRACE_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.+)\n(?:    (?P<code>.*)\n)?', re.M)


def error_line(exc: BaseException) -> str:
    """The exception as the one-line error: `Type: message`. One from a DataLoader worker is the worker's own
    last line, and where it ran (torch's message holds the worker's whole traceback)."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: {_exited(exc)}"
    message = exception_message(exc)
    worker = _WORKER.match(message)
    if worker:
        last = [line for line in worker["trace"].strip().splitlines() if line.strip()][-1]
        return f"{printable(last.strip(), ERROR_CHARS)} (in {worker[2]})"
    lines = [line for line in message.splitlines() if line.strip()]
    text = type(exc).__name__ + (f": {printable(lines[0].strip(), ERROR_CHARS)}" if lines else "") + (
        " (the whole message is in the run's kernel.log)" if len(lines) > 1 else "")
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
        text += "; torch.compile failed: fix what it names, or train without --compile"
    return text


def user_trace(exc: BaseException) -> tuple[str, str]:
    """Where in the user's code `exc` was raised (" (in your code: FILE, line N)", or "" when none of their code
    ran) and its traceback trimmed to their frames: "" without any (a lone exception line would only repeat
    the one-line error), except for a SyntaxError, whose file, line and caret are the point. An exception from a
    DataLoader worker is read from the worker's traceback, which torch passes on as text."""
    worker = _WORKER.match(exception_message(exc))
    if worker:
        frames = [traceback.FrameSummary(m["file"], int(m["line"]), m["name"], line=m["code"] or "")
                  for m in _TRACE_FRAME.finditer(worker["trace"])]
        last = error_line(exc).rsplit(" (in ", 1)[0] + "\n"
    else:
        frames, last = traceback.extract_tb(exc.__traceback__), None
    frames = [f for f in frames
              if not f.filename.startswith("<") and is_user_file(os.path.abspath(f.filename))]
    if not frames and not isinstance(exc, SyntaxError):
        return "", ""
    header = ["Traceback (most recent call last; your code only):\n"] if frames else []
    last = last or printable("".join(traceback.format_exception_only(type(exc), exc)), TRACE_MESSAGE_CHARS, lines=True)
    trace = "".join([*header, *traceback.format_list(frames), last.rstrip("\n") + "\n"])
    return (f" (in your code: {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""), trace
