"""A plugin attached by hand on the kernel's machine whose own process stood still a while (Ctrl-Z, SIGSTOP, a
debugger holding it): the kernel lives on and forgets the silent peer. On waking, the plugin must neither take its
own silence for the kernel's death (on_kernel_gone: a "run died" mail for a healthy run) nor end at the refusal
of its next message: it says hello again and, durable, replays what went by."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fixture_targets import open_gate
from helpers import recorded, run_config
from kernel_process import KernelProcess, wait_until
from trainbus.proto.journal_format import read_journal


def test_a_durable_plugin_attached_by_hand_goes_on_after_its_process_was_stopped(runs_dir, tmp_path, kernels):
    # gated: the run steps on only where the test lets it, so it outlasts the plugin's stop however slowly a busy
    # machine forgets the silent peer, and the events that go by while it stands still are known to have gone by
    gate, per_epoch, epochs = tmp_path / "gate", 45, 3
    open_gate(gate, 1)
    kernel = KernelProcess(run_config(runs_dir, epochs=epochs, target="fixture_targets:paced_digits", gate=str(gate)),
                           tmp_path)
    kernels.append(kernel)
    kernel.wait_step(1, timeout_s=60)
    record, gone = tmp_path / "record", tmp_path / "gone"
    plugin = subprocess.Popen(
        [sys.executable, "-m", "trainbus.sdk", "fixture_remote:GoneWatcher", "--name", "by_hand", "--set",
         f"path={record}", "--set", f"kernel_gone_path={gone}"],
        env={**os.environ, "TRAINBUS_RUN_DIR": str(kernel.run_dir)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "by_hand", timeout_s=60)
        open_gate(gate, per_epoch)
        wait_until(lambda: record.exists() and len(recorded(record)) > 20, 60, "the plugin's first events")
        plugin.send_signal(signal.SIGSTOP)
        try:  # past twice the liveness window the kernel forgets a peer attached by hand (peers.forget_dead)
            open_gate(gate, 2 * per_epoch)  # an epoch goes by while the plugin stands still
            hung = kernel.wait_event("plugin_hung", lambda e: e.data["plugin"] == "by_hand", timeout_s=60)
            kernel.wait_step(2 * per_epoch, timeout_s=60)
            assert not kernel.journal.of("end_training_session"), "the run ended before the test could look"
        finally:
            plugin.send_signal(signal.SIGCONT)
        # awake, its next message is refused as a stranger's: it says hello again before the run goes on (and ends)
        kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "by_hand", timeout_s=60, after_seq=hung.seq)
        open_gate(gate, epochs * per_epoch)
        kernel.result(timeout_s=180)
        out, err = plugin.communicate(timeout=60)
    finally:
        plugin.kill()
    assert plugin.returncode == 0 and not gone.exists(), err
    handled = {seq for seq, _ in recorded(record)}
    final = next(e.seq for e in read_journal(kernel.run_dir) if e.type == "end_training_session")
    first = min(handled)
    assert set(range(first, final + 1)) <= handled, "an event the durable plugin never handled"
