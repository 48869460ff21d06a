"""A plugin process's start and end: what the kernel tells it in its environment, and ending a process that has torch
loaded (shared by the kernel's CLI and the SDK's plugin processes)."""

from __future__ import annotations

import atexit
import gc
import os
import sys

# Set by the kernel for the plugins it starts (PROTOCOL.md, environment).
KERNEL_PID_ENV = "TRAINBUS_KERNEL_PID"
TRAINING_ENV = "TRAINBUS_TRAINING"  # "1": started while training runs (a restart, an attach)
# Set by `trainbus run` (kernel/cli_common.py) in its own environment, which the run's plugins inherit: the names,
# one a line, of the plugins whose class warnings it said on its terminal before the run.
WARNINGS_SAID_ENV = "TRAINBUS_WARNINGS_SAID"


def class_warning_level(name: str) -> str:
    """The level a plugin logs its class's warnings at (a handler named for no event): "warning", or "info" when
    `trainbus run` said them on its terminal already. Each is in kernel.log either way; at "warning" the console
    shows it too, a second time on the same terminal."""
    return "info" if name in os.environ.get(WARNINGS_SAID_ENV, "").split("\n") else "warning"


def started_while_training() -> bool:
    """This plugin process joins a run that is training: the kernel restarted or attached it then, or someone started
    it by hand. False only for one the kernel started before training, while it waits for the plugins' hellos."""
    return KERNEL_PID_ENV not in os.environ or os.environ.get(TRAINING_ENV) == "1"


def exit_without_teardown(code: int) -> None:
    """End the process once what it did is closed: garbage with a finalizer is collected (a file object left open
    is flushed), the exit handlers run (logging's flush among them) and the standard streams are flushed; then the
    process ends without Python's teardown of every module.

    With torch loaded that teardown takes 0.7-1.5 s (more on a busy box) and does nothing for a run: the kernel's
    run, or a plugin's, has closed its files and sockets by then. Without torch it is quick: the ordinary exit."""
    if "torch" not in sys.modules:
        sys.exit(code)
    gc.collect()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing more to say there
            pass
    os._exit(code)


def drain(fd: int) -> None:
    """Read a non-blocking pipe empty (a wake-up pipe: what was written only says "look")."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
