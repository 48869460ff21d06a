"""Where a run's training function comes from: its target, `path/to/file.py:function` or `package.module:function`,
resolved and imported (a file's code run once, under a module name its neighbours and workers import it by)."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .spec import SpecError, TrainingSpec, with_article
from .user_errors import user_code_error

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
        raise SpecError(f"{target} is not a function (it is {with_article(type(func).__name__)}); name a function "
                        f"that returns a TrainingSpec")
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
