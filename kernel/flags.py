"""A spec function's flags: read from its signature and docstring, parsed from `NAME=VALUE` words, checked.

Guild's `guild run train.py lr=0.01` is the model: `trainbus run train.py:build lr=0.01 epochs=5` calls
`build(lr=0.01, epochs=5)`. A flag is a parameter of the function; its type comes from the annotation, else
from the default; its help from the docstring's "Args:" (Google) or "Parameters" (NumPy) section.

A function whose only parameter is named `hyperparameters` (or is annotated as a dict) is given the
hyperparameters as one dict, as before flags existed: any `NAME=VALUE` goes into that dict.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from trainbus.proto.settings_format import FALSE_WORDS, TRUE_WORDS

from .spec import SpecError

REQUIRED = inspect.Parameter.empty  # a flag with no default must be given
TYPES = (bool, int, float, str)  # what a flag's value is parsed as; any other annotation: JSON if it parses
DICT_PARAMETER = "hyperparameters"


class FlagError(SpecError):
    """An unknown flag, a value of the wrong type, a missing required flag: one line naming the valid flags."""


@dataclass(frozen=True)
class Flag:
    name: str
    type: type | None  # one of TYPES; None: any (JSON if it parses, else the text)
    default: Any = REQUIRED
    help: str = ""
    optional: bool = False  # annotated `X | None`: "none" or "null" gives None

    def describe(self) -> str:
        kind = self.type.__name__ if self.type else "any"
        value = "required" if self.default is REQUIRED else f"default {_text(self.default)}"
        return f"{self.name} ({kind}{' or none' if self.optional else ''}, {value})"


@dataclass(frozen=True)
class Signature:
    """What a spec function takes: flags, or the hyperparameters dict (takes_dict), or anything more (**kwargs)."""

    flags: tuple[Flag, ...]
    takes_dict: bool = False
    takes_extra: bool = False  # a **kwargs parameter: names besides the flags are welcome too

    def known(self) -> str:
        return ", ".join(f.describe() for f in self.flags) or "none"


def signature_of(func: Callable[..., Any]) -> Signature:
    """The flags of `func`, from its parameters (annotations resolved when they can be), help from its docstring."""
    try:
        params = list(inspect.signature(func, eval_str=True).parameters.values())
    except Exception:  # noqa: BLE001 -- an annotation that cannot be evaluated here: use it unevaluated
        params = list(inspect.signature(func).parameters.values())
    plain = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(plain) == 1 and plain[0].default is REQUIRED and plain[0].kind != inspect.Parameter.KEYWORD_ONLY and (
            plain[0].name == DICT_PARAMETER or _is_dict(plain[0].annotation)):
        return Signature(flags=(), takes_dict=True)
    helps = docstring_help(inspect.getdoc(func) or "")
    flags = tuple(_flag(p, helps.get(p.name, "")) for p in plain)
    return Signature(flags=flags, takes_extra=any(p.kind == p.VAR_KEYWORD for p in params))


def parse_words(sig: Signature, words: list[str], target: str) -> dict[str, Any]:
    """`NAME=VALUE` words from the command line as typed values; FlagError for an unknown name or a bad value."""
    by_name = {f.name: f for f in sig.flags}
    values: dict[str, Any] = {}
    for word in words:
        name, sep, text = word.partition("=")
        if not sep or not name:
            raise FlagError(f"{word!r} is not a flag: flags are NAME=VALUE; flags of {target}: {sig.known()}")
        flag = by_name.get(name)
        if flag is None and not (sig.takes_dict or sig.takes_extra):
            raise FlagError(f"unknown flag {name!r}; flags of {target}: {sig.known()}", flag=name)
        if name in values:  # a typo of another, or an edited command line: which one was meant is not ours to guess
            given = next(w for w in words if w.partition("=")[0] == name)
            raise FlagError(f"flag {name!r} given twice ({given} and {word}): give it once")
        values[name] = _parse(flag, text, target, sig) if flag else _json_or_text(text)
    return values


def resolve(sig: Signature, values: dict[str, Any], target: str) -> dict[str, Any]:
    """The arguments the function is called with: values checked against the flags, defaults filled in.

    Values come typed (a config file, `--set`, a run's config.json); a string given for a typed flag is parsed
    as on the command line. A function taking the hyperparameters dict gets `values` as they are."""
    if sig.takes_dict:
        return dict(values)
    by_name = {f.name: f for f in sig.flags}
    unknown = [name for name in values if name not in by_name]
    if unknown and not sig.takes_extra:
        raise FlagError(f"unknown flag {unknown[0]!r}; flags of {target}: {sig.known()}", flag=unknown[0])
    resolved = {}
    for flag in sig.flags:
        if flag.name in values:
            resolved[flag.name] = _check(flag, values[flag.name], target, sig)
        elif flag.default is REQUIRED:
            raise FlagError(f"flag {flag.name!r} is required: add {flag.name}=VALUE; flags of {target}: {sig.known()}")
        else:
            resolved[flag.name] = flag.default
    return {**resolved, **{name: values[name] for name in unknown}}


def call(func: Callable[..., Any], sig: Signature, arguments: dict[str, Any]) -> Any:
    """Call the spec function with resolved arguments: the dict itself, or one keyword each."""
    return func(dict(arguments)) if sig.takes_dict else func(**arguments)


def help_text(func: Callable[..., Any], sig: Signature, target: str) -> str:
    """What `trainbus run TARGET --help-flags` prints."""
    summary = (inspect.getdoc(func) or "").split("\n\n")[0].strip()
    lines = [f"usage: trainbus run {target} [NAME=VALUE ...]", ""]
    if summary:
        lines += [summary, ""]
    if sig.takes_dict:
        lines.append(f"{target} takes the hyperparameters as one dict: each NAME=VALUE goes into it (VALUE read "
                     f"as JSON when it parses, else as text), and the function checks the names and values itself.")
        return "\n".join(lines)
    if not sig.flags:
        lines.append(f"{target} takes no flags.")
        return "\n".join(lines)
    rows = [(f.name, (f.type.__name__ if f.type else "any") + ("|none" if f.optional else ""),
             "(required)" if f.default is REQUIRED else _text(f.default), f.help) for f in sig.flags]
    widths = [max(len(r[i]) for r in rows + [("flag", "type", "default", "")]) for i in range(3)]
    lines.append("flags:")
    for row in [("flag", "type", "default", "help")] + rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    if sig.takes_extra:
        lines += ["", "other NAME=VALUE flags are passed on too (it takes **kwargs)."]
    return "\n".join(line.rstrip() for line in lines)


# Google style: "Args:" then "    name (type): text" lines; NumPy style: "Parameters" over dashes, then
# "name : type" lines with the text indented below. Continuation lines are joined.
_GOOGLE_HEAD = re.compile(r"^(Args|Arguments|Parameters|Params):\s*$")
_NUMPY_HEAD = re.compile(r"^(Parameters|Other Parameters)\s*$")
_GOOGLE_ITEM = re.compile(r"^\*{0,2}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ITEM = re.compile(r"^(\w+)\s*(:.*)?$")


def docstring_help(doc: str) -> dict[str, str]:
    """{parameter: help} from a docstring's Args:/Parameters section (Google or NumPy style)."""
    lines = doc.expandtabs().splitlines()
    helps: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        numpy = _NUMPY_HEAD.match(line.strip()) and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if not (_GOOGLE_HEAD.match(line.strip()) or numpy):
            continue
        section_indent = len(line) - len(line.lstrip())
        item_indent, name = None, None
        start = i + (2 if numpy else 1)
        for j, body in enumerate(lines[start:], start):
            if not body.strip():
                continue
            indent = len(body) - len(body.lstrip())
            underlined = j + 1 < len(lines) and lines[j + 1].strip() and set(lines[j + 1].strip()) == {"-"}
            if indent < section_indent or (indent == section_indent and (not numpy or underlined)):
                break  # the next section
            item_indent = indent if item_indent is None else item_indent
            match = (_NUMPY_ITEM if numpy else _GOOGLE_ITEM).match(body.strip())
            if indent == item_indent and match:
                name = match.group(1)
                helps[name] = [] if numpy else [match.group(3)]
            elif name is not None:
                helps[name].append(body.strip())
        break
    return {name: " ".join(w for w in words if w) for name, words in helps.items()}


def _flag(p: inspect.Parameter, help_: str) -> Flag:
    kind, optional = _type_of(p.annotation)
    if kind is None and p.default is not REQUIRED and type(p.default) in TYPES:
        kind = type(p.default)
    return Flag(p.name, kind, p.default, help_, optional or (p.default is None and kind is not None))


def _type_of(annotation: Any) -> tuple[type | None, bool]:
    """(one of TYPES or None, whether None is allowed) for an annotation: float, `int | None`, Optional[str]."""
    if annotation in TYPES:
        return annotation, False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in TYPES:
            return args[0], len(args) < len(typing.get_args(annotation))
    return None, False


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict or annotation in ("dict", "Dict")


def _parse(flag: Flag, text: str, target: str, sig: Signature) -> Any:
    """The command line's text as the flag's type."""
    if flag.optional and text.lower() in ("none", "null"):
        return None
    try:
        if flag.type is bool:
            if text.lower() in TRUE_WORDS + FALSE_WORDS:
                return text.lower() in TRUE_WORDS
            raise ValueError
        if flag.type in (int, float):
            return flag.type(text)
    except ValueError:
        raise FlagError(f"flag {flag.name}: {text!r} is not {_a(flag.type)}; flags of {target}: "
                        f"{sig.known()}", flag=flag.name) from None
    return text if flag.type is str else _json_or_text(text)


def _check(flag: Flag, value: Any, target: str, sig: Signature) -> Any:
    """A typed value for the flag (an int widens to a float; a string is parsed as on the command line)."""
    if value is None and (flag.optional or flag.type is None):
        return None
    if isinstance(value, str) and flag.type not in (str, None):
        return _parse(flag, value, target, sig)
    if flag.type is None or (isinstance(value, flag.type) and not (flag.type is int and isinstance(value, bool))):
        return value
    if flag.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise FlagError(f"flag {flag.name}: {_text(value)} is not {_a(flag.type)}; flags of {target}: {sig.known()}",
                    flag=flag.name)


def _a(kind: type | None) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "valid")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)
