"""Installed plugins by name: the `trainbus.plugins` entry points, the names two packages clash on, and the class
a name runs."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any

from trainbus.proto.text import near_miss

from .config import ConfigError, PluginConfig

PLUGIN_ENTRY_POINT_GROUP = "trainbus.plugins"
BUILTIN_DISTRIBUTION = "trainbus"  # its entry points are the built-in plugins, whose names no package can take


def plugin_entry_points() -> dict[str, list[tuple[str, str]]]:
    """Plugin name -> every (distribution, "module:Class") that registers it in the `trainbus.plugins` entry-point
    group, the built-ins' first; read from installed metadata, nothing imported."""
    found: dict[str, list[tuple[str, str]]] = {}
    for ep in entry_points(group=PLUGIN_ENTRY_POINT_GROUP):
        found.setdefault(ep.name, []).append((ep.dist.name if ep.dist else "?", ep.value))
    for sources in found.values():
        sources.sort(key=lambda source: source[0] != BUILTIN_DISTRIBUTION)
    return found


# Names a user reaches for that no plugin has, and where what they want is: what README calls the output
# (TensorBoard files), the built-ins' module names (plugins/gpu_monitor.py), and the dashboard, which is a command.
OTHER_NAMES = {
    **{name: "TensorBoard files and PNG plots are the visualization plugin's: name it visualization"
       for name in ("tensorboard", "plots")},
    **{f"{name}_monitor": f"the built-in {what} monitor is named {name}"
       for name, what in (("cpu", "CPU"), ("gpu", "GPU"), ("memory", "memory"), ("disk", "disk"), ("perf", "perf"))},
    "email_alert": "the built-in e-mail plugin is named email",
    "dashboard": "the live dashboard is a command, not a plugin: trainbus attach RUN, while the run trains",
}


def unknown_plugin_hint(name: str, known) -> str:
    """` (did you mean 'console'?)` for a typo of a known name, or where what an unknown name asks for is."""
    if name in OTHER_NAMES and name not in known:
        return f" ({OTHER_NAMES[name]})"
    return near_miss(name, known)


def registered_plugins() -> dict[str, str]:
    """Plugin name -> "module:Class" from installed distributions' `trainbus.plugins` entry points. A built-in's
    name is reserved (another package's entry point of that name is left out), and a name two other packages
    both register is left out: which one `--plugins NAME` meant cannot be told (plugin_name_clashes says why)."""
    return {name: sources[0][1] for name, sources in plugin_entry_points().items()
            if len(sources) == 1 or sources[0][0] == BUILTIN_DISTRIBUTION}


def plugin_name_clashes() -> dict[str, str]:
    """Plugin name -> one line on the packages that all register it: which one runs, and how to fix it."""
    clashes = {}
    for name, sources in plugin_entry_points().items():
        if len(sources) < 2:
            continue
        who = " and ".join(f"{dist} ({target})" for dist, target in sources)
        others = [dist for dist, _ in sources if dist != BUILTIN_DISTRIBUTION]
        if sources[0][0] == BUILTIN_DISTRIBUTION:
            table = f'[project.entry-points."{PLUGIN_ENTRY_POINT_GROUP}"]'
            clashes[name] = (f"plugin name {name!r} is registered by {who}: the built-in one runs; rename the entry "
                             f"point in {' and '.join(others)}'s {table}")
        else:
            clashes[name] = (f"plugin name {name!r} is registered by {who}, so it names neither; rename one of the "
                             f"entry points, or name the class: [plugins.{name}] target = \"{sources[0][1]}\"")
    return clashes


def resolve_plugin(name: str, settings: dict[str, Any], target: str | None = None, where: str = "") -> PluginConfig:
    """The plugin NAME runs as; `where` it was named (a config file's table, --plugins) begins a ConfigError."""
    if target is None:
        if ":" in name:  # an author's own class, where a name goes: say where a target goes
            table = re.sub(r"(?<!^)(?=[A-Z])", "_", name.rpartition(":")[2]).lower() or "mine"
            raise ConfigError(f"{where + ': ' if where else ''}{name!r} is a module:Class, not a plugin name; run your "
                              f"own class from a config file (trainbus run -c FILE) with [plugins.{table}] target = "
                              f"\"{name}\"")
        known = registered_plugins()
        if name not in known and name in (clashes := plugin_name_clashes()):
            raise ConfigError(clashes[name])
        if name not in known:
            hint = unknown_plugin_hint(name, known)
            raise ConfigError(f"{where + ': ' if where else ''}unknown plugin {name!r}{hint}; "
                              f"known: {', '.join(sorted(known))} (or give a target = \"module:Class\" for your own)")
        target = known[name]
    return PluginConfig(name=name, target=target, settings=dict(settings))
