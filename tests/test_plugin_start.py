"""A plugin process started, or ending, while training runs: real runs and processes, nothing
mocked.

The checkpoint plugin says hello before torch is loaded, so one attached (or restarted) mid-run is a persister at once
and the next checkpoints due are taken (its handler waits for torch), not skipped. A plugin whose setup raises ends
without the interpreter's teardown, so its restart is not held up by it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import TESTS_DIR, trainbus_cmd
from fixture_targets import open_gate
from helpers import PLUGIN_START_S, run_config
from kernel_process import KernelProcess, cli, of, wait_until
from trainbus.kernel.config import PluginConfig
from trainbus.kernel.journal import read_events
from trainbus.proto.checkpoint_format import CHECKPOINT_DIR, MANIFEST, read_manifest

PACED = "fixture_targets:paced_digits"
STEPS_PER_EPOCH = 45  # the digits demo at batch size 32 (tests/test_checkpoint_e2e.py)
STARTUP_S = 180  # kernel/supervisor.py STARTUP_TIMEOUT_S: a plugin importing torch, starved on a busy box
# An attached checkpoint plugin's hello comes before torch (held here until the test lets it), so this bounds only
# Python and the SDK starting at nice 10 on a busy box: the torch import it waited for took 25-42 s there.
HELLO_S = 120
# A plugin's exit after its setup raised: without the interpreter's teardown it is prompt; fixture_slow_teardown's
# would take TEARDOWN_S, and torch's took 0.7-14 s at nice 10 on a busy box.
EXIT_S = 120


@pytest.mark.timeout(3 * STARTUP_S)  # a hang guard: the run's start, the attach, the held import's waits
def test_a_checkpoint_plugin_attached_mid_run_says_hello_before_torch_and_saves_the_next_checkpoints_due(tmp_path):
    """Attached at step 5 while its `import torch` is held: it says hello anyway, so the checkpoints due at steps 10
    and 15 are taken (their buffers held while its handler waits for torch) rather than skipped as "no checkpoint
    plugin has said hello yet"; the one at 20 finds both buffers busy. Each taken one is written, once."""
    gate, torch_open = tmp_path / "gate", tmp_path / "torch-open"
    cfg = run_config(tmp_path / "runs", [], 1, PACED, checkpoint_every_n_steps=5, checkpoint_every_n_epochs=0,
                     drain_timeout_s=60, step_sleep_s=0.0, gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path, env={"TRAINBUS_TEST_TORCH_GATE": str(torch_open),
                                               "PYTHONPATH": f"{TESTS_DIR / 'torch_gate'}{os.pathsep}{TESTS_DIR}"})
    try:
        open_gate(gate, 5)
        kernel.wait_step(5, timeout_s=STARTUP_S)
        attached = subprocess.run([*trainbus_cmd(), "plugins", "attach", kernel.run_id, "checkpoint", "--runs-dir",
                                   str(kernel.run_dir.parent)], capture_output=True, text=True, timeout=STARTUP_S)
        assert attached.returncode == 0, attached.stderr
        kernel.wait_ready("checkpoint", timeout_s=HELLO_S)  # torch is held: a hello that waits for it never comes
        open_gate(gate, 20)
        decided = {step: decision(kernel, step) for step in (10, 15, 20)}
        assert decided[10].type == decided[15].type == "save_checkpoint", {s: e.data for s, e in decided.items()}
        assert decided[20].type == "checkpoint_skipped", decided[20].data
        assert decided[20].data["reason"] == "both snapshot buffers are still being persisted", decided[20].data
        torch_open.touch()
        for step in (10, 15):
            kernel.wait_event("checkpoint_saved", lambda e: e.data["seq"] == decided[step].seq, timeout_s=STARTUP_S)
        open_gate(gate, STEPS_PER_EPOCH)
        result = kernel.result(timeout_s=STARTUP_S)
    finally:
        open_gate(gate, STEPS_PER_EPOCH)
        torch_open.touch()
        if kernel.proc.poll() is None:
            kernel.kill()
    assert result["status"] == "completed"
    # every snapshot taken is written, once: the held ones too (later ones may be skipped, both buffers busy)
    written = [e["step"] for e in read_manifest(kernel.run_dir / CHECKPOINT_DIR / MANIFEST) if "alias_of" not in e]
    published = [e.step for e in of(read_events(kernel.run_dir), "save_checkpoint")]
    assert written == published and written[:2] == [10, 15], (written, published)


def decision(kernel: KernelProcess, step: int):
    """The save_checkpoint or checkpoint_skipped of the checkpoint due at `step`."""
    return wait_until(lambda: [e for e in kernel.journal.of("save_checkpoint") + kernel.journal.of(
        "checkpoint_skipped") if e.step == step], STARTUP_S, f"the checkpoint due at step {step}")[0]


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


def test_a_plugin_whose_constructor_raises_exits_without_the_interpreters_teardown(tmp_path):
    """Before any socket, as the kernel starts it: its traceback on stderr (the kernel reads its log's end), exit 1 at
    once. It ran the interpreter's teardown, minutes here (fixture_slow_teardown), 1-14 s with torch at nice 10."""
    env = {**os.environ, "TRAINBUS_KERNEL_PID": str(os.getpid()), "TRAINBUS_EVENTS": "ipc:///nonexistent/events",
           "TRAINBUS_CONTROL": "ipc:///nonexistent/control", "TRAINBUS_RUN_DIR": str(tmp_path),
           "TRAINBUS_PLUGIN_NAME": "init_fails", "TRAINBUS_SECRET": "00", "PYTHONPATH": str(TESTS_DIR)}
    done = subprocess.run([sys.executable, "-m", "trainbus.sdk", "fixture_slow_teardown:InitFails"], env=env,
                          capture_output=True, text=True, timeout=EXIT_S)
    assert done.returncode == 1, done.stderr
    assert done.stderr.rstrip().endswith("RuntimeError: constructor fails on purpose"), done.stderr


def test_a_plugin_started_by_hand_on_a_run_dir_that_is_a_loop_of_symbolic_links_says_so_in_one_line(tmp_path):
    """pathlib's RuntimeError ("Symlink loop from ...") of resolving TRAINBUS_RUN_DIR went out as a traceback."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINBUS_EVENTS", "TRAINBUS_CONTROL")}
    done = subprocess.run([sys.executable, "-m", "trainbus.sdk", "trainbus.plugins.cpu_monitor:CpuMonitorPlugin"],
                          env={**env, "TRAINBUS_RUN_DIR": str(tmp_path / "a")}, capture_output=True, text=True,
                          timeout=EXIT_S)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith(
        f"error: {tmp_path / 'a'} is a loop of symbolic links"), done.stderr



@pytest.mark.parametrize("target, skipped", [("fixture_plugins:HeldBeforeHello", False),
                                             ("fixture_plugins:PersisterHeldBeforeHello", True)])
def test_a_plugin_still_starting_holds_checkpoints_only_if_its_class_declares_it_persists(tmp_path, target, skipped):
    """A run with no checkpoint plugin had each checkpoint due skipped, "no checkpoint plugin has said hello yet
    (plugins still starting: held)", while a plugin of the user's was still importing: until its hello the kernel did
    not know what it could do. `trainbus run` describes the class before the run: one that declares no checkpoint
    capability holds nothing, and the run is as one without a persister; one that does is waited for, and said."""
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\nepochs = 1\nready_timeout_s = 0\n\n[plugins.held]\ntarget = "{target}"\n'
                      f'settings = {{ gate = "{tmp_path / "never"}" }}\n')
    done = cli("run", "--config", str(config), "--runs-dir", str(tmp_path / "runs"), timeout=STARTUP_S)
    assert done.returncode == 0, done.stderr
    [run_dir] = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    events = read_events(run_dir)
    assert of(events, "plugin_started") and of(events, "plugin_ready") == []  # held before its hello the whole run
    reasons = [e.data["reason"] for e in of(events, "checkpoint_skipped")]
    assert reasons == (["no checkpoint plugin has said hello yet (plugins still starting: held)"] if skipped else [])
