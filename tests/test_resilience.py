"""Resilience with real processes and real signals: plugins killed, stopped, crashing, slow or poisoned;
the kernel killed; Ctrl-C. Nothing is mocked; timings are read from the run's journal.

Numbers the assertions rest on (kernel/liveness.py, kernel/supervisor.py): heartbeats every 1 s, a peer silent for 3 of
them is hung, restarts back off 0.25 s doubling, a plugin failing 6 times within 60 s is failed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from trainbus.kernel.bus import Bus
from trainbus.kernel.config import PluginConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.plugin_guard import ORPHAN_KILL_AFTER_S, ORPHAN_TERM_AFTER_S
from trainbus.proto import JOURNAL_NAME
from trainbus.kernel.run_overview import run_overview
from trainbus.kernel.run_bus import PLUGIN_EXIT_TIMEOUT_S
from trainbus.kernel.checkpointing import FINAL_WEIGHTS
from trainbus.kernel.session import run_training
from trainbus.kernel.liveness import HEARTBEAT_INTERVAL_S
from trainbus.proto.messages import HEARTBEAT_LIVENESS
from trainbus.kernel.supervisor import INTERVAL_INIT_S, MAX_RESTARTS

import fixture_plugins
from fixture_targets import open_gate
from helpers import PLUGIN_START_S, assert_same_weights, recorded, run_config, seeded_rng
from kernel_process import Command, JournalTail, KernelProcess, cli, of, process_gone, wait_until

TESTS_DIR = Path(__file__).resolve().parent
PACED = "fixture_targets:paced_digits"  # the digits demo with a sleep per step: same weights, known pace
TRAIN_SAMPLES = 1797 - int(1797 * 0.2)  # kernel/digits.py: 1,797 images, 20 % held out for validation
RESTART_WITHIN_S = 2.0  # issue 3: a killed plugin is running again within this
LIVENESS_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
# How late, in wall time, a real kernel may act on a deadline here: its bus wakes at each one, the rest is a loaded
# 2-core box's scheduling. The exact decisions (hung at the window, each backoff) are held under a fake clock in
# test_supervisor_clock.py; these end-to-end tests check the same schedule with a margin busy cores keep.
TICK_SLACK_S = 1.0


# -- building runs and reading them -----------------------------------------------------------------


def plugin(name: str, cls: str, **settings) -> PluginConfig:
    return PluginConfig(name=name, target=f"fixture_plugins:{cls}", settings=settings)


def steps_per_epoch(batch_size: int) -> int:
    return math.ceil(TRAIN_SAMPLES / batch_size)


def assert_saw_every_event_of(path: Path, events, types) -> None:
    """The plugin's handler saw every event of `types` up to end_training_session (that one too), in seq order,
    and nothing else."""
    final = of(events, "end_training_session")[0].seq
    expected = [(e.seq, e.type) for e in events if e.seq <= final and (e.type in types or e.seq == final)]
    seen = sorted(set(recorded(path)))  # a restarted plugin sees again what it had not acked: at least once
    assert seen == expected, f"missing {sorted(set(expected) - set(seen))[:10]}, extra {sorted(set(seen) - set(expected))[:10]}"


def assert_saw_every_seq(path: Path, events) -> None:
    """The plugin's handler saw every seq 1..N, N the seq of end_training_session, each as its journaled type."""
    final = of(events, "end_training_session")
    assert final, "the run has no end_training_session"
    n = final[0].seq
    seen = recorded(path)
    missing = sorted(set(range(1, n + 1)) - {seq for seq, _ in seen})
    assert not missing, f"{len(missing)} of {n} seqs never reached the handler: {missing[:20]}"
    journaled = {e.seq: e.type for e in events}
    wrong = [(seq, type_) for seq, type_ in seen if journaled.get(seq) != type_]
    assert not wrong, f"handler saw events that differ from the journal: {wrong[:10]}"


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    """Run dirs of plugin-free runs of the digits demo, by (epochs, batch_size), each run once per module."""
    cache: dict[tuple[int, int], str] = {}

    def get(epochs: int, batch_size: int) -> str:
        if (epochs, batch_size) not in cache:
            runs = tmp_path_factory.mktemp("fault_free") / "runs"
            result = run_training(run_config(runs, epochs=epochs, batch_size=batch_size))
            assert result.status == "completed"
            cache[epochs, batch_size] = result.run_dir
        return cache[epochs, batch_size]

    return get


def restart_delays(events, name: str, deaths: list[float]) -> list[float]:
    """Seconds from each death to the plugin_restarted that followed it."""
    restarted = [e.ts for e in of(events, "plugin_restarted", name)]
    return [min((ts for ts in restarted if ts >= death), default=math.inf) - death for death in deaths]


# -- 1. kill -9 a durable plugin at 3 random steps ------------------------------------------------------


@pytest.mark.parametrize("recorder", ["Recorder", "SubsetRecorder"])
def test_durable_plugin_killing_itself_at_three_random_steps_changes_nothing(tmp_path, fault_free, recorder):
    """SubsetRecorder is sent one per-batch type of four: its restarts go live again by the envelope's `n`."""
    rng, seed = seeded_rng()
    epochs, batch_size = 1, 16  # 90 steps: the kills, not the length, are what the test is about
    total = epochs * steps_per_epoch(batch_size)
    kill_steps = sorted(rng.sample(range(5, total - 5), 3))
    markers = tmp_path / "markers"
    markers.mkdir()
    record = tmp_path / "rec.txt"
    cfg = run_config(tmp_path / "runs", [plugin("rec", recorder, path=str(record), kill_at_steps=kill_steps,
                                                marker_dir=str(markers))], epochs=epochs, batch_size=batch_size)
    result = run_training(cfg)
    why = f"(seed {seed}, kills at steps {kill_steps})"

    assert result.status == "completed", why
    assert result.undrained == {}, why
    rec = result.plugins["rec"]
    assert (rec["state"], rec["restarts"], rec["crashes"]) == ("exited", 3, ["signal SIGKILL"] * 3), why
    deaths = sorted(float((markers / f"killed-{step}").read_text()) for step in kill_steps)
    events = read_events(result.run_dir)
    assert len(of(events, "plugin_crashed", "rec")) == 3, why
    delays = restart_delays(events, "rec", deaths)
    print(f"restarted {', '.join(f'{d:.2f}' for d in delays)} s after each kill {why}")
    # Each kill was answered by a restart. How soon is the supervisor's schedule, checked on a fake clock
    # (test_supervisor_clock.py); here it is also the box's load: beside two CPU burners one took 3.99 s.
    assert max(delays) < math.inf, f"restart delays {delays} {why}"
    if recorder == "Recorder":
        assert_saw_every_seq(record, events)
    else:
        assert_saw_every_event_of(record, events, fixture_plugins.SubsetRecorder.TYPES)
    assert_same_weights(result.run_dir, fault_free(epochs, batch_size))


def test_a_durable_plugin_sent_some_per_batch_types_sees_a_drop_by_n_and_replays_it_in_order(tmp_path):
    """A slow durable plugin sent only end_training_batch of the per-batch types, its inbox shrunk to 5 events:
    each 100 ms burst (~20 steps at this pace) overflows it, mostly with no other event among the drops, and it
    must see each drop by the envelope's `n` (seq alone would call every jump a gap, a careless check none) and
    replay it, handling every event it takes once and in seq order."""
    record = tmp_path / "rec.txt"
    cfg = run_config(tmp_path / "runs", [plugin("rec", "SubsetRecorder", path=str(record), inbox=5, sleep_s=0.005)],
                     epochs=2, batch_size=16, target=PACED, step_sleep_s=0.005)
    result = run_training(cfg)
    assert result.status == "completed" and result.undrained == {}
    events = read_events(result.run_dir)
    seen = recorded(record)
    assert [seq for seq, _ in seen] == sorted({seq for seq, _ in seen}), "handled out of order, or twice"
    assert_saw_every_event_of(record, events, fixture_plugins.SubsetRecorder.TYPES)
    stats = (Path(result.run_dir) / "plugins" / "rec.log").read_text().rsplit("run ended. ", 1)[1]
    counts = {key.strip(): int(value) for key, value in re.findall(r"([a-z ]+) (\d+)", stats)}
    print(stats.strip())
    assert counts["dropped"] > 0 and counts["gaps"] > 0, stats  # the bound was reached, and the drops repaired
    final = of(events, "end_training_session")[0].seq
    # sent neither start_training_batch nor the validation batches: far fewer than every event
    assert counts["received"] < final - len(of(events, "start_training_batch")), stats


def test_durable_plugin_killed_from_outside_at_three_random_steps_changes_nothing(tmp_path, fault_free, kernels):
    """A real `kill -9` from outside, at kernel steps picked at random, while the run goes on in its own process.
    The run is gated: it trains up to each kill step and waits there until the plugin's restart is ready, so on a
    busy machine a slow restart cannot push the last kill past the end of training."""
    rng, seed = seeded_rng()
    epochs, batch_size = 1, 16  # ~1-2 s of training; three kills and restarts take ~1.5 s
    total = epochs * steps_per_epoch(batch_size)
    kill_steps = sorted(rng.sample(range(10, total // 2), 3))
    record, gate = tmp_path / "rec.txt", tmp_path / "gate"
    open_gate(gate, 0)
    cfg = run_config(tmp_path / "runs", [plugin("rec", "Recorder", path=str(record))], epochs=epochs, target=PACED,
                     batch_size=batch_size, step_sleep_s=0.01, gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    deaths, killed_at, killed_pids = [], [], []
    for step in kill_steps:
        pid = kernel.wait_ready("rec", not_in=killed_pids)
        killed_pids.append(pid)
        open_gate(gate, step)
        killed_at.append(kernel.wait_step(step))
        deaths.append(time.time())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: process_gone(pid), 5, f"pid {pid} to die")
    kernel.wait_ready("rec", not_in=killed_pids)
    open_gate(gate, total)
    result = kernel.result()
    why = f"(seed {seed}, kills at kernel steps {killed_at})"

    assert result["status"] == "completed", why
    assert result["undrained"] == {}, why
    rec = result["plugins"]["rec"]
    assert (rec["restarts"], rec["crashes"]) == (3, ["signal SIGKILL"] * 3), why
    events = read_events(result["run_dir"])
    delays = restart_delays(events, "rec", deaths)
    print(f"restarted {', '.join(f'{d:.2f}' for d in delays)} s after each kill {why}")
    # Each kill was answered by a restart. How soon is the supervisor's schedule, checked on a fake clock
    # (test_supervisor_clock.py); here it is also the box's load: beside two CPU burners one took 3.99 s.
    assert max(delays) < math.inf, f"restart delays {delays} {why}"
    assert_saw_every_seq(record, events)
    assert_same_weights(result["run_dir"], fault_free(epochs, batch_size))


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
def test_durable_plugin_killed_from_outside_soak(tmp_path, fault_free, kernels, round_):
    test_durable_plugin_killed_from_outside_at_three_random_steps_changes_nothing(tmp_path, fault_free, kernels)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(5))
@pytest.mark.parametrize("recorder", ["Recorder", "SubsetRecorder"])
def test_durable_plugin_killing_itself_soak(tmp_path, fault_free, round_, recorder):
    test_durable_plugin_killing_itself_at_three_random_steps_changes_nothing(tmp_path, fault_free, recorder)


# -- 2. SIGSTOP a durable plugin past the liveness window -------------------------------------------


def recorded_run_at_step_20(tmp_path, kernels) -> tuple[KernelProcess, Path, int]:
    """A ~1.5 s paced run (90 steps) with a durable Recorder plugin ("rec"), at step 20: the kernel, the record, the
    plugin's pid."""
    record = tmp_path / "rec.txt"
    cfg = run_config(tmp_path / "runs", [plugin("rec", "Recorder", path=str(record))], epochs=1, target=PACED,
                     batch_size=16, step_sleep_s=0.01)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    pid = kernel.wait_ready("rec")
    kernel.wait_step(20)
    return kernel, record, pid


def test_stopped_durable_plugin_is_declared_hung_killed_restarted_and_loses_nothing(tmp_path, kernels):
    """SIGSTOP at step 20 of a ~1.5 s run: the hang, the kill and the restart may fall in training or in the drain."""
    kernel, record, pid = recorded_run_at_step_20(tmp_path, kernels)
    stopped_at = time.time()
    os.kill(pid, signal.SIGSTOP)  # and never SIGCONT from here: the supervisor must deal with it
    result = kernel.result()

    assert result["status"] == "completed"
    assert result["undrained"] == {}
    events = read_events(result["run_dir"])
    hung = of(events, "plugin_hung", "rec")
    assert len(hung) == 1 and hung[0].data["pid"] == pid
    # Liveness counts heartbeats: the last one came at most one interval before the SIGSTOP, so `hung` comes 2..3 s after it.
    print(f"declared hung {hung[0].ts - stopped_at:.2f} s after SIGSTOP")
    assert LIVENESS_S - HEARTBEAT_INTERVAL_S <= hung[0].ts - stopped_at <= LIVENESS_S + TICK_SLACK_S
    crashed = of(events, "plugin_crashed", "rec")
    assert len(crashed) == 1 and crashed[0].data["hung"] and crashed[0].ts >= hung[0].ts
    assert process_gone(pid)
    restarted = of(events, "plugin_restarted", "rec")
    assert len(restarted) == 1 and restarted[0].ts - crashed[0].ts <= RESTART_WITHIN_S
    assert any(e.data["pid"] == restarted[0].data["pid"] for e in of(events, "plugin_ready", "rec"))
    assert result["plugins"]["rec"]["restarts"] == 1
    assert result["plugins"]["rec"]["crashes"][0].startswith("hung")
    assert_saw_every_seq(record, events)


def test_a_kernel_stopped_past_the_liveness_window_keeps_its_plugins(tmp_path, kernels):
    """SIGSTOP the kernel past the plugins' liveness window, then SIGCONT: each local plugin sees its kernel is
    still its parent, says it waits and that the kernel is back, and goes on; none left (exit 0, "kernel gone") and
    none lost the run's remaining events. Before, both left at the window and the run completed without them.
    The kernel stays stopped until the plugin said it waits (only past the window) or left (the old bug), not a
    fixed 2 windows."""
    kernel, record, pid = recorded_run_at_step_20(tmp_path, kernels)
    log_path = kernel.run_dir / "plugins" / "rec.log"
    waiting = "is still running (stopped or starved?); waiting for it"
    kernel.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_until(lambda: waiting in log_path.read_text() or process_gone(pid), 4 * LIVENESS_S + 30,
                   "the plugin to say it waits for its stopped kernel, or to leave")
        print(f"kernel stopped {time.monotonic() - stopped:.2f} s")
    finally:
        kernel.signal(signal.SIGCONT)
    result = kernel.result()

    assert result["status"] == "completed" and result["undrained"] == {}
    assert result["plugins"]["rec"]["restarts"] == 0 and process_gone(pid)
    log = (Path(result["run_dir"]) / "plugins" / "rec.log").read_text()
    assert f"but the kernel (pid {kernel.pid}) is still running (stopped or starved?); waiting for it" in log, log
    assert "the kernel is back after" in log and "kernel gone" not in log, log
    assert_saw_every_seq(record, read_events(result["run_dir"]))


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_stopped_durable_plugin_soak(tmp_path, kernels, round_):
    test_stopped_durable_plugin_is_declared_hung_killed_restarted_and_loses_nothing(tmp_path, kernels)


# -- 3. a plugin that exits at start: backoff, then failed --------------------------------------------


def check_backoff_then_failed(events, name: str) -> None:
    started = [e.ts for e in of(events, "plugin_started", name)]
    crashed = [e.ts for e in of(events, "plugin_crashed", name)]
    restarted = [e.ts for e in of(events, "plugin_restarted", name)]
    failed = of(events, "plugin_failed", name)
    assert len(started) == MAX_RESTARTS + 1 and len(restarted) == MAX_RESTARTS and len(crashed) == MAX_RESTARTS + 1
    assert len(failed) == 1 and failed[0].ts >= crashed[-1]
    assert f"{MAX_RESTARTS + 1} failures" in failed[0].data["reason"]
    # crash -> restart waits exactly the backoff: 0.25, 0.5, 1, 2, 4 s
    for i, (crash, restart) in enumerate(zip(crashed, restarted)):
        backoff = INTERVAL_INIT_S * 2 ** i
        assert backoff - 0.01 <= restart - crash <= backoff + TICK_SLACK_S, f"restart {i + 1}: {restart - crash:.3f} s"
    # start -> start: the same backoff plus the few tenths of a second a start takes, so each gap grows
    gaps = [b - a for a, b in zip(started, started[1:])]
    for i, gap in enumerate(gaps):
        assert gap >= INTERVAL_INIT_S * 2 ** i
    assert gaps == sorted(gaps), f"gaps between starts do not grow: {gaps}"
    assert gaps[-1] / gaps[0] > 4, f"gaps between starts do not roughly double: {gaps}"


@pytest.mark.slow  # real backoff in real time (~13 s); CI checks the same decisions under a fake clock (test_supervisor_clock.py)
def test_plugin_exiting_at_start_backs_off_then_is_failed_and_training_completes(tmp_path):
    """Durable, so the kernel keeps supervising it through the final drain: a short run sees the whole schedule."""
    cfg = run_config(tmp_path / "runs", [plugin("exiter", "DurableExitAtStart")], epochs=1)
    result = run_training(cfg)

    assert result.status == "completed" and result.outcome["epochs_completed"] == 1
    assert (Path(result.run_dir) / FINAL_WEIGHTS).exists()
    assert result.plugins["exiter"]["state"] == "failed"
    assert result.plugins["exiter"]["restarts"] == MAX_RESTARTS
    assert result.plugins["exiter"]["crashes"] == ["exit code 3"] * (MAX_RESTARTS + 1)
    check_backoff_then_failed(read_events(result.run_dir), "exiter")


@pytest.mark.slow
def test_best_effort_plugin_exiting_at_start_is_failed_while_training_goes_on(tmp_path):
    # ~28 s of training, paced by sleeps; the schedule takes ~10 s of backoff plus a start per try, seconds each on
    # busy cores (14 s of training was once too short for it there)
    cfg = run_config(tmp_path / "runs", [plugin("exiter", "ExitAtStart")], epochs=4, target=PACED, batch_size=16,
                     step_sleep_s=0.075)
    result = run_training(cfg)

    assert result.status == "completed" and result.outcome["epochs_completed"] == 4
    assert result.plugins["exiter"]["state"] == "failed"
    events = read_events(result.run_dir)
    check_backoff_then_failed(events, "exiter")
    assert of(events, "plugin_failed")[0].seq < of(events, "end_training_session")[0].seq


def test_a_plugin_that_leaves_mid_run_on_purpose_is_not_restarted_but_shown_as_trouble(tmp_path):
    """Exit code 0 before the run's end: not a crash, so not restarted (a plugin may leave on purpose), but the
    run lost it; it said "exited" like every plugin at the end, and nothing in the summary, list or show told."""
    # gated: the run waits after the leaver's step until the kernel has seen it leave, so it is known to have left
    # before the run's end however slowly a busy machine runs the plugin (12 paced steps were only a margin)
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    open_gate(gate, 3)
    cfg = run_config(runs, [plugin("leaver", "LeavesAtStep", step=3), plugin("stayer", "Recorder",
                                                                             path=str(tmp_path / "rec"))],
                     epochs=2, target=PACED, batch_size=256, step_sleep_s=0, gate=str(gate))

    def left() -> bool:
        journals = list(runs.glob(f"*/{JOURNAL_NAME}"))
        return bool(journals) and bool(of(read_events(journals[0].parent), "plugin_exited", "leaver"))

    with gate_opened_once(gate, left, "the leaver's exit in the journal"):
        result = run_training(cfg)
    assert result.status == "completed", result.error
    assert result.plugins["leaver"] == {"state": "exited", "restarts": 0, "crashes": [], "greeted": True,
                                        "errors_logged": 0, "left_early": True}, result.plugins["leaver"]
    assert "left_early" not in result.plugins["stayer"], "leaving at the final event is the end, not early"
    events = read_events(result.run_dir)
    assert [e.data["exit_code"] for e in of(events, "plugin_exited") if e.data["plugin"] == "leaver"] == [0]
    assert not of(events, "plugin_restarted")
    # sys.exit(0) in a handler: its bye goes first (PROTOCOL.md §7.1)
    said = (Path(result.run_dir) / "kernel.log").read_text()
    assert "plugin leaver left before the run ended (exit code 0, after bye)" in said
    listed = cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json")
    assert json.loads(listed.stdout)[0]["plugin_trouble"] == ["leaver left before the run ended"], listed.stdout
    shown = Command("runs", "show", result.run_id, "--runs-dir", str(tmp_path / "runs"), env={"COLUMNS": "200"})
    shown.stdout, _ = shown.communicate(120)
    assert re.search(r"leaver\s+exited\s+0\s+left before the run ended", shown.stdout), shown.stdout


@contextmanager
def gate_opened_once(gate: Path, ready: Callable[[], bool], what: str) -> Iterator[None]:
    """While the body runs a gated run in this process (run_training), a thread opens the gate (paced_digits') all
    the way once ready() holds; opened at the body's end whatever happens, so the run is never left held."""
    ended = threading.Event()

    def opener() -> None:
        try:
            wait_until(lambda: ended.is_set() or ready(), 60, what, poll_s=0.05)
        finally:
            open_gate(gate, 10**6)

    thread = threading.Thread(target=opener, daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        open_gate(gate, 10**6)
        thread.join(timeout=120)


@pytest.mark.parametrize("exit_code", [-signal.SIGKILL, 0])
def test_a_plugin_that_dies_leaves_no_process_of_its_group_behind(tmp_path, exit_code):
    """A plugin's group is what the kernel kills (docs/architecture.md), but it signalled the group only of a plugin
    still running: a child in the group of one that crashed (its restart started beside it) or left ran on,
    orphaned, past the run's end, and a crash a day left a process a day. Its leftovers go as its exit is seen."""
    pid_file, seen_file, gate = tmp_path / "child.pid", tmp_path / "seen", tmp_path / "gate"
    # a crashed one's restart looks for the child as it starts: the run is held after the crash's step until it
    # has looked, however slowly a busy machine restarts it (a fixed pace was only a margin); one that left needs none
    open_gate(gate, 2 if exit_code else 10**6)
    cfg = run_config(tmp_path / "runs", [plugin("parent", "LeavesAChild", step=2, pid_file=str(pid_file),
                                                exit_code=exit_code, seen_file=str(seen_file))],
                     epochs=2, target=PACED, batch_size=256, ready_timeout_s=PLUGIN_START_S, step_sleep_s=0,
                     gate=str(gate))
    try:
        with gate_opened_once(gate, seen_file.exists if exit_code else lambda: True, "the restarted plugin's look"):
            result = run_training(cfg)
        assert result.status == "completed", result.error
        child = int(pid_file.read_text())
        if exit_code:  # restarted: its new process looked for the child as it started
            assert result.plugins["parent"]["restarts"] == 1, result.plugins["parent"]
            assert wait_until(seen_file.exists, 10, "the restarted plugin's look") and \
                seen_file.read_text().strip() == "gone", "the crashed plugin's child ran on beside its restart"
        wait_until(lambda: process_gone(child), 10, f"the child {child} of a plugin that died to be gone")
    finally:
        if pid_file.exists() and not process_gone(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_plugin_whose_constructor_raises_is_a_crash_named_by_its_exception_and_line(tmp_path):
    """Raised before the plugin has a socket, the exception reached only its own log, the traceback starting in the
    SDK's frames; the run said "crashed (exit code 1)". The kernel reads the end of the plugin's log."""
    cfg = run_config(tmp_path / "runs", [plugin("db", "FailsInInit")], epochs=1)
    result = run_training(cfg)
    assert result.status == "completed", result.error
    line = next(n for n, text in enumerate(Path(fixture_plugins.__file__).read_text().splitlines(), 1)
                if "cannot open its database" in text)
    crashes = result.plugins["db"]["crashes"]
    assert crashes and crashes[0].startswith(f"exit code 1: RuntimeError: cannot open its database (at "
                                             f"fixture_plugins.py:{line} in __init__)"), crashes
    log = (Path(result.run_dir) / "plugins" / "db.log").read_text()
    assert "runner.py" not in log and "runpy" not in log and 'fixture_plugins.py", line' in log, log
    assert "plugin db exited with exit code 1: RuntimeError" in (Path(result.run_dir) / "kernel.log").read_text()


def test_a_plugin_whose_constructor_skips_super_init_is_named_at_its_constructor_not_in_the_sdk(tmp_path):
    """It crashed at every start in the SDK's frames, `AttributeError: 'ForgetsSuperInit' object has no attribute
    'outbox' (at runner.py:387 in _send_replies)`, with no word of the missing super().__init__ call."""
    from trainbus.sdk import Harness

    said = "ForgetsSuperInit.__init__ does not call super().__init__(*args, **kwargs)"
    with pytest.raises(TypeError, match=re.escape(said)):
        Harness(fixture_plugins.ForgetsSuperInit())
    cfg = run_config(tmp_path / "runs", [plugin("forgets", "ForgetsSuperInit")], epochs=1)
    result = run_training(cfg)
    assert result.status == "completed", result.error
    line = fixture_plugins.ForgetsSuperInit.__init__.__code__.co_firstlineno
    crashes = result.plugins["forgets"]["crashes"]
    assert crashes and crashes[0].startswith(f"exit code 1: TypeError: {said}") and crashes[0].endswith(
        f"(at fixture_plugins.py:{line} in __init__)"), crashes
    assert "runner.py" not in (Path(result.run_dir) / "plugins" / "forgets.log").read_text()


def test_the_runs_summary_of_a_plugin_that_crashed_before_its_hello_points_at_its_crash(tmp_path, capsys):
    """`trainbus run`'s summary of an author's plugin whose constructor raised said, under the crash line, "never
    said hello, so it took no event (...; a command plugin speaks proto/PROTOCOL.md)": a wire-protocol hint for a
    Python class that simply crashed. It now points at the crash the line above names."""
    from trainbus.kernel.cli_run_summary import print_summary

    result = run_training(run_config(tmp_path / "runs", [plugin("db", "FailsInInit")], epochs=1))
    capsys.readouterr()
    print_summary(result)
    said = [line for line in capsys.readouterr().out.splitlines() if "plugin db: never said hello" in line]
    assert len(said) == 1 and "PROTOCOL.md" not in said[0], said
    assert said[0].strip().startswith("plugin db: never said hello, so it took no event: it crashed before it could "
                                      "(why: above; what it printed: "), said


@pytest.mark.parametrize("log, words", [
    ("Traceback (most recent call last):\n  File \"/x/p.py\", line 3, in <module>\n    boom()\n"
     "  File \"/x/q.py\", line 9, in boom\n    raise KeyError('k')\nKeyError: 'k'\n", "KeyError: 'k' (at q.py:9 in boom)"),
    # an earlier traceback (a handler's error, logged) and then a bare sys.exit(3): no cause to read
    ("Traceback (most recent call last):\n  File \"/x/p.py\", line 3, in h\n    f()\nValueError: v\n"
     "retrying\nall done\n", ""),
    ("started\n", ""),
    ("", ""),
])
def test_a_plugins_last_words_are_read_only_from_a_traceback_its_log_ends_in(tmp_path, log, words):
    from trainbus.kernel.last_words import last_words

    (tmp_path / "p.log").write_text(log)
    assert last_words(tmp_path / "p.log") == words
    assert last_words(tmp_path / "missing.log") == ""


def test_a_plugin_that_dies_or_hangs_as_the_run_ends_is_named_in_its_summary(tmp_path, monkeypatch):
    """Past the run's last event the supervisor restarts nothing, but a plugin that crashed in its last handler
    (its final lines lost) or had to be killed when plugins' exit time ran out is trouble all the same: the
    summary and `runs list` name it, and the run itself completed. One that was slow but stopped when asked is
    no crash, but the handler it was cut short in is an error it logged. What a plugin says in teardown arrives.
    The plugins' exit time is 2 s here, not PLUGIN_EXIT_TIMEOUT_S's 5 (the test waits it out for the two that
    never leave): still more than the others take to go, and stretched as ever for a plugin starved of CPU."""
    exit_timeout_s = 2.0
    assert exit_timeout_s < PLUGIN_EXIT_TIMEOUT_S
    monkeypatch.setattr("trainbus.kernel.session.PLUGIN_EXIT_TIMEOUT_S", exit_timeout_s)
    cfg = run_config(tmp_path / "runs", [plugin("dier", "DiesAtTheEnd"), plugin("hanger", "HangsAtTheEnd"),
                                         plugin("slow", "SlowToLeave"),
                                         plugin("fine", "Lifecycle", path=str(tmp_path / "fine")),
                                         plugin("bye", "SaysGoodbye")], epochs=1)
    result = run_training(cfg)
    assert result.status == "completed", result.error
    # crashed while the kernel drained (a crash like any) or once it was closing: once, either way
    assert result.plugins["dier"]["crashes"] in (["exit code 4"], ["exit code 4 at the run's end"]), result.plugins
    # the seconds it was given: the exit time, more when the kernel saw the plugins starved of CPU
    [hung] = result.plugins["hanger"]["crashes"]
    given = re.fullmatch(r"still running (\d+) s after the run's end \(signal SIGKILL\)", hung)
    assert given and int(given[1]) >= exit_timeout_s, result.plugins
    # slow, but it stopped when asked: no fault (a slow teardown on a busy machine, a plugin still starting)
    assert result.plugins["slow"]["crashes"] == [] and result.plugins["fine"]["crashes"] == [], result.plugins
    log = (Path(result.run_dir) / "kernel.log").read_text()
    assert re.search(r"plugin slow was still running (\d+) s after the run's end; it stopped when asked", log), \
        log[-3000:]
    # and the journal says each one's end: a crash for the two, the third's clean exit
    ends = {e.data["plugin"]: e for e in read_events(result.run_dir) if e.type in ("plugin_crashed", "plugin_exited")}
    assert (ends["dier"].type, ends["dier"].data["exit_code"]) == ("plugin_crashed", 4), ends
    assert ends["hanger"].type == "plugin_crashed" and ends["hanger"].data["hung"] is True, ends
    assert (ends["fine"].type, ends["fine"].data["exit_code"]) == ("plugin_exited", 0), ends
    assert ends["slow"].type == "plugin_exited", ends
    # what a plugin says in its teardown reaches the journal (it was dropped with the connection)
    said = [(e.type, e.data.get("name"), e.data.get("value"), e.data.get("text")) for e in read_events(result.run_dir)
            if e.type in ("metric", "log") and e.data.get("plugin") == "bye"]
    assert said == [("metric", "goodbye/events", 42.0, None), ("log", None, None, "goodbye from teardown")], said
    trouble = run_overview(Path(result.run_dir))["plugin_trouble"]
    assert trouble[0].startswith("dier crashed (exit code 4") and trouble[1].startswith(
        "hanger crashed (still running") and trouble[2:] == ["slow 1 error logged"], trouble
    [cut] = [e.data["text"] for e in read_events(result.run_dir) if e.type == "log" and e.data.get("plugin") == "slow"]
    assert cut.startswith("the handler for end_training_session (seq ") and " was cut short " in cut, cut


# -- 4. slow plugins never slow the kernel --------------------------------------------------------------


def step_times(events) -> list[float]:
    """Seconds between consecutive end_training_batch events of the same epoch."""
    batches = of(events, "end_training_batch")
    return [b.ts - a.ts for a, b in zip(batches, batches[1:]) if a.epoch == b.epoch]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@pytest.fixture
def one_torch_thread():
    """One intra-op thread while timing steps: on a small shared box, two spinning OpenMP threads turn a
    1 ms step into 40 ms whenever another process takes a core, which swamps what is being measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WAITED_S = 0.1  # what one event costs the slow plugins below, so what waiting for one would cost the kernel


@pytest.mark.parametrize("batch_size", [64, pytest.param(16, marks=pytest.mark.slow)])
def test_slow_plugins_never_block_the_kernel(tmp_path, monkeypatch, one_torch_thread, batch_size):
    """A short run (23 steps at batch 64): the durable plugin, at 100 ms an event, must still drain all of it."""
    publish_s: list[float] = []
    real_publish = Bus.publish

    def timed_publish(self, *args, **kwargs):
        started = time.perf_counter()
        real_publish(self, *args, **kwargs)
        publish_s.append(time.perf_counter() - started)

    monkeypatch.setattr(Bus, "publish", timed_publish)
    baseline = run_training(run_config(tmp_path / "baseline" / "runs", epochs=1, batch_size=batch_size))
    durable, live = tmp_path / "durable.txt", tmp_path / "live.txt"
    cfg = run_config(tmp_path / "runs", [plugin("durable", "Recorder", path=str(durable), sleep_s=0.1),
                                         plugin("live", "LaggingLiveRecorder", path=str(live), sleep_s=0.1)],
                     epochs=1, batch_size=batch_size, drain_timeout_s=120)
    publish_s.clear()
    result = run_training(cfg)

    # the kernel never waited: each publish is a queue append, and steps are as fast as without plugins
    slow, fast = median(step_times(read_events(result.run_dir))), median(step_times(read_events(baseline.run_dir)))
    print(f"slowest publish {max(publish_s) * 1e6:.0f} us of {len(publish_s)}; "
          f"median step {slow * 1000:.2f} ms with slow plugins, {fast * 1000:.2f} ms without")
    # A kernel that waited for these plugins would spend their 100 ms per event in a publish or a step; the
    # bounds sit far below that and far above what a busy 2-core box adds to a sub-millisecond step (a 1.5x
    # ratio alone failed on scheduling noise: 1.22 vs 0.79 ms).
    assert max(publish_s) < WAITED_S / 2, f"slowest publish took {max(publish_s) * 1000:.1f} ms"
    assert slow < 1.5 * fast + WAITED_S / 5, f"median step {slow * 1000:.2f} ms with slow plugins, {fast * 1000:.2f} ms without"

    # the durable one caught up with everything in the final drain
    assert result.status == "completed" and result.undrained == {}
    events = read_events(result.run_dir)
    assert_saw_every_seq(durable, events)

    # the best-effort one missed events, and said how many: exactly the seqs it never handled
    missed_logs = [e for e in of(events, "log", "live") if "missed" in e.data["text"]]
    assert len(missed_logs) == 1, [e.data for e in of(events, "log", "live")]
    gaps = int(missed_logs[0].data["text"].split()[1])
    seen = {seq for seq, _ in recorded(live)}
    assert gaps > 0 and max(seen) == of(events, "end_training_session")[0].seq
    ready_seq = of(events, "plugin_ready", "live")[0].seq
    first_expected = max(seen) + 1 - len(seen) - gaps  # where its count of missed events must have started
    assert first_expected <= min(seen) and first_expected <= ready_seq, (gaps, min(seen), max(seen), len(seen))
    log_line = (Path(result.run_dir) / "plugins" / "live.log").read_text()
    assert f"processed {len(recorded(live))}, gaps {gaps}," in log_line


def test_a_best_effort_plugin_still_behind_at_the_runs_end_reports_what_it_missed(tmp_path):
    """A slow best-effort plugin whose backlog outlasts the exit timeout is stopped by the kernel's SIGTERM. Its
    missed count went only to its own log then (and as `gaps 0`: the events its inbox dropped lay ahead of where its
    handler had got to), so the run's journal and kernel.log never said that it had missed events."""
    live = tmp_path / "live.txt"
    # 20 events held at 0.4 s each outlast the kernel's PLUGIN_EXIT_TIMEOUT_S: still behind when SIGTERM comes
    cfg = run_config(tmp_path / "runs", [plugin("live", "LaggingLiveRecorder", path=str(live), sleep_s=0.4)],
                     epochs=1, batch_size=64)
    result = run_training(cfg)

    assert result.status == "completed"
    log_line = (Path(result.run_dir) / "plugins" / "live.log").read_text()
    assert "terminated (SIGTERM)" in log_line, log_line
    dropped = int(re.search(r"dropped (\d+),", log_line).group(1))
    events = read_events(result.run_dir)
    missed_logs = [e for e in of(events, "log", "live") if "missed" in e.data["text"]]
    assert dropped > 0 and len(missed_logs) == 1, (log_line, [e.data for e in of(events, "log")])
    missed = int(missed_logs[0].data["text"].split()[1])
    # what it dropped after the final event (heartbeats, its own exit) is not owed to a handler: not missed
    after_final = sum(1 for e in events if e.seq > of(events, "end_training_session")[0].seq)
    assert dropped - after_final <= missed <= dropped, (missed, dropped, after_final, log_line)


def test_a_best_effort_voter_without_a_handler_for_its_vote_never_makes_the_kernel_wait(tmp_path):
    """It was sent only the types it handled, not end_epoch: it never acked, and the kernel waited out
    vote_timeout_s (here 60 s, 5 s by default) at the first epoch's end for a vote that could not come."""
    cfg = run_config(tmp_path / "runs", [plugin("voter", "VotesWithoutHandler")], epochs=2, vote_timeout_s=60.0)
    started = time.monotonic()
    result = run_training(cfg)

    assert result.status == "completed" and result.outcome["epochs_completed"] == 2
    log = (Path(result.run_dir) / "kernel.log").read_text()
    assert "no vote from voter" not in log, log
    assert time.monotonic() - started < 60.0


def test_a_vote_that_came_too_late_is_the_plugins_trouble_in_the_summary_runs_list_and_runs_show(tmp_path):
    """A voter that did not answer within vote_timeout_s was said only in kernel.log (then as a vote_missed event
    the console shows): the run's summary, `runs list` and `runs show`, where trouble is read after the run, had
    no word of it, and a stop it decided at that boundary landed later than its author meant."""
    config = tmp_path / "run.toml"
    config.write_text('[run]\nepochs = 2\nvote_timeout_s = 0.5\n[plugins.slow]\ntarget = "fixture_plugins:SlowVoter"\n'
                      '[plugins.slow.settings]\nsleep_s = 3.0\n')
    ran = cli("run", "--config", str(config), "--runs-dir", str(tmp_path / "runs"))
    assert ran.returncode == 0, ran.stderr
    assert "plugin slow: missed 1 vote (training went on without them): it did not answer within vote_timeout_s" \
        in ran.stdout, ran.stdout
    [run_dir] = [d for d in (tmp_path / "runs").iterdir() if (d / "summary.json").is_file()]
    assert json.loads((run_dir / "summary.json").read_text())["plugins"]["slow"]["votes_missed"] == 1
    said = "slow missed 1 vote (training went on without them)"
    listed = cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json")
    assert json.loads(listed.stdout)[0]["plugin_trouble"] == [said], listed.stdout
    shown = Command("runs", "show", run_dir.name, "--runs-dir", str(tmp_path / "runs"), env={"COLUMNS": "200"})
    shown.stdout, _ = shown.communicate(120)
    assert re.search(r"slow\s+exited\s+0\s+missed 1 vote \(training went on without them\)", shown.stdout), \
        shown.stdout


# -- 5. kill -9 the kernel: no plugin outlives it ------------------------------------------------------


def test_plugins_exit_when_the_kernel_is_killed(tmp_path, kernels):
    names = ("rec", "live", "metrics_log")
    plugins = [plugin("rec", "Recorder", path=str(tmp_path / "rec.txt"), sleep_s=0.01),
               plugin("live", "LiveRecorder", path=str(tmp_path / "live.txt")),
               PluginConfig("metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin")]
    cfg = run_config(tmp_path / "runs", plugins, epochs=50, target=PACED, batch_size=16)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    pids = {name: kernel.wait_ready(name) for name in names}
    kernel.wait_step(20)
    assert not any(process_gone(pid) for pid in pids.values())

    kernel.proc.send_signal(signal.SIGKILL)
    kernel.proc.wait()
    killed = time.monotonic()
    wait_until(lambda: all(process_gone(pid) for pid in pids.values()), 5,
               f"plugins {[n for n, p in pids.items() if not process_gone(p)]} to exit after the kernel was killed")
    print(f"plugins gone {time.monotonic() - killed:.2f} s after the kernel")


@pytest.mark.parametrize("stuck", [False, True])
def test_what_a_plugin_started_in_its_group_goes_with_it_when_the_kernel_is_killed(tmp_path, kernels, stuck):
    """With the kernel killed, no supervisor is left to end a plugin's group: the plugin exited (or, stuck, was
    ended by the SDK) and the child it started ran on, an orphan. A spawned plugin's SDK ends its group as it goes.

    Stuck: the SDK leaves once its kernel is gone, but only from its main thread: a plugin stuck in a handler that no
    signal interrupts (SIGTERM ignored, a C call) outlived a kill -9 of the kernel for good, an orphan nothing would
    end; now it exits ORPHAN_EXIT_S after, saying why. Beside it (one kill -9 for both: each waits out seconds), a
    plugin written from PROTOCOL.md alone need not leave when its kernel dies (§8: SHOULD): it and the child it
    started ran on for good. The kernel's guard (kernel/plugin_guard.py) ends their group: ORPHAN_TERM_AFTER_S for
    it to leave on its own, then SIGTERM."""
    pid_file, marker, raw_pids = tmp_path / "child.pid", tmp_path / "stuck", tmp_path / "raw.pids"
    plugins = [plugin("parent", "LeavesAChild", step=2, pid_file=str(pid_file), exit_code=1)]
    if stuck:  # the child's parent itself stuck in a handler that ignores SIGTERM (ORPHAN_EXIT_S)
        plugins = [plugin("parent", "LeavesAChildThenSticks", step=2, pid_file=str(pid_file), marker=str(marker)),
                   PluginConfig("orphan", "", command=[sys.executable, str(TESTS_DIR / "raw_orphan_plugin.py"),
                                                       str(raw_pids)])]
    cfg = run_config(tmp_path / "runs", plugins, epochs=50, target=PACED, batch_size=16, ready_timeout_s=PLUGIN_START_S)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    pids = [int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 120, "the plugin's child"))]
    if stuck:
        pids.append(int(wait_until(lambda: marker.exists() and marker.read_text().strip(), 120, "the plugin stuck")))
        pids += [int(p) for p in wait_until(lambda: raw_pids.exists() and raw_pids.read_text().split(), 120,
                                            "the raw plugin")]
    else:
        kernel.wait_step(5)
    kernel.proc.send_signal(signal.SIGKILL)
    kernel.proc.wait()
    try:
        wait_until(lambda: all(process_gone(pid) for pid in pids),
                   ORPHAN_TERM_AFTER_S + ORPHAN_KILL_AFTER_S + 30 if stuck else 10,
                   f"the plugins and their children {pids} to be gone after their kernel was killed")
    finally:
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
    if stuck:  # the SDK's own way out, not the guard's SIGKILL 3 s after its ignored SIGTERM
        log = (kernel.run_dir / "plugins" / "parent.log").read_text()
        assert "the kernel is gone and the handler for end_training_batch" in log, log


def test_a_killed_kernels_sockets_directory_in_the_temp_dir_is_removed_by_the_next_run_that_needs_one(
        tmp_path, kernels):
    """A run directory too long for a socket path puts its sockets in a directory of the temp dir, which the kernel
    removed as it closed: one killed with SIGKILL left it, sockets and all (796 of them in this machine's /tmp).
    Each kernel now holds a lock on its own, and the next one to make such a directory removes those none holds."""
    tmp, runs = Path(tempfile.mkdtemp(prefix="tb-")), tmp_path / ("d" * 60) / ("e" * 60)  # a short TMPDIR
    try:
        killed = KernelProcess(run_config(runs, [], epochs=50, target=PACED, batch_size=16), tmp_path,
                               env={"TMPDIR": str(tmp)})
        kernels.append(killed)
        killed.wait_step(2, timeout_s=120)
        assert [p.name for p in tmp.rglob("control.sock")] == ["control.sock"]
        killed.kill()
        second = KernelProcess(run_config(runs, [], epochs=1, target=PACED, batch_size=256), tmp_path,
                               env={"TMPDIR": str(tmp)})
        kernels.append(second)
        assert second.result(timeout_s=180)["status"] == "completed"
        assert not list(tmp.rglob("*.sock")), sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_plugins_run_in_the_kernels_session_in_groups_of_their_own_below_training(tmp_path, kernels):
    # The kernel's session: one scheduling autogroup for the run (a session of its own would give a
    # plugin a share of its own). Its own process group: what a restart kills, and not where Ctrl-C goes.
    cfg = run_config(tmp_path / "runs", [PluginConfig("metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin")],
                     epochs=50, target=PACED, batch_size=16)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    pid = kernel.wait_ready("metrics_log")
    kernel_pid = kernel.proc.pid
    assert os.getsid(pid) == os.getsid(kernel_pid)
    assert os.getpgid(pid) == pid != os.getpgid(kernel_pid)
    ours = os.getpriority(os.PRIO_PROCESS, 0)

    def below_training(pid: int) -> bool:
        """Every thread of it (priority is per thread), once training started: the first process started at the
        kernel's priority and was lowered then, a restarted one started lower."""
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        return len(tids) > 1 and all(os.sched_getscheduler(t) == os.SCHED_BATCH and
                                     os.getpriority(os.PRIO_PROCESS, t) == max(10, ours) for t in tids)

    kernel.wait_step(1)
    assert below_training(pid)
    assert os.sched_getscheduler(kernel_pid) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, kernel_pid) == ours
    os.kill(pid, signal.SIGKILL)
    restarted = kernel.wait_ready("metrics_log", timeout_s=60, not_in=(pid,))
    wait_until(lambda: below_training(restarted), 10, "the restarted plugin's I/O thread")
    kernel.kill()


# -- 6. a poison event is dead-lettered, and delivery goes on -------------------------------------------


def test_poison_event_is_dead_lettered_after_the_retry_limit_and_later_events_still_arrive(tmp_path):
    record, attempts = tmp_path / "poison.txt", tmp_path / "attempts.txt"
    cfg = run_config(tmp_path / "runs", [plugin("poison", "CountingPoison", path=str(record),
                                                attempts_path=str(attempts), poison_type="end_training_loop")],
                     epochs=2, batch_size=64)
    result = run_training(cfg)

    assert result.status == "completed" and result.undrained == {}
    assert result.plugins["poison"] == {"state": "exited", "restarts": 0, "crashes": [], "errors_logged": 2, "greeted": True}
    events = read_events(result.run_dir)
    poisoned = [e.seq for e in of(events, "end_training_loop")]
    assert len(poisoned) == 2
    tries = [int(line) for line in attempts.read_text().split()]
    assert sorted(tries) == sorted(poisoned * 3)  # MAX_HANDLER_ATTEMPTS tries each, then given up
    letters = [json.loads(line) for line in
               (Path(result.run_dir) / "plugins" / "poison.deadletter.jsonl").read_text().splitlines()]
    assert [(d["seq"], d["type"], d["attempts"]) for d in letters] == [(s, "end_training_loop", 3) for s in poisoned]
    for letter in letters:
        assert "Traceback" in letter["traceback"] and f"ValueError: poison {letter['seq']}" in letter["traceback"]
    # every other event up to the end reached the handler, in order, after the poison too
    final = of(events, "end_training_session")[0].seq
    seen = [seq for seq, _ in recorded(record)]
    assert seen == [seq for seq in range(1, final + 1) if seq not in poisoned]
    assert len([e for e in of(events, "log", "poison") if "dead-lettered" in e.data["text"]]) == 2


def test_a_plugins_own_thread_that_dies_of_an_exception_is_reported_like_a_handler(tmp_path):
    """The exception went to the plugin's log alone (Python's `Exception in thread`): the kernel's log, the console
    and the run's summary said nothing, and the plugin's readings stopped without a word."""
    cfg = run_config(tmp_path / "runs", [plugin("sampler", "SamplerThreadFails")], epochs=1, batch_size=64)
    result = run_training(cfg)

    assert result.status == "completed"
    assert result.plugins["sampler"]["errors_logged"] == 1, result.plugins
    [error] = [e.data["text"] for e in of(read_events(result.run_dir), "log", "sampler") if e.data["level"] == "error"]
    assert error.startswith("thread 'sampler' failed: ProtocolError: metric.value must be finite, got nan"), error
    assert 'fixture_plugins.py", line' in error and "trainbus/proto" not in error and "/proto/codec.py" not in error
    assert "thread 'sampler' failed:" in (Path(result.run_dir) / "plugins" / "sampler.log").read_text()


def test_a_plugin_whose_thread_is_no_daemon_exits_after_its_teardown_saying_which_thread_held_it(tmp_path):
    """Python's exit waited for the thread for good: the plugin was still running 5 s after the run's end, SIGKILLed,
    and counted a crash with no word of why, while the run's end waited for it."""
    cfg = run_config(tmp_path / "runs", [plugin("poller", "NonDaemonPoller")], epochs=1, batch_size=64)
    result = run_training(cfg)

    assert result.status == "completed"
    assert result.plugins["poller"]["state"] == "exited" and result.plugins["poller"]["crashes"] == [], result.plugins
    [said] = [e.data["text"] for e in of(read_events(result.run_dir), "log", "poller") if e.data["level"] == "warning"]
    assert said.startswith("thread 'poller' still runs after teardown() and is no daemon"), said
    exited = of(read_events(result.run_dir), "plugin_exited", "poller")
    assert [e.data["exit_code"] for e in exited] == [0]


def test_what_a_plugin_printed_is_in_its_log_as_it_prints_not_lost_with_a_kill(tmp_path, monkeypatch):
    """Its stdout, a file, was block-buffered: a line printed sat in the process until 8 KiB had gathered (a user
    tailing plugins/NAME.log saw nothing) and was lost when the plugin was killed, its last words included."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # as a user's shell has it (a CI runner may set it)
    cfg = run_config(tmp_path / "runs", [plugin("printer", "PrintsThenIsKilled")], epochs=2, batch_size=64)
    result = run_training(cfg)

    assert result.status == "completed", result.error
    assert any("signal SIGKILL" in crash for crash in result.plugins["printer"]["crashes"]), result.plugins
    assert "printed at the end of epoch 1" in (Path(result.run_dir) / "plugins" / "printer.log").read_text()


# -- Ctrl-C: once stops at a batch boundary, twice stops at once ----------------------------------------


def start_cli(tmp_path: Path, *args: str) -> tuple[Command, Path]:
    """`trainbus run ... --epochs 50` in its own process; returns it and its journal's path once the run exists."""
    runs = tmp_path / "runs"
    proc = Command("run", *args, "--epochs", "50", "--runs-dir", str(runs), "--device", "cpu")
    journal = wait_until(lambda: next(runs.glob(f"*/{JOURNAL_NAME}"), None) if runs.exists() else None, 60,
                         "the CLI's run directory")
    return proc, journal


def finish_cli(proc: Command, timeout_s: float = 30.0) -> str:
    """What it wrote, stdout then stderr, once it exits."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the CLI did not exit within {timeout_s:.0f} s of Ctrl-C:\n{(out + err)[-3000:]}")
    return out + err


def assert_no_plugin_left(events) -> None:
    pids = [e.data["pid"] for e in of(events, "plugin_started")]
    assert pids and all(process_gone(pid) for pid in pids), \
        f"plugin processes left: {[pid for pid in pids if not process_gone(pid)]}"


def test_ctrl_c_once_stops_at_a_batch_boundary(tmp_path):
    proc, journal_path = start_cli(tmp_path, "--plugins", "metrics_log", "--set", "batch_size=16")
    journal = JournalTail(journal_path)
    try:
        wait_until(lambda: journal.step() >= 20, 60, "20 training steps")
        proc.send_signal(signal.SIGINT)
        out = finish_cli(proc)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["outcome"]["epochs_completed"] < 50
    events = read_events(journal_path)
    assert_no_plugin_left(events)  # checked first: the CLI has exited, so nothing of it may be running
    lifecycle = [e for e in events if e.type not in ("heartbeat", "metric", "log") and not e.type.startswith("plugin_")]
    stop = next(i for i, e in enumerate(lifecycle) if e.type == "stop_requested")
    # the step in progress finished and no other began (or, during validation, the epoch closed first)
    assert lifecycle[stop - 1].type in ("end_training_batch", "end_epoch")
    assert not of(lifecycle[stop:], "start_training_batch")
    assert "Ctrl-C" in " ".join(lifecycle[stop].data["reasons"])
    final = of(events, "end_training_session")
    assert len(final) == 1 and final[0].data["stopped_early"]


def test_ctrl_c_twice_stops_at_once(tmp_path):
    """Steps of 0.5 s (paced target), so the second Ctrl-C lands while the first still waits for its boundary."""
    proc, journal_path = start_cli(tmp_path, f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits",
                                   "--plugins", "metrics_log", "--set", "step_sleep_s=0.5")
    journal = JournalTail(journal_path)
    try:
        wait_until(lambda: journal.step() >= 2, 60, "2 training steps")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)  # a person's double Ctrl-C
        proc.send_signal(signal.SIGINT)
        second = time.time()
        out = finish_cli(proc, timeout_s=10)
        exited_after_s = time.time() - second
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    events = read_events(journal_path)
    assert_no_plugin_left(events)
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"] == "interrupted (a second Ctrl-C)", summary
    assert summary["outcome"]["steps"] == journal.step() >= 2, summary["outcome"]  # where it stopped, not 0
    failed = of(events, "run_failed")
    assert len(failed) == 1 and failed[0].data["error"] == "interrupted (a second Ctrl-C)"
    assert not of(events, "end_training_session")
    assert not [e for e in of(events, "end_training_batch") if e.ts > second], "a step finished after the 2nd Ctrl-C"
    # no drain wait (a Ctrl-C's is drain_timeout_s, 30 s): the plugin handles run_failed and exits. 3.8 s was seen on
    # a busy 2-core box (the interpreters' teardown); the bound is a wait of the drain's kind, not a timing
    assert exited_after_s < 10.0, f"exited {exited_after_s:.1f} s after the second Ctrl-C"


def test_a_keyboardinterrupt_the_training_code_raises_is_named_as_that_not_as_a_second_ctrl_c(tmp_path):
    """No signal came: the summary said "interrupted (a second Ctrl-C)", which nobody had pressed; run_training from
    Python (a notebook, with Python's own Ctrl-C handler) said "a second" too."""
    target = tmp_path / "train.py"
    target.write_text(
        "import torch\n"
        "from specs import tiny\n"
        "def build(hyperparameters: dict):\n"
        "    spec, calls = tiny(hyperparameters), [0]\n"
        "    def loss_fn(outputs, targets):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:\n"
        "            raise KeyboardInterrupt('the data server went away')\n"
        "        return torch.nn.functional.cross_entropy(outputs, targets)\n"
        "    spec.loss_fn = loss_fn\n"
        "    return spec\n")
    runs = tmp_path / "runs"
    done = Command("run", f"{target}:build", "--plugins", "", "--runs-dir", str(runs),
                   env={"PYTHONPATH": str(TESTS_DIR)})
    _, err = done.communicate(120)
    assert done.returncode == 130, err
    [run_dir] = [p for p in runs.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["error"].startswith("interrupted: the training code raised KeyboardInterrupt (the data server went "
                                       "away) (in your code: "), summary["error"]
    assert "train.py, line 8" in summary["error"], summary["error"]
    # in-process, under Python's own Ctrl-C handler (a notebook): a Ctrl-C and this look alike, and neither is "a second"
    result = run_training(run_config(tmp_path / "runs2", [], epochs=1, target=f"{target}:build"))
    assert result.status == "interrupted", result
    assert result.error.startswith("interrupted (KeyboardInterrupt: the data server went away) (in your code: "), \
        result.error


SLOW_DURABLE_CONFIG = """
[hyperparameters]
batch_size = 16
[plugins.metrics_log]
[plugins.rec]
target = "fixture_plugins:Recorder"
settings = {{ path = "{path}", sleep_s = 0.05 }}
"""


def test_ctrl_c_once_after_training_ended_lets_the_plugins_drain_and_the_run_completes(tmp_path):
    """Training over, plugins still finishing (the last checkpoint may be being written): one Ctrl-C waits for
    them, as the first Ctrl-C always does; it took a second one to give up on them."""
    config_path = tmp_path / "run.toml"
    config_path.write_text(SLOW_DURABLE_CONFIG.replace("batch_size = 16", "batch_size = 64").format(
        path=tmp_path / "rec.txt"))
    runs = tmp_path / "runs"
    proc = Command("run", "--config", str(config_path), "--epochs", "1", "--runs-dir", str(runs), "--device", "cpu")
    try:
        journal_path = wait_until(lambda: next(runs.glob(f"*/{JOURNAL_NAME}"), None) if runs.exists() else None, 60,
                                  "the CLI's run directory")
        journal = JournalTail(journal_path)
        wait_until(lambda: of(journal.poll(), "end_training_session"), 120, "training to end")
        proc.send_signal(signal.SIGINT)
        out = finish_cli(proc, timeout_s=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "training is over; the plugins are finishing" in out, out
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["undrained"] == {}, summary
    assert summary["plugins"]["rec"]["crashes"] == [], summary["plugins"]


def start_held_at_the_end(tmp_path: Path, run_table: str = "") -> tuple[Path, Command, Path, JournalTail]:
    """`trainbus run` with a durable plugin held in its last handler until the returned `release` file exists:
    (release, the command, its journal's path, a tail of it)."""
    release = tmp_path / "release"
    config_path = tmp_path / "run.toml"
    config_path.write_text(f'{run_table}[hyperparameters]\nbatch_size = 16\n[plugins.held]\n'
                           f'target = "fixture_plugins:HeldAtTheEnd"\nsettings = {{ release = "{release}" }}\n')
    proc, journal_path = start_cli(tmp_path, "--config", str(config_path))
    return release, proc, journal_path, JournalTail(journal_path)


def test_ctrl_c_once_mid_training_waits_for_a_durable_plugin_as_any_run_end_does(tmp_path):
    """An interrupted run waited 2 s for its durable plugins, not [run] drain_timeout_s (30 s) as README says every
    run's end does: a visualization plugin drawing its last plots on a busy machine was named `did not catch up`
    (and a checkpoint still being written was cut short), though one Ctrl-C is to let plugins drain."""
    release, proc, journal_path, journal = start_held_at_the_end(tmp_path)
    try:
        wait_until(lambda: journal.step() >= 20, 60, "20 training steps")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: of(journal.poll(), "end_training_session"), 60, "the graceful stop to reach the drain")
        time.sleep(3.0)  # past the 2 s the drain was cut to: the plugin is still in its last handler
        release.touch()
        out = finish_cli(proc, timeout_s=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "did not catch up" not in out, out
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["undrained"] == {}, summary
    assert summary["plugins"]["held"]["crashes"] == [], summary["plugins"]


def test_a_sigterm_mid_training_waits_briefly_for_a_lagging_durable_plugin_whatever_drain_timeout_s(tmp_path):
    """A SIGTERM is a scheduler's (SLURM preempting, systemd stopping the unit), whose SIGKILL follows after its
    grace: the run's end is written first. The drain waits SIGTERM_DRAIN_S, not [run] drain_timeout_s (600 s here:
    a Ctrl-C would wait for the plugin that long), and the plugin that did not catch up is named."""
    release, proc, journal_path, journal = start_held_at_the_end(tmp_path, run_table="[run]\ndrain_timeout_s = 600\n")
    try:
        wait_until(lambda: journal.step() >= 20, 60, "20 training steps")
        proc.send_signal(signal.SIGTERM)
        out = finish_cli(proc, timeout_s=120)
    finally:
        release.touch()
        proc.kill()
    assert proc.returncode == 130 and "did not catch up" in out, out
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "held" in summary["undrained"], summary


def test_ctrl_c_twice_cuts_a_slow_drain_short(tmp_path):
    """The first Ctrl-C's graceful stop waits for a lagging durable plugin; the second ends that wait at once."""
    config_path = tmp_path / "run.toml"
    config_path.write_text(SLOW_DURABLE_CONFIG.format(path=tmp_path / "rec.txt"))
    proc, journal_path = start_cli(tmp_path, "--config", str(config_path))
    journal = JournalTail(journal_path)
    try:
        wait_until(lambda: journal.step() >= 20, 60, "20 training steps")
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: of(journal.poll(), "end_training_session"), 10, "the graceful stop to reach the drain")
        proc.send_signal(signal.SIGINT)
        second = time.time()
        out = finish_cli(proc, timeout_s=15)
        exited_after_s = time.time() - second
    finally:
        proc.kill()
    events = read_events(journal_path)
    assert_no_plugin_left(events)
    assert proc.returncode == 130, out
    summary = json.loads((journal_path.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert exited_after_s < 1.5 + 1.0, f"exited {exited_after_s:.1f} s after the second Ctrl-C"  # TERM grace + slack


def test_a_plugin_whose_metrics_and_logs_go_past_its_limits_is_said_with_how_many_were_dropped(tmp_path, capsys):
    """A plugin reporting 1,000 metrics at each epoch's end got ~600 of its 2,000 through ([limits] metrics_per_s
    200, a burst of 400): the rest were dropped and counted in summary.json's `bus`, for no plugin in particular, and
    kernel.log said it once; `trainbus run`'s summary, `runs show` and `runs list` said nothing, so its author took
    the metrics for written. The run's summary now counts each plugin's drops, and says them with the limit."""
    from trainbus.kernel.cli_run_summary import print_summary

    # a vote missed on a busy box (its 1,200 sends outlast the 5 s) would be a second line of trouble
    cfg = run_config(tmp_path / "runs", [plugin("flood", "FloodsAtEpochEnd")], epochs=2, batch_size=64,
                     vote_timeout_s=120)
    result = run_training(cfg)
    assert result.status == "completed"
    entry = result.plugins["flood"]
    # how many: the kernel reads its ipc socket at a share of its time (LOCAL_CONTROL_SHARE), so a burst is read over
    # a while, the buckets refilling meanwhile, and what is still unread as the run ends is no drop of the kernel's
    assert entry["metric_dropped"] == result.bus["metric_dropped"] > 0, (entry, result.bus)
    assert entry["log_dropped"] == result.bus["log_dropped"] > 0, (entry, result.bus)
    print_summary(result)
    printed = [line for line in capsys.readouterr().out.splitlines() if "plugin flood:" in line]
    dropped = f"{entry['metric_dropped']:,} metrics and {entry['log_dropped']:,} logs dropped"
    assert printed == [f"  plugin flood: {dropped}, past its [limits] (metrics_per_s, logs_per_s, bytes_per_s; see "
                       f"kernel.log)"], printed
    shown = cli("runs", "show", result.run_dir)
    assert f"{entry['metric_dropped']:,} metrics and {entry['log_dropped']:,} logs dropped" in shown.stdout, \
        shown.stdout
    listed = json.loads(cli("runs", "list", "--json", "--runs-dir", str(tmp_path / "runs")).stdout)
    assert listed[0]["plugin_trouble"] == [f"flood {dropped}"], listed
