"""What a plugin author imports: the Plugin base class, run(), and a socket-free test harness."""

from trainbus.proto import BEST_EFFORT, DURABLE, Event

from .harness import Harness
from .plugin import Plugin, SettingsError
from .runner import run

__all__ = ["BEST_EFFORT", "DURABLE", "Event", "Harness", "Plugin", "SettingsError", "run"]
