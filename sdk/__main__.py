"""`python -m trainbus.sdk module:Class` runs a plugin (`--connect`: against a remote kernel); `--describe T [T ...]`
prints what they are, as JSON."""

from __future__ import annotations

import json
import sys

from .bz import Plugin as BzPlugin, constructor_arguments
from .loader import PluginLoadError, describe, load_plugin_class
from .plugin import SettingsError, merge_settings
from .runner import run

USAGE = ("usage: python -m trainbus.sdk module:Class [--connect HOST:PORT|connection.json --key FILE "
         "[--server-key FILE]] | --describe module:Class[=SETTINGS_JSON] ...")
REMOTE_OPTIONS = ("--connect", "--key", "--server-key")  # a remote kernel over TCP + CURVE (PROTOCOL.md, security)


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "--describe":
        return _describe(argv[1:])
    options = dict(zip(argv[1::2], argv[2::2]))
    if len(argv) % 2 == 0 or set(options) - set(REMOTE_OPTIONS):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cls = load_plugin_class(argv[0])
        return run(cls, connect=options.get("--connect", ""), key=options.get("--key", ""),
                   server_key=options.get("--server-key", ""))
    except (PluginLoadError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _describe(targets: list[str]) -> int:
    """One JSON list on stdout; with settings given, each entry says whether they are valid and, when they
    are, gives them as the plugin will read them ("values": a string from the command line converted)."""
    out = []
    for item in targets:
        target, _, settings_json = item.partition("=")
        try:
            info = describe(target)
            if settings_json:
                cls = load_plugin_class(target)
                given = json.loads(settings_json)
                settings = merge_settings(cls, given)
                if issubclass(cls, BzPlugin):  # its constructor's parameters are filled from its config table
                    constructor_arguments(cls, settings)
                info["values"] = {key: settings[key] for key in given}
        except (PluginLoadError, SettingsError) as exc:
            info = {"target": target, "error": str(exc)}
        out.append(info)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
