"""Import direction is one way: proto <- sdk <- plugins, proto <- kernel; and nothing unpickles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "sdk", "kernel", "plugins")  # folder at the root -> trainbus.<folder>
# Bare names of our folders: importing them would pick up a different distribution (DESIGN.md).
BARE_NAMES = frozenset(PACKAGES)
# Our packages each layer may import (besides third-party code); None means "any but FORBIDDEN".
ALLOWED: dict[str, frozenset[str] | None] = {
    "proto": frozenset({"trainbus.proto"}),
    "sdk": frozenset({"trainbus.proto", "trainbus.sdk"}),
    "kernel": None,
    "plugins": frozenset({"trainbus.proto", "trainbus.sdk", "trainbus.plugins"}),
}
FORBIDDEN = {"kernel": frozenset({"trainbus.sdk", "trainbus.plugins"})}  # it starts plugins by name
PICKLERS = frozenset({"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"})


def module_package(layer: str, relpath: Path) -> str:
    """The package a file's relative imports resolve against: proto/codec.py -> trainbus.proto."""
    parts = ["trainbus", layer, *relpath.parent.parts]
    return ".".join(parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every static import; relative ones resolved against package."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                if node.level - 1 >= len(anchor):
                    found.append((node.lineno, "." * node.level + base + " (beyond the top-level package)"))
                    continue
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from trainbus import sdk` imports trainbus.sdk: judge base.name, not just base
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}") for alias in node.names]
    return found


def _ours(module: str) -> str | None:
    """trainbus.sdk.plugin.Plugin -> trainbus.sdk; None for third-party and standard-library modules."""
    parts = module.split(".")
    if parts[0] != "trainbus":
        return None
    return ".".join(parts[:2])


def import_violations(source: str, layer: str, relpath: Path = Path("x.py")) -> list[str]:
    """Every import in `source` (a file of `layer`) that breaks the direction rules, as readable text."""
    where = f"{layer}/{relpath.as_posix()}"
    out = []
    for line, module in imported_modules(source, module_package(layer, relpath)):
        top = module.split(".")[0]
        if "beyond the top-level package" in module:
            out.append(f"{where}:{line}: relative import {module}")
        elif top in BARE_NAMES:
            out.append(f"{where}:{line}: imports {module!r}; use trainbus.{module}")
        elif top in PICKLERS:
            out.append(f"{where}:{line}: imports {module!r}; nothing here unpickles, ever")
        ours = _ours(module)
        if ours is None:
            continue
        allowed = ALLOWED[layer]
        if allowed is not None and ours not in allowed:
            out.append(f"{where}:{line}: {layer} may import only {sorted(allowed)}, but imports {module!r}")
        if ours in FORBIDDEN.get(layer, ()):
            out.append(f"{where}:{line}: {layer} must never import {ours}, but imports {module!r}")
    return out


def unsafe_torch_loads(source: str, name: str = "x.py") -> list[str]:
    """Every torch.load(...) call without a literal weights_only=True (torch.load unpickles otherwise)."""
    out = []
    load_names = {"torch.load"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {alias.asname or alias.name for alias in node.names if alias.name == "load"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in load_names:
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                out.append(f"{name}:{node.lineno}: {ast.unparse(node)} without weights_only=True")
    return out


def _sources() -> list[tuple[str, Path]]:
    files = []
    for layer in PACKAGES:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files.append((layer, path.relative_to(ROOT / layer)))
    return files


SOURCES = _sources()


def test_the_packages_are_found():
    layers = {layer for layer, _ in SOURCES}
    assert {"proto", "sdk", "kernel"} <= layers, f"expected sources under {ROOT}, found layers {sorted(layers)}"


@pytest.mark.parametrize(("layer", "relpath"), SOURCES, ids=[f"{layer}/{p.as_posix()}" for layer, p in SOURCES])
def test_import_direction(layer, relpath):
    source = (ROOT / layer / relpath).read_text(encoding="utf-8")
    found = import_violations(source, layer, relpath)
    assert not found, "wrong-way imports:\n" + "\n".join(found)


@pytest.mark.parametrize(("layer", "relpath"), SOURCES, ids=[f"{layer}/{p.as_posix()}" for layer, p in SOURCES])
def test_no_unsafe_torch_load(layer, relpath):
    source = (ROOT / layer / relpath).read_text(encoding="utf-8")
    found = unsafe_torch_loads(source, f"{layer}/{relpath.as_posix()}")
    assert not found, "torch.load unpickles without weights_only=True:\n" + "\n".join(found)


def test_scripts_and_tests_do_not_unpickle():
    found = []
    for folder in ("scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            name = path.relative_to(ROOT).as_posix()
            found += [f"{name}:{line}: imports {m!r}" for line, m in imported_modules(source, folder)
                      if m.split(".")[0] in PICKLERS]
            found += unsafe_torch_loads(source, name)
    assert not found, "\n".join(found)


# -- the checks themselves catch what they are for --------------------------------------------------

def test_flags_sdk_imported_by_kernel():
    found = import_violations("from trainbus.sdk import Plugin\n", "kernel", Path("bus.py"))
    assert found == ["kernel/bus.py:1: kernel must never import trainbus.sdk, but imports 'trainbus.sdk.Plugin'"]


@pytest.mark.parametrize(("source", "layer", "relpath"), [
    ("import trainbus.plugins.console\n", "kernel", Path("supervisor.py")),
    ("from trainbus import sdk\n", "kernel", Path("cli.py")),
    ("from ..sdk import Plugin\n", "kernel", Path("bus.py")),
    ("from .. import sdk\n", "kernel", Path("bus.py")),
    ("from trainbus.kernel import bus\n", "proto", Path("codec.py")),
    ("from ..kernel import bus\n", "proto", Path("codec.py")),
    ("from ... import anything\n", "proto", Path("codec.py")),
    ("import trainbus.kernel.journal\n", "sdk", Path("runner.py")),
    ("from trainbus.plugins import console\n", "sdk", Path("runner.py")),
    ("from trainbus.kernel.bus import Bus\n", "plugins", Path("console.py")),
    ("def f():\n    from trainbus.kernel import loop\n", "plugins", Path("console.py")),  # nested, still static
    ("import proto\n", "sdk", Path("plugin.py")),
    ("import pickle\n", "kernel", Path("journal.py")),
    ("from pickle import loads\n", "plugins", Path("x.py")),
])
def test_flags_violations(source, layer, relpath):
    assert import_violations(source, layer, relpath), f"not flagged: {source!r} in {layer}"


@pytest.mark.parametrize(("source", "layer", "relpath"), [
    ("from .messages import Event\nfrom . import events\n", "proto", Path("codec.py")),
    ("from trainbus.proto import events as ev\nfrom .plugin import Plugin\nimport zmq\n", "sdk", Path("runner.py")),
    ("from trainbus.proto import pack\nfrom .journal import Journal\nimport torch\n", "kernel", Path("bus.py")),
    ("from trainbus.sdk import Plugin\nfrom .common import x\n", "plugins", Path("console.py")),
    ("from ..sdk import Plugin\n", "plugins", Path("extra/deep.py")),  # resolves to trainbus.plugins.sdk
])
def test_allows_the_right_direction(source, layer, relpath):
    assert import_violations(source, layer, relpath) == []


def test_flags_torch_load_without_weights_only():
    assert unsafe_torch_loads("torch.load(path)\n")
    assert unsafe_torch_loads("torch.load(path, weights_only=False)\n")
    assert unsafe_torch_loads("from torch import load\nload(path)\n")
    assert unsafe_torch_loads("torch.load(\n    path,\n    map_location='cpu',\n)\n")
    assert not unsafe_torch_loads("torch.load(path, map_location='cpu', weights_only=True)\n")
    assert not unsafe_torch_loads("# plain torch.load( in a comment is fine\nx = 1\n")
