"""A plugin process started, or ending, while training runs: real runs and processes, nothing
mocked.

A plugin whose setup raises ends without the interpreter's teardown, so its restart is not held up by it.
"""

from __future__ import annotations

import pytest

from fixture_targets import open_gate
from helpers import PLUGIN_START_S, run_config
from kernel_process import KernelProcess
from trainbus.kernel.config import PluginConfig

PACED = "fixture_targets:paced_digits"
STEPS_PER_EPOCH = 45  # the digits demo at batch size 32 (tests/test_checkpoint_e2e.py)
STARTUP_S = 180  # kernel/supervisor.py STARTUP_TIMEOUT_S: a plugin importing torch, starved on a busy box
# A plugin's exit after its setup raised: without the interpreter's teardown it is prompt; fixture_slow_teardown's
# would take TEARDOWN_S, and torch's took 0.7-14 s at nice 10 on a busy box.
EXIT_S = 120


@pytest.mark.timeout(2 * STARTUP_S)  # a hang guard: the run's start, the plugin's torch import, its restart
def test_a_plugin_whose_setup_raises_exits_without_the_interpreters_teardown_and_is_restarted(tmp_path):
    """Its module's teardown would take minutes (fixture_slow_teardown): the plugin exits 1 after its traceback
    reached the kernel, and is restarted, while training is held at its first step. Waiting for that teardown, it
    was silent until the supervisor took it for hung and ended it (SIGTERM)."""
    gate = tmp_path / "gate"
    failing = PluginConfig(name="setup_fails", target="fixture_slow_teardown:SetupFails")
    cfg = run_config(tmp_path / "runs", [failing], 1, PACED, checkpoint_every_n_epochs=0,
                     ready_timeout_s=PLUGIN_START_S, step_sleep_s=0.0, gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path)
    try:
        said = kernel.wait_event("log", lambda e: e.data["plugin"] == "setup_fails", timeout_s=STARTUP_S)
        assert said.data["text"].startswith("setup failed: RuntimeError: setup fails on purpose"), said.data
        # its teardown would take minutes (fixture_slow_teardown): the exit, and the restart, come without it
        crashed = kernel.wait_event("plugin_crashed", lambda e: e.data["plugin"] == "setup_fails",
                                    timeout_s=EXIT_S)
        assert crashed.data["exit_code"] == 1, crashed.data
        kernel.wait_event("plugin_restarted", lambda e: e.data["plugin"] == "setup_fails", timeout_s=60)
    finally:
        open_gate(gate, STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed"
    assert result["plugins"]["setup_fails"]["restarts"] >= 1
