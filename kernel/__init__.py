"""The trainbus kernel: the training loop, the bus, the journal, the supervisor, and the CLI."""

__all__ = ["TrainingSpec"]


def __getattr__(name: str):
    # On first use, not as the package is imported: every `trainbus` command and rank imports this package first,
    # and its 0.07 s were most of the time before the command line could take a Ctrl-C (kernel/cli.py)
    if name == "TrainingSpec":
        from .spec import TrainingSpec

        return TrainingSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
