"""`python -m trainbus.sdk module:Class` runs a plugin; `--describe T [T ...]` prints what they are, as JSON."""

from __future__ import annotations

import json
import sys

from .bz import Plugin as BzPlugin, constructor_arguments
from .loader import PluginLoadError, describe, load_plugin_class
from .plugin import SettingsError, merge_settings
from .runner import run

USAGE = "usage: python -m trainbus.sdk module:Class | --describe module:Class[=SETTINGS_JSON] ..."


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "--describe":
        return _describe(argv[1:])
    try:
        cls = load_plugin_class(argv[0])
        return run(cls)
    except (PluginLoadError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _describe(targets: list[str]) -> int:
    """One JSON list on stdout; with settings given, each entry says whether they are valid."""
    out = []
    for item in targets:
        target, _, settings_json = item.partition("=")
        try:
            info = describe(target)
            if settings_json:
                cls = load_plugin_class(target)
                settings = merge_settings(cls, json.loads(settings_json))
                if issubclass(cls, BzPlugin):  # its constructor's parameters are filled from its config table
                    constructor_arguments(cls, settings)
        except (PluginLoadError, SettingsError) as exc:
            info = {"target": target, "error": str(exc)}
        out.append(info)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
