"""Find a plugin class from `module:Class` and describe it (name, one line, settings) as plain data."""

from __future__ import annotations

import importlib
import traceback
from typing import Any

from .plugin import Plugin
from .settings import describe_settings


class PluginLoadError(Exception):
    pass


def load_plugin_class(target: str) -> type[Plugin]:
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise PluginLoadError(f"plugin target {target!r} must look like package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginLoadError(f"cannot import plugin module {module_name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 -- the module's own code raised: say what and where, in one line
        raise PluginLoadError(f"cannot import plugin module {module_name!r}: {_where_raised(exc)}") from None
    if not hasattr(module, class_name):
        plugins = sorted(name for name, value in vars(module).items()
                         if isinstance(value, type) and issubclass(value, Plugin) and value is not Plugin)
        offered = f"name one of its Plugin subclasses: {', '.join(plugins)}" if plugins \
            else "it has no trainbus.sdk.Plugin subclass"
        raise PluginLoadError(f"module {module_name!r} has no attribute {class_name!r}; {offered}")
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginLoadError(f"{target} is not a trainbus.sdk.Plugin subclass")
    return cls


def _where_raised(exc: Exception) -> str:
    """`File.py, line N: Type: message` for the innermost frame of exc (a SyntaxError names its line itself)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}, line {frames[-1].lineno}: " if frames and not isinstance(exc, SyntaxError) else ""
    return f"{where}{type(exc).__name__}: {exc}"


def describe(target: str) -> dict[str, Any]:
    cls = load_plugin_class(target)
    return {
        "target": target,
        "description": cls.description(),
        "delivery": cls.delivery,
        "settings": describe_settings(cls.settings),  # name -> type, default, constraint, help, kind
        "events": cls.handled_events(),
    }
