"""What `python -m trainbus.sdk --describe` says about a plugin's setting, read by the kernel: the kinds named once."""

# A str setting's kind, beyond being a string (sdk/settings.py declares them; the kernel acts on them):
METRIC = "metric"  # names a metric of the run's epochs; `trainbus run` checks it against what the run's spec produces
PATH = "path"  # a file or folder the plugin writes: relative to the run directory and inside it
