"""Typed plugin settings: each one's type, default, constraint and help declared once, and values checked against it.

A plugin declares ``settings = {"patience": Setting(3, "epochs without improvement before stopping", min=1)}``;
a plain value (``{"patience": 3}``) still works and is a Setting whose type is its default's, with no constraint
and no help. Values are checked, and strings from the command line (``--set early_stopping.patience=1``) are
converted, in the plugin's constructor and in ``python -m trainbus.sdk --describe``, which `trainbus run` asks
before anything starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from trainbus.proto.checkpoint_format import CHECKPOINT_DIR, MANIFEST
from trainbus.proto.codec import fits_msgpack
from trainbus.proto.messages import JOURNAL_NAME, RUN_DIR_RESERVED
from trainbus.proto.settings_format import (HOST_PATH, KINDS, METRIC, METRIC_FIELDS, PATH, STEP_FIELDS, bool_word,
                                            template_fields)
from trainbus.proto.text import near_miss, not_utf8, printable

__all__ = ["HOST_PATH", "METRIC", "METRIC_FIELDS", "PATH", "Setting", "SettingsError", "check_value", "declared",
           "describe_settings"]

# The article-and-noun each type is called by in an error ("must be an integer >= 0").
TYPE_PHRASES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "a table"}
# A list setting's elements: "a list of strings".
ITEM_PHRASES = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
# NAME_MAX of Linux's file systems (ext4, xfs, tmpfs): a longer name in a PATH is ENAMETOOLONG at the first open.
NAME_MAX_BYTES = 255


class SettingsError(ValueError):
    """A plugin setting that does not exist or whose value is not allowed."""


@dataclass(frozen=True)
class Setting:
    """One setting: its default, one line of help, and what is allowed (type from the default unless given)."""

    default: Any
    help: str = ""
    type: type | None = None  # None: the default's type (any type for a default of None); given: the default's too
    min: float | None = None  # inclusive bounds, for numbers
    max: float | None = None
    choices: tuple[Any, ...] = ()
    kind: str = ""  # METRIC, PATH, METRIC_FIELDS or HOST_PATH (proto/settings_format.py), for a str setting
    rule: str = ""  # what the plugin's check_settings also requires, in a few words, for `trainbus plugins list`
    # A list's element type (str, int, float or bool); None: that of a non-empty default's elements when they are
    # all of one of those types (integers and floats together: float), else any.
    items: type | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # a misspelt kind would be no kind at all: nothing checked, silently
            raise SettingsError(f"Setting kind={self.kind!r}: not a kind; one of "
                                f"{', '.join(kind.upper() for kind in KINDS if kind)}")
        if self.type is not None and not isinstance(self.type, type):  # type="float", as a YAML schema names one
            raise SettingsError(f"Setting type={self.type!r} is not allowed: type= takes the type itself, one of str, "
                                f"int, float, bool, list or dict (type=float), not its name")
        for bound in ("min", "max"):
            value = getattr(self, bound)
            if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
                raise SettingsError(f"Setting {bound}={value!r} is not allowed: min= and max= take numbers "
                                    f"(min=0, max=1.5)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise SettingsError(f"Setting min={self.min!r} is not allowed: min= and max= take numbers, min <= max "
                                f"(max={self.max!r})")
        if isinstance(self.default, tuple) and self.type in (None, tuple, list):  # a config gives lists, no tuples
            object.__setattr__(self, "default", list(self.default))
            object.__setattr__(self, "type", list)
        if self.type is None and self.default is not None:
            object.__setattr__(self, "type", type(self.default))
        if self.type is not None and self.type not in TYPE_PHRASES:  # a value a config could never give, nor msgpack
            # carry to the plugin's process
            said = f"default {self.default!r}" if self.default is not None else f"type={self.type!r}"
            raise SettingsError(f"Setting {said} is not allowed: a {self.type.__name__} cannot come from a config "
                                f"file or --set; give a str, int, float, bool, list or dict (a path as a str, "
                                f"kind=PATH or HOST_PATH; an Enum's member as its value, with choices=)")
        if self.items is None and self.type is list and self.default:
            kinds = {type(item) for item in self.default}
            if kinds == {int, float}:  # [1, 2.5]: numbers, as a float setting takes an integer
                kinds = {float}
            if len(kinds) == 1 and kinds <= ITEM_PHRASES.keys():
                object.__setattr__(self, "items", kinds.pop())
        if self.items is not None and (self.type is not list or self.items not in ITEM_PHRASES):
            raise SettingsError(f"Setting items={self.items!r}: only a list setting has items, one of "
                                f"{', '.join(t.__name__ for t in ITEM_PHRASES)}")
        if self.default is not None:  # None: not set. Else the default is a value like any given one: of the
            # declared type (Setting(1, type=float) gives 1.0) and allowed, or the declaration is refused
            default = _converted(self.type, self.default, self.items)
            if default is _REFUSED or not _within(self, default):
                raise SettingsError(f"Setting default {_shown(self.default)} is not allowed; "
                                    f"it must be {self.allowed()}")
            object.__setattr__(self, "default", default)

    def constraint(self) -> str:
        """What is allowed beyond the type, in a few words; "" when any value of the type is."""
        if self.rule:
            return self.rule
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind == METRIC:
            return "a metric the run produces"
        if self.kind == METRIC_FIELDS:
            return f"a template whose {{fields}} are {', '.join(STEP_FIELDS)} or metrics the run produces"
        if self.kind == PATH:
            return (f"a path inside the run directory (relative, no '..', each name at most {NAME_MAX_BYTES} bytes, "
                    "no NUL, none of the kernel's own files: events, config.json, summary.json, plugins/, "
                    f"{CHECKPOINT_DIR}/{MANIFEST}, ...)")
        if self.kind == HOST_PATH:
            return "a path on the plugin's machine (a relative one is from the directory the command runs in)"
        if self.min is not None and self.max is not None:
            return f"between {self.min:g} and {self.max:g}"
        if self.min is not None:
            return f">= {self.min:g}"
        if self.max is not None:
            return f"<= {self.max:g}"
        return ""

    def allowed(self) -> str:
        """The type and the constraint together: "an integer >= 1", "one of 'min', 'max'"."""
        constraint = self.constraint()
        if self.choices or self.type is None:
            return constraint or "any value"
        phrase = TYPE_PHRASES.get(self.type, self.type.__name__)
        if self.items is not None:
            phrase = f"a list of {ITEM_PHRASES[self.items]}"
        said = f"{phrase}: {constraint}" if self.kind or self.rule else " ".join(filter(None, (phrase, constraint)))
        return f"{said} (or null)" if self.default is None else said


def declared(settings: dict[str, Any]) -> dict[str, Setting]:
    """A class's `settings`, every entry a Setting (a plain default becomes one)."""
    if not isinstance(settings, dict) or not all(isinstance(key, str) for key in settings):
        raise SettingsError(f"settings = {_shown(settings)[:80]} is not allowed; the class's settings must be a "
                            f"dict of name -> Setting(default, help) (or a plain default)")
    return {key: value if isinstance(value, Setting) else Setting(value) for key, value in settings.items()}


def check_value(key: str, setting: Setting, value: Any) -> Any:
    """The value as the plugin gets it (a string converted to the declared type), or SettingsError in one line."""
    if value is None and setting.default is None:  # not set, as declared: a config may say so again
        return None
    if isinstance(value, str) and not_utf8(value):  # a Latin-1 file name: it cannot reach the plugin, nor be opened
        raise SettingsError(f"{key} = {printable(repr(value))} is not UTF-8 text ({not_utf8(value)}); give it in UTF-8")
    converted = _converted(setting.type, value, setting.items)
    if isinstance(converted, int) and not isinstance(converted, bool) and not fits_msgpack(converted):
        # the kernel sends a plugin its settings in msgpack: `plugins attach` failed with a traceback as it sent them
        raise SettingsError(f"{key} = {_shown(value)} is not allowed; it must be {setting.allowed()} that fits in "
                            f"64 bits")
    if converted is _REFUSED or not _within(setting, converted):
        # The command line reads --set VALUE as JSON first: 1234 or true comes as a number where text is wanted.
        quote = (f"; {_shown(value)} was read as {'true/false' if isinstance(value, bool) else 'a number'}: quote "
                 f"it (\"{_shown(value)}\" in a config file, '\"{_shown(value)}\"' after the = of a --set)"
                 if setting.type is str and isinstance(value, (int, float)) else "")
        if setting.type is list and isinstance(value, str) and not value.lstrip().startswith("["):  # show a list
            items = [part.strip() for part in value.split(",")] if setting.items in (str, None) else None
            shown = json.dumps(items) if items is not None else f"[{value.strip()}]"
            quote = (f"; a list is written in JSON: {shown} in a config file, '{shown}' after the = of a --set")
        allowed = setting.allowed()
        if converted is not _REFUSED and (setting.kind or setting.rule):  # of its type already: what else it must be
            allowed = setting.constraint() + (" (or null)" if setting.default is None else "")
        if isinstance(converted, float) and not math.isfinite(converted):  # NaN and infinity are numbers too
            allowed = allowed.replace(TYPE_PHRASES[float], f"a finite {TYPE_PHRASES[float].removeprefix('a ')}", 1)
        # `MAX` for `max`: the value it was likely meant to be
        near = near_miss(value, setting.choices) if setting.choices and isinstance(value, str) else ""
        raise SettingsError(f"{key} = {_shown(value)} is not allowed{near}; it must be {allowed}{quote}")
    if setting.kind == HOST_PATH and converted:  # what the plugin opens in the kernel's working directory
        return os.path.abspath(os.path.expanduser(converted))
    return converted


def describe_settings(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every setting as plain data, for `trainbus plugins list` and its --json."""
    return {key: {"type": _type_name(s), "default": s.default, "constraint": s.constraint(),
                  "help": s.help, "kind": s.kind} for key, s in declared(settings).items()}


def _type_name(setting: Setting) -> str:
    """"int", "list[str]" (a list whose elements have a type), "any"."""
    if setting.type is None:
        return "any"
    return f"list[{setting.items.__name__}]" if setting.items is not None else setting.type.__name__


_REFUSED = object()


def _converted(kind: type | None, value: Any, items: type | None = None) -> Any:
    """value as `kind` (a list's elements as `items`); a string is read as one (the command line gives every
    value as text); else _REFUSED."""
    if isinstance(value, str) and kind is not str and kind is not None:
        value = _parsed(kind, value.strip())
    if kind is bool and type(value) is int and value in (0, 1):  # `--set x.flag=1`: read as JSON first, as 1
        value = bool(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is not None and not _is_a(value, kind):
        return _REFUSED
    if items is not None:  # the elements as they are, no text read: a list's text is JSON, its types are its own
        value = [float(v) if items is float and _is_a(v, int) else v for v in value]
        if not all(_is_a(v, items) for v in value):
            return _REFUSED
    return value


def _parsed(kind: type, text: str) -> Any:
    try:
        if kind is bool:
            said = bool_word(text)
            return _REFUSED if said is None else said
        if kind in (int, float):
            return kind(text)
        if kind in (list, dict):
            return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's JSON reader
        pass
    return _REFUSED


def _is_a(value: Any, kind: type) -> bool:
    """isinstance, but true/false is no number."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _within(setting: Setting, value: Any) -> bool:
    if setting.choices:
        return value in setting.choices
    if setting.kind == PATH:  # inside the run directory, and none of the kernel's own files there
        path = PurePosixPath(value)
        first = path.parts[0] if path.parts else ""
        return (not path.is_absolute() and ".." not in path.parts and not value.startswith("~")
                and first not in RUN_DIR_RESERVED and not first.startswith(f"{JOURNAL_NAME}.")
                and path.parts != (CHECKPOINT_DIR, MANIFEST)  # what `--resume` finds checkpoints by
                and "\x00" not in value and all(len(part.encode()) <= NAME_MAX_BYTES for part in path.parts))
    if setting.kind == METRIC_FIELDS:
        try:
            return all(name.isidentifier() for name in template_fields(value))
        except ValueError:  # a lone brace
            return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):  # NaN, or an infinity JSON let in (1e400)
            return False
        return (setting.min is None or value >= setting.min) and (setting.max is None or value <= setting.max)
    return True


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)
