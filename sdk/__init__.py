"""What a plugin author imports: the Plugin base class, run(), and a socket-free test harness."""

from trainbus.proto import BEST_EFFORT, DURABLE, Event, ProtocolError

from .harness import Harness
from .plugin import KernelGoneInfo, Plugin
from .entry import run
from .settings import HOST_PATH, METRIC, METRIC_FIELDS, PATH, Setting, SettingsError

__all__ = ["BEST_EFFORT", "DURABLE", "Event", "Harness", "HOST_PATH", "KernelGoneInfo", "METRIC", "METRIC_FIELDS",
           "PATH", "Plugin", "ProtocolError", "Setting", "SettingsError", "run"]
