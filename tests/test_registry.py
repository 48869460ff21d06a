"""The run registry (RUNS_DIR/registry.sqlite): what kernels record, what `runs list` reads through it, rebuilt from
the run directories by `runs reindex`, shared by several writing processes, and never a reason for a run to fail.
Real runs and real processes; the registry is the real SQLite file."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from trainbus.kernel.cli import UserError, app
from trainbus.kernel.config import RunConfig
from trainbus.kernel.registry import COLUMNS, JOB_COLUMNS, REGISTRY_NAME, SCHEMA_VERSION, Registry, list_runs
from trainbus.kernel.session import run_training

from conftest import TESTS_DIR, trainbus_cmd
from kernel_process import KernelProcess

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"
FAILING = f"{TESTS_DIR / 'specs.py'}:failing"

WRITER = """
import sys, time
from trainbus.kernel.registry import Registry
runs_dir, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(count):  # a connection per write, as a kernel makes one
    with Registry(runs_dir) as registry:
        registry.record([{"id": f"{name}-{i % 5}", "status": "queued", "target": "t.py:build", "flags": {"i": i}}],
                        time.time())
print(count)
"""

LISTER = """
import os, sys, time
from trainbus.kernel.registry import list_runs
runs_dir, stop = sys.argv[1], sys.argv[2]
lists, deadline = 0, time.monotonic() + 150
while not os.path.exists(stop) and time.monotonic() < deadline:
    list_runs(runs_dir)
    lists += 1
    time.sleep(0.005)  # still many lists a second, without taking a whole core from the kernels it races
print(lists)
"""


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _comparable(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in run.items() if k != "dir"} for run in runs]


@pytest.fixture(scope="module")
def ended_runs(tmp_path_factory):
    """A runs directory with a completed run (given hyperparameters) and a failed one, made in this process."""
    runs_dir = tmp_path_factory.mktemp("registry") / "runs"
    assert run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir), plugins=[],
                                  hyperparameters={"lr": 0.3}), run_id="a-completed").status == "completed"
    assert run_training(RunConfig(target=FAILING, epochs=2, runs_dir=str(runs_dir), plugins=[]),
                        run_id="b-failed").status == "failed"
    return runs_dir


def test_the_kernel_records_its_run_as_it_ends(ended_runs):
    with Registry(ended_runs) as registry:
        rows = registry.runs(time.time())
    completed, failed = rows["a-completed"], rows["b-failed"]
    assert completed["status"] == "completed" and failed["status"] == "failed"
    assert completed["target"] == TINY and completed["flags"] == {"lr": 0.3}
    assert completed["epochs_completed"] == 2 and completed["steps"] == 6 and completed["last_seq"] > 0
    assert completed["best"]["epoch"] in (1, 2) and completed["best"]["validation_loss"] <= completed["validation_loss"]
    assert completed["ended_ts"] >= completed["started_ts"] and completed["duration_s"] > 0
    assert "loss exploded" in failed["error"]
    assert (ended_runs / REGISTRY_NAME).stat().st_mode & 0o777 == 0o600


def test_runs_list_reads_through_the_registry_with_filters(ended_runs):
    listed = json.loads(cli("runs", "list", "--runs-dir", str(ended_runs), "--json"))
    assert [r["id"] for r in listed] == ["b-failed", "a-completed"]  # newest first
    assert [r["id"] for r in list_runs(ended_runs, statuses=("failed",))] == ["b-failed"]
    assert [r["id"] for r in list_runs(ended_runs, target="specs.py:tiny")] == ["a-completed"]
    assert cli("runs", "list", "--runs-dir", str(ended_runs), "--status", "completed,died").splitlines()[1].split()[:2] \
        == ["a-completed", "completed"]
    with pytest.raises(UserError, match="'done' is not a status; statuses: queued, running, completed"):
        CliRunner().invoke(app, ["runs", "list", "--runs-dir", str(ended_runs), "--status", "done"],
                           catch_exceptions=False)
    assert [r["id"] for r in json.loads(cli("runs", "list", "--runs-dir", str(ended_runs), "--json", "--last", "1"))] \
        == ["b-failed"]  # the newest, as a table of thousands takes seconds to draw
    assert cli("runs", "list", "--runs-dir", str(ended_runs), "--status", "completed", "--last", "1").splitlines()[1] \
        .split()[:2] == ["a-completed", "completed"]


def test_reindex_of_a_copied_runs_dir_reproduces_the_list(ended_runs, tmp_path):
    before = list_runs(ended_runs)
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy, ignore=shutil.ignore_patterns(f"{REGISTRY_NAME}*"))
    assert cli("runs", "reindex", "--runs-dir", str(copy)).startswith("2 runs indexed in ")
    with Registry(copy) as registry:
        assert sorted(registry.runs(time.time())) == ["a-completed", "b-failed"]
    after = list_runs(copy)
    assert _comparable(after) == _comparable(before)
    assert {r["dir"] for r in after} == {str((copy / r["id"]).resolve()) for r in after}
    # a copy that took the old registry along: its rows name the old directories, and list reads them anew
    moved = tmp_path / "moved"
    shutil.copytree(ended_runs, moved)
    assert _comparable(list_runs(moved)) == _comparable(before)
    with Registry(moved) as registry:
        assert {r["dir"] for r in registry.runs(time.time()).values()} == {str((moved / i).resolve())
                                                                           for i in ("a-completed", "b-failed")}


def test_a_row_only_gives_way_to_a_newer_observation(tmp_path):
    with Registry(tmp_path) as registry:
        registry.record([{"id": "r", "status": "completed", "target": "new"}], observed_ts=200.0)
        registry.record([{"id": "r", "status": "running", "target": "old"}], observed_ts=100.0)  # a slow lister
        assert registry.runs(300.0)["r"]["status"] == "completed"
        registry.record([{"id": "r", "status": "running", "target": "again"}], observed_ts=300.0)  # continued
        assert registry.runs(300.0)["r"]["target"] == "again"


def test_a_run_that_diverged_keeps_its_nan_losses_in_the_registry(tmp_path):
    """SQLite stores a NaN as NULL: a run whose loss went NaN listed `-` in `runs list` and `runs compare` (nothing
    measured) while its summary.json and `runs show` said nan."""
    nan = float("nan")
    with Registry(tmp_path) as registry:
        registry.record([{"id": "r", "status": "completed", "target": "NaN", "training_loss": nan,
                          "validation_loss": float("inf"), "best": {"validation_loss": nan, "epoch": 1}}], 1.0)
        row = registry.runs(2.0)["r"]
    assert math.isnan(row["training_loss"]) and row["validation_loss"] == float("inf")
    assert math.isnan(row["best"]["validation_loss"]) and row["best"]["epoch"] == 1
    assert row["target"] == "NaN"  # a text column's own text stays text


def test_a_run_whose_files_hold_a_count_past_64_bits_is_listed_and_reindexed(ended_runs, tmp_path):
    """A run's config.json from elsewhere (or from before epochs had a bound) with epochs = 2**63: SQLite refused
    the row with OverflowError, and `runs list` and `runs reindex` raised it for every run of the directory."""
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy, ignore=shutil.ignore_patterns(f"{REGISTRY_NAME}*"))
    config = json.loads((copy / "a-completed" / "config.json").read_text())
    (copy / "a-completed" / "config.json").write_text(json.dumps({**config, "epochs": 2**63}))
    assert cli("runs", "reindex", "--runs-dir", str(copy)).startswith("2 runs indexed in ")
    listed = {r["id"]: r for r in list_runs(copy)}
    assert sorted(listed) == ["a-completed", "b-failed"] and listed["a-completed"]["epochs"] == float(2**63)


def test_a_registry_of_schema_2_gains_who_submitted_each_job_and_keeps_its_queue(tmp_path):
    """A daemon upgraded under a queue: the jobs table of schema 2 (no submitted_by) is altered in place."""
    old = sqlite3.connect(tmp_path / REGISTRY_NAME)
    columns = {n: k for n, k in JOB_COLUMNS.items() if n != "submitted_by"}
    old.execute(f"CREATE TABLE jobs ({', '.join(f'{n} {k}' for n, k in columns.items())})")
    old.execute("INSERT INTO jobs (id, state, submitted_ts, argv, cwd) VALUES ('q', 'queued', 1.0, '[]', '/')")
    old.execute(f"CREATE TABLE runs ({', '.join(f'{n} {k}' for n, k in COLUMNS.items())})")
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    with Registry(tmp_path) as registry:
        assert [(job["id"], job["submitted_by"]) for job in registry.jobs()] == [("q", None)]
        registry.submit({"id": "r", "state": "queued", "submitted_ts": 2.0, "argv": [], "cwd": "/",
                         "submitted_by": "key alice"}, {"id": "r", "status": "queued"}, 2.0)
        assert [(job["id"], job["submitted_by"]) for job in registry.jobs()] == [("q", None), ("r", "key alice")]
        assert registry.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_registry_of_schema_3_gains_the_runs_hyperparameters_and_keeps_its_rows(tmp_path):
    old = sqlite3.connect(tmp_path / REGISTRY_NAME)
    columns = {n: k for n, k in COLUMNS.items() if n not in ("hyperparameters", "training_metrics")}
    old.execute(f"CREATE TABLE runs ({', '.join(f'{n} {k}' for n, k in columns.items())})")
    old.execute(f"CREATE TABLE jobs ({', '.join(f'{n} {k}' for n, k in JOB_COLUMNS.items())})")
    old.execute("INSERT INTO runs (id, status, flags, observed_ts) VALUES ('old', 'completed', '{\"lr\": 1}', 1.0)")
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    with Registry(tmp_path) as registry:
        registry.record([{"id": "new", "status": "completed", "flags": {}, "hyperparameters": {"lr": 0.5}}], 2.0)
        runs = registry.runs(3.0)
        assert (runs["old"]["flags"], runs["old"]["hyperparameters"]) == ({"lr": 1}, None)
        assert runs["new"]["hyperparameters"] == {"lr": 0.5}
        assert registry.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_registry_of_schema_4_gains_the_runs_training_metrics_and_keeps_its_rows(tmp_path):
    old = sqlite3.connect(tmp_path / REGISTRY_NAME)
    columns = {n: k for n, k in COLUMNS.items() if n != "training_metrics"}
    old.execute(f"CREATE TABLE runs ({', '.join(f'{n} {k}' for n, k in columns.items())})")
    old.execute(f"CREATE TABLE jobs ({', '.join(f'{n} {k}' for n, k in JOB_COLUMNS.items())})")
    old.execute("INSERT INTO runs (id, status, validation_metrics, observed_ts) VALUES ('old', 'completed', "
                "'{\"accuracy\": 0.5}', 1.0)")
    old.execute("PRAGMA user_version = 4")
    old.commit()
    old.close()
    with Registry(tmp_path) as registry:
        registry.record([{"id": "new", "status": "completed", "training_metrics": {"accuracy": 0.75}}], 2.0)
        runs = registry.runs(3.0)
        assert (runs["old"]["validation_metrics"], runs["old"]["training_metrics"]) == ({"accuracy": 0.5}, {})
        assert runs["new"]["training_metrics"] == {"accuracy": 0.75}
        assert registry.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_registry_of_schema_5_gains_each_jobs_resumes_left_and_keeps_its_queue(tmp_path):
    """A daemon upgraded under a queue: the jobs of schema 5 (before --max-resumes) are resumed by nobody."""
    old = sqlite3.connect(tmp_path / REGISTRY_NAME)
    columns = {n: k for n, k in JOB_COLUMNS.items() if n != "resumes_left"}
    old.execute(f"CREATE TABLE jobs ({', '.join(f'{n} {k}' for n, k in columns.items())})")
    old.execute("INSERT INTO jobs (id, state, submitted_ts, argv, cwd) VALUES ('q', 'queued', 1.0, '[]', '/')")
    old.execute(f"CREATE TABLE runs ({', '.join(f'{n} {k}' for n, k in COLUMNS.items())})")
    old.execute("PRAGMA user_version = 5")
    old.commit()
    old.close()
    with Registry(tmp_path) as registry:
        registry.submit({"id": "r", "state": "queued", "submitted_ts": 2.0, "argv": [], "cwd": "/",
                         "resumes_left": 3}, {"id": "r", "status": "queued"}, 2.0)
        jobs = registry.jobs()
        assert [(job["id"], job["resumes_left"], job.get("unreadable")) for job in jobs] == [
            ("q", None, None), ("r", 3, None)]
        assert registry.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_compare_fills_a_flag_a_run_was_not_given_with_what_its_spec_trained_with(ended_runs):
    """The demo's way: a spec function taking the hyperparameters dict fills in its own defaults, so a run given
    no lr trained with one all the same; a run that names none (a registry row from before) shows none."""
    from trainbus.kernel.runs_view import comparison

    runs = [{"id": "given", "status": "completed", "flags": {"lr": 0.3}, "hyperparameters": {"lr": 0.1}},
            {"id": "defaults", "status": "completed", "flags": {}, "hyperparameters": {"lr": 0.05, "width": 8}},
            {"id": "old-row", "status": "completed", "flags": {}, "hyperparameters": None}]
    assert [row["flags"] for row in comparison(runs)] == [{"lr": 0.3}, {"lr": 0.05}, {}]
    # epochs, which the demo's spec takes from the dict but fills in outside it: the epochs each run planned
    runs = [{"id": "given", "status": "completed", "flags": {"epochs": 1}, "hyperparameters": {"epochs": 1},
             "epochs": 1}, {"id": "default", "status": "completed", "flags": {}, "hyperparameters": {}, "epochs": 10}]
    assert [row["flags"] for row in comparison(runs)] == [{"epochs": 1}, {"epochs": 10}]
    compared = json.loads(cli("runs", "compare", "--runs-dir", str(ended_runs), "--json"))
    assert {c["id"]: c["flags"] for c in compared} == {"a-completed": {"lr": 0.3}, "b-failed": {"lr": 0.1}}


def test_a_registry_that_is_not_one_or_a_missing_runs_dir_is_one_error_line_naming_the_fix(tmp_path):
    from conftest import trainbus

    (tmp_path / REGISTRY_NAME).write_text("junk\n")
    for args in (["daemon", "cancel", "x"], ["runs", "stop", "x"], ["daemon", "start"]):
        done = trainbus(*args, "--runs-dir", str(tmp_path), check=False)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert done.stderr.startswith(f"error: {tmp_path / REGISTRY_NAME} is not a run registry") and \
            f"`trainbus runs reindex --runs-dir {tmp_path}`" in done.stderr, (args, done.stderr)
    # status answers whether a daemon serves (3: none does), and says the queue is unknown, with the same fix
    done = trainbus("daemon", "status", "--runs-dir", str(tmp_path), check=False)
    assert done.returncode == 3 and done.stdout.count("\n") == 1 and done.stdout.startswith(
        f"no daemon serves {tmp_path}; its queue is unknown: {tmp_path / REGISTRY_NAME} is not a run registry"), done
    assert f"`trainbus runs reindex --runs-dir {tmp_path}`" in done.stdout, done.stdout
    as_json = json.loads(trainbus("daemon", "status", "--json", "--runs-dir", str(tmp_path), check=False).stdout)
    assert as_json["serving"] is False and "is not a run registry" in as_json["registry_error"], as_json
    done = trainbus("daemon", "cancel", "x", "--runs-dir", str(tmp_path / "nowhere"), check=False)
    assert (done.returncode, done.stderr) == (2, f"error: the runs directory {tmp_path / 'nowhere'} does not exist "
                                                 f"(is --runs-dir right?)\n")
    assert not (tmp_path / "nowhere").exists()


def test_reindex_sets_aside_a_registry_sqlite_cannot_read_and_builds_a_new_one(ended_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy, ignore=shutil.ignore_patterns(f"{REGISTRY_NAME}*"))
    (copy / REGISTRY_NAME).write_bytes(b"garbage, not a database" * 100)  # what `runs list` says to reindex
    said = cli("runs", "reindex", "--runs-dir", str(copy))
    [kept] = copy.glob(f"{REGISTRY_NAME}.unreadable-*")
    assert kept.read_bytes().startswith(b"garbage") and f"kept as {kept}" in said.replace("\n", ""), said
    assert said.strip().splitlines()[-1].startswith("2 runs indexed in "), said
    with Registry(copy) as registry:
        assert sorted(registry.runs(time.time())) == ["a-completed", "b-failed"]


def test_a_registry_row_garbled_by_hand_is_read_again_from_its_run_and_the_other_runs_are_listed(ended_runs,
                                                                                                  tmp_path):
    """A row whose columns are not what trainbus writes (an edit in sqlite3) cost every `runs list` a traceback:
    a run that has a directory is read from it again, one that has none is listed unreadable, naming the fix."""
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy)
    with Registry(copy) as registry:
        registry.submit({"id": "c-lost", "state": "ended", "submitted_ts": 1.0, "argv": [], "cwd": str(tmp_path),
                         "gpus": None}, {"id": "c-lost", "dir": None, "status": "failed", "started_ts": 2.0}, 1.0)
    db = sqlite3.connect(copy / REGISTRY_NAME)
    with db:
        db.execute("UPDATE runs SET flags = '{{{', epochs = 'x' WHERE id = 'a-completed'")
        db.execute("UPDATE runs SET status = 'bogus', plugin_trouble = '5' WHERE id = 'b-failed'")
        db.execute("UPDATE runs SET validation_metrics = '[1,2', last_event = '\"x\"' WHERE id = 'c-lost'")
    db.close()
    listed = {run["id"]: run for run in json.loads(cli("runs", "list", "--runs-dir", str(copy), "--json"))}
    assert listed["a-completed"]["status"] == "completed" and listed["a-completed"]["flags"] == {"lr": 0.3}
    assert listed["a-completed"]["epochs"] == 2 and listed["b-failed"]["status"] == "failed"
    lost = listed["c-lost"]
    assert lost["status"] == "unreadable" and lost["detail"] == (
        "its row in the run registry (validation_metrics, last_event) is not what trainbus writes: `trainbus runs "
        "delete c-lost` removes it"), lost
    table = " ".join(cli("runs", "list", "--runs-dir", str(copy)).split())  # its error column may wrap
    assert "c-lost unreadable" in table and "`trainbus runs delete c-lost` removes it" in table, table  # as --json
    picked = json.loads(cli("runs", "list", "--runs-dir", str(copy), "--json", "--status", "unreadable"))
    assert [run["id"] for run in picked] == ["c-lost"]  # a status runs list shows is one it filters on
    shown = json.loads(cli("runs", "show", "c-lost", "--json", "--runs-dir", str(copy)))
    assert shown["status"] == "unreadable" and shown["detail"] == lost["detail"], shown  # as runs list says
    with Registry(copy) as registry:  # the rows of runs with a directory were written again from it
        rows = registry.runs(time.time())
    assert rows["a-completed"]["flags"] == {"lr": 0.3} and rows["b-failed"]["status"] == "failed"
    assert "deleted run c-lost" in cli("runs", "delete", "c-lost", "--yes", "--runs-dir", str(copy))
    assert sorted(run["id"] for run in list_runs(copy)) == ["a-completed", "b-failed"]


def test_a_garbled_row_of_a_run_with_no_directory_and_no_job_is_deleted_as_runs_list_says(ended_runs, tmp_path):
    """A row the registry alone holds, garbled by hand with no queue job beside it (a row inserted, or its job
    removed, in sqlite3): `runs list` named `runs delete` as its fix, and `runs delete` refused it, as `run ... is
    bogus and has no run directory`, the garbled status said as one."""
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy)
    db = sqlite3.connect(copy / REGISTRY_NAME)
    with db:
        db.execute("INSERT INTO runs (id, dir, status, observed_ts) VALUES ('c-lost', NULL, 'bogus', 1.0)")
    db.close()
    listed = {run["id"]: run for run in json.loads(cli("runs", "list", "--runs-dir", str(copy), "--json"))}
    lost = listed["c-lost"]
    assert lost["status"] == "unreadable" and lost["detail"].endswith("`trainbus runs delete c-lost` removes it"), lost
    with pytest.raises(UserError) as shown:
        cli("runs", "show", "c-lost", "--runs-dir", str(copy))
    assert "bogus" not in str(shown.value) and "`trainbus runs delete c-lost` removes it" in str(shown.value), shown
    assert "deleted run c-lost" in cli("runs", "delete", "c-l", "--yes", "--runs-dir", str(copy))
    assert sorted(run["id"] for run in list_runs(copy)) == ["a-completed", "b-failed"]


def test_an_ended_runs_summary_or_config_changed_since_its_row_was_written_is_read_again(ended_runs, tmp_path):
    """The run directories are the truth: a summary.json garbled after the run ended (a disk error, an edit), one
    removed, one put back (a kept summary moved in), or a config.json edited, was listed as the registry's row last
    said (`completed`) while `runs show` said `died`."""
    copy = tmp_path / "copy"
    shutil.copytree(ended_runs, copy)
    assert {r["id"]: r["status"] for r in list_runs(copy)} == {"a-completed": "completed", "b-failed": "failed"}
    completed, failed = copy / "a-completed", copy / "b-failed"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for run_dir in (completed, failed):  # made in this process: a kernel that is gone, as a run's is once it ended
        (run_dir / "kernel.pid").write_text(gone.stdout)
    whole = (completed / "summary.json").read_text()
    (completed / "summary.json").write_text(whole[:200])  # torn
    (failed / "summary.json").rename(tmp_path / "b-summary.json")  # gone
    listed = {r["id"]: r for r in list_runs(copy)}
    assert listed["a-completed"]["status"] == "died", listed["a-completed"]
    assert listed["a-completed"]["detail"].startswith("summary.json is unreadable ("), listed["a-completed"]
    assert listed["b-failed"]["status"] == "died", listed["b-failed"]
    shown = json.loads(cli("runs", "show", "a-completed", "--json", "--runs-dir", str(copy)))
    assert (shown["status"], shown["detail"]) == (listed["a-completed"]["status"], listed["a-completed"]["detail"])
    # both put back as they were (a move keeps the file's old time): listed as they ended again
    (completed / "summary.json").write_text(whole)
    (tmp_path / "b-summary.json").rename(failed / "summary.json")
    assert {r["id"]: r["status"] for r in list_runs(copy)} == {"a-completed": "completed", "b-failed": "failed"}
    config = json.loads((completed / "config.json").read_text())
    (completed / "config.json").write_text(json.dumps({**config, "target": 5, "flags": {"lr": 0.5}}))
    listed = {r["id"]: r for r in list_runs(copy)}
    assert (listed["a-completed"]["target"], listed["a-completed"]["flags"]) == (None, {"lr": 0.5})
    with Registry(copy) as registry:  # written back: the next list need not read them again
        rows = registry.runs(time.time())
    assert (rows["a-completed"]["status"], rows["a-completed"]["flags"]) == ("completed", {"lr": 0.5})


def test_a_runs_directory_on_a_read_only_mount_is_listed_through_its_registry_without_a_word(ended_runs,
                                                                                            mount_tmpfs):
    """An archive of runs on a read-only mount (a read-only NFS export, a snapshot): `runs list` warned `run registry
    ... not usable (OperationalError: unable to open database file) ... (`trainbus runs reindex` rebuilds it)`,
    a fix that cannot work there (SQLite's WAL mode wants to make a file beside it), and read every directory."""
    disk = mount_tmpfs("archive", 64 << 20)
    runs_dir = disk / "runs"
    shutil.copytree(ended_runs, runs_dir)
    before = list_runs(runs_dir)  # the copy's rows are written again for where they are now
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True, timeout=30)
    assert remounted.returncode == 0, remounted.stderr
    listed = subprocess.run([*trainbus_cmd(), "runs", "list", "--runs-dir", str(runs_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert (listed.returncode, listed.stderr) == (0, ""), listed.stderr
    assert _comparable(json.loads(listed.stdout)) == _comparable(json.loads(json.dumps(before))), listed.stdout
    with Registry(runs_dir) as registry:  # read through the registry: its rows, not a read of each directory
        assert sorted(registry.runs(time.time())) == ["a-completed", "b-failed"]
    # taking a run off the queue writes: said as the read-only mount it is, not as a full disk to free space on
    cancelled = subprocess.run([*trainbus_cmd(), "daemon", "cancel", "a-completed", "--runs-dir", str(runs_dir)],
                               capture_output=True, text=True, timeout=60)
    assert cancelled.returncode != 0 and "is on a read-only filesystem; do this where the runs directory is " \
        "mounted writable" in cancelled.stderr and "free space" not in cancelled.stderr, cancelled.stderr


def test_a_registry_that_cannot_be_written_costs_one_warning_line_and_never_the_run(tmp_path, capfd):
    runs_dir = tmp_path / "runs"
    (runs_dir / REGISTRY_NAME).mkdir(parents=True)  # not a database file: every open fails
    result = run_training(RunConfig(target=TINY, epochs=1, runs_dir=str(runs_dir), plugins=[]), run_id="r1")
    assert result.status == "completed"
    warnings = [line for line in capfd.readouterr().err.splitlines() if "registry" in line]
    assert len(warnings) == 1 and "not usable" in warnings[0] and "runs reindex" in warnings[0], warnings
    assert [r["id"] for r in list_runs(runs_dir)] == ["r1"]  # read from the run directory instead


def test_concurrent_writers_and_a_list_loop_never_see_a_locked_or_corrupt_registry(tmp_path):
    """Three kernels, two processes writing a row per connection as fast as they can, and a `runs list` loop."""
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    stop = tmp_path / "stop"
    lister = subprocess.Popen([sys.executable, "-c", LISTER, str(runs_dir), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(runs_dir), f"w{n}", "150"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    kernels = [KernelProcess(RunConfig(target=TINY, epochs=3, runs_dir=str(runs_dir), plugins=[]), tmp_path,
                             run_id=f"k{n}") for n in range(3)]
    try:
        for kernel in kernels:
            assert kernel.result(timeout_s=150)["status"] == "completed"
        for writer in writers:
            out, err = writer.communicate(timeout=150)
            assert writer.returncode == 0 and out.strip() == "150", err
    finally:
        stop.write_text("")
        for process in writers + [lister]:
            if process.poll() is None:
                process.wait(timeout=60)
        for kernel in kernels:
            kernel.kill()
    out, err = lister.communicate(timeout=60)
    assert lister.returncode == 0 and int(out) > 0, err
    assert "warning" not in err and "locked" not in err, err
    for kernel in kernels:
        assert "registry" not in kernel.stderr(), kernel.stderr()
    with sqlite3.connect(runs_dir / REGISTRY_NAME) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    runs = {r["id"]: r for r in list_runs(runs_dir)}
    assert {i: r["status"] for i, r in runs.items() if i.startswith("k")} == {f"k{n}": "completed" for n in range(3)}
    assert sorted(i for i in runs if i.startswith("w")) == sorted(f"w{n}-{i}" for n in range(2) for i in range(5))
    assert runs["w0-4"]["flags"] == {"i": 149}  # the last write of each row won
