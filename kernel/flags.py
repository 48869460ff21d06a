"""A spec function's flags: read from its signature and docstring, parsed from `NAME=VALUE` words, checked.

Guild's `guild run train.py lr=0.01` is the model: `trainbus run train.py:build lr=0.01 epochs=5` calls
`build(lr=0.01, epochs=5)`. A flag is a parameter of the function; its type comes from the annotation, else
from the default; its help from the docstring's "Args:" (Google) or "Parameters" (NumPy) section.

A function whose only parameter is named `hyperparameters` (or is annotated as a dict) is given the
hyperparameters as one dict, as before flags existed: any `NAME=VALUE` goes into that dict.
"""

from __future__ import annotations

import enum
import inspect
import json
import pathlib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from trainbus.proto.settings_format import BOOL_WORDS_SAID, bool_word
from trainbus.proto.text import near_miss

from .spec import SpecError

REQUIRED = inspect.Parameter.empty  # a flag with no default must be given
TYPES = (bool, int, float, str)  # what a flag's value is parsed as; any other annotation: JSON if it parses


class Number:
    """The type of an `int | float` flag: an integer stays one (Lightning's limit_train_batches: 10 batches, 0.5 of
    them), a decimal is a float."""
DICT_PARAMETER = "hyperparameters"


class FlagError(SpecError):
    """An unknown flag, a value of the wrong type, a missing required flag: one line naming the valid flags."""


@dataclass(frozen=True)
class Flag:
    name: str
    # one of TYPES, a pathlib class or an Enum class (what argparse's `type=Path` and typer's enums give a
    # function: text where it expects a Path breaks on `data_dir / "x"`); None: any (JSON if it parses, else the text)
    type: type | None
    default: Any = REQUIRED
    help: str = ""
    optional: bool = False  # annotated `X | None`: "none" or "null" gives None
    # Literal[...]'s values, or an Enum's members: Guild's `choices`; any other value is refused, not trained with
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        value = "required" if self.default is REQUIRED else f"default {_text(self.default)}"
        kind = "one of " + ", ".join(_text(c) for c in self.choices) if self.choices else _kind(self.type)
        # a list of choices has commas of its own: a semicolon says where it ends
        return f"{self.name} ({kind}{' or none' if self.optional else ''}{';' if self.choices else ','} {value})"


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
            raise FlagError(f"unknown flag {name!r}{_an_option_of_run(name, text, target) or _near(name, sig)}; "
                            f"flags of {target}: {sig.known()}", flag=name)
        if name in values:  # a typo of another, or an edited command line: which one was meant is not ours to guess
            given = next(w for w in words if w.partition("=")[0] == name)
            raise FlagError(f"flag {name!r} given twice ({given} and {word}): give it once")
        # plain: the words become the run's hyperparameters, which are recorded and queued as JSON (a path as text)
        values[name] = plain(_parse(flag, text, target, sig)) if flag else _json_or_text(text)
    return values


# `trainbus run`'s options that Guild's and Lightning's users write as flags (`seed=3`, `precision=bf16-mixed`)
RUN_OPTIONS = ("seed", "device", "precision", "accumulate_grad_batches", "gradient_clip_val", "compile", "plugins",
               "runs_dir", "nproc", "nnodes", "max_restarts", "rdzv_endpoint")


def option_of_run(name: str, value: Any) -> str | None:
    """`--seed 3` for `seed=3`, a `trainbus run` option given as a flag; None for a name that is none."""
    if name not in RUN_OPTIONS:
        return None
    option = f"--{name.replace('_', '-')}"
    if name == "compile":
        return "--no-compile" if value is False or bool_word(str(value)) is False else option
    return f"{option} {value}"


def _near(name: str, sig: Signature) -> str:
    """" (did you mean 'lr'?)" for a typo of one of the flags (`lrr`); else "". `build(hyperparameters=None)`, meant
    to take the dict, is one flag of that name (signature_of): said, with the way to the dict."""
    if len(sig.flags) == 1 and sig.flags[0].name == DICT_PARAMETER and sig.flags[0].default is not REQUIRED:
        return (f" (the parameter {DICT_PARAMETER} has a default, so it is one flag of that name: without the default "
                f"it takes the hyperparameters as one dict, each NAME=VALUE into it)")
    return near_miss(name, [flag.name for flag in sig.flags])


def _an_option_of_run(name: str, text: Any, target: str) -> str:
    """" (seed is an option of trainbus run, not a flag of TARGET: --seed 3)" for a word that names one; else ""."""
    option = option_of_run(name, text)
    return f" ({name} is an option of trainbus run, not a flag of {target}: {option})" if option else ""


def resolve(sig: Signature, values: dict[str, Any], target: str) -> dict[str, Any]:
    """The arguments the function is called with: values checked against the flags, defaults filled in.

    Values come typed (a config file, `--set`, a run's config.json); a string given for a typed flag is parsed
    as on the command line. A function taking the hyperparameters dict gets `values` as they are."""
    if sig.takes_dict:
        return dict(values)
    by_name = {f.name: f for f in sig.flags}
    unknown = [name for name in values if name not in by_name]
    if unknown and not sig.takes_extra:
        name = unknown[0]  # `--set seed=3`, a config's `seed = 3`: said as the option, as `seed=3` is
        raise FlagError(f"unknown flag {name!r}{_an_option_of_run(name, values[name], target) or _near(name, sig)}; "
                        f"flags of {target}: {sig.known()}", flag=name)
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
    """Call the spec function with resolved arguments: the dict itself, or one keyword each (a positional-only
    parameter, `def build(lr=0.1, /)`, in its place: by keyword it was a TypeError said to be the user's code's)."""
    if sig.takes_dict:
        return func(dict(arguments))
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): keywords, as before
        params = []
    positional = [p.name for p in params if p.kind == p.POSITIONAL_ONLY and p.name in arguments]
    return func(*(arguments[name] for name in positional),
                **{name: value for name, value in arguments.items() if name not in positional})


def help_text(func: Callable[..., Any], sig: Signature, target: str) -> str:
    """What `trainbus run TARGET --help-flags` prints."""
    summary = (inspect.getdoc(func) or "").split("\n\n")[0].strip()
    if _GOOGLE_HEAD.match(summary.partition("\n")[0]) or _NUMPY_HEAD.match(summary.partition("\n")[0]):
        summary = ""  # a docstring that starts with its Args: section has no summary; the table shows the section
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
    rows = [(f.name, ("{" + ",".join(_text(c) for c in f.choices) + "}" if f.choices else _kind(f.type))
             + ("|none" if f.optional else ""),
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
_NEXT_SECTION = re.compile(r"^(Returns|Yields|Raises|Examples?|Notes?|See Also|Attributes|Warnings?|References|Todo)"
                           r"\s*:?\s*$")
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
        # on the docstring's first line, Python dedented the lines below it to its column: its items start there
        section_indent = len(line) - len(line.lstrip()) if i else -1
        item_indent, name = None, None
        start = i + (2 if numpy else 1)
        for j, body in enumerate(lines[start:], start):
            if not body.strip():
                continue
            indent = len(body) - len(body.lstrip())
            underlined = j + 1 < len(lines) and lines[j + 1].strip() and set(lines[j + 1].strip()) == {"-"}
            if indent < section_indent or (indent == section_indent and (not numpy or underlined)):
                break  # the next section
            if item_indent is not None and (indent < item_indent or section_indent < 0 and indent == item_indent and (
                    underlined or _NEXT_SECTION.match(body.strip()))):
                break  # the next section, after one that began on the docstring's first line
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
    kind, optional, choices = _type_of(p.annotation)
    # a union of several types (`str | int`) takes any of them: not only its default's
    if kind is None and not choices and p.default is not REQUIRED and not _is_union(p.annotation) and (
            type(p.default) in TYPES or _is_enum(type(p.default)) or isinstance(p.default, pathlib.PurePath)):
        kind = type(p.default)
        choices = tuple(kind) if _is_enum(kind) else ()
    return Flag(p.name, kind, p.default, help_, optional or (p.default is None and kind is not None), choices)


def _type_of(annotation: Any) -> tuple[type | None, bool, tuple[Any, ...]]:
    """(one of TYPES, a path or Enum class, or None; whether None is allowed; the values allowed, () for any) for an
    annotation: float, `int | None`, Optional[str], Path, an Enum, Literal["adam", "sgd"]."""
    if annotation in TYPES or _is_path(annotation) or _is_list(annotation):
        return annotation, False, ()
    if _is_enum(annotation):
        return annotation, False, tuple(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        allowed = tuple(v for v in values if v is not None)
        kinds = {type(v) for v in allowed}
        kind = kinds.pop() if len(kinds) == 1 and kinds <= set(TYPES) else float if kinds == {int, float} else None
        if kind is float:  # Literal[1, 2.5]: numbers, as a float flag takes an integer
            allowed = tuple(float(v) for v in allowed)
        return kind, len(allowed) < len(values), allowed
    if _is_union(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            kind, _, choices = _type_of(args[0])
            if kind is not None or choices:
                return kind, optional, choices
        if set(args) == {int, float}:
            return Number, optional, ()
    return None, False, ()


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _is_path(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, pathlib.PurePath)


def _is_list(kind: Any) -> bool:
    """list, or list[int], list[float], list[str], list[bool]: a JSON list on the command line (`layers=[64,32]`)."""
    return kind is list or (typing.get_origin(kind) is list and _item(kind) is not None)


def _item(kind: Any) -> type | None:
    """A list flag's element type (one of TYPES), or None: any."""
    args = typing.get_args(kind)
    return args[0] if len(args) == 1 and args[0] in TYPES else None


def _as_list(kind: Any, value: Any) -> list | None:
    """The value as a list flag takes it (an int widens to a float), or None when it is not one."""
    item = _item(kind)
    if not isinstance(value, list):
        return None
    if item is None:
        return value
    if item is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    if all(isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value):
        return value
    return None


def _kind(kind: type | None) -> str:
    if _is_list(kind):
        return f"list[{_item(kind).__name__}]" if _item(kind) else "list"
    return "any" if kind is None else "path" if _is_path(kind) else "number" if kind is Number else kind.__name__


def plain(value: Any) -> Any:
    """A flag's value as the records carry it (config.json, the registry, events): a path as its text, an Enum
    member as its value (its name when the value is no JSON scalar); each is read back into its type."""
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (str, int, float, bool)) else value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    return value


def _is_dict(annotation: Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict or annotation in ("dict", "Dict")


def _parse(flag: Flag, text: str, target: str, sig: Signature) -> Any:
    """The command line's text as the flag's type."""
    if flag.optional and text.lower() in ("none", "null"):
        return None
    try:
        if flag.type is bool:
            if (said := bool_word(text)) is not None:
                return _chosen(flag, said, text, target, sig)
            raise ValueError
        if flag.type in (int, float):
            return _chosen(flag, flag.type(text), text, target, sig)
        if flag.type is Number:
            try:
                return int(text)
            except ValueError:
                return float(text)
        if _is_enum(flag.type):
            return _member(flag.type, text)
        if _is_path(flag.type):
            return flag.type(text)
        if _is_list(flag.type):
            listed = _as_list(flag.type, _json_or_text(text))
            if listed is None:
                raise ValueError(text)
            return listed
    except ValueError:
        raise FlagError(f"flag {flag.name}: {text!r} is not {_a(flag)}; flags of {target}: "
                        f"{sig.known()}", flag=flag.name) from None
    return _chosen(flag, text if flag.type is str else _json_or_text(text), text, target, sig)


def _member(kind: type[enum.Enum], text: str) -> enum.Enum:
    """The Enum member `text` names: by name, as typer's enums are given, or by its value (what the records hold)."""
    for match in (lambda m: m.name == text, lambda m: str(plain(m)) == text, lambda m: m.name.lower() == text.lower()):
        found = [m for m in kind if match(m)]
        if found:
            return found[0]
    raise ValueError(text)


def _chosen(flag: Flag, value: Any, given: Any, target: str, sig: Signature) -> Any:
    """The value, when the flag takes any or it is one of its choices (Literal's: the type counts, True is not 1)."""
    if not flag.choices or any(type(value) is type(c) and value == c for c in flag.choices):
        return value
    shown = repr(given) if isinstance(given, str) else _text(given)  # as the other parse errors show the text
    raise FlagError(f"flag {flag.name}: {shown} is not {_a(flag)}; flags of {target}: {sig.known()}", flag=flag.name)


def _check(flag: Flag, value: Any, target: str, sig: Signature) -> Any:
    """A typed value for the flag (an int widens to a float; a string is parsed as on the command line)."""
    if value is None and (flag.optional or flag.type is None):
        return None
    if isinstance(value, str) and flag.type not in (str, None):
        return _parse(flag, value, target, sig)
    if _is_enum(flag.type):  # a member, or a member's value (an IntEnum's number in a config file)
        found = [m for m in flag.type if m is value or (type(plain(m)) is type(value) and plain(m) == value)]
        if found:
            return found[0]
    elif _is_path(flag.type):
        if isinstance(value, pathlib.PurePath):
            return flag.type(value)
    elif _is_list(flag.type):
        listed = _as_list(flag.type, value)
        if listed is not None:
            return listed
    elif flag.type is None or (isinstance(value, flag.type) and not (flag.type is int and isinstance(value, bool))):
        return _chosen(flag, value, value, target, sig)
    elif flag.type is float and isinstance(value, int) and not isinstance(value, bool):
        return _chosen(flag, float(value), value, target, sig)
    elif flag.type is Number and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    # `--set name=123` reads 123 as JSON, as TOML's `name = 123` is a number: text is quoted
    quote = (f" (text is quoted: --set '{flag.name}=\"{_text(value)}\"', or {flag.name} = \"{_text(value)}\" in a "
             f"config file)") if flag.type is str and isinstance(value, (int, float)) else ""
    raise FlagError(f"flag {flag.name}: {_text(value)} is not {_a(flag)}{quote}; flags of {target}: {sig.known()}",
                    flag=flag.name)


def _a(flag: Flag) -> str:
    if flag.choices:
        return "one of " + ", ".join(_text(c) for c in flag.choices)
    if _is_path(flag.type):
        return "a path"
    if _is_list(flag.type):
        items = {int: " of integers", float: " of numbers", str: " of strings", bool: " of true and false"}
        return "a JSON list" + items.get(_item(flag.type), "")
    return {bool: BOOL_WORDS_SAID, int: "an integer", float: "a number", Number: "a number",
            str: "a string"}.get(flag.type, "valid")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # nested past Python's reader: not JSON it can take
        return text


def _text(value: Any) -> str:
    value = plain(value)
    return value if isinstance(value, str) and value else json.dumps(value, default=str)  # "" shown, not a blank
