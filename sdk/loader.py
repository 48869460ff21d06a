"""Find a plugin class from `module:Class` and describe it (name, one line, settings) as plain data."""

from __future__ import annotations

import importlib
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from trainbus.proto.text import printable

from .plugin import Plugin
from .settings import describe_settings

SDK_DIR = Path(__file__).resolve().parent
STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"]).resolve()


class PluginLoadError(Exception):
    pass


def load_plugin_class(target: str) -> type[Plugin]:
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise PluginLoadError(f"plugin target {target!r} must look like package.module:Class")
    if module_name.endswith(".py") or "/" in module_name:  # `trainbus run` takes file.py:fn for its target
        module = module_name.removesuffix(".py").rsplit("/", 1)[-1]
        raise PluginLoadError(f"plugin target {target!r} names a file: a plugin is module:Class, a module its Python "
                              f"imports ({module}:{class_name}, run from {module}.py's folder or with it on "
                              f"PYTHONPATH)")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # argparse at import read this process's arguments, or a sys.exit(): no exit of ours
        raise PluginLoadError(f"cannot import plugin module {module_name!r}: {_exited(exc)}") from None
    except Exception as exc:  # noqa: BLE001 -- the module's own code raised: say what and where, in one line
        if _is_missing(module_name, exc):  # no file to name: say where it could come from
            raise PluginLoadError(f"cannot import plugin module {module_name!r}: {exc}; install the package that has "
                                  f"it into this Python's environment, or put its folder on PYTHONPATH") from None
        raise PluginLoadError(f"cannot import plugin module {module_name!r}: {where_raised(exc)}") from None
    plugins = sorted(name for name, value in vars(module).items()
                     if isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin)
    if not hasattr(module, class_name):
        offered = f"name one of its Plugin subclasses: {', '.join(plugins)}" if plugins \
            else "it has no trainbus.sdk.Plugin subclass"
        raise PluginLoadError(f"module {module_name!r} has no attribute {class_name!r}; {offered}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        what = "a class" if isinstance(cls, type) else "a function" if callable(cls) else f"a {type(cls).__name__}"
        named = class_name if what == "a class" else "NAME"
        offered = f"name one of its module's Plugin subclasses: {', '.join(plugins)}" if plugins else \
            f"make it one: class {named}(Plugin), with from trainbus.sdk import Plugin"
        raise PluginLoadError(f"{target} is {what}, not a trainbus.sdk.Plugin subclass; {offered}")
    return cls


def _is_missing(module_name: str, exc: Exception) -> bool:
    """The plugin's module itself (or a package above it) is not to be found, rather than something it imports."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    return missing is not None and f"{module_name}.".startswith(f"{missing}.")


def where_raised(exc: Exception) -> str:
    """`File.py, line N: Type: message` for the innermost frame of exc in a file, outside this SDK (a Setting
    declared wrong is the plugin's line, not the SDK's that checked it nor its generated `<string>` __init__); a
    SyntaxError names its line itself."""
    frames = _authors(traceback.extract_tb(exc.__traceback__))
    where = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames and not isinstance(exc, SyntaxError) else ""
    return f"{where}{type(exc).__name__}: {exc}"


def _authors(frames: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames of files outside this SDK; of those, the author's (not the standard library's, nor an installed
    package's, as the console tells them) when there is one: json.loads raising at a module's top is that line.
    A plugin package pip installed has only installed frames: then those, still not the standard library's
    (argparse.py's line is not where its author called parse_args)."""
    files = [f for f in frames if not f.filename.startswith("<") and Path(f.filename).parent != SDK_DIR]
    outside_stdlib = [f for f in files if _installed(f) or not Path(f.filename).is_relative_to(STDLIB_DIR)]
    return [f for f in outside_stdlib if not _installed(f)] or outside_stdlib or files


def _installed(frame: traceback.FrameSummary) -> bool:
    """In an installed package (a site-packages under the standard library's folder too, as a system Python has)."""
    return bool({"site-packages", "dist-packages"} & set(Path(frame.filename).parts))


def _exited(exc: SystemExit) -> str:
    """`File.py, line N: sys.exit(2) as it is imported ...; FIX` for a module that exited as it was imported, at its
    own innermost line (argparse's, the standard library's, are not the author's)."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = _authors(frames)
    where = f"{own[-1].filename}, line {own[-1].lineno}: " if own else ""
    fix = ("argparse read the plugin process's command line: parse arguments under `if __name__ == \"__main__\":`, "
           "and take what a plugin needs as its settings"
           if any(Path(f.filename).name == "argparse.py" for f in frames)
           else "a plugin module raises an exception instead")
    return f"{where}sys.exit({printable(repr(exc.code), 500)}) as it is imported would end the process; {fix}"


def describe(target: str) -> dict[str, Any]:
    cls = load_plugin_class(target)
    return {
        "target": target,
        "description": cls.description(),
        "delivery": cls.delivery,
        "settings": describe_settings(cls.settings),  # name -> type, default, constraint, help, kind
        "events": cls.handled_events(),
        "capabilities": list(cls.capabilities),  # "checkpoint": the kernel waits for its hello to take snapshots
        "warnings": cls.warnings(),
    }
