"""A training loop standing still is said (training_stalled, with where its thread waits), and again when it moves."""

from __future__ import annotations

import json
import linecache
import math
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import fixture_targets
from fixture_targets import open_gate
from kernel_process import Command, KernelProcess, cli, wait_until
from trainbus.kernel.journal import Journal
from trainbus.kernel.run_overview import run_overview
from trainbus.kernel.config import ConfigError, RunConfig
from trainbus.kernel.config_checks import check_run
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.rank_stacks import STACKS, ask_ranks
from trainbus.kernel.user_errors import is_user_file
from trainbus.kernel.stall_watch import StallWatch, thread_stack
from trainbus.proto import JOURNAL_NAME, Event, encode_event, events as ev
from trainbus.proto.journal_format import TAIL_BYTES


def test_a_stall_is_said_once_after_its_deadline_and_its_end_with_how_long_it_lasted():
    watch = StallWatch(after_s=600.0)
    assert watch.tick(10_000.0) is None  # before the loop's first event: building, plugins starting
    assert watch.moved(0.0) is None
    assert watch.tick(599.9) is None
    assert watch.tick(600.0) == 600.0
    assert watch.tick(5_000.0) is None  # said once a stall, however long it lasts
    assert watch.moved(5_000.5) == 5_000.5
    assert watch.moved(5_001.0) is None
    assert watch.tick(5_601.0) == 600.0  # a second stall is said again


def test_no_stall_is_said_after_the_loops_final_event_nor_when_turned_off():
    watch = StallWatch(after_s=600.0)
    watch.moved(0.0)
    watch.ended()  # draining plugins at the end is not training standing still
    assert watch.tick(10_000.0) is None
    off = StallWatch(after_s=0.0)
    off.moved(0.0)
    assert off.tick(10_000.0) is None


def test_the_stack_of_a_stalled_thread_names_the_users_frame_and_reads_no_file(tmp_path: Path, monkeypatch):
    """The stall may be a file system that stopped answering: the bus thread, taking the stack, must not read the
    user's source files (a source line is shown only when Python had it cached)."""
    (tmp_path / "user_waits.py").write_text("def wait(event):\n    event.wait(30)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_waits

    release, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (ready.set(), user_waits.wait(release)))
    thread.start()
    try:
        ready.wait(10)
        filename = user_waits.__file__
        stack, where = wait_until(lambda: in_user_code(thread.ident), 10, "the thread in user_waits.wait")
    finally:
        release.set()
        thread.join()
    assert where == f"{filename}, line 2"
    assert "threading.py" in stack[-1] and ", in wait\n" in stack[-1]  # the innermost: threading's own
    assert f'  File "{filename}", line 2, in wait\n' in stack
    assert filename not in linecache.cache
    assert thread_stack(None, is_user_file) == ([], "")


def test_a_run_stalled_for_longer_than_its_journals_tail_spans_is_listed_stalled(tmp_path: Path):
    """`runs list` reads a running run's last 1 MiB of journal: past ~3 hours of a stall that is heartbeats alone."""
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    stalled_at, beats = 1_000_000.0, 15_000
    events = [Event(1, "r1", ev.START_TRAINING_SESSION, stalled_at - 700, 0, 1, {"epochs": 2}),
              Event(2, "r1", ev.END_TRAINING_BATCH, stalled_at - 600, 3, 1, {"loss": 1.0}),
              Event(3, "r1", ev.TRAINING_STALLED, stalled_at, 3, 1, {"stalled_s": 600.0, "after": "end_training_batch",
                                                                    "where": "/me/train.py, line 9", "stack": []})]
    events += [Event(4 + i, "r1", ev.HEARTBEAT, stalled_at + i, 3, 1, {"interval_s": 1.0}) for i in range(beats)]
    journal = Journal(run_dir / JOURNAL_NAME)
    journal.append([encode_event(e) for e in events], 1)
    journal.close()
    assert (run_dir / JOURNAL_NAME).stat().st_size > TAIL_BYTES
    overview = run_overview(run_dir, now=stalled_at + beats)  # heartbeats a second old: running
    assert overview["status"] == "running"
    assert overview["stalled"] == {"since_ts": stalled_at - 600, "stalled_s": 600.0 + beats, "step": 3,
                                   "where": "/me/train.py, line 9"}


def in_user_code(thread_id: int) -> tuple[list[str], str] | None:
    stack, where = thread_stack(thread_id, is_user_file)
    return (stack, where) if where else None


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_a_stall_deadline_that_is_not_a_number_of_seconds_is_refused_naming_it(value):
    with pytest.raises(ConfigError, match=r"stalled_after_s must be a number of seconds >= 0 \(0: never said\)"):
        check_run(RunConfig(stalled_after_s=value))


def test_a_loop_held_in_the_users_code_is_said_with_where_and_again_once_it_moves(tmp_path: Path):
    gate = tmp_path / "gate"
    open_gate(gate, 3)  # batch 4 waits in the user's loader, as a DataLoader whose worker deadlocked does
    cfg = RunConfig(target="fixture_targets:paced_digits", epochs=1, runs_dir=str(tmp_path / "runs"),
                    plugins=[resolve_plugin("console", {})],
                    stalled_after_s=1.0, hyperparameters={"gate": str(gate), "step_sleep_s": 0.0})
    kernel = KernelProcess(cfg, tmp_path)
    stalled = kernel.wait_event(ev.TRAINING_STALLED, timeout_s=60)
    assert stalled.step == 3 and stalled.data["after"] == ev.END_TRAINING_BATCH
    assert stalled.data["stalled_s"] >= 1.0
    assert stalled.data["where"].startswith(str(Path(fixture_targets.__file__).resolve()) + ", line ")
    assert any("in _wait_for_gate" in frame for frame in stalled.data["stack"])
    [listed] = json.loads(cli("runs", "list", "--runs-dir", cfg.runs_dir, "--json").stdout)  # while it stands still
    assert listed["status"] == "running" and listed["stalled"]["step"] == 3 and listed["stalled"]["stalled_s"] >= 1
    table, _ = Command("runs", "list", "--runs-dir", cfg.runs_dir, env={"COLUMNS": "300"}).communicate(60)
    assert re.search(r" running .* training stalled \d+\.\d s at step 3\s*$", table, re.M), table
    shown = cli("runs", "show", kernel.run_id, "--runs-dir", cfg.runs_dir).stdout
    assert re.search(r"running \(kernel pid \d+ is alive; training has stood still for \d+\.\d s at step 3, in your "
                     r"code at .*fixture_targets\.py, line \d+ \(its stack: kernel\.log\)\)", " ".join(shown.split())), shown
    open_gate(gate, 10**6)
    resumed = kernel.wait_event(ev.TRAINING_RESUMED, timeout_s=60)
    assert resumed.seq > stalled.seq and resumed.data["stalled_s"] >= stalled.data["stalled_s"]
    assert resumed.data["event"] == ev.START_TRAINING_BATCH and resumed.step == 3  # right behind what ended it
    result = kernel.result()
    assert result["status"] == "completed", result
    assert len(kernel.journal.of(ev.TRAINING_STALLED)) == 1
    assert "training has stood still for" in (kernel.run_dir / "kernel.log").read_text()
    said = kernel.stdout_path.read_text()  # the console plugin's, on the kernel's stdout
    assert "error: training has stood still for " in said
    assert " after end_training_batch at step 3 in your code at " in said
    assert "training moved again after standing still for " in said


def test_a_rank_is_asked_for_its_stacks_only_by_the_process_that_registered(tmp_path: Path):
    """SIGUSR2's default action ends a process: rank 0 signals only the process that wrote the rank's header, its pid
    and its start time both, never another process that got that pid since (here a process that never registered;
    asked, it would die)."""
    import psutil

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(other.pid).create_time()
        header = "trainbus rank 1 pid {} started {!r} main thread 0x7f00\n"
        (tmp_path / STACKS.format(1)).write_text(header.format(other.pid, started + 1.0))  # a pid reused since
        (tmp_path / STACKS.format(2)).write_text(header.format(other.pid + 1, started))  # another rank's pid
        answers = ask_ranks(tmp_path, {0: 1, 1: other.pid, 2: other.pid, 3: other.pid}, is_user_file, wait_s=0.2)
        assert answers == [{"rank": 1, "error": "its process is gone"},
                           {"rank": 2, "error": "its stacks file is not its own"},
                           {"rank": 3, "error": "not listening for the question (SIGUSR2 taken by the user's code, or "
                                               "its run directory not writable)"}], answers
        assert other.poll() is None, "a process that never registered was sent SIGUSR2"
    finally:
        other.kill()
        other.wait()
