"""What `python -m trainbus.sdk --describe` says about a plugin's setting, read by the kernel: the kinds named once."""

import json
import string

# A str setting's kind, beyond being a string (sdk/settings.py declares them; the kernel acts on them):
METRIC = "metric"  # names a metric of the run's epochs; `trainbus run` checks it against what the run's spec produces
PATH = "path"  # a file or folder the plugin writes: relative to the run directory and inside it
# a str.format template (a file name, say) whose {fields} are epoch, step or metrics of the run's epochs; `trainbus run`
# checks each metric field as it checks a METRIC
METRIC_FIELDS = "metric_fields"
# a file or folder on the plugin's machine that it reads (a password file, a disk to watch): a relative one is made
# absolute when the settings are checked, from the directory the command was run in, since the plugin runs in the
# kernel's (`trainbus plugins attach` from another directory, a run resumed from elsewhere)
HOST_PATH = "host_path"
KINDS = ("", METRIC, PATH, METRIC_FIELDS, HOST_PATH)
STEP_FIELDS = ("epoch", "step")  # a METRIC_FIELDS template's fields that are no metric
# How a true/false is spelt on a command line, the same for a function's flags and a plugin's settings
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
BOOL_WORDS_SAID = "true or false (or yes/no, on/off, 1/0)"


def bool_word(text: str) -> bool | None:
    """The true/false a word says, in any case (TRUE_WORDS, FALSE_WORDS); None for any other word."""
    word = text.lower()
    return word in TRUE_WORDS if word in TRUE_WORDS + FALSE_WORDS else None


def template_fields(template: str) -> list[str]:
    """The fields a METRIC_FIELDS template names, in order (ValueError for a malformed one: a lone brace)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def metrics_named(kind: str, value) -> list[str]:
    """The metrics a setting's value names, which the run must produce: a METRIC's value, a METRIC_FIELDS
    template's fields other than the STEP_FIELDS; none for any other kind (or an empty METRIC)."""
    if kind == METRIC and value:
        return [value]
    if kind == METRIC_FIELDS and isinstance(value, str):
        return [field for field in template_fields(value) if field not in STEP_FIELDS]
    return []


def typed_word(raw: str):
    """A --set VALUE (`trainbus run`, `python -m trainbus.sdk`): JSON when it parses (5, true, [1, 2]), else the text
    itself; the plugin's declared type then reads a string as its own ("1" for an integer setting is 1)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, RecursionError):  # nested past Python's reader: not JSON it can take
        return raw
