"""`trainbus run`'s flag words (NAME=VALUE) and --set items read into the run config; their mistakes said."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from trainbus.proto.settings_format import typed_word

from .cli_common import UserError
from .config import apply_set
from .spec import SpecError


def apply_sets(cfg, hparam: list[str], flag_words: list[str]) -> None:
    """Each --set KEY=VALUE put into cfg; UserError for one malformed, or naming what a flag word or an earlier
    --set gave another value."""
    flagged = {word.partition("=")[0]: word for word in flag_words}
    set_before: dict[str, str] = {}
    for item in hparam:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} must look like KEY=VALUE")
        word = flagged.get(key.removeprefix("hyperparameters."))
        if word is not None and word.partition("=")[2] != raw:  # the later would win without a word
            raise UserError(f"{key.removeprefix('hyperparameters.')} given twice, as {word} and as --set {item}: "
                            f"give it once")
        earlier = set_before.setdefault(_set_name(key), item)
        if earlier.partition("=")[2] != raw:  # as a flag given twice: which one the run was meant to have is unsaid
            raise UserError(f"{_set_name(key)} given twice, as --set {earlier} and as --set {item}: give it once")
        apply_set(cfg, key, typed_word(raw))


def is_flag_word(word: str) -> bool:
    name, sep, _ = word.partition("=")
    return bool(sep) and name.isidentifier()


def apply_flags(cfg, flag_words: list[str], help_flags: bool, seed: int) -> None:
    """--help-flags: print the target's flags and exit; else the NAME=VALUE words, typed, into the hyperparameters
    (checked here, before anything is made: an unknown flag or a bad value is one line, exit 2)."""
    from .config_checks import SEED_LIMIT
    from .flags import help_text, parse_words, signature_of
    from .training_state import seed_everything
    from .target import load_target

    if 0 <= seed < SEED_LIMIT:  # else check_run says what it takes, once the rest is read
        seed_everything(seed)  # what a script draws as it is imported (a model made at its top) is the seed's too
    func = load_target(cfg.target)
    signature = signature_of(func)
    if help_flags:
        print(help_text(func, signature, cfg.target))
        raise typer.Exit()
    cfg.hyperparameters.update(parse_words(signature, flag_words, cfg.target))


def from_the_file(exc: SpecError, only_in_file: set[str], config: Path | None) -> str:
    """The error, naming the config file when the hyperparameter it is about was given there and not on the
    command line: `unknown flag 'bogus'` alone sends the user looking through their command."""
    if exc.flag in only_in_file:
        return f"{exc} ({exc.flag} is set in {config}'s {_section_of(config, exc.flag)})"
    return str(exc)


def _section_of(config: Path, name: str) -> str:
    """Where the config file sets hyperparameter `name`: a TOML file's [hyperparameters]; bz's JSON its "training"
    (whose keys besides epochs, device, ... are hyperparameters: bz's `batch_size` among them) or "hyperparameters",
    which has no [hyperparameters] table to look in."""
    if config.suffix != ".json":
        return "[hyperparameters]"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    given = raw.get("hyperparameters") if isinstance(raw, dict) else None
    return '"hyperparameters"' if isinstance(given, dict) and name in given else '"training"'


def _set_name(key: str) -> str:
    """What a --set KEY names, however spelt: `hyperparameters.lr` is `lr`, `plugins.NAME.settings.S` is `NAME.S`."""
    head, _, rest = key.partition(".")
    if head == "hyperparameters" and rest:
        return rest
    name, _, tail = rest.partition(".")
    section, _, setting = tail.partition(".")
    if head == "plugins" and name and section == "settings" and setting:
        return f"{name}.{setting}"
    return key


def check_epochs_given_once(epochs: int | None, words: list[str], hyperparameters: dict) -> None:
    """UserError for `epochs=N` (a flag word or --set) and a different `--epochs M` on one command line: the spec
    function would be called with N and --epochs would override the epochs it sets, so the run would train M
    epochs while its flags (runs list, runs compare) said N."""
    named = epochs_named(words)
    if epochs is not None and named and hyperparameters.get("epochs") != epochs:
        raise UserError(f"epochs given twice, as {named[-1]} and as --epochs {epochs}: give epochs once (--epochs "
                        f"overrides the epochs the spec sets; the flag is what its function is called with)")


def epochs_named(words: list[str]) -> list[str]:
    """The flag words and --set items that give the hyperparameter `epochs`."""
    return [word for word in words if word.partition("=")[0] in ("epochs", "hyperparameters.epochs")]
