"""What `python -m trainbus.sdk --describe` says about a plugin's setting, read by the kernel: the kinds named once."""

import json

# A str setting's kind, beyond being a string (sdk/settings.py declares them; the kernel acts on them):
METRIC = "metric"  # names a metric of the run's epochs; `trainbus run` checks it against what the run's spec produces
PATH = "path"  # a file or folder the plugin writes: relative to the run directory and inside it


def typed_word(raw: str):
    """A --set VALUE (`trainbus run`, `python -m trainbus.sdk`): JSON when it parses (5, true, [1, 2]), else the text
    itself; the plugin's declared type then reads a string as its own ("1" for an integer setting is 1)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
