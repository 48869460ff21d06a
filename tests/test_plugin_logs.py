"""What a run of days piles up is bounded. A plugin's output log is capped (kernel/supervisor.py, LOG_MAX_BYTES): a
real plugin process writing to its log, the real Supervisor, a fake clock deciding when the size is checked.
kernel.log is capped too (kernel/kernel_log.py): a real run whose plugin logs a line a step; a durable plugin's dead
letters: a real run whose plugin fails at every step; a plugin's crash causes: a real process crashing again and
again on the fake clock."""

from __future__ import annotations

import json
import sys
import time

from pathlib import Path

from helpers import PLUGIN_START_S, run_config
from trainbus.kernel import kernel_log
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.session import run_training
from trainbus.kernel.supervisor import (CRASHES_KEPT, INTERVAL_MAX_S, LOG_CHECK_S, RESTART_WINDOW_S, PluginSpec,
                                        Supervisor)
from trainbus.sdk.attach import SOCKETS_LINE

T0 = 1000.0
# Writes 20 kB to stderr (the log), waits for the file `go`, writes "after", exits.
NOISY = """
import os, sys, time
for _ in range(200):
    sys.stderr.write("x" * 99 + "\\n")
sys.stderr.flush()
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.01)
sys.stderr.write("after\\n")
"""


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_log_past_its_cap_is_copied_aside_and_emptied_in_place_and_the_plugin_writes_on_at_its_start(tmp_path):
    go = tmp_path / "go"
    spec = PluginSpec("noisy", "", command=[sys.executable, "-c", NOISY, str(go)])
    sup = Supervisor([spec], {}, tmp_path / "run", lambda type_, data: None)
    sup.log_max_bytes = 10_000
    log, copy = tmp_path / "run" / "plugins" / "noisy.log", tmp_path / "run" / "plugins" / "noisy.log.1"
    sup.start_all(now=T0)
    try:
        _wait(lambda: log.stat().st_size >= 20_000, "the plugin wrote its 20 kB")
        sup.tick(T0)
        assert copy.stat().st_size == 20_000 and log.stat().st_size == 0
        assert copy.read_bytes() == (b"x" * 99 + b"\n") * 200

        go.touch()
        proc = sup.children["noisy"].proc
        proc.wait(timeout=60)
        # O_APPEND: its next write lands at the emptied file's start, not at its old offset behind a hole of NULs
        assert log.read_bytes() == b"after\n"
        sup.tick(T0 + LOG_CHECK_S)  # under the cap: left alone, the copy kept
        assert log.read_bytes() == b"after\n" and copy.stat().st_size == 20_000
    finally:
        sup.shutdown(deadline_s=0)


def test_the_size_is_checked_every_log_check_s_not_at_every_tick(tmp_path):
    # a plugin that cannot start at all (failed) still has its log, and it is still watched
    sup = Supervisor([PluginSpec("p", "", command=[str(tmp_path / "missing")])], {}, tmp_path, lambda *_: None)
    sup.log_max_bytes = 10
    sup.start_all(now=T0)
    assert sup.children["p"].state == "failed"
    sup.tick(T0)
    log = tmp_path / "plugins" / "p.log"
    log.write_bytes(b"y" * 100)
    sup.tick(T0 + LOG_CHECK_S - 0.01)
    assert log.stat().st_size == 100
    sup.tick(T0 + LOG_CHECK_S)
    assert log.stat().st_size == 0 and (tmp_path / "plugins" / "p.log.1").read_bytes() == b"y" * 100


def test_a_log_past_its_cap_when_the_run_ends_is_capped_then(tmp_path):
    """The size was looked at only every LOG_CHECK_S while the run went on: a short run whose plugin printed 70 MB
    left a 70 MB log, where README says a log past its cap moves to .log.1."""
    sup = Supervisor([PluginSpec("p", "", command=[str(tmp_path / "missing")])], {}, tmp_path, lambda *_: None)
    sup.log_max_bytes = 10
    sup.start_all(now=T0)
    sup.tick(T0)
    log = tmp_path / "plugins" / "p.log"
    log.write_bytes(b"y" * 100)
    sup.shutdown(deadline_s=0)
    assert log.stat().st_size == 0 and (tmp_path / "plugins" / "p.log.1").read_bytes() == b"y" * 100


def test_kernel_log_past_its_cap_is_rotated_into_one_older_file_and_still_says_where_the_sockets_are(
        tmp_path, monkeypatch):
    """A plugin's log replies are kernel.log lines: one of 1,000 characters a step (rate-limited to 50 a second)
    grew it ~1.6 GB a day. Two epochs here are ~90 such lines, ~95 kB, against a cap of 30 kB."""
    cap = 30_000
    monkeypatch.setattr(kernel_log, "MAX_BYTES", cap)
    chatty = resolve_plugin("chatty", {"chars": 1000}, target="fixture_plugins:ChattyLogger")
    result = run_training(run_config(tmp_path, [chatty], epochs=2, checkpoint_every_n_epochs=0,
                                     ready_timeout_s=PLUGIN_START_S, drain_timeout_s=60))
    assert result.status == "completed", result.error
    log, older = Path(result.run_dir) / "kernel.log", Path(result.run_dir) / "kernel.log.1"
    assert log.stat().st_size < cap and cap - 2_000 < older.stat().st_size < cap
    assert not Path(f"{log}.2").exists()
    text = log.read_text()
    # atop the file a rotation began: a client attached by hand (PROTOCOL.md §2) still finds the run's sockets
    assert SOCKETS_LINE.match(text.splitlines()[0]) and len(SOCKETS_LINE.findall(text)) == 1
    last_step = max(int(line.split("step ")[1].split()[0]) for line in (older.read_text() + text).splitlines()
                    if "[chatty] step " in line)
    assert last_step >= 2 * 40  # the newest lines are the ones kept (kernel/digits.py: 45 steps an epoch)


def test_a_durable_plugins_dead_letters_past_their_cap_move_to_one_older_file(tmp_path):
    """A handler failing at every batch dead-letters each one (~1 kB with its traceback): the file grew without
    bound. Two epochs are 90 failures, ~90 kB, against the fixture's cap of 20 kB (Plugin.dead_letters_max_bytes)."""
    failing = resolve_plugin("failing", {}, target="fixture_plugins:FailsEveryBatch")
    result = run_training(run_config(tmp_path, [failing], epochs=2, checkpoint_every_n_epochs=0,
                                     ready_timeout_s=PLUGIN_START_S, drain_timeout_s=60))
    assert result.status == "completed", result.error
    letters = Path(result.run_dir) / "plugins" / "failing.deadletter.jsonl"
    older = letters.with_name(letters.name + ".1")
    line_max = max(len(line) + 1 for line in (older.read_text() + letters.read_text()).splitlines())
    assert letters.stat().st_size < 20_000 + line_max and 20_000 <= older.stat().st_size < 20_000 + line_max
    assert not letters.with_name(letters.name + ".2").exists()
    newest = [json.loads(line) for line in letters.read_text().splitlines()][-1]
    assert newest["type"] == "end_training_batch" and "cannot handle step 90" in newest["traceback"], newest


def test_a_plugin_crashing_for_days_keeps_its_newest_causes_and_counts_them_all(tmp_path):
    """A real process that exits 3 at once, restarted far enough apart on the fake clock never to be given up (a
    plugin crashing every 13 s does so for as long as the run trains): the summary kept every cause, ~6,600 a day."""
    spec = PluginSpec("crashy", "", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    sup = Supervisor([spec], {}, tmp_path, lambda type_, data: None)
    crashes, now = CRASHES_KEPT + 10, T0
    sup.start_all(now=now)
    try:
        for _ in range(crashes):
            sup.children["crashy"].proc.wait(timeout=60)
            now += RESTART_WINDOW_S  # the previous restart has left the window: never MAX_RESTARTS within it
            sup.tick(now)  # its exit: a crash, a restart due after the backoff
            now += INTERVAL_MAX_S
            sup.tick(now)  # started again
        summary = sup.summary()["crashy"]
        assert summary["state"] != "failed" and summary["crashes"] == ["exit code 3"] * CRASHES_KEPT, summary
        assert summary["crash_count"] == crashes
    finally:
        sup.shutdown(deadline_s=0)
