"""The kernel daemon (kernel/daemon.py): placement as a pure function (kernel/placement.py), and the real daemon
process with real runs: a queue that outlives `kill -9` of the daemon, two runs placed on a configured two-device
list at once, one daemon per runs directory, a run that fails before it has a directory."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainbus.kernel.checkpointing import has_checkpoints
from trainbus.kernel.daemon import OUTPUT_CHECK_S, Daemon
from trainbus.kernel.daemon_files import DaemonError, daemon_dir, output_file
from trainbus.kernel.placement import parse_devices, place
from trainbus.kernel.cli_daemon import QUEUED_SHOWN
from trainbus.kernel.registry import MAX_QUEUED, Registry, list_runs
from trainbus.proto import JOURNAL_NAME
from trainbus.proto import events as ev

from conftest import TESTS_DIR, sigint_as_from_a_terminal, start_daemon, child_path_with_tests, trainbus, trainbus_cmd
from fixture_targets import open_gate
from helpers import assert_same_weights, fill
from kernel_process import Command, JournalTail, process_gone, wait_until

PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"
DEVICES = f"{TESTS_DIR / 'fixture_targets.py'}:devices_digits"
SLOW_BUILD = f"{TESTS_DIR / 'fixture_targets.py'}:slow_build"
UNBUILDABLE = f"{TESTS_DIR / 'specs.py'}:unbuildable"
TINY = f"{TESTS_DIR / 'specs.py'}:tiny"
WAIT_S = 120  # a run of a few seconds, on a busy 2-core machine


# -- placement ----------------------------------------------------------------------------------------------


def job(name: str, gpus: int | None = None) -> dict:
    return {"id": name, "gpus": gpus}


def test_placement_starts_in_submission_order_within_max_concurrent_and_free_devices():
    starts, never = place([job("a", 1), job("b", 1), job("c", 1)], set(), 0, ["0", "1"], max_concurrent=3)
    assert [(j["id"], d) for j, d in starts] == [("a", ["0"]), ("b", ["1"])] and never == []
    starts, _ = place([job("c", 1)], {"1"}, 1, ["0", "1"], max_concurrent=3)  # a freed the device 0
    assert [(j["id"], d) for j, d in starts] == [("c", ["0"])]
    starts, _ = place([job("a", 0), job("b", 0)], set(), 0, [], max_concurrent=1)
    assert [j["id"] for j, _ in starts] == ["a"]  # one at a time by default


def test_placement_holds_everything_behind_a_job_that_must_wait():
    # b needs both devices: c (one device, one is free) does not jump ahead of it
    starts, never = place([job("b", 2), job("c", 1)], {"0"}, 1, ["0", "1"], max_concurrent=4)
    assert starts == [] and never == []


def test_placement_defaults_to_one_device_when_the_daemon_has_some_and_none_without():
    starts, _ = place([job("a")], set(), 0, ["7"], max_concurrent=2)
    assert starts[0][1] == ["7"]
    starts, _ = place([job("a")], set(), 0, [], max_concurrent=2)
    assert starts[0][1] == []


def test_placement_fails_a_job_that_asks_for_more_devices_than_the_daemon_has():
    starts, never = place([job("a", 3), job("b", 1)], set(), 0, ["0", "1"], max_concurrent=2)
    assert [j["id"] for j, _ in starts] == ["b"]
    assert [j["id"] for j, _ in never] == ["a"] and "asks for 3 GPUs and the daemon has 2 (0,1)" in never[0][1]


def test_devices_are_indices_or_uuids_each_once():
    uuid = "GPU-8f6e3c1a-1234-5678-9abc-def012345678"
    assert parse_devices(f" 0, 3,,{uuid},MIG-{uuid[4:]},MIG-{uuid}/1/0") == \
        ["0", "3", uuid, f"MIG-{uuid[4:]}", f"MIG-{uuid}/1/0"]
    assert parse_devices("") == []
    for bad in ("abc", "0,gpu1", "-1", "1.5", "GPU-xyz", "\u0663"):  # the last: an Arabic-Indic 3, a digit to \d
        with pytest.raises(DaemonError, match="is not a device: give indices"):
            parse_devices(bad)
    with pytest.raises(DaemonError, match="lists 1 twice"):
        parse_devices("0,1,1")
    with pytest.raises(DaemonError, match="lists 0 twice"):
        parse_devices("0,00")  # CUDA reads both as device 0
    assert parse_devices("01,2") == ["1", "2"]


# -- a daemon's rounds, with processes that are not training runs ---------------------------------------------


def test_a_daemon_that_died_mid_start_is_followed_by_one_that_adopts_the_started_run_and_requeues_the_other(
        tmp_path):
    """Two jobs taken (`starting`) with no process recorded: one had been started (a process carries its run
    id), one not. The next daemon adopts the first, queues the second again and starts it once the first ends;
    `true` stands in for python, so each started job ends at once without a run directory."""
    runs = tmp_path / "runs"
    runs.mkdir()
    with Registry(runs) as registry:
        for run_id in ("a", "b"):
            registry.submit({"id": run_id, "state": "queued", "submitted_ts": 1.0 if run_id == "a" else 2.0,
                             "argv": [], "cwd": str(tmp_path), "gpus": None},
                            {"id": run_id, "dir": None, "status": "queued", "started_ts": None}, 1.0)
            assert registry.move_job(run_id, ["queued"], state="starting")
    started = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               env={**os.environ, "TRAINBUS_LAUNCH_RUN_ID": "a"})
    try:
        daemon = Daemon(runs, [], max_concurrent=1, python=shutil.which("true"))
        daemon.tick(100.0)
        assert {i: w.pid for i, w in daemon.watched.items()} == {"a": started.pid}
        with Registry(runs) as registry:
            assert [job["id"] for job in registry.jobs(["queued"])] == ["b"]  # held: one at a time
        started.kill()
        started.wait()
        daemon.tick(101.0)  # a settled (its process gone, no directory), b started
        daemon.tick(102.0)
        wait_until(lambda: daemon.tick(103.0) or not daemon.watched, 30, "b's `true` to exit")
        with Registry(runs) as registry:
            ended = {job["id"]: job for job in registry.jobs(["ended"])}
            assert set(ended) == {"a", "b"} and ended["b"]["exit_code"] == 0
            assert registry.runs(200.0)["b"]["status"] == "failed"  # it never made a run directory
    finally:
        started.kill()


def test_a_runs_output_past_its_cap_is_copied_aside_and_emptied_in_place_every_output_check_s(tmp_path):
    """What a run prints (the user's code printing a line a step) went to its output file without bound. A stand-in
    for python writes 20 kB, waits for the file `go`, writes "after" and exits; the daemon's fake clock decides when
    the size is checked. The file and its copy are owner-only, as daemon.log is (they were 0644: what the user's
    code prints)."""
    runs, go = tmp_path / "runs", tmp_path / "go"
    runs.mkdir()
    noisy = tmp_path / "noisy"
    noisy.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                     f"sys.stdout.write(('x' * 99 + '\\n') * 200)\nsys.stdout.flush()\n"
                     f"deadline = time.monotonic() + 60\n"
                     f"while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n    time.sleep(0.01)\n"
                     f"print('after')\n")
    noisy.chmod(0o755)
    with Registry(runs) as registry:
        registry.submit({"id": "a", "state": "queued", "submitted_ts": 1.0, "argv": [], "cwd": str(tmp_path),
                         "gpus": None}, {"id": "a", "dir": None, "status": "queued", "started_ts": None}, 1.0)
    daemon = Daemon(runs, [], max_concurrent=1, python=str(noisy))
    daemon.output_max_bytes = 10_000
    out, copy = output_file(runs, "a"), output_file(runs, "a").with_name("a.log.1")
    t0 = 100.0
    umask = os.umask(0o022)  # a login shell's: files are made 0644 unless said otherwise
    try:
        daemon.tick(t0)  # starts it
    finally:
        os.umask(umask)
    assert list(daemon.watched) == ["a"]
    wait_until(lambda: out.stat().st_size >= 20_000, 60, "the run's 20 kB of output")
    daemon.tick(t0 + OUTPUT_CHECK_S - 0.01)
    assert out.stat().st_size == 20_000 and not copy.exists()
    umask = os.umask(0o022)
    try:
        daemon.tick(t0 + OUTPUT_CHECK_S)
    finally:
        os.umask(umask)
    assert copy.read_bytes() == (b"x" * 99 + b"\n") * 200 and out.stat().st_size == 0
    assert [oct(path.stat().st_mode & 0o777) for path in (out, copy)] == ["0o600", "0o600"]
    go.touch()
    wait_until(lambda: daemon.tick(t0 + 6) or not daemon.watched, 60, "the run to end")
    assert out.read_bytes() == b"after\n"  # O_APPEND: at the emptied file's start, not behind a hole of NULs


def test_a_resume_the_daemon_died_starting_is_queued_again_not_taken_for_a_died_run(tmp_path):
    """A queued resume's directory exists (it is the run's), so "no directory yet" cannot say it never started:
    a kernel.pid older than the job's start does."""
    runs = tmp_path / "runs"
    (runs / "c").mkdir(parents=True)
    (runs / "c" / "config.json").write_text("{}\n")
    (runs / "c" / "kernel.pid").write_text("999999\n")
    os.utime(runs / "c" / "kernel.pid", (1.0, 1.0))  # the session before the resume's
    with Registry(runs) as registry:
        registry.submit({"id": "c", "state": "queued", "submitted_ts": 1.0, "argv": [], "cwd": str(tmp_path),
                         "gpus": None}, {"id": "c", "dir": str(runs / "c"), "status": "queued"}, 1.0)
        assert registry.move_job("c", ["queued"], state="starting", started_ts=time.time())
    daemon = Daemon(runs, [], max_concurrent=1, python=shutil.which("true"))
    daemon.tick(time.time())
    with Registry(runs) as registry:
        assert {job["id"]: job["state"] for job in registry.jobs()} == {"c": "running"}  # queued again, started
    wait_until(lambda: daemon.tick(time.time()) or not daemon.watched, 30, "c's `true` to exit")


def test_a_resume_that_fails_at_once_says_why_in_the_queue_not_just_the_runs_old_status(tmp_path):
    """The resume's kernel refused to go on and exited 2 before writing anything: the directory still says how the
    run last ended (died), so the queue's word for the job said only "run died, exit code 2"."""
    runs = tmp_path / "runs"
    (runs / "d").mkdir(parents=True)
    (runs / "d" / "config.json").write_text(json.dumps({"target": "nowhere.py:build"}) + "\n")
    (runs / "d" / "kernel.pid").write_text("999999\n")
    os.utime(runs / "d" / "kernel.pid", (1.0, 1.0))  # the session that died, long before the resume
    with Registry(runs) as registry:
        registry.submit({"id": "d", "state": "queued", "submitted_ts": 1.0, "cwd": str(tmp_path), "gpus": None,
                         "argv": ["--resume", "d", "--runs-dir", str(runs), "--plugins", ""]},
                        {"id": "d", "dir": str((runs / "d").resolve()), "status": "died"}, 1.0)
    daemon = Daemon(runs, [], max_concurrent=1)
    daemon.tick(time.time())
    wait_until(lambda: daemon.tick(time.time()) or not daemon.watched, WAIT_S, "the resume to exit")
    with Registry(runs) as registry:
        [ended] = registry.ended_jobs(10)
    assert ended["detail"].startswith("its resume ended before training (exit code 2): error: --resume d: that run "
                                      "has no checkpoints"), ended
    assert ended["detail"].endswith("; the run is still died"), ended
    shown = cli("daemon", "status", "--runs-dir", str(runs), check=False).stdout
    assert ": failed (its resume ended before training (exit code 2): error: " in " ".join(shown.split()), shown
    [listed] = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json", check=False).stdout)["ended"]
    assert listed["status"] == "failed" and listed["error"].startswith("its resume ended before training"), listed


def test_a_run_with_no_checkpoint_is_refused_a_resume_at_submission_not_once_started(tmp_path):
    """A remote `submit -- --resume RUN --epochs 2` of a run that had no checkpoint plugin was queued, then its kernel
    refused it ("that run has no checkpoints"); `run --detach` said so at once. Both now say it at submission."""
    from trainbus.kernel.daemon_queue import why_not_resumable

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"target": "demo", "epochs": 1}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"run_id": "r", "status": "completed",
                                                       "outcome": {"epochs_completed": 1}}) + "\n")
    assert why_not_resumable(run_dir, 2) == ("--resume r: that run has no checkpoints (it ran without the checkpoint "
                                             "plugin, or ended before its first); run it again instead")
    assert why_not_resumable(run_dir, None) == ("run r has completed (1 epoch); nothing to resume (it has no "
                                                "checkpoint to train on from: run it again, with more epochs)")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "manifest.jsonl").write_text("")
    assert why_not_resumable(run_dir, 2) is None


def test_a_started_job_whose_process_died_with_no_daemon_up_holds_its_run_no_more(tmp_path):
    """The daemon stopped (or killed), then its run's kernel died: nobody settled the job, which said running.
    Resuming the run was refused ("already running in the daemon's queue") and deleting it said "stop it first",
    which said there was nothing to stop. A live process still holds it."""
    import psutil

    from trainbus.kernel.registry import JobError
    from trainbus.kernel.run_removal import RemovalError, check_not_submitted

    runs = tmp_path / "runs"
    runs.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_started = psutil.Process(gone.pid).create_time()
    gone.wait()
    me = psutil.Process(os.getpid())
    job = {"id": "d", "state": "queued", "submitted_ts": 1.0, "argv": ["--resume", "d"], "cwd": str(tmp_path)}
    for pid, started, held in ((gone.pid, gone_started, False), (me.pid, me.create_time(), True)):
        with Registry(runs) as registry:
            registry.submit(job, {"id": "d", "status": "queued"}, 1.0)
            registry.move_job("d", ["queued"], state="running", pid=pid, pid_started=started)
            if held:
                with pytest.raises(JobError, match="already running"):
                    registry.submit(job, {"id": "d", "status": "queued"}, 2.0)
            else:
                registry.submit(job, {"id": "d", "status": "queued"}, 2.0)  # queued again: its resume
                assert [j["state"] for j in registry.jobs()] == ["queued"]
                registry.move_job("d", ["queued"], state="running", pid=pid, pid_started=started)
        if held:
            with pytest.raises(RemovalError, match="is running"):
                check_not_submitted(runs, "d")
        else:
            check_not_submitted(runs, "d")  # deletable
            with Registry(runs) as registry:
                registry.move_job("d", ["running"], state="ended")


def started_by_a_gone_daemon(runs: Path, run_id: str, cwd: Path) -> None:
    """A job of the queue in runs as a killed daemon leaves one it started: running, its process gone since."""
    import psutil

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_started = psutil.Process(gone.pid).create_time()
    gone.wait()
    with Registry(runs) as registry:
        registry.submit({"id": run_id, "state": "queued", "submitted_ts": 1.0, "argv": [], "cwd": str(cwd)},
                        {"id": run_id, "status": "queued"}, 1.0)
        registry.move_job(run_id, ["queued"], state="running", pid=gone.pid, pid_started=gone_started)


def test_a_run_deleted_while_no_daemon_watched_its_ended_kernel_is_listed_deleted_not_brought_back_died(tmp_path):
    """The daemon and its run's kernel killed, then `runs delete RUN` with no daemon up (as docs/daemon.md says it
    may be): the job still said running, so `daemon status` named it `gone` with `runs show RUN` to see how it ended,
    and the next daemon settled it as a run that never had a directory: `runs list` showed the deleted run again,
    `died (ended before its run had a directory ...)`, and `runs show` said the daemon never started a process for
    it. The delete now ends the job: listed `deleted`, as any run `runs delete` took, and nothing to settle."""
    from trainbus.kernel.session import run_training
    from helpers import run_config

    runs = tmp_path / "runs"
    runs.mkdir()
    assert run_training(run_config(runs, target=TINY), run_id="d").status == "completed"  # the run's directory
    started_by_a_gone_daemon(runs, "d", tmp_path)
    assert cli("runs", "delete", "d", "--yes", "--runs-dir", str(runs)).returncode == 0
    status = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert status.returncode == 3 and "gone d" not in status.stdout, status.stdout
    Daemon(runs, [], max_concurrent=1).tick(100.0)  # what the next daemon settles: nothing of d
    assert "d" not in listed(runs), listed(runs)
    ended = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json", check=False).stdout)["ended"]
    assert [(job["run"], job["status"]) for job in ended] == [("d", "deleted")], ended


def test_a_daemon_settling_a_job_whose_run_was_resumed_by_hand_meanwhile_says_so_not_run_running(tmp_path, caplog):
    """The daemon and its run's kernel killed, then `runs resume RUN` by hand: `daemon status` said the run's kernel
    was gone too, and the next daemon ended the job (its process gone: it holds the run no more) with the detail
    `run running`. Each says now that the run goes on in a kernel the daemon did not start, and which."""
    import logging

    from trainbus.kernel.kernel_pid import KERNEL_PID
    from trainbus.kernel.run_json import SUMMARY
    from trainbus.kernel.session import run_training
    from helpers import run_config

    runs = tmp_path / "runs"
    runs.mkdir()
    assert run_training(run_config(runs, target=TINY), run_id="d").status == "completed"
    by_hand = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the resumed run's kernel
    try:
        (runs / "d" / SUMMARY).unlink()  # as a kernel still training leaves its directory
        (runs / "d" / KERNEL_PID).write_text(f"{by_hand.pid}\n")
        started_by_a_gone_daemon(runs, "d", tmp_path)
        status = cli("daemon", "status", "--runs-dir", str(runs), check=False).stdout
        assert (f"  gone d: started by a daemon that is gone; the run goes on in a kernel the daemon did not start "
                f"(pid {by_hand.pid})") in status, status
        with caplog.at_level(logging.INFO, logger="trainbus.daemon"):
            Daemon(runs, [], max_concurrent=1).tick(100.0)
        with Registry(runs) as registry:
            job = registry.job("d")
        said = f"its process was gone; the run goes on in a kernel the daemon did not start (pid {by_hand.pid})"
        assert job["state"] == "ended" and job["detail"] == said, job
        assert f"d: {said}" in caplog.text, caplog.text
    finally:
        by_hand.kill()
        by_hand.wait()


def test_a_started_run_that_failed_before_its_directory_while_no_daemon_watched_is_failed_not_running(tmp_path,
                                                                                                      daemons):
    """The daemon stopped while a run it started still built its spec; the build then raised. Nobody settled the
    job, and `runs list` said `running` (README: running while its kernel is alive) until a daemon came back, and
    `runs stop` said it waited for the kernel to listen, then that the `running` run had ended. Now: failed, with
    its output's error line, as the next daemon settles it."""
    runs, gate = tmp_path / "runs", tmp_path / "go"
    target = tmp_path / "slow_fail.py"
    target.write_text(f"import os, time\n\ndef build():\n    end = time.monotonic() + 60\n"
                      f"    while not os.path.exists({str(gate)!r}) and time.monotonic() < end:\n"
                      f"        time.sleep(0.05)\n    raise RuntimeError('no data on this host')\n")
    run_id = cli("run", f"{target}:build", "--detach", "--runs-dir", str(runs), "--plugins", "").stdout.strip()
    start_daemon(daemons, runs)
    pid = wait_until(lambda: listed(runs).get(run_id, {}).get("pid"), 60, "the daemon starting the run")
    trainbus("daemon", "stop", "--runs-dir", str(runs))
    gate.touch()
    wait_until(lambda: process_gone(pid), 60, "the run's process failing")
    row = listed(runs, through_cli=True)[run_id]
    assert row["status"] == "failed", row
    assert "no data on this host" in row["error"] and "while no daemon watched it" in row["error"], row
    stop = cli("runs", "stop", run_id, "--runs-dir", str(runs), check=False)
    assert stop.returncode == 1, stop
    assert stop.stderr.count("\n") == 1, stop.stderr
    assert stop.stderr.startswith(f"error: run {run_id} has already ended (failed: "), stop.stderr


def test_a_queued_resume_is_listed_and_shown_as_queued_with_how_the_run_last_ended(tmp_path):
    """Its directory says died (its kernel.pid is dead, no summary.json); the queue says it is going to run again."""
    runs = tmp_path / "runs"
    (runs / "d").mkdir(parents=True)
    (runs / "d" / "config.json").write_text(json.dumps({"target": "demo"}) + "\n")
    (runs / "d" / "kernel.pid").write_text("999999\n")
    with Registry(runs) as registry:
        registry.submit({"id": "d", "state": "queued", "submitted_ts": 1.0, "argv": ["--resume", "d"],
                         "cwd": str(tmp_path), "gpus": None, "submitted_by": "ann"},
                        {"id": "d", "dir": str((runs / "d").resolve()), "status": "running"}, 1.0)
    [row] = list_runs(runs)
    assert row["status"] == "queued" and row["detail"].startswith("queued to be resumed by ann; last died ("), row
    shown = cli("runs", "show", "d", "--runs-dir", str(runs)).stdout
    assert shown.startswith("run d: queued (queued to be resumed by ann; last died (kernel pid 999999"), shown
    assert json.loads(cli("runs", "show", "d", "--runs-dir", str(runs), "--json").stdout)["status"] == "queued"
    listed = cli("runs", "list", "--runs-dir", str(runs)).stdout
    assert "queued to be resumed by ann; last died" in " ".join(listed.split()), listed  # the table's words wrap
    with Registry(runs) as registry:
        assert registry.move_job("d", ["queued"], state="cancelled")
    assert [r["status"] for r in list_runs(runs)] == ["died"]
    assert cli("runs", "show", "d", "--runs-dir", str(runs)).stdout.startswith("run d: died")


def test_a_resume_the_daemon_is_starting_is_running_not_the_died_its_directory_still_tells(tmp_path):
    """From the daemon starting the resume until its kernel rewrote kernel.pid (its spec built: seconds), `runs
    list` and `runs show` said died (the last session's kernel.pid is dead): running, by the daemon's process."""
    import psutil

    runs = tmp_path / "runs"
    (runs / "d").mkdir(parents=True)
    (runs / "d" / "config.json").write_text(json.dumps({"target": "demo"}) + "\n")
    (runs / "d" / "kernel.pid").write_text("999999\n")
    starting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the resumed kernel
    try:
        with Registry(runs) as registry:
            registry.submit({"id": "d", "state": "queued", "submitted_ts": 1.0, "argv": ["--resume", "d"],
                             "cwd": str(tmp_path), "gpus": None, "submitted_by": "ann"},
                            {"id": "d", "dir": str((runs / "d").resolve()), "status": "running"}, 1.0)
            assert registry.move_job("d", ["queued"], state="running", pid=starting.pid, started_ts=time.time(),
                                     pid_started=psutil.Process(starting.pid).create_time())
        [row] = list_runs(runs)
        said = f"resumed by the daemon (pid {starting.pid}); its kernel is starting; last died (kernel pid 999999"
        assert row["status"] == "running" and row["detail"].startswith(said), row
        shown = cli("runs", "show", "d", "--runs-dir", str(runs)).stdout
        assert shown.startswith(f"run d: running ({said}"), shown
    finally:
        starting.kill()
        starting.wait()
    assert [r["status"] for r in list_runs(runs)] == ["died"]  # its process gone: the directory tells again
    assert cli("runs", "show", "d", "--runs-dir", str(runs)).stdout.startswith("run d: died")


# -- the daemon process -------------------------------------------------------------------------------------

cli = trainbus


def submit(runs: Path, target: str = PACED, *extra: str) -> str:
    plugins = [] if "--plugins" in extra else ["--plugins", ""]  # an option given twice is refused
    done = cli("run", target, "--detach", "--runs-dir", str(runs), *plugins, "--device", "cpu",
               "--set", "batch_size=256", *extra)
    return done.stdout.strip()


def listed(runs: Path, through_cli: bool = False) -> dict[str, dict]:
    """The runs as `trainbus runs list --json` shows them; polled in this process (a CLI start costs a second)."""
    if through_cli:
        return {run["id"]: run for run in json.loads(cli("runs", "list", "--runs-dir", str(runs), "--json").stdout)}
    return {run["id"]: run for run in json.loads(json.dumps(list_runs(runs), default=str))}


def test_the_next_queued_run_starts_as_the_one_before_it_ends_not_at_the_next_round(tmp_path, daemons):
    """The daemon looked at its runs once a round (TICK_S, 1 s): each run of a queue started up to a round after the
    one before it ended, a sweep of short runs losing a second a run. A run the daemon started is its child, whose
    end (SIGCHLD) now wakes it. Here a round is a minute: the second run must not wait for one."""
    runs = tmp_path / "runs"
    first = submit(runs, PACED, "--epochs", "1", "--set", "step_sleep_s=0")
    second = submit(runs, PACED, "--epochs", "1", "--set", "step_sleep_s=0")
    daemon = Command("daemon", "start", "--foreground", "--runs-dir", str(runs),
                     constants={"trainbus.kernel.daemon_serve.TICK_S": 60.0})
    daemons.append(runs)
    try:
        wait_until(lambda: listed(runs)[first]["status"] not in ("queued", "starting", "running"), 120,
                   "the first run to end")
        ended = time.monotonic()
        wait_until(lambda: listed(runs)[second]["status"] != "queued", 30, "the second run to start")
        assert time.monotonic() - ended < 30
        wait_until(lambda: listed(runs)[second]["status"] == "completed", 120, "the second run to end")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(60)


def test_the_queue_outlives_a_killed_daemon_and_a_running_run_outlives_it(tmp_path, daemons):
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    first_pid = start_daemon(daemons, runs)
    # one epoch each (6 steps): the gate holds the second where the test acts, and all three must complete
    first = submit(runs, PACED, "--epochs", "1")
    second = submit(runs, PACED, "--epochs", "1", "--set", f"gate={gate}", "--set", "step_sleep_s=0")
    third = submit(runs, PACED, "--epochs", "1", "--set", "lr=0.002")
    assert listed(runs)[third]["status"] == "queued"

    journal = JournalTail(runs / second / JOURNAL_NAME)
    open_gate(gate, 2)
    wait_until(lambda: (runs / second / JOURNAL_NAME).exists() and journal.step() >= 2, WAIT_S,
               "the second run at its gate")
    kernel = int((runs / second / "kernel.pid").read_text())
    os.kill(first_pid, signal.SIGKILL)  # the daemon, during the second run
    wait_until(lambda: process_gone(first_pid), 30, "the daemon gone")
    open_gate(gate, 4)
    wait_until(lambda: journal.step() >= 4, WAIT_S, "the second run training on without a daemon")
    assert not process_gone(kernel), "killing the daemon stopped the run it had started"
    status = cli("daemon", "status", "--runs-dir", str(runs), check=False)  # what trains while no daemon watches
    assert status.returncode == 3 and (f"  running {second} (pid {kernel}), started by a daemon that is gone: "
                                       f"`trainbus daemon start --runs-dir {runs}` watches it again"
                                       ) in status.stdout, status.stdout

    start_daemon(daemons, runs)  # adopts the second (still held at its gate), then starts the third after it
    log = daemon_dir(runs) / "daemon.log"
    wait_until(lambda: f"{second}: still running (pid {kernel}); adopted" in log.read_text(), 30, "the adoption")
    open_gate(gate, 10_000)
    wait_until(lambda: listed(runs)[third]["status"] == "completed", WAIT_S, "the third run completed")
    found = listed(runs, through_cli=True)
    assert [found[i]["status"] for i in (first, second, third)] == ["completed"] * 3
    starts = [e for e in JournalTail(runs / second / JOURNAL_NAME).poll() if e.type == ev.START_TRAINING_SESSION]
    assert len(starts) == 1, "the second run was started again instead of adopted"
    assert found[third]["started_ts"] >= found[second]["ended_ts"] - 1.0, "two runs trained at once (max 1)"


def test_a_run_submitted_with_max_resumes_is_continued_by_the_daemon_when_its_kernel_dies_as_often_as_it_says(
        tmp_path, daemons):
    """`run --detach --max-resumes 1`: its kernel killed (kill -9: the OOM killer, a reboot) once it has a checkpoint,
    the daemon queues its resume by itself and starts it; killed again, with no resume left, it stays died, with
    the command that continues it in the log."""
    runs = tmp_path / "runs"
    runs.mkdir()
    start_daemon(daemons, runs)
    run_id = submit(runs, PACED, "--plugins", "checkpoint", "--set", "step_sleep_s=0.2", "--max-resumes", "1")
    run_dir = runs / run_id
    with Registry(runs) as registry:
        assert [job["resumes_left"] for job in registry.jobs()] == [1]
        assert "--max-resumes" not in registry.jobs()[0]["argv"]

    def kernel_with_a_checkpoint(sessions: int) -> int:
        """The pid of the run's kernel once the journal holds `sessions` starts and the run has a checkpoint."""
        def ready() -> bool:
            starts = [e for e in JournalTail(run_dir / JOURNAL_NAME).poll() if e.type == ev.START_TRAINING_SESSION]
            return len(starts) == sessions and has_checkpoints(run_dir)
        wait_until(lambda: (run_dir / JOURNAL_NAME).exists() and ready(), WAIT_S, f"session {sessions} checkpointed")
        return int((run_dir / "kernel.pid").read_text())

    first = kernel_with_a_checkpoint(1)
    status = cli("daemon", "status", "--runs-dir", str(runs)).stdout
    assert f"running {run_id} (pid {first}), resumed if it dies (--max-resumes: 1 left)" in status, status
    os.kill(first, signal.SIGKILL)
    second = kernel_with_a_checkpoint(2)  # resumed in place, by the daemon alone
    assert second != first
    log = daemon_dir(runs) / "daemon.log"
    assert f"{run_id}: run died; resumed from its newest checkpoint (--max-resumes: 0 left after this)" \
        in log.read_text(), log.read_text()
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: "continues it from its newest checkpoint" in log.read_text(), WAIT_S, "the second death")
    time.sleep(3)  # three of the daemon's rounds: no resume is queued
    assert listed(runs)[run_id]["status"] == "died"
    starts = [e for e in JournalTail(run_dir / JOURNAL_NAME).poll() if e.type == ev.START_TRAINING_SESSION]
    assert len(starts) == 2
    with Registry(runs) as registry:
        [job] = registry.jobs()
    assert job["state"] == "ended" and job["env"] is None  # the environment kept for a resume is gone with it


@pytest.fixture(scope="module")
def power_cut(tmp_path_factory):
    """A --max-resumes 1 run with a checkpoint, killed (kill -9) at once with the daemon that started it, as a power
    cut leaves them; its next session's build() will wait for `build_gate`. What `daemon status` said then, with no
    daemon (one checkpointed session for the two tests: the test of its status reads what was said then, the test of
    `runs stop` starts the next daemon, which resumes the run, and is the only one to act on it)."""
    runs = tmp_path_factory.mktemp("power_cut") / "runs"
    build_gate, gate = runs.parent / "build_gate", runs.parent / "gate"
    runs.mkdir()
    with child_path_with_tests():
        pid = start_daemon([], runs)
        try:
            open_gate(build_gate, 1)
            open_gate(gate, 10_000)
            run_id = submit(runs, SLOW_BUILD, "--set", f"build_gate={build_gate}", "--set", f"gate={gate}",
                            "--plugins", "checkpoint", "--set", "step_sleep_s=0.2", "--max-resumes", "1")
            run_dir = runs / run_id
            wait_until(lambda: has_checkpoints(run_dir) and (run_dir / "kernel.pid").is_file(), WAIT_S,
                       "a checkpoint")
        except BaseException:  # the daemon is killed below, once the run has what the tests need
            trainbus("daemon", "stop", "--runs-dir", str(runs), check=False)
            raise
        open_gate(build_gate, 0)  # the resume's build() waits
        waiting = build_gate.with_name("build_gate.waiting")
        waiting.unlink()
        kernel = int((run_dir / "kernel.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        os.kill(kernel, signal.SIGKILL)
        wait_until(lambda: process_gone(pid) and process_gone(kernel), 30, "the daemon and the kernel gone")
        status = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    return {"runs": runs, "run": run_id, "status": status, "build_gate": build_gate, "waiting": waiting}


def test_with_no_daemon_status_says_a_gone_run_with_resumes_left_is_resumed_by_the_next_daemon(power_cut):
    """A power cut: the daemon and its --max-resumes run killed at once. `daemon status` said the next daemon would
    record the run as ended, when it resumes it from its checkpoint (an operator deciding whether to resume it by
    hand, or to delete it, was told the wrong thing)."""
    runs, run_id, status = power_cut["runs"], power_cut["run"], power_cut["status"]
    assert status.returncode == 3 and (
        f"  gone {run_id}: started by a daemon that is gone, and its kernel is gone too (`trainbus runs show {run_id} "
        f"--runs-dir {runs}` says how it ended; `trainbus daemon start --runs-dir {runs}` resumes it from its newest "
        f"checkpoint (--max-resumes: 1 left))") in status.stdout, status.stdout


def test_runs_stop_of_a_run_the_daemon_is_resuming_waits_for_its_kernel_and_stops_it(power_cut, daemons):
    """--max-resumes: its kernel killed (here with its daemon, a power cut), the daemon resumes the run, whose new
    kernel builds the spec first (loading data). `runs stop` meanwhile read the directory, which still says died:
    'already ended, nothing to stop', exit 1, and the resume trained on (a remote `daemon cancel` was told it was
    stopping)."""
    runs, run_id, build_gate, waiting = (power_cut[key] for key in ("runs", "run", "build_gate", "waiting"))
    start_daemon(daemons, runs)  # it settles the run as died and resumes it, as status said it would
    wait_until(waiting.exists, WAIT_S, "the daemon's resume in its build()")
    stopping = subprocess.Popen([*trainbus_cmd(), "runs", "stop", run_id, "--runs-dir", str(runs)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([stopping.stderr], [], [], WAIT_S)[0], "no word from `runs stop`"
        said = stopping.stderr.readline()
        assert f"run {run_id} is being resumed by the daemon" in said, said + stopping.stderr.read()
        open_gate(build_gate, 1)
        out, err = stopping.communicate(timeout=WAIT_S)
    finally:
        stopping.kill()
    assert stopping.returncode == 0, err
    wait_until(lambda: listed(runs)[run_id]["status"] not in ("running", "queued"), WAIT_S, "the resumed run's end")
    assert listed(runs)[run_id]["status"] == "stopped"


def test_each_resume_the_daemon_queues_continues_the_run_with_the_command_it_was_submitted_with(tmp_path):
    """--max-resumes 3: each resume queued the previous one's command with `--resume RUN --runs-dir DIR` added
    again, so a run resumed N times was started with N copies of them (4,000 words at --max-resumes 1000)."""
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    argv = [TINY, "--epochs", "3"]
    with Registry(runs) as registry:
        registry.submit({"id": "r", "state": "queued", "submitted_ts": 1.0, "argv": argv, "cwd": str(tmp_path),
                         "gpus": None, "resumes_left": 3}, {"id": "r", "dir": None, "status": "queued"}, 1.0)
        daemon = Daemon(runs, [])
        for left in (2, 1):
            assert registry.move_job("r", ["queued"], state="running", pid=2 ** 22 + 1, pid_started=1.0)
            [job] = registry.jobs(["running"])
            daemon._resume_dead(registry, "r", job, "run died", 2.0)
            [job] = registry.jobs(["queued"])
            assert job["resumes_left"] == left
            assert job["argv"] == [*argv, "--resume", "r", "--runs-dir", str(runs.resolve())]


def test_a_resume_the_daemon_queues_keeps_its_runs_place_before_the_runs_submitted_after_it(tmp_path):
    """A power cut killed the daemon and its --max-resumes run; the next daemon queued the run's resume behind every
    run submitted after it (its submission time made the moment of the resume), so a queue of a night's runs went
    first and the run that was training waited for all of them."""
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    with Registry(runs) as registry:
        registry.submit({"id": "r", "state": "running", "submitted_ts": 1.0, "argv": [TINY], "cwd": str(tmp_path),
                         "gpus": None, "resumes_left": 2, "pid": 2 ** 22 + 1, "pid_started": 1.0},
                        {"id": "r", "dir": None, "status": "running"}, 1.0)
        registry.submit({"id": "later", "state": "queued", "submitted_ts": 5.0, "argv": [TINY], "cwd": str(tmp_path),
                         "gpus": None}, {"id": "later", "dir": None, "status": "queued"}, 5.0)
        [job] = registry.jobs(["running"])
        Daemon(runs, [])._resume_dead(registry, "r", job, "run died", 10.0)
        assert registry.job_ids(["queued"]) == ["r", "later"]


def resumed_by_the_daemon(runs: Path, argv: list[str]) -> dict:
    """The job the daemon queues to resume run `r` (submitted with `argv`, 2 resumes left) when its kernel died."""
    (runs / "r").mkdir(parents=True)
    with Registry(runs) as registry:
        registry.submit({"id": "r", "state": "running", "submitted_ts": 1.0, "argv": argv, "cwd": str(runs.parent),
                         "gpus": None, "resumes_left": 2, "pid": 2 ** 22 + 1, "pid_started": 1.0},
                        {"id": "r", "dir": None, "status": "running"}, 1.0)
        [job] = registry.jobs(["running"])
        Daemon(runs, [])._resume_dead(registry, "r", job, "run died", 2.0)
        [job] = registry.jobs(["queued"])
    return job


def test_a_resume_the_daemon_queues_for_a_command_that_named_its_own_resume_gives_it_once(tmp_path):
    """`runs resume RUN --detach --max-resumes 2` queues `run --resume /path/RUN ...`, `run --resume ckpt.pt` starts a
    new run from a file: the daemon's resume added a second --resume, which `trainbus run` refuses (an option given
    twice with two values), so the resumed run failed at once."""
    runs = tmp_path / "runs"
    job = resumed_by_the_daemon(runs, ["--resume", str(tmp_path / "runs" / "r"), "--epochs", "3", "--resume=ckpt.pt"])
    assert job["argv"] == ["--epochs", "3", "--resume", "r", "--runs-dir", str(runs.resolve())]


@pytest.mark.parametrize("config", [["-c", "run.toml"], ["--config", "run.toml"], ["--config=run.toml"],
                                    ["-crun.toml"]])
def test_a_resume_the_daemon_queues_for_a_run_submitted_with_a_config_file_continues_it_in_place(tmp_path, config):
    """`run -c run.toml --detach --max-resumes 1`, its kernel killed: the daemon queued `run -c run.toml --resume RUN`,
    which `trainbus run` reads as a new run from RUN's checkpoint (README: `--resume` with `--config`), under RUN's own
    id: it failed at once (`cannot create RUNS/RUN (File exists)`) and the run stayed died, its resumes spent. The
    continued run takes its config from its own config.json, so the file is left out."""
    runs = tmp_path / "runs"
    job = resumed_by_the_daemon(runs, [TINY, *config, "--epochs", "3"])
    assert job["argv"] == [TINY, "--epochs", "3", "--resume", "r", "--runs-dir", str(runs.resolve())]


def test_a_run_of_nproc_whose_launcher_is_killed_is_settled_as_its_ranks_end_it_and_resumed(tmp_path, daemons):
    """`run --nproc 2 --detach --max-resumes 1`, its launcher (the pid `daemon status` shows) killed with SIGKILL: its
    ranks end the run interrupted a moment later (PR_SET_PDEATHSIG). The daemon settled the job as the launcher went,
    while rank 0's kernel still wrote its summary: 'run running', and the run was never resumed."""
    runs = tmp_path / "runs"
    runs.mkdir()
    start_daemon(daemons, runs)
    # 40 epochs of 23 steps a rank, 50 ms a step: ~46 s of training, most of it left when the launcher is killed
    run_id = submit(runs, PACED, "--nproc", "2", "--epochs", "40", "--plugins", "checkpoint", "--set",
                    "step_sleep_s=0.05", "--max-resumes", "1")
    run_dir = runs / run_id
    journal = run_dir / JOURNAL_NAME

    def starts() -> int:
        return sum(e.type == ev.START_TRAINING_SESSION for e in JournalTail(journal).poll())

    wait_until(lambda: journal.exists() and starts() == 1 and has_checkpoints(run_dir), WAIT_S,
               "a checkpoint of the first session")
    with Registry(runs) as registry:
        [job] = registry.jobs(["running"])
    os.kill(job["pid"], signal.SIGKILL)  # the launcher alone: its ranks see it go
    log = daemon_dir(runs) / "daemon.log"
    wait_until(lambda: "resumed from its newest checkpoint" in log.read_text() or "run running" in log.read_text(),
               60, "the daemon to settle the job")
    assert f"{run_id}: run interrupted; resumed from its newest checkpoint" in log.read_text(), log.read_text()
    wait_until(lambda: starts() == 2, WAIT_S, "the resumed session")
    cli("runs", "stop", run_id, "--runs-dir", str(runs))  # the test's to end; a stopped run is not resumed
    wait_until(lambda: listed(runs)[run_id]["status"] == "stopped", WAIT_S, "the resumed run to stop")


def test_with_no_daemon_status_names_a_run_whose_daemon_and_kernel_are_both_gone(tmp_path):
    """What a daemon killed with its runs leaves in the registry: a job `running` under a pid that is gone. Status
    listed the live ones ("started by a daemon that is gone") and left this one out, as if it never was."""
    from trainbus.kernel import daemon_queue

    runs = tmp_path / "runs"
    runs.mkdir()
    daemon_queue.submit(runs, "20260101-000000-abcdef", [], None, None, {}, None, wake=False)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # its pid: a kernel that is gone
    with Registry(runs) as registry:
        registry.move_job("20260101-000000-abcdef", ["queued"], state="running", pid=ended.pid,
                          pid_started=time.time() - 5)
    status = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert status.returncode == 3, status
    assert ("  gone 20260101-000000-abcdef: started by a daemon that is gone, and its kernel is gone too (`trainbus "
            f"runs show 20260101-000000-abcdef --runs-dir {runs}` says how it ended; `trainbus daemon start --runs-dir "
            f"{runs}` records it as ended)") in status.stdout, status.stdout
    as_json = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json", check=False).stdout)
    assert as_json["unwatched"] == {} and as_json["unwatched_gone"] == ["20260101-000000-abcdef"], as_json


def test_two_runs_asking_for_a_gpu_each_run_at_once_on_two_devices_and_a_third_waits(tmp_path, daemons):
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    start_daemon(daemons, runs, "--gpus", "0,1", "--max-concurrent", "3")
    # more GPUs than the daemon has: said at submission, nothing queued (it would fail as the daemon took it)
    greedy = cli("run", DEVICES, "--detach", "--gpus", "3", "--runs-dir", str(runs), "--plugins", "", check=False)
    assert greedy.returncode == 2 and greedy.stderr == ("error: --gpus 3: the run asks for 3 GPUs and the daemon has 2 "
                                                        "(0,1); start the daemon with --gpus listing them\n"), greedy
    assert listed(runs) == {}
    ids = [submit(runs, DEVICES, "--gpus", "1", "--epochs", "1", "--set", f"gate={gate}", "--set", "step_sleep_s=0")
           for _ in range(3)]  # one epoch each: the gate holds the first two while the test looks
    for run_id in ids[:2]:
        wait_until(lambda: (runs / run_id / "devices.txt").exists(), WAIT_S, f"{run_id} training")
    seen = sorted((runs / run_id / "devices.txt").read_text() for run_id in ids[:2])
    assert seen == ["0", "1"]
    status = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)
    assert sorted(status["running"]) == sorted(ids[:2]) and status["queued"] == [ids[2]]
    assert listed(runs, through_cli=True)[ids[2]]["status"] == "queued"

    open_gate(gate, 10_000)
    wait_until(lambda: all(r["status"] == "completed" for r in listed(runs).values()), WAIT_S, "all three done")
    assert (runs / ids[2] / "devices.txt").read_text() in ("0", "1")


def test_one_daemon_per_runs_directory_and_a_run_that_fails_before_it_has_a_directory(tmp_path, daemons):
    runs = tmp_path / "runs"
    runs.mkdir()
    pid = start_daemon(daemons, runs)
    again = cli("daemon", "start", "--runs-dir", str(runs), check=False)
    assert again.returncode == 2 and again.stderr == (
        f"error: a daemon (pid {pid}) already serves {runs}; `trainbus daemon status --runs-dir {runs}` shows it\n")
    assert "already serves" not in (daemon_dir(runs) / "daemon.log").read_text()  # refused before it spawned

    failing = submit(runs, UNBUILDABLE)
    wait_until(lambda: listed(runs)[failing]["status"] == "failed", WAIT_S, "the failing run settled")
    run = listed(runs)[failing]
    assert run["dir"] is None and "ended before its run had a directory" in run["error"]
    assert "no data at /nowhere" in run["error"]  # the target's own error line, from the run's output
    shown = cli("runs", "show", failing, "--runs-dir", str(runs)).stdout
    assert f"run {failing}: failed" in shown and f"output: {daemon_dir(runs) / 'output' / failing}.log" in shown
    plotted = cli("runs", "plot", failing, "--runs-dir", str(runs), check=False)  # it will never have one ("yet")
    assert f"error: run {failing} is failed and has no run directory (it ended before its kernel made one)" \
        in plotted.stderr, plotted.stderr
    output = daemon_dir(runs) / "output" / f"{failing}.log"
    deleted = cli("runs", "delete", failing, "--yes", "--runs-dir", str(runs)).stdout
    assert f"deleted run {failing} (it never had a directory; its output {output})" in deleted
    assert failing not in listed(runs) and not output.exists()
    ended = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)["ended"]
    assert {job["run"]: job["status"] for job in ended}[failing] == "deleted"  # not a bare "ended"

    # a run the daemon started whose kernel is still in build() (loading data): no directory yet, and stoppable
    build_gate = tmp_path / "build_gate"
    held = submit(runs, SLOW_BUILD, "--set", f"build_gate={build_gate}", "--set", f"gate={tmp_path / 'gate'}")
    wait_until(lambda: listed(runs)[held]["status"] == "running", WAIT_S, "the held run started")
    assert not (runs / held).exists()
    refused = cli("daemon", "cancel", held[:-2], "--runs-dir", str(runs), check=False)  # here a running run is stopped
    assert refused.returncode == 2 and refused.stderr == (
        f"error: run {held} is not queued: it is running; `trainbus runs stop {held} --runs-dir {runs}` stops it\n"
    ), refused.stderr
    assert cli("runs", "show", held, "--runs-dir", str(runs)).stdout.startswith(f"run {held}: running")  # not queued
    # Ctrl-C while `runs stop` waits for it to listen: said that no stop went in (it exited 130 saying nothing)
    waiting = subprocess.Popen([*trainbus_cmd(), "runs", "stop", held, "--runs-dir", str(runs)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=sigint_as_from_a_terminal)
    try:
        assert select.select([waiting.stderr], [], [], WAIT_S)[0], "no word from `runs stop`"
        assert f"run {held} is starting" in waiting.stderr.readline()
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=WAIT_S)
    finally:
        waiting.kill()
    assert (waiting.returncode, out, err) == (130, "", f"trainbus: Ctrl-C: no stop was sent; run {held} goes on\n")
    stopping = subprocess.Popen([*trainbus_cmd(), "runs", "stop", held, "--runs-dir", str(runs), "--reason", "early"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([stopping.stderr], [], [], WAIT_S)[0], "no word from `runs stop`"
        assert f"run {held} is starting" in stopping.stderr.readline()
        open_gate(build_gate, 1)
        open_gate(tmp_path / "gate", 3)
        out, err = stopping.communicate(timeout=WAIT_S)
    finally:
        stopping.kill()
    assert stopping.returncode == 0, err
    open_gate(tmp_path / "gate", 10_000)
    wait_until(lambda: listed(runs)[held]["status"] != "running", WAIT_S, "the held run ended")
    assert listed(runs)[held]["status"] == "stopped"
    assert [reason.partition(": ")[2] for reason in listed(runs)[held]["stop_reasons"]] == ["stop: early"]

    # killed (an OOM killer, kill -9) while still in build(): died, as a kernel killed later is (it said failed)
    killed_gate = tmp_path / "killed_gate"
    killed = submit(runs, SLOW_BUILD, "--set", f"build_gate={killed_gate}")
    wait_until(lambda: killed_gate.with_name("killed_gate.waiting").exists(), WAIT_S, "the run in its build()")
    with Registry(runs) as registry:
        [pid] = [job["pid"] for job in registry.jobs(["running"]) if job["id"] == killed]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: listed(runs)[killed]["status"] != "running", WAIT_S, "the killed run settled")
    run = listed(runs)[killed]
    assert run["status"] == "died" and "ended before its run had a directory (killed by SIGKILL)" in run["error"]

    stopped = cli("daemon", "stop", "--runs-dir", str(runs))
    assert "daemon stopped" in stopped.stdout
    assert cli("daemon", "status", "--runs-dir", str(runs), check=False).returncode == 3
    # nothing left that looks like a daemon listening (libzmq leaves an ipc socket's file behind as it closes)
    assert not {"endpoint", "control.sock"} & {path.name for path in daemon_dir(runs).iterdir()}

    waiting = submit(runs, UNBUILDABLE)  # no daemon: it waits in the queue, and can be taken off it
    assert "no daemon serves" in cli("daemon", "status", "--runs-dir", str(runs), check=False).stdout
    assert listed(runs)[waiting]["status"] == "queued"
    refused = cli("runs", "delete", waiting, "--yes", "--runs-dir", str(runs), check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == (f"error: run {waiting} is queued for the daemon; "
                                                                 f"take it off the queue first with "
                                                                 f"`trainbus runs stop {waiting} --runs-dir {runs}`")
    stopped = cli("runs", "stop", waiting[:-2], "--runs-dir", str(runs)).stdout
    assert f"cancelled {waiting}: it was queued and never started" in stopped
    assert listed(runs)[waiting]["status"] == "cancelled"
    # each said "not queued (it started, ended or was never submitted)", whichever it was
    again = cli("daemon", "cancel", waiting, "--runs-dir", str(runs), check=False)
    assert again.returncode == 2 and f"run {waiting} is not queued: it was cancelled already (" in again.stderr, \
        again.stderr
    never = cli("daemon", "cancel", "no-such-run", "--runs-dir", str(runs), check=False)
    assert never.returncode == 2 and "run no-such-run is not queued: the daemon's queue never held a run of that id" \
        in never.stderr, never.stderr


_WINNER = """
import fcntl, os, sys, time
from pathlib import Path
directory = Path(sys.argv[1])
fd = os.open(directory / "daemon.pid", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
for n in range(12000):  # at most a minute: the test kills it sooner
    with open(directory / "daemon.log", "a") as log:
        log.write(f"INFO line {n} of the daemon that holds the lock\\n")
    time.sleep(0.005)
"""


def test_a_daemon_start_that_loses_the_lock_to_one_started_at_once_says_which_serves_and_leaves_its_log(tmp_path):
    # two `daemon start` at the same instant: the loser is past the "does one answer?" check before the winner
    # answers; it refused, but the winner went on writing to the shared log, and its last line was taken for
    # the loser's reason ("the daemon exited at start: INFO ... serving ...")
    runs = tmp_path / "runs"
    runs.mkdir()
    directory = daemon_dir(runs)
    directory.mkdir(mode=0o700)
    winner = subprocess.Popen([sys.executable, "-c", _WINNER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert winner.stdout.readline() == "locked\n"
        refused = one_error_line(cli("daemon", "start", "--runs-dir", str(runs), "--gpus", "", check=False))
    finally:
        winner.kill()
        winner.wait()
    assert refused == (f"error: a daemon (pid {winner.pid}) already serves {runs}; "
                       f"`trainbus daemon status --runs-dir {runs}` shows it")
    # and said only there: the refusal went into the winner's log too, a line without its time among its own
    assert "already serves" not in (directory / "daemon.log").read_text()
    assert [p.name for p in directory.iterdir() if p.name.startswith("start-")] == []


def test_daemon_status_with_its_registry_garbled_says_the_daemon_serves_and_how_to_rebuild_the_queue(tmp_path,
                                                                                                     daemons):
    # the status request read the registry first: a garbled one made the daemon's answer an error, and `daemon
    # status` a KeyError traceback, just when the operator most needed to know whether a daemon serves
    runs = tmp_path / "runs"
    runs.mkdir()
    pid = start_daemon(daemons, runs, "--gpus", "")
    for name in ("registry.sqlite-wal", "registry.sqlite-shm"):
        (runs / name).unlink(missing_ok=True)
    (runs / "registry.sqlite").write_bytes(b"not a database, garbled by hand " * 8)
    shown = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert shown.stdout.startswith(f"daemon pid {pid} serves {runs}")
    assert "  queued: unknown: " in shown.stdout and f"trainbus runs reindex --runs-dir {runs}" in shown.stdout
    answer = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)
    assert answer["serving"] and answer["pid"] == pid and "is not a run registry" in answer["registry_error"]


def test_daemon_status_on_a_full_disk_names_the_registry_and_the_fix_as_with_no_daemon(tmp_path, mount_tmpfs, daemons):
    # with a daemon serving, a registry SQLite could not open on a full disk was said as "queued: unknown: disk I/O
    # error", naming neither the file nor the fix that `daemon status` gives when no daemon serves
    runs = mount_tmpfs("runs", 4 << 20)
    start_daemon(daemons, runs, "--gpus", "")
    submit(runs, TINY)
    fill(runs)
    for name in ("registry.sqlite-wal", "registry.sqlite-shm"):  # as after a checkpoint: SQLite must write to open
        (runs / name).unlink(missing_ok=True)
    shown = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("  queued: unknown: ")]
    assert f"{runs / 'registry.sqlite'} cannot be read (" in line and "free space there" in line, shown.stdout


def test_queued_runs_wait_while_the_disk_of_their_output_files_is_full_and_start_once_it_is_not(tmp_path, mount_tmpfs,
                                                                                                 daemons):
    # mount_tmpfs before daemons: fixtures end in reverse, so the daemon is stopped before its directory is unmounted
    # a kernel the daemon started with its output file on a full disk failed at its first stderr line (ENOSPC):
    # the run was lost to a full log disk, its error "OSError: [Errno 28]" naming no file
    runs = tmp_path / "runs"
    runs.mkdir()
    mount_tmpfs("runs/.daemon", 2 << 20)
    start_daemon(daemons, runs, "--gpus", "")
    filler = fill(daemon_dir(runs))
    run = submit(runs, TINY)

    def status() -> dict:
        return json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)

    held = wait_until(lambda: status()["trouble"], WAIT_S, "the daemon said why the queue waits", poll_s=0.5)
    assert "queued runs wait:" in held and "free space there and they start" in held
    assert listed(runs)[run]["status"] == "queued"
    filler.unlink()
    wait_until(lambda: listed(runs)[run]["status"] == "completed", WAIT_S, "the run started and completed")
    assert status()["trouble"] == ""


def test_a_daemon_that_holds_its_runs_dir_but_does_not_answer_is_said_alive_not_gone(tmp_path, daemons):
    """A daemon stuck (stopped, swapping, a round blocked) holds its lock but answers nothing: `daemon status` said
    `no daemon serves DIR` (exit 3, `daemon start` starts it) while `daemon start` said one (pid N) serves it, and
    `daemon stop` said none served and exited 0, the daemon still there."""
    runs = tmp_path / "runs"
    runs.mkdir()
    pid = start_daemon(daemons, runs)

    def impatient(*args: str) -> subprocess.CompletedProcess:
        """`trainbus ARGS` waiting 1 s for the daemon's answer, not REQUEST_TIMEOUT_S (3 s, three times over): the
        stopped daemon never answers, and what is said of it does not hang on how long the wait was."""
        command = Command(*args, constants={"trainbus.kernel.daemon_client.REQUEST_TIMEOUT_S": 1.0})
        try:
            out, err = command.communicate(WAIT_S)
        finally:
            command.kill()
        return subprocess.CompletedProcess(command.args, command.returncode, out, err)

    os.kill(pid, signal.SIGSTOP)
    try:
        status = impatient("daemon", "status", "--runs-dir", str(runs))
        assert status.returncode == 1, (status.stdout, status.stderr)
        assert status.stdout.startswith(f"daemon pid {pid} holds {runs} but did not answer"), status.stdout
        as_json = json.loads(impatient("daemon", "status", "--runs-dir", str(runs), "--json").stdout)
        assert as_json["serving"] is True and as_json["answering"] is False and as_json["pid"] == pid, as_json
        stop = impatient("daemon", "stop", "--runs-dir", str(runs))
        assert stop.returncode == 2 and stop.stderr.startswith(f"error: daemon pid {pid} holds {runs} but did not "
                                                               f"answer"), (stop.stdout, stop.stderr)
        assert f"`kill {pid}`" in stop.stderr, stop.stderr
        # a run queued meanwhile was told to `daemon start` one, which would say that one serves the directory
        queued = impatient("run", "--detach", "--epochs", "1", "--runs-dir", str(runs))
        assert queued.returncode == 0, (queued.stdout, queued.stderr)
        run_id = queued.stdout.strip()
        assert queued.stderr.startswith(f"trainbus: queued run {run_id}; daemon pid {pid} holds {runs} but did not "
                                        f"answer"), queued.stderr
        assert "it starts the run once it answers" in queued.stderr, queued.stderr
        cli("daemon", "cancel", run_id, "--runs-dir", str(runs))  # the registry, not the daemon: it still sleeps
    finally:
        os.kill(pid, signal.SIGCONT)
    assert cli("daemon", "status", "--runs-dir", str(runs)).stdout.startswith(f"daemon pid {pid} serves")


def test_a_killed_daemons_endpoint_is_not_asked_for_an_answer_no_process_can_give(tmp_path, daemons):
    """kill -9 of the daemon (the OOM killer, a crash) leaves its endpoint file: `daemon status` and `daemon stop`
    then sent their request there and waited REQUEST_TIMEOUT_S (3 s) before saying no daemon serves, and `daemon
    start` its 0.5 s, though no process held the daemon's lock. With none holding it, none is asked."""
    from trainbus.kernel import daemon_client
    from trainbus.kernel.daemon_files import ENDPOINT_FILE

    runs = tmp_path / "runs"
    runs.mkdir()
    pid = start_daemon(daemons, runs)
    os.kill(pid, signal.SIGKILL)
    # gone, and its lock with it: its main thread is reaped first, its files (the lock) go with its last thread
    wait_until(lambda: process_gone(pid) and not daemon_client.daemon_lives(runs), 30, "the daemon gone")
    assert (daemon_dir(runs) / ENDPOINT_FILE).is_file(), "what a killed daemon leaves"
    started = time.monotonic()
    assert daemon_client.request(runs, "status", timeout_s=30) is None
    assert time.monotonic() - started < 15, "waited for an answer from a daemon that is gone"
    status = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert status.returncode == 3 and status.stdout.startswith(f"no daemon serves {runs}"), status.stdout


def test_a_daemon_killed_on_a_long_runs_path_leaves_no_socket_directory_behind_once_one_serves_again(tmp_path,
                                                                                                       daemons):
    """A runs path too long for an ipc socket has the daemon's socket in a temporary directory of its own, removed as
    it stops; one killed (kill -9, the OOM killer, a crash systemd restarts) left it in /tmp, one more each time."""
    runs = tmp_path / ("a" * 60) / ("b" * 60)
    runs.mkdir(parents=True)
    pid = start_daemon(daemons, runs)
    home = Path((daemon_dir(runs) / "endpoint").read_text().strip().removeprefix("ipc://")).parent
    assert home.name.startswith("trainbus-daemon-") and home.is_dir(), home
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), 30, "the daemon gone")
    start_daemon(daemons, runs)
    assert not home.exists(), "the killed daemon's socket directory is left"


def test_a_run_submitted_from_another_virtual_environment_runs_in_it_not_in_the_daemons(tmp_path, daemons):
    """A teammate's `run --detach` from a virtual environment of their own (a package the daemon's has not): the run
    was started with the daemon's interpreter, the submitter's PATH and VIRTUAL_ENV around it, and failed at once
    importing that package, where `trainbus run` in the same shell trained."""
    import sysconfig
    import venv

    theirs = tmp_path / "their venv"
    venv.EnvBuilder(with_pip=False).create(theirs)
    [site] = list(theirs.glob("lib/python*/site-packages"))
    (site / "ours.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    (site / "teammod.py").write_text("EPOCHS = 1\n")
    (tmp_path / "team.py").write_text("import teammod\nfrom trainbus.kernel.digits import build\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    start_daemon(daemons, runs)
    python = str(theirs / "bin" / "python")
    env = {**os.environ, "VIRTUAL_ENV": str(theirs), "PATH": f"{theirs / 'bin'}:{os.environ['PATH']}"}
    submitted = subprocess.run([python, "-m", "trainbus.kernel.cli", "run", f"{tmp_path / 'team.py'}:build",
                                "--detach", "--runs-dir", str(runs), "--plugins", "", "--device", "cpu", "--epochs",
                                "1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    wait_until(lambda: listed(runs)[run_id]["status"] not in ("queued", "running"), WAIT_S, "the run ended")
    assert listed(runs)[run_id]["status"] == "completed", listed(runs)[run_id]


def test_a_background_daemons_own_output_stays_in_its_log_as_the_log_is_rotated(tmp_path):
    """A daemon started in the background writes what is not a log line (a crash's traceback, a library's warning)
    into daemon.log through its stdout and stderr. Once the log was rotated those went on into the file renamed
    daemon.log.1, and after three rotations into a deleted one: the traceback of a daemon that died was nowhere."""
    log = tmp_path / "daemon.log"
    script = (f"import sys\nfrom pathlib import Path\nfrom trainbus.kernel import daemon_serve as d\n"
              f"d.LOG_MAX_BYTES = 2000\npath = Path({str(log)!r})\nd._output_into(path)\nd._log_to(path, False)\n"
              f"for i in range(200):\n    d.log.info('line %d %s', i, 'x' * 50)\n"
              f"print('Traceback: the daemon crashed', file=sys.stderr, flush=True)\n"
              f"print('a warning on stdout', flush=True)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert (tmp_path / "daemon.log.3").exists()  # rotated, and more than the files kept
    assert "Traceback: the daemon crashed\na warning on stdout\n" in log.read_text()


def suggested_commands(text: str) -> list[list[str]]:
    """The `trainbus ...` commands a message suggests between backticks, as a shell splits them."""
    import re
    import shlex

    return [shlex.split(command) for command in re.findall(r"`(trainbus [^`]*)`", text)]


def test_commands_suggested_about_a_runs_dir_that_is_not_dot_runs_name_it_as_a_shell_takes_it(tmp_path):
    """An operator's runs directory with a space in its path (`~/My Experiments/runs`): each command suggested with a
    --runs-dir printed the path bare (a shell split it in two), and some left --runs-dir out altogether (`daemon
    cancel` of a running run said `trainbus runs stop ID`, `daemon status` `trainbus daemon start`): copied as they
    were, they looked in ./runs and found nothing."""
    from trainbus.kernel import daemon_queue
    from trainbus.kernel.registry import JobError

    runs = tmp_path / "my runs [1]"
    runs.mkdir()
    queued = cli("run", TINY, "--detach", "--runs-dir", str(runs), "--plugins", "", "--device", "cpu")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a daemon's run whose kernel is gone, and the daemon too
    daemon_queue.submit(runs, "20260101-000000-abcdef", [], None, None, {}, None, wake=False)
    with Registry(runs) as registry:
        registry.move_job("20260101-000000-abcdef", ["queued"], state="running", pid=ended.pid,
                          pid_started=time.time() - 5)
    status = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    with pytest.raises(JobError) as not_queued:
        daemon_queue.cancel(runs, "20260101-000000-abcdef")
    assert_each_names_the_runs_dir([queued.stderr, status.stdout, str(not_queued.value)], runs, 5)


def assert_each_names_the_runs_dir(texts: list[str], runs: Path, count: int) -> None:
    """The texts suggest `count` trainbus commands, each with --runs-dir naming runs as a shell takes it."""
    commands = [command for text in texts for command in suggested_commands(text)]
    assert len(commands) == count, texts
    for command in commands:
        assert "--runs-dir" in command, command
        assert Path(command[command.index("--runs-dir") + 1]).resolve() == runs.resolve(), command


def test_the_fixes_said_of_a_queued_or_started_run_outside_dot_runs_name_its_runs_dir(tmp_path):
    """A run queued in a runs directory that is not ./runs: `run --resume` and `runs delete` of its queued resume
    said to take it off the queue with `trainbus runs stop ID`, `runs delete` of one the daemon is starting to stop
    it so, and `runs resume` of a new queued run and `daemon cancel` of a start of ended runs' ids that `trainbus
    daemon status` shows the queue: copied as they were, each looked in ./runs and found nothing there."""
    from trainbus.kernel import daemon_queue
    from trainbus.kernel.session import run_training
    from helpers import run_config

    runs = tmp_path / "my runs"
    runs.mkdir()
    assert run_training(run_config(runs, target=TINY), run_id="a-queued").status == "completed"
    daemon_queue.submit(runs, "a-queued", ["a-queued"], None, None, {}, resumes=runs / "a-queued", wake=False)
    where = ("--runs-dir", str(runs))
    texts = [cli("run", "--resume", "a-queued", "--epochs", "3", *where, check=False).stderr,
             cli("runs", "delete", "a-queued", "--yes", *where, check=False).stderr]
    with Registry(runs) as registry:
        assert registry.move_job("a-queued", ["queued"], state="starting")  # no pid yet: the daemon is starting it
    texts.append(cli("runs", "delete", "a-queued", "--yes", *where, check=False).stderr)
    first, second = submit(runs, TINY, "--epochs", "1"), submit(runs, TINY, "--epochs", "1")
    texts.append(cli("runs", "resume", first, *where, check=False).stderr)
    for run_id in (first, second):
        cli("daemon", "cancel", run_id, *where)
    texts.append(cli("daemon", "cancel", first[:4], *where, check=False).stderr)
    assert_each_names_the_runs_dir(texts, runs, 5)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a user mistake gets (exit 2, no traceback)."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    return done.stderr.strip()


def test_gpus_that_are_not_devices_are_refused_before_a_daemon_starts(tmp_path, daemons):
    runs = tmp_path / "runs"
    runs.mkdir()
    daemons.append(runs)  # stopped at the end should one start all the same
    refused = one_error_line(cli("daemon", "start", "--runs-dir", str(runs), "--gpus", "0,abc", check=False))
    assert "--gpus 'abc' is not a device: give indices (0,1) or UUIDs" in refused
    assert not daemon_dir(runs).exists()


def test_a_queued_run_shows_its_command_and_who_submitted_it_by_a_start_of_its_id(tmp_path):
    import getpass

    runs = tmp_path / "runs"
    runs.mkdir()
    run_id = submit(runs, TINY, "--epochs", "1")  # no daemon: it waits in the queue
    shown = cli("runs", "show", run_id[:-2], "--runs-dir", str(runs)).stdout
    assert f"run {run_id}: queued" in shown and "output: none yet (it is queued)" in shown, shown
    assert f"  command: trainbus run {TINY} " in shown and f" by {getpass.getuser()}\n" in shown, shown
    as_json = cli("runs", "show", run_id, "--json", "--runs-dir", str(runs), check=False)  # was a KeyError
    assert as_json.returncode == 0 and "Traceback" not in as_json.stderr, as_json.stderr
    shown_json = json.loads(as_json.stdout)
    assert shown_json["id"] == run_id and shown_json["status"] == "queued" and TINY in shown_json["argv"], shown_json
    assert cli("daemon", "cancel", run_id[:-2], "--runs-dir", str(runs)).stdout == f"cancelled {run_id}\n"
    from kernel_process import cli as in_dir

    bare = in_dir("run", "--detach", cwd=tmp_path).stdout.strip()  # the demo in ./runs: no word to add
    assert "  command: trainbus run\n" in cli("runs", "show", bare, "--runs-dir", str(runs)).stdout  # had a space


def test_a_queued_run_taken_off_the_queue_is_listed_and_shown_cancelled_until_deleted(tmp_path):
    """`daemon cancel` of a queued run (no daemon: it waits in the queue) removed its row: the run vanished from
    `runs list` and `runs show` called it unknown, while a run that failed before it had a directory stays listed.
    It stays, cancelled, with who took it off the queue, until `runs delete` removes it; `daemon status` then lists
    it `deleted`, as it does any run `runs delete` took (it said `cancelled` of a run no command knew any more)."""
    import getpass

    runs = tmp_path / "runs"
    runs.mkdir()
    run_id = submit(runs, TINY, "--epochs", "1")
    assert cli("daemon", "cancel", run_id, "--runs-dir", str(runs)).stdout == f"cancelled {run_id}\n"
    said = f"taken off the daemon's queue by {getpass.getuser()} before it started"
    row = listed(runs, through_cli=True)[run_id]
    assert (row["status"], row["detail"], row["target"]) == ("cancelled", said, TINY), row
    only = json.loads(cli("runs", "list", "--status", "cancelled", "--json", "--runs-dir", str(runs)).stdout)
    assert [run["id"] for run in only] == [run_id], only
    table = " ".join(cli("runs", "list", "--runs-dir", str(runs)).stdout.split())
    assert f"{run_id} cancelled " in table and said in table, table
    shown = cli("runs", "show", run_id[:-2], "--runs-dir", str(runs)).stdout
    assert shown.startswith(f"run {run_id}: cancelled ({said})"), shown
    assert "output: none (the daemon never started a process for it)" in shown, shown
    stop = cli("runs", "stop", run_id, "--runs-dir", str(runs), check=False)
    assert stop.returncode == 1 and stop.stderr == f"error: run {run_id} has already ended (cancelled: {said}); " \
                                                   f"there is nothing to stop\n", stop.stderr
    deleted = cli("runs", "delete", run_id, "--yes", "--runs-dir", str(runs)).stdout
    assert deleted.strip() == f"deleted run {run_id} (it never had a directory)"
    assert listed(runs) == {}
    status = cli("daemon", "status", "--runs-dir", str(runs), "--json", check=False)  # no daemon serves: exit 3
    ended = json.loads(status.stdout)["ended"]
    assert {job["run"]: job["status"] for job in ended} == {run_id: "deleted"}, ended


def test_daemon_cancel_of_the_start_of_ids_the_queue_held_says_how_those_runs_ended_not_that_it_held_none(tmp_path):
    """`daemon cancel PREFIX` naming no queued run said `the daemon's queue never held a run of that id (or start of
    one)` even where PREFIX was the start of runs it had held (cancelled, here): only a whole id was looked up. A
    unique start now says how that run ended, as its whole id does; one that several share says so."""
    runs = tmp_path / "runs"
    runs.mkdir()
    first, second = submit(runs, TINY, "--epochs", "1"), submit(runs, TINY, "--epochs", "1")
    for run_id in (first, second):
        cli("daemon", "cancel", run_id, "--runs-dir", str(runs))
    unique = cli("daemon", "cancel", first[:-1], "--runs-dir", str(runs), check=False)
    assert one_error_line(unique).startswith(f"error: run {first} is not queued: it was cancelled already ("), \
        unique.stderr
    shared = cli("daemon", "cancel", first[:4], "--runs-dir", str(runs), check=False)
    line = one_error_line(shared)
    assert shared.returncode == 2 and "never held" not in line, line
    assert f"run {first[:4]} is not queued: no queued run's id starts with it" in line, line
    assert "2 runs whose id does have ended or were cancelled" in line, line


def test_daemon_cancel_takes_a_queued_run_off_only_by_a_start_of_its_id_no_other_run_shares(tmp_path):
    """`daemon cancel PREFIX` took off the one queued run PREFIX starts even where a run that had ended (cancelled,
    here) shared it: meaning the ended run, the user lost the queued one. A start several runs share is refused,
    naming them (`runs stop PREFIX` too), and the queued run stays queued."""
    runs = tmp_path / "runs"
    runs.mkdir()
    first, second = submit(runs, TINY, "--epochs", "1"), submit(runs, TINY, "--epochs", "1")
    cli("daemon", "cancel", first, "--runs-dir", str(runs))
    shared = next(n for n in range(len(second), 0, -1) if first.startswith(second[:n]))
    for command in (("daemon", "cancel"), ("runs", "stop")):
        refused = cli(*command, second[:shared], "--runs-dir", str(runs), check=False)
        line = one_error_line(refused)
        assert "several" in line and first in line and second in line, (command, line)
        assert listed(runs)[second]["status"] == "queued"
    assert cli("daemon", "cancel", second[:shared + 1], "--runs-dir", str(runs)).stdout == f"cancelled {second}\n"


def test_a_queued_run_a_remote_key_cancels_is_listed_cancelled_by_that_key(tmp_path):
    """Who took a run off the queue is the connection's, as for a submission: a control key's `daemon cancel`."""
    from trainbus.kernel.daemon_serve import _do

    runs = tmp_path / "runs"
    runs.mkdir()
    with Registry(runs) as registry:
        registry.submit({"id": "q", "state": "queued", "submitted_ts": 1.0, "argv": [], "cwd": str(tmp_path),
                         "gpus": None}, {"id": "q", "dir": None, "status": "queued", "started_ts": None}, 1.0)
    assert _do("cancel", {"run": "q"}, Daemon(runs, []), [], "key alice") == {"ok": True, "run": "q"}
    [row] = list_runs(runs)
    assert (row["status"], row["detail"]) == ("cancelled", "taken off the daemon's queue by key alice before it "
                                                           "started"), row


def test_a_run_asking_for_more_gpus_than_the_daemon_has_fails_with_the_reason_listed(tmp_path, daemons):
    """Queued while no daemon served (one that serves refuses it at submission: the test of two runs on two
    devices), then taken by a daemon with none."""
    from trainbus.kernel.daemon_queue import submit as queue

    runs = tmp_path / "runs"
    runs.mkdir()
    # queued as `run --detach --gpus 2` queues it once checked: on a host without GPUs that refuses it now, with no
    # daemon too (test_run_detach_gpus_with_no_gpu_and_no_daemon_is_refused_before_anything_is_queued)
    run_id = "20260101-000000-a1b2c3"
    queue(runs, run_id, [PACED, "--plugins", "", "--device", "cpu"], 2, PACED, {}, None)
    start_daemon(daemons, runs, "--gpus", "")
    wait_until(lambda: listed(runs)[run_id]["status"] == "failed", WAIT_S, "the run failed at placement")
    reason = "asks for 2 GPUs and the daemon has 0 (none); start the daemon with --gpus listing them"
    row = next(line for line in cli("runs", "list", "--runs-dir", str(runs)).stdout.splitlines() if run_id in line)
    assert row.split()[1] == "failed" and row.endswith(reason)

    output = daemon_dir(runs) / "output" / f"{run_id}.log"
    shown = cli("runs", "show", run_id, "--runs-dir", str(runs)).stdout
    assert f"run {run_id}: failed ({reason})" in shown and not output.exists()
    assert "output: none (the daemon never started a process for it)" in shown
    deleted = cli("runs", "delete", run_id, "--yes", "--runs-dir", str(runs)).stdout
    assert deleted.strip() == f"deleted run {run_id} (it never had a directory)"


def test_run_detach_max_resumes_with_no_plugin_that_saves_checkpoints_says_the_daemon_cannot_continue_it(tmp_path):
    """`run --detach --max-resumes 3` with the default plugins (console, metrics_log) was queued in silence, as the
    README's example shows it, and the daemon never continued the run: its kernel killed, it had no checkpoint to
    resume from (`the kernel died ...; it had no checkpoint`). Queued still (a checkpoint plugin may be
    attached to the live run), with a note saying so and the fix."""
    runs = tmp_path / "runs"
    submitted = {plugins: cli("run", TINY, "--detach", "--max-resumes", "3", "--runs-dir", str(runs), "--device",
                              "cpu", *(("--plugins", plugins) if plugins is not None else ()))
                 for plugins in (None, "console,checkpoint")}
    assert all(done.returncode == 0 and "queued run" in done.stderr for done in submitted.values()), submitted
    assert "trainbus: note: --max-resumes 3, but none of the run's plugins saves checkpoints" in \
        submitted[None].stderr and "add checkpoint to --plugins" in submitted[None].stderr, submitted[None].stderr
    assert "note:" not in submitted["console,checkpoint"].stderr, submitted["console,checkpoint"].stderr
    plain = cli("run", TINY, "--detach", "--runs-dir", str(runs), "--device", "cpu")
    assert plain.returncode == 0 and "note:" not in plain.stderr, plain.stderr


def test_run_detach_of_the_demo_queues_it_without_importing_torch(tmp_path):
    """The demo's settings are checked without torch (as `trainbus run` checks them before it trains); importing the
    demo's module to check that it imports cost `run --detach` ~1.5 s of CPU (seconds on a busy box) for nothing. A
    torch that raises on import stands in for the real one: the command never reaches it."""
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    done = subprocess.run([*trainbus_cmd(), "run", "--detach", "--runs-dir", str(tmp_path / "runs"), "--epochs", "1",
                           "--device", "cpu", "--set", "lr=0.01"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{TESTS_DIR}"})
    assert done.returncode == 0 and "queued run" in done.stderr, done.stderr
    with Registry(tmp_path / "runs") as registry:
        assert [job["state"] for job in registry.jobs()] == ["queued"]


@pytest.mark.parametrize("target, flag, expected", [
    ("nosuchmod:build", None, "cannot import module 'nosuchmod'"),
    ("nosuch.py:build", None, "target file nosuch.py does not exist"),
    ("trainbus.kernel.digits:nosuch", None, "has no function 'nosuch'"),
    ("train.py:build", "width=5", "width"),
])


def test_run_detach_refuses_what_the_run_would_refuse_and_queues_nothing(tmp_path, target, flag, expected):
    """docs/daemon.md: `run --detach` checks what `trainbus run` checks before anything starts: a target that does
    not import, and a flag it does not take, are one error line now, not a queued run that fails later."""
    (tmp_path / "train.py").write_text("def build(lr: float = 0.1):\n    raise SystemExit('never called')\n")
    runs = tmp_path / "runs"
    target = str(tmp_path / target) if target.startswith("train.py") else target
    done = cli("run", target, *([flag] if flag else []), "--detach", "--runs-dir", str(runs), check=False)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
    assert done.stdout == "", done.stdout
    assert not runs.exists() or list_runs(runs) == [], "a run was queued"


def test_a_queued_run_is_called_queued_not_missing_by_the_commands_that_need_its_directory(tmp_path):
    """No daemon: the run waits in the queue with no directory. attach, runs resume, plot and compare said "no run
    ...: does not exist" of a run `runs list` lists; each now says it is queued and where the queue is shown."""
    runs = tmp_path / "runs"
    run_id = cli("run", "--detach", "--runs-dir", str(runs), "epochs=1").stdout.strip()
    for command in (["attach"], ["runs", "resume"], ["runs", "plot"], ["runs", "compare", run_id]):
        done = cli(*command, run_id[:15], "--runs-dir", str(runs), check=False)
        assert done.returncode != 0 and done.stderr.startswith(f"error: run {run_id} is queued and has no run "
                                                               f"directory yet (submitted "), (command, done.stderr)
        assert f"`trainbus daemon status --runs-dir {runs}` shows the queue" in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr


NO_GPU_REFUSALS = {
    "--device cuda": (["--device", "cuda"], "error: --device cuda, but this host has no GPU that NVML sees, so the "
                      "daemon's run would fail as it starts; use --device cpu or auto\n"),
    # 16-mixed is CUDA only: queued, it failed once the daemon started it on the CPU (found by a bad-input audit)
    "16-mixed, device auto": (["--precision", "16-mixed"], "error: --precision 16-mixed needs a CUDA device, but this "
                              "host has no GPU that NVML sees, so the daemon's run would fail as it starts; use "
                              "bf16-mixed on the CPU\n"),
    "16-mixed, device cpu": (["--precision", "16-mixed", "--device", "cpu"], "error: precision 16-mixed needs a CUDA "
                             "device (float16 autocast with a loss scaler) and this run asks for device cpu; use "
                             "bf16-mixed on the CPU\n"),
}


@pytest.mark.parametrize("case", NO_GPU_REFUSALS)
def test_run_detach_that_needs_a_gpu_this_host_lacks_is_refused_and_queues_nothing(tmp_path, case):
    from trainbus.kernel.placement import detected_devices

    if detected_devices():
        pytest.skip("this host has a GPU: the run would start")
    args, said = NO_GPU_REFUSALS[case]
    runs = tmp_path / "runs"
    done = cli("run", *args, "--detach", "--runs-dir", str(runs), check=False)
    assert done.returncode == 2 and done.stderr == said, done.stderr
    assert not runs.exists() or list_runs(runs) == [], "a run was queued"


GARBLED = {"argv": "not json", "gpus": "lots", "env": '{"A": 1}', "resumes_left": "many"}


@pytest.fixture(scope="module")
def garbled_queue(tmp_path_factory):
    """One queue for the garbled-row tests: a row garbled in each column of GARBLED, a good row behind them all, and
    one daemon that takes them (one daemon and one kernel start, not one per column). What `daemon status` said
    before the daemon started and after the good run completed, and the runs as listed then."""
    import sqlite3

    from trainbus.kernel.registry import REGISTRY_NAME

    runs = tmp_path_factory.mktemp("garbled") / "runs"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(TESTS_DIR))
        rows = {column: submit(runs, TINY) for column in GARBLED}
        good = submit(runs, TINY)
        with sqlite3.connect(runs / REGISTRY_NAME) as db:
            for column, garbled in GARBLED.items():
                db.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", (garbled, rows[column]))
        before = cli("daemon", "status", "--runs-dir", str(runs), check=False)  # 3: no daemon serves them yet
        served: list[Path] = []
        try:
            start_daemon(served, runs)
            wait_until(lambda: listed(runs).get(good, {}).get("status") == "completed", WAIT_S, "the run behind them")
            seen = {"runs": runs, "rows": rows, "before": before, "listed": listed(runs),
                    "through_cli": listed(runs, through_cli=True),
                    "after": cli("daemon", "status", "--runs-dir", str(runs)).stdout}
        finally:  # all the cases read is above: the daemon need not serve through the rest of the module
            for directory in served:
                trainbus("daemon", "stop", "--runs-dir", str(directory), check=False)
    return seen


@pytest.mark.parametrize("column", GARBLED)
def test_a_queued_row_garbled_by_hand_fails_alone_and_the_queue_goes_on(column, garbled_queue):
    """A row the daemon did not write (sqlite3 by hand, a damaged disk): `daemon status` and `runs list` raised on
    it, and the daemon's every round failed on it, starting nothing behind it."""
    runs, row, status = garbled_queue["runs"], garbled_queue["rows"][column], garbled_queue["before"]
    queued = len(GARBLED) + 1
    assert status.returncode == 3 and f"{queued} run(s) queued" in status.stdout, status.stderr
    assert f"queued: `trainbus daemon start --runs-dir {runs}` starts them" in status.stdout  # what to do about it
    said = f"its queue row's {column} is not what trainbus writes: submit the run again"
    assert garbled_queue["through_cli"][row]["status"] == "failed"
    assert garbled_queue["listed"][row]["error"] == said
    assert f"ended {row}" in garbled_queue["after"]


def test_the_daemon_removes_the_snapshot_buffers_of_a_run_whose_kernel_was_killed(tmp_path, daemons):
    """kill -9 of a run's kernel left its two snapshot buffers in /dev/shm, memory held until some later kernel
    started; the daemon removes them as it settles the run as died."""
    from trainbus.kernel.buffer_files import SHM_DIR

    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    start_daemon(daemons, runs)
    open_gate(gate, 3)  # held at step 3 until killed: its buffers are made after the first step
    victim = submit(runs, PACED, "--set", "step_sleep_s=0", "--set", f"gate={gate}", "--plugins", "checkpoint")
    wait_until(lambda: (runs / victim / "kernel.pid").exists(), WAIT_S, "the run's kernel")
    kernel = int((runs / victim / "kernel.pid").read_text())
    buffers = wait_until(lambda: len(list(SHM_DIR.glob(f"trainbus-{kernel}-{victim}-slot*"))) == 2
                         and list(SHM_DIR.glob(f"trainbus-{kernel}-{victim}-slot*")), WAIT_S, "its buffers")
    os.kill(kernel, signal.SIGKILL)
    log = daemon_dir(runs) / "daemon.log"
    wait_until(lambda: f"{victim}: the kernel died" in log.read_text(), WAIT_S, "the daemon settled the run as died")
    assert not any(path.exists() for path in buffers), log.read_text()


@pytest.mark.slow
def test_a_run_killed_with_the_daemon_is_died_and_runs_resume_ends_it_with_the_uninterrupted_weights(tmp_path,
                                                                                                     daemons):
    """The other branch of the killed-daemon case (CI runs the adopted branch above, and exact resume of a
    killed kernel in tests/test_checkpoint_e2e.py)."""
    runs, gate, reference = tmp_path / "runs", tmp_path / "gate", tmp_path / "reference"
    runs.mkdir()
    daemon = start_daemon(daemons, runs)
    settings = ("--epochs", "3", "--set", "step_sleep_s=0", "--plugins", "checkpoint")
    victim = submit(runs, PACED, *settings, "--set", f"gate={gate}")
    open_gate(gate, 8)  # into the second epoch, once the first one's checkpoint is written
    journal = JournalTail(runs / victim / JOURNAL_NAME)
    wait_until(lambda: (runs / victim / JOURNAL_NAME).exists() and journal.step() >= 8
               and (runs / victim / "checkpoints" / "manifest.jsonl").exists(), WAIT_S, "epoch 2, a checkpoint")
    kernel = int((runs / victim / "kernel.pid").read_text())
    os.kill(daemon, signal.SIGKILL)
    os.kill(kernel, signal.SIGKILL)
    wait_until(lambda: process_gone(kernel) and process_gone(daemon), 30, "both gone")

    start_daemon(daemons, runs)
    wait_until(lambda: listed(runs)[victim]["status"] == "died", WAIT_S, "the run settled as died")
    assert "the kernel died" in (daemon_dir(runs) / "daemon.log").read_text()
    open_gate(gate, 10_000)
    cli("runs", "resume", victim, "--runs-dir", str(runs), "--detach")
    wait_until(lambda: listed(runs)[victim]["status"] == "completed", WAIT_S, "the resumed run completed")
    cli("run", PACED, "--runs-dir", str(reference), "--device", "cpu", "--set", "batch_size=256", *settings)
    assert_same_weights(runs / victim, next(p for p in reference.iterdir() if p.is_dir()))


def test_daemon_status_says_why_a_run_it_ended_was_stopped(tmp_path):
    """A remote `daemon cancel` of a running run ends it `stopped`, its reason `cancelled by key alice`
    (docs/daemon.md): `daemon status`, a remote key's only view, listed it as `stopped` alone, whoever stopped it
    and why. It now gives the stop's reasons, as `failed` gives its error."""
    from trainbus.kernel.daemon_queue import submit

    runs = tmp_path / "runs"
    runs.mkdir()
    submit(runs, "r1", [TINY], None, TINY, {}, None, wake=False, by="key alice")
    now = time.time()
    with Registry(runs) as registry:
        registry.move_job("r1", ["queued"], state="ended", ended_ts=now, exit_code=0, detail="run stopped, exit code 0")
        registry.record([{"id": "r1", "dir": str(runs / "r1"), "status": "stopped", "target": TINY, "flags": {},
                          "started_ts": now - 5, "stop_reasons": ["attach-ann@box-1: stop: cancelled by key alice"]}],
                         now)
    shown = cli("daemon", "status", "--runs-dir", str(runs), check=False)
    assert shown.returncode == 3, shown.stderr
    assert ": stopped (attach-ann@box-1: stop: cancelled by key alice)\n" in shown.stdout, shown.stdout
    ended = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json", check=False).stdout)["ended"]
    assert ended[0]["stop_reasons"] == ["attach-ann@box-1: stop: cancelled by key alice"], ended


@pytest.fixture(scope="module")
def queued_run_outliving_its_daemon(tmp_path_factory):
    """One run for the two tests of the daemons' log order: queued before any daemon serves, started by the first
    daemon, which is killed (kill -9) while the run trains; the run completes with no daemon, and the next daemon
    settles it (one kernel start, not one per test). The log then, the run's id and the second daemon's pid."""
    runs = tmp_path_factory.mktemp("outliving") / "runs"
    runs.mkdir()
    log = daemon_dir(runs) / "daemon.log"
    with child_path_with_tests():
        queued = submit(runs, TINY)
        served: list[Path] = []
        try:
            first = start_daemon(served, runs)
            wait_until(lambda: f"{queued}: started (pid" in log.read_text(), WAIT_S, "the queued run started")
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: (runs / queued / "summary.json").exists(), WAIT_S, "the run completed with no daemon")
            second = start_daemon(served, runs)
            wait_until(lambda: f"{queued}: run completed" in log.read_text(), 30, "the run settled")
            assert listed(runs)[queued]["status"] == "completed"
        finally:
            for directory in served:
                trainbus("daemon", "stop", "--runs-dir", str(directory), check=False)
    return {"run": queued, "second": second, "log": log.read_text()}


def test_a_run_queued_before_the_daemon_starts_is_logged_started_after_the_daemon_serves(
        queued_run_outliving_its_daemon):
    """The daemon's first round (before it bound its sockets) started the queued runs, so its log said a run
    `started` before the daemon's `serving` line: read top down, a run started by no daemon. Lines come as they
    happen: serving, then started."""
    text, queued = queued_run_outliving_its_daemon["log"], queued_run_outliving_its_daemon["run"]
    assert text.index(" serving ") < text.index(f"{queued}: started (pid"), text


def test_a_run_that_ended_while_no_daemon_watched_is_logged_under_the_daemon_that_settles_it(
        queued_run_outliving_its_daemon):
    """kill -9 of the daemon while its run trained, the run completing meanwhile: the next daemon's first round
    (before its `serving` line) logged `RUN: run completed`, so read top down the log said the killed daemon saw the
    run end, and nothing said that daemon had gone. The next daemon's first line comes before what it settles."""
    text, run_id = queued_run_outliving_its_daemon["log"], queued_run_outliving_its_daemon["run"]
    second = queued_run_outliving_its_daemon["second"]
    assert text.index(f"daemon pid {second} ") < text.index(f"{run_id}: run completed"), text


def test_a_registry_deleted_under_the_daemon_is_said_with_the_queued_runs_it_lost(tmp_path, daemons):
    """`rm runs/registry.sqlite` (a cleanup script) while a run trained and another waited: the daemon's next round
    made a new, empty registry, and the queued run vanished without a word: `daemon status` said `queued: none`,
    the log nothing. The daemon now says it in its log and on `daemon status`'s trouble line, naming the lost runs."""
    runs, build_gate = tmp_path / "runs", tmp_path / "build_gate"
    runs.mkdir()
    start_daemon(daemons, runs)
    held = submit(runs, SLOW_BUILD, "--set", f"build_gate={build_gate}", "--epochs", "1")
    waiting = submit(runs, TINY)
    try:
        wait_until(lambda: build_gate.with_name("build_gate.waiting").exists(), WAIT_S, "the first run in build()")
        for name in ("registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm"):
            (runs / name).unlink(missing_ok=True)
        log = daemon_dir(runs) / "daemon.log"
        wait_until(lambda: "was deleted or replaced" in log.read_text(), 30, "the daemon's word on it")
        said = log.read_text()
        assert f"the queue it held is lost: 1 run(s), {waiting}; submit them again" in said, said
        status = cli("daemon", "status", "--runs-dir", str(runs)).stdout
        assert f"trouble: {runs / 'registry.sqlite'} was deleted or replaced" in status and waiting in status, status
        assert f"running {held}" in status
    finally:
        open_gate(build_gate, 1)
        open_gate(tmp_path / "gate", 10_000)


def test_a_full_queue_is_served_said_in_part_and_refuses_the_next_run_with_the_fix(tmp_path, daemons):
    """A script submitting runs in a loop: the queue took any number, each of the daemon's rounds decoded every
    queued row (0.5 to 1.2 s of every second at 10,000), and past ~45,000 `daemon status` failed, its answer over
    the client's 1 MiB. The queue now holds at most registry.MAX_QUEUED, a round reads its head only, and status's
    line names the first runs (--json all of them)."""
    runs, build_gate = tmp_path / "runs", tmp_path / "build_gate"
    runs.mkdir()
    start_daemon(daemons, runs)
    held = submit(runs, SLOW_BUILD, "--set", f"build_gate={build_gate}", "--epochs", "1")
    try:
        wait_until(lambda: build_gate.with_name("build_gate.waiting").exists(), WAIT_S, "the first run in build()")
        first = submit(runs, TINY)
        with sqlite3.connect(runs / "registry.sqlite") as db:  # the rest of a full queue: copies of the first
            columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
            copied = {"id": "printf('q%05d', n.i)", "submitted_ts": "submitted_ts + n.i"}
            db.execute(f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
                       f"INSERT INTO jobs ({', '.join(columns)}) SELECT {', '.join(copied.get(c, c) for c in columns)} "
                       f"FROM n, jobs WHERE jobs.id = ?", (MAX_QUEUED - 1, first))
        refused = one_error_line(cli("run", TINY, "--detach", "--runs-dir", str(runs), "--plugins", "", check=False))
        assert refused == (f"error: the daemon's queue holds {MAX_QUEUED} runs, the most it takes: let some start, or "
                           f"take some off it (`trainbus daemon cancel RUN`), then submit again"), refused
        status = cli("daemon", "status", "--runs-dir", str(runs)).stdout
        shown = ", ".join([first, *(f"q{i:05d}" for i in range(1, QUEUED_SHOWN))])
        assert f"running {held}" in status and f"  queued: {shown} and {MAX_QUEUED - QUEUED_SHOWN} more (`--json` " \
               f"lists them all)\n" in status, status
        queued = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)["queued"]
        assert queued == [first, *(f"q{i:05d}" for i in range(1, MAX_QUEUED))]
    finally:
        cli("daemon", "stop", "--runs-dir", str(runs), check=False)  # before the gate: the queue's runs stay queued
        open_gate(build_gate, 1)


def test_a_daemon_round_decodes_the_head_of_the_queue_not_every_queued_run(tmp_path, monkeypatch):
    """Each round (every second) read and decoded the whole queue, each row's argv and environment, to start its
    first run: CPU grew with the queue. It reads as far as placement looks now; counted through the row decoder."""
    from trainbus.kernel import daemon_queue, registry

    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(50):
        daemon_queue.submit(runs, f"r{i:03d}", [TINY], None, TINY, {}, None, wake=False)
    decoded, real = [], registry.job_from_row
    monkeypatch.setattr(registry, "job_from_row", lambda row: decoded.append(row[0]) or real(row))
    held = Daemon(runs, [], max_concurrent=1)
    for now in (1.0, 2.0):
        held.tick(now, start=False)  # the first run would start; the second must wait, and every one behind it
    assert 0 < len(decoded) <= 6, decoded


def test_daemon_log_and_its_rotated_files_are_owner_only_as_a_runs_private_files_are(tmp_path):
    """daemon.log holds what users ran (each run's command and who submitted it). A daemon started in the
    foreground (`daemon start --foreground`, under systemd) created it 0644, as each rotation did its new file,
    while kernel.log and the registry are 0600."""
    log = tmp_path / "daemon.log"
    script = (f"import os\nfrom pathlib import Path\nfrom trainbus.kernel import daemon_serve as d\nos.umask(0o022)\n"
              f"d.LOG_MAX_BYTES = 2000\nd._log_to(Path({str(log)!r}), False)\n"
              f"for i in range(200):\n    d.log.info('line %d %s', i, 'x' * 50)\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    written = sorted(tmp_path.glob("daemon.log*"))
    assert len(written) == 4, written  # the log and the 3 rotated files kept
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {
        path.name: "0o600" for path in written}


def test_run_gpus_on_a_host_without_gpus_says_it_has_none_and_to_train_on_the_cpu(tmp_path, daemons):
    """`trainbus run --gpus 1` on a machine without GPUs said "add --detach", and with --detach to a daemon that has
    none "start the daemon with --gpus listing them": neither can work here. Each now says the host has no GPU
    (and NVML's why), and the way: drop --gpus, train on the CPU."""
    from trainbus.kernel.placement import gpu_census

    found, why = gpu_census()
    if found:
        pytest.skip("this host has a GPU")
    assert why, "no reason given for no GPU"
    runs = tmp_path / "runs"
    runs.mkdir()
    here = cli("run", "--gpus", "1", "--runs-dir", str(runs), "epochs=1", check=False)
    start_daemon(daemons, runs)
    queued = cli("run", "--gpus", "1", "--detach", "--runs-dir", str(runs), "epochs=1", check=False)
    for done in (here, queued):
        assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith(f"error: --gpus 1: this host has no GPU that NVML sees ({why})"), done.stderr
        assert "drop --gpus" in done.stderr and "--device cpu" in done.stderr, done.stderr
    assert listed(runs) == {}


def test_run_detach_gpus_with_no_gpu_and_no_daemon_is_refused_before_anything_is_queued(tmp_path):
    """`trainbus run --detach --gpus 1` with no daemon on a host where NVML sees no GPU queued the run: a daemon
    started here (its devices: every GPU NVML sees, none) fails it at placement, which a daemon already serving
    refuses at submission (the test above). Refused as that one is, naming the host's lack and the fix."""
    from trainbus.kernel.placement import gpu_census

    found, why = gpu_census()
    if found:
        pytest.skip("this host has a GPU")
    runs = tmp_path / "runs"
    runs.mkdir()
    done = cli("run", "--gpus", "1", "--detach", "--runs-dir", str(runs), "epochs=1", check=False)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: --gpus 1: this host has no GPU that NVML sees ({why}) and no daemon "
                                  f"serves {runs.resolve()}"), done.stderr
    assert "drop --gpus" in done.stderr and "--device cpu" in done.stderr, done.stderr
    assert "`trainbus daemon start --gpus" in done.stderr, done.stderr  # devices NVML does not see yet
    assert listed(runs) == {}


def test_a_daemon_whose_first_round_outlasts_the_start_wait_is_said_to_be_starting_not_killed(tmp_path, daemons):
    """`daemon start` in the background waited 30 s for the daemon to answer, then sent it SIGTERM: a daemon whose
    first round took longer (a long queue, a slow disk; here the registry held by another writer) was killed
    while it worked. Past its lock, it is now left to go on and said to be starting; it serves once it can."""
    from trainbus.kernel import daemon_client

    runs = tmp_path / "runs"
    runs.mkdir()
    with Registry(runs) as registry:  # a job a daemon died starting: the first round writes it queued again
        registry.submit({"id": "a", "state": "queued", "submitted_ts": 1.0, "argv": ["nosuch.py:build"],
                         "cwd": str(tmp_path), "gpus": None}, {"id": "a", "status": "queued"}, 1.0)
        assert registry.move_job("a", ["queued"], state="starting", started_ts=time.time())
    holder = sqlite3.connect(runs / "registry.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # that write waits for it (the registry's busy_timeout) before it can serve
    daemons.append(runs)
    try:
        started = daemon_client.start_background(runs, ["--runs-dir", str(runs), "--gpus", ""], timeout_s=4.0)
    finally:
        holder.rollback()
        holder.close()
    pid = int((daemon_dir(runs) / "daemon.pid").read_text())
    assert started == {"pid": pid, "starting": True}, started
    answer = wait_until(lambda: daemon_client.request(runs, "status", timeout_s=1.0), 60, "the daemon serving")
    assert answer["pid"] == pid
