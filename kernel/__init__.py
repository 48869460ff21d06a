"""The trainbus kernel: the training loop, the bus, the journal, the supervisor, and the CLI."""

from .spec import TrainingSpec

__all__ = ["TrainingSpec"]
