"""`trainbus runs list` and `trainbus runs show` over a runs directory of real runs, one of each status:
completed, stopped (by a plugin), failed (the target raises), interrupted (Ctrl-C), running (a kernel in
another process) and died (that kernel killed)."""

from __future__ import annotations

import json
import math
import shutil
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainbus.kernel.cli import app
from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.runs import RunLookupError, list_runs, resolve_run
from trainbus.kernel.session import run_training
from trainbus.plugins._history import History
from trainbus.proto import JOURNAL_NAME, Event, event_to_map, pack
from trainbus.proto.journal_format import TAIL_BYTES, journal_tail, last_event_of

from conftest import TESTS_DIR, trainbus_cmd
from kernel_process import JournalTail, KernelProcess, process_gone, wait_until, cli as fork_cli

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"
FAILING = f"{TESTS_DIR / 'specs.py'}:failing"
PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"
ENDED = {"a-completed": "completed", "b-stopped": "stopped", "c-failed": "failed", "d-interrupted": "interrupted"}


def _interrupted_run(runs_dir: Path) -> None:
    """A run in this process that gets Ctrl-C (SIGINT, as the terminal sends it) after its second step."""
    journal = JournalTail(runs_dir / "d-interrupted" / JOURNAL_NAME)
    sent = threading.Event()

    def press_ctrl_c():
        try:
            wait_until(lambda: journal.step() >= 2, 60, "2 steps of the interrupted run", poll_s=0.02)
        except AssertionError:
            return
        sent.set()
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    cfg = RunConfig(target=PACED, epochs=3, runs_dir=str(runs_dir),
                    hyperparameters={"batch_size": 256, "step_sleep_s": 0.2})
    result = run_training(cfg, run_id="d-interrupted", install_sigint=True)
    presser.join(5)
    assert sent.is_set() and result.status == "interrupted", result


@pytest.fixture(scope="module")
def every_status(tmp_path_factory):
    """A runs directory with one run of each ended status and a kernel still running (the fixture's kernel)."""
    tmp = tmp_path_factory.mktemp("runs_cli")
    runs_dir = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(TESTS_DIR))  # plugin processes import tests/fixture_plugins.py
        # the running one first: its process starts (imports torch) while the others run here
        kernel = KernelProcess(RunConfig(target=PACED, epochs=100, runs_dir=str(runs_dir), hyperparameters={
            "batch_size": 256, "step_sleep_s": 0.25}), tmp, run_id="e-running")
        try:
            assert run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir)),
                                run_id="a-completed").status == "completed"
            stopper = PluginConfig("stopper", "fixture_plugins:Stopper", {"epoch": 1})
            assert run_training(RunConfig(target=TINY, epochs=50, runs_dir=str(runs_dir), plugins=[stopper]),
                                run_id="b-stopped").status == "stopped"
            assert run_training(RunConfig(target=FAILING, epochs=2, runs_dir=str(runs_dir)),
                                run_id="c-failed").status == "failed"
            _interrupted_run(runs_dir)
            kernel.wait_event("end_epoch", timeout_s=60)  # the running one has an epoch to show
            yield runs_dir, kernel
        finally:
            kernel.kill()


def cli(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_list_shows_each_run_with_its_status_newest_first(every_status):
    runs_dir, kernel = every_status
    runs = json.loads(cli("runs", "list", "--runs-dir", str(runs_dir), "--json"))
    by_id = {r["id"]: r for r in runs}
    assert {r["id"]: r["status"] for r in runs} == {**ENDED, "e-running": "running"}
    # newest first: the in-process runs were started one after another; the kernel process started before them
    ended = [r["id"] for r in runs if r["id"] in ENDED]
    assert ended == sorted(ENDED, reverse=True)

    completed = by_id["a-completed"]
    assert completed["target"] == TINY and completed["epochs_completed"] == 2 and completed["epochs"] == 2
    assert completed["steps"] == 6 and completed["validation_loss"] > 0 and completed["duration_s"] > 0
    assert completed["started_at"] and completed["error"] is None and completed["plugin_trouble"] == []

    stopped = by_id["b-stopped"]
    assert any("enough after epoch 1" in reason for reason in stopped["stop_reasons"])
    assert 1 <= stopped["epochs_completed"] < 50

    failed = by_id["c-failed"]
    assert "FloatingPointError: loss exploded" in failed["error"] and failed["epochs_completed"] == 1

    interrupted = by_id["d-interrupted"]
    # within epoch 1 (6 steps): a cut-short epoch is not a completed one
    assert 2 <= interrupted["steps"] < 6 and interrupted["epochs_completed"] == 0
    assert any("Ctrl-C" in reason for reason in interrupted["stop_reasons"])

    running = by_id["e-running"]
    assert running["pid"] == kernel.pid and str(kernel.pid) in running["detail"]
    assert running["epochs_completed"] >= 1 and running["epochs"] == 100 and running["validation_loss"] > 0
    assert running["last_event"]["age_s"] < 10 and running["duration_s"] > 0

    table = cli("runs", "list", "--runs-dir", str(runs_dir))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "target"]
    rows = {line.split()[0]: line for line in lines[1:]}
    for run_id, status in {**ENDED, "e-running": "running"}.items():
        assert rows[run_id].split()[1] == status, table
    assert "specs.py:tiny" in rows["a-completed"] and " 2/2 " in rows["a-completed"]
    assert "  FloatingPointError: loss exploded" in rows["c-failed"] and rows["a-completed"].endswith(" -")
    assert "fixture_targets.py:paced_digits" in rows["e-running"] and "/100" in rows["e-running"]
    assert [line.split()[0] for line in lines[1:]].index("d-interrupted") < \
        [line.split()[0] for line in lines[1:]].index("a-completed")


def test_show_has_a_column_for_each_training_and_validation_metric(tmp_path):
    result = run_training(RunConfig(epochs=1, device="cpu", runs_dir=str(tmp_path), plugins=[]))  # digits: accuracy
    text = cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path))
    header = next(line for line in text.splitlines() if line.startswith("epoch "))
    assert header.split("  ")[:5] == ["epoch", "steps", "train loss", "train accuracy", "val loss"], header
    assert "val accuracy" in header
    row = next(line for line in text.splitlines() if line.startswith("1*"))
    assert len(row.split()) == 9  # epoch, steps, the two losses, the two accuracies, lr, time ("0.1 s")


def test_a_run_without_validation_shows_its_training_metrics_in_list_show_compare_and_its_summary(tmp_path):
    """Found by a user-code audit: a run with no validation set showed '-' for its metrics everywhere but the epoch
    table, though its spec computed an accuracy every epoch."""
    from trainbus.kernel.registry import Registry

    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:tiny_unvalidated", epochs=1, device="cpu",
                                    runs_dir=str(tmp_path), plugins=[]))
    accuracy = result.outcome["training_metrics"]["accuracy"]
    assert 0 <= accuracy <= 1 and result.outcome["validation_metrics"] == {}
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["outcome"]["training_metrics"] == {"accuracy": accuracy}
    listed = cli("runs", "list", "--runs-dir", str(tmp_path))
    assert f"train accuracy {accuracy:.4g}"[:16] in listed, listed
    shown = cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path))
    assert re.search(r"^  training\s+loss \S+, accuracy \S+ \(last epoch\)$", shown, re.M), shown
    compared = json.loads(cli("runs", "compare", result.run_id, "--runs-dir", str(tmp_path), "--json"))
    assert compared[0]["metrics"]["training_accuracy"] == accuracy, compared
    with Registry(tmp_path) as registry:  # the column survives the registry's round trip
        assert registry.runs(time.time())[result.run_id]["training_metrics"] == {"accuracy": accuracy}


def test_list_says_why_a_run_is_died_in_its_error_column(tmp_path):
    """README: `runs list` shows a run `died` once its kernel is gone, as for a summary.json that is torn, the
    detail saying which. The table said only `died`, its error column `-`: the detail was in --json and `runs show`
    alone. It goes in the error column, as a queued or cancelled run's does."""
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:tiny", epochs=1, device="cpu",
                                    runs_dir=str(tmp_path), plugins=[]))
    summary = Path(result.run_dir) / "summary.json"
    summary.write_text(summary.read_text()[:40])  # torn
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (Path(result.run_dir) / "kernel.pid").write_text(gone.stdout)  # the kernel ran in this process: now gone
    listed = cli("runs", "list", "--runs-dir", str(tmp_path))
    row = next(line for line in listed.splitlines() if line.startswith(result.run_id))
    assert " died " in row and "summary.json is unreadable" in " ".join(listed.split()), listed


def test_compare_puts_training_then_validation_then_best_columns_whichever_run_comes_first(tmp_path):
    """README: compare's columns are the flags, then the last epoch's training loss and metrics, validation loss and
    metrics, and the best validation loss. They came in the order the runs first had them: training loss, validation
    loss, training accuracy, then, with a run without validation named first, the best validation loss and epoch
    before the other run's validation accuracy."""
    ids = [run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:{name}", epochs=1, device="cpu",
                                  runs_dir=str(tmp_path), plugins=[])).run_id
           for name in ("tiny_unvalidated", "tiny_accuracy")]
    header = cli("runs", "compare", *ids, "--runs-dir", str(tmp_path)).splitlines()[0]
    columns = [c for c in re.split(r"\s{2,}", header.strip()) if "loss" in c or "accuracy" in c or "best" in c]
    assert columns == ["train loss", "train accuracy", "val loss", "val accuracy", "best val loss",
                       "best epoch"], header
    compared = json.loads(cli("runs", "compare", *ids, "--runs-dir", str(tmp_path), "--json"))
    assert list(compared[1]["metrics"]) == ["training_loss", "training_accuracy", "validation_loss",
                                            "validation_accuracy", "best_validation_loss", "best_epoch"], compared


def _strict_json(text: str):
    """JSON as jq and JavaScript's JSON.parse read it: NaN and Infinity are no JSON."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in --json output: not JSON")
    return json.loads(text, parse_constant=refuse)


def test_json_of_a_diverged_run_is_strict_json_with_null_for_its_nan_losses(tmp_path):
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:diverged", epochs=1, runs_dir=str(tmp_path),
                                    plugins=[]))
    assert result.status == "completed" and math.isnan(result.outcome["training_loss"]), result
    listed = _strict_json(cli("runs", "list", "--runs-dir", str(tmp_path), "--json"))
    assert listed[0]["training_loss"] is None and listed[0]["best"] == {"validation_loss": None, "epoch": 1}, listed
    shown = _strict_json(cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path), "--json"))
    assert shown["validation_loss"] is None and shown["epoch_table"][0]["training_loss"] is None, shown
    compared = _strict_json(cli("runs", "compare", result.run_id, "--runs-dir", str(tmp_path), "--json"))
    assert compared[0]["metrics"]["training_loss"] is None, compared
    ended = _strict_json(cli("attach", result.run_id, "--runs-dir", str(tmp_path), "--json"))  # a run that ended
    assert ended["type"] == "ended" and ended["training_loss"] is None, ended
    # the run's own record keeps what the kernel wrote: Python's json reads NaN back as NaN
    assert math.isnan(json.loads((Path(result.run_dir) / "summary.json").read_text())["outcome"]["training_loss"])


def test_a_nan_validation_loss_is_not_the_best_once_an_epoch_has_a_number(tmp_path):
    """NaN compares less than nothing: a first epoch whose validation loss was NaN stayed the run's best through every
    later epoch, in summary.json (best_validation_loss NaN, best_epoch 1) and in runs show ("best validation loss nan
    at epoch 1", its row starred)."""
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:nan_first_validation", runs_dir=str(tmp_path),
                                    plugins=[]))
    assert result.status == "completed", result
    outcome = result.outcome
    assert math.isfinite(outcome["best_validation_loss"]) and outcome["best_epoch"] in (2, 3), outcome
    shown = json.loads(cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path), "--json"))
    assert math.isnan(shown["epoch_table"][0]["validation_loss"] or math.nan), shown["epoch_table"]
    assert shown["best"] == {"validation_loss": outcome["best_validation_loss"], "epoch": outcome["best_epoch"]}, \
        shown["best"]
    # the plots' "best validation (epoch N)" line (visualization, runs plot, the e-mail's plot)
    assert History.from_journal(result.run_dir).best_validation().epoch == outcome["best_epoch"]


def test_show_names_a_plugin_that_never_said_hello_as_list_does(tmp_path):
    """A plugin that exited before its hello (a command that speaks no PROTOCOL.md, a plugin that quits at start)
    took no event of the run: runs list named it as trouble, but runs show's plugins table said '-'."""
    result = run_training(RunConfig(epochs=1, device="cpu", runs_dir=str(tmp_path),
                                    plugins=[PluginConfig(name="quitter", target="", command=["true"])]))
    assert result.status == "completed" and result.plugins["quitter"]["greeted"] is False, result.plugins
    assert "quitter never said hello" in cli("runs", "list", "--runs-dir", str(tmp_path))
    shown = cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path))
    assert re.search(r"^quitter\s+exited\s+0\s+never said hello\s", shown, re.M), shown


def test_show_tells_one_run_in_detail(every_status):
    runs_dir, _ = every_status
    completed = json.loads(cli("runs", "show", "a-completed", "--runs-dir", str(runs_dir), "--json"))
    assert [row["epoch"] for row in completed["epoch_table"]] == [1, 2]
    assert all(row["validation_loss"] > 0 and row["training_loss"] > 0 for row in completed["epoch_table"])
    assert completed["best"]["validation_loss"] == min(r["validation_loss"] for r in completed["epoch_table"])
    assert completed["device"] == "cpu" and completed["model"] == "Linear"
    files = {Path(f["path"]).name for f in completed["files"]}
    assert {"config.json", JOURNAL_NAME, "summary.json", "final.pt", "kernel.log", "kernel.pid"} <= files

    text = cli("runs", "show", "a-completed", "--runs-dir", str(runs_dir))
    assert text.startswith("run a-completed: completed")
    assert str(runs_dir / "a-completed" / "summary.json") in text and "best" in text
    epoch_rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [row[0].rstrip("*") for row in epoch_rows] == ["1", "2"]

    # by its path, and the plugin that stopped it, with its state and log
    stopped = json.loads(cli("runs", "show", str(runs_dir / "b-stopped"), "--json"))
    assert stopped["status"] == "stopped" and stopped["plugins"]["stopper"]["state"] == "exited"
    assert stopped["plugins"]["stopper"]["log"] == str(runs_dir / "b-stopped" / "plugins" / "stopper.log")
    text = cli("runs", "show", str(runs_dir / "b-stopped"))
    assert "enough after epoch 1" in text and "stopper" in text and "stopper.log" in text

    failed = cli("runs", "show", "c-f", "--runs-dir", str(runs_dir))  # a unique start of an id will do
    assert failed.startswith("run c-failed: failed") and "error       FloatingPointError: loss exploded" in failed

    interrupted = json.loads(cli("runs", "show", "d-interrupted", "--runs-dir", str(runs_dir), "--json"))
    assert interrupted["status"] == "interrupted" and [r["epoch"] for r in interrupted["epoch_table"]] == [1]


def test_a_copy_of_a_running_runs_directory_is_not_running(every_status, tmp_path):
    """`cp -r` of a live run: its kernel.pid names a live kernel, the original's, and the copy was listed running
    for as long as that trained; a kernel keeps its own run's kernel.log open, so the copy's is not its."""
    runs_dir, kernel = every_status
    copy = tmp_path / "runs" / "e-running"
    shutil.copytree(runs_dir / "e-running", copy, copy_function=_copy_file)
    runs = {r["id"]: r for r in json.loads(cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json"))}
    assert (runs["e-running"]["status"], runs["e-running"]["detail"]) == (
        "died", f"kernel pid {kernel.pid} trains another run (this one is a copy of it?) and wrote no summary.json")
    original = json.loads(cli("runs", "list", "--runs-dir", str(runs_dir), "--json"))
    assert {r["id"]: r["status"] for r in original}["e-running"] == "running"


def test_a_run_directory_whose_name_holds_a_newline_stays_on_its_own_row(every_status, tmp_path):
    """A run folder's name is any name the file system takes (a copy made by a script, a name pasted with a newline):
    printed raw, `\n` split its row in two in `runs list`, and a second line began as if it were another run."""
    runs_dir, _ = every_status
    odd = tmp_path / "runs" / "copied\nb-stopped"
    shutil.copytree(runs_dir / "b-stopped", odd)
    listed = subprocess.run([*trainbus_cmd(), "runs", "list", "--runs-dir", str(tmp_path / "runs")], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert len(rows) == 1 and rows[0].startswith("copied\\x0ab-stopped "), listed.stdout
    shown = subprocess.run([*trainbus_cmd(), "runs", "show", str(odd)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith("run copied\\x0ab-stopped: stopped"), shown.stdout


def _copy_file(source: str, destination: str) -> None:
    """As cp -r copies: regular files (the run's sockets are not), their times kept."""
    if os.path.isfile(source):
        shutil.copy2(source, destination)


def test_a_running_kernel_and_then_a_killed_one(every_status):
    runs_dir, kernel = every_status
    shown = json.loads(cli("runs", "show", "e-running", "--runs-dir", str(runs_dir), "--json"))
    assert shown["status"] == "running" and shown["pid"] == kernel.pid and shown["epoch_table"]
    assert shown["last_event"]["type"] and shown["plugins"] == {}
    text = cli("runs", "show", "e-running", "--runs-dir", str(runs_dir))
    assert text.startswith(f"run e-running: running (kernel pid {kernel.pid} is alive)") and "running for" in text

    kernel.kill()
    assert process_gone(kernel.pid)
    runs = {r["id"]: r for r in json.loads(cli("runs", "list", "--runs-dir", str(runs_dir), "--json"))}
    died = runs["e-running"]
    assert died["status"] == "died" and "is gone" in died["detail"] and died["epochs_completed"] >= 1
    text = cli("runs", "show", "e-running", "--runs-dir", str(runs_dir))
    assert text.startswith(f"run e-running: died (kernel pid {kernel.pid} is gone and wrote no summary.json)")


def test_the_installed_command_and_a_run_that_is_not_there(every_status):
    runs_dir, _ = every_status
    r = subprocess.run(trainbus_cmd() + ["runs", "list", "--runs-dir", str(runs_dir)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "a-completed" in r.stdout and "completed" in r.stdout, r.stderr
    r = subprocess.run(trainbus_cmd() + ["runs", "show", "nope", "--runs-dir", str(runs_dir)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: no run 'nope': ")
    assert str(runs_dir / "nope") in r.stderr, "names what it looked at"


def test_a_run_directory_with_nothing_in_it_yet_is_not_called_missing(tmp_path):
    (tmp_path / "r-starting").mkdir()
    with pytest.raises(RunLookupError) as e:
        resolve_run("r-starting", tmp_path)
    assert "holds neither a config.json nor a journal" in str(e.value) and "does not exist" not in str(e.value)
    with pytest.raises(RunLookupError, match="does not exist"):
        resolve_run("r-other", tmp_path)


def _write_long_journal(path: Path, batches_before: int, batches_after: int) -> int:
    """A journal of a run in epoch 2: epoch 1 with many batches, its end_epoch, then more batches. Returns its last seq."""
    seq = 0

    def event(type_, step, epoch, **data):
        nonlocal seq
        seq += 1
        return pack(event_to_map(Event(seq=seq, run="long", type=type_, ts=time.time() - 3600 + seq * 1e-4,
                                       step=step, epoch=epoch, data=data)))
    with open(path, "wb") as f:
        f.write(event("start_training_session", 0, 0, epochs=5, device="cpu", model="Big", parameters=1))
        step = 0
        for epoch, batches in ((1, batches_before), (2, batches_after)):
            f.write(event("start_epoch", step, epoch))
            chunk = []
            for i in range(batches):
                step += 1
                chunk.append(event("end_training_batch", step, epoch, batch_index=i, loss=0.5, batch_size=32))
                if len(chunk) == 10_000:
                    f.write(b"".join(chunk))
                    chunk = []
            f.write(b"".join(chunk))
            if epoch == 1:
                f.write(event("end_epoch", step, epoch, training_loss=0.5, validation_loss=0.25,
                              validation_metrics={"accuracy": 0.9}))
    return seq


def test_list_reads_only_the_tail_of_a_long_journal(tmp_path, monkeypatch):
    """A run without a summary (and, from before kernel.pid, without a pid file): list reads its journal's head
    and a bounded tail, never the whole of it; its last end_epoch, out of the tail, is found by its bytes."""
    run_dir = tmp_path / "runs" / "long"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"target": "big.py:build", "epochs": None}))
    journal = run_dir / JOURNAL_NAME
    last_seq = _write_long_journal(journal, batches_before=150_000, batches_after=20_000)
    assert journal.stat().st_size > 8 * TAIL_BYTES and journal.stat().st_size - 20_000 * 60 > TAIL_BYTES

    import trainbus.kernel.run_details as details_module
    import trainbus.kernel.run_overview as overview_module

    def no_streaming(*_):
        raise AssertionError("list decoded the whole journal")
    monkeypatch.setattr(details_module, "stream_journal", no_streaming)
    decoded = []  # what list decoded, counted (not timed: a busy machine makes any time bound flaky or meaningless)
    for name in ("journal_head", "journal_tail"):
        def counting(*args, _read=getattr(overview_module, name), **kwargs):
            events = _read(*args, **kwargs)
            decoded.extend(events)
            return events
        monkeypatch.setattr(overview_module, name, counting)
    (run,) = list_runs(tmp_path / "runs")
    assert run["status"] == "died" and "no kernel.pid" in run["detail"]
    assert run["last_event"]["seq"] == last_seq and run["steps"] == 170_000
    assert run["epochs_completed"] == 1 and run["epochs"] == 5
    assert run["validation_loss"] == 0.25 and run["validation_metrics"] == {"accuracy": 0.9}
    assert 0 < len(decoded) < last_seq // 10, f"list decoded {len(decoded)} of {last_seq} events"

    # a tail that starts in the middle of a record still yields whole, consecutive records up to the end
    for cut in (300, 1000, 123_457):
        tail = journal_tail(journal, cut)
        assert tail and tail[-1].seq == last_seq and [e.seq for e in tail] == list(range(tail[0].seq, last_seq + 1))
    assert last_event_of(journal, "end_epoch").epoch == 1


def test_the_end_of_a_real_journal_is_found_from_its_middle(every_status):
    """The kernel's records carry "n" (9 keys), and the marker a read from the middle looked for was a record's
    without it (8): every tail that began mid-file found nothing, so `runs list` had no last event of a run whose
    journal outgrew 64 KiB, and last_event_of found no epoch at all. The synthetic journal above had no "n"."""
    journal = every_status[0] / "a-completed" / JOURNAL_NAME
    last = read_events(journal)[-1]
    assert last.n is not None and journal.stat().st_size > 4096
    for cut in (300, 1000, 4096):
        tail = journal_tail(journal, cut)
        assert tail and tail[-1].seq == last.seq, (cut, [e.seq for e in tail])
    assert last_event_of(journal, "end_epoch", max_bytes=4096).epoch == 2


@pytest.mark.parametrize("where", ["mid-journal", "in its last records"])
def test_runs_show_and_plot_say_when_a_bad_byte_hides_the_journal_after_it(every_status, tmp_path, where):
    """An in-order read stops at a bad byte; `runs show` showed the run as if it had ended there, without a word,
    and still did when the bad byte was among the last few records; `runs plot` drew up to it without one."""
    from trainbus.proto.journal_format import iter_records

    run_dir = tmp_path / "a-completed"
    shutil.copytree(every_status[0] / "a-completed", run_dir)
    journal = run_dir / JOURNAL_NAME
    records = list(iter_records(journal))
    bad = records[len(records) // 2] if where == "mid-journal" else records[-3]
    damaged = bytearray(journal.read_bytes())
    damaged[bad[0]] = 0xc1  # a byte msgpack never uses
    journal.write_bytes(bytes(damaged))
    seq = bad[2]["seq"]
    said = (f"warning: the journal cannot be read past event {seq - 1}: events {seq}-{records[-1][2]['seq']} "
            f"follow a damaged record (`trainbus run --resume` keeps their bytes beside the journal)")
    shown = subprocess.run([*trainbus_cmd(), "runs", "show", str(run_dir)], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and f"trainbus: {said}" in shown.stderr, shown.stderr
    plotted = subprocess.run([*trainbus_cmd(), "runs", "plot", str(run_dir), "--out", str(tmp_path / "plots")],
                             capture_output=True, text=True, timeout=120)
    assert plotted.returncode == 0 and f"trainbus: {said}; the plots leave those events out" in plotted.stderr, \
        plotted.stderr


def test_runs_show_of_a_run_whose_journal_was_deleted_says_so_and_keeps_what_its_summary_holds(tmp_path):
    """With the journal gone (an `rm`, a cleanup script) `runs show` left out the epochs table, the best epoch and the
    checkpoints without a word, as if the run had never had any."""
    runs_dir = tmp_path / "runs"
    assert run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir), plugins=[]),
                        run_id="r1").status == "completed"
    outcome = json.loads((runs_dir / "r1" / "summary.json").read_text())["outcome"]
    (runs_dir / "r1" / JOURNAL_NAME).unlink()
    shown = subprocess.run([*trainbus_cmd(), "runs", "show", "r1", "--runs-dir", str(runs_dir)], capture_output=True,
                           text=True, timeout=60)
    journal = (runs_dir / "r1" / JOURNAL_NAME).resolve()
    assert shown.returncode == 0 and shown.stderr == (
        f"trainbus: warning: the journal {journal} is not there (deleted?): the run's per-epoch metrics, its plugins' "
        f"history and its checkpoints are in it; what this shows leaves those events out\n"), shown.stderr
    assert "completed" in shown.stdout.splitlines()[0]
    assert f"best        validation loss {outcome['best_validation_loss']:.4f} at epoch {outcome['best_epoch']}" \
        in shown.stdout, shown.stdout
    as_json = subprocess.run([*trainbus_cmd(), "runs", "show", "r1", "--runs-dir", str(runs_dir), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["journal_damage"] == [shown.stderr.split("warning: ")[1].split(";")[0]]


def test_runs_show_of_a_damaged_journal_keeps_the_best_the_run_itself_recorded(every_status, tmp_path):
    """The journal read stops at a bad byte before the best epoch's end_epoch: `runs show` took the best of the
    epochs it could read, over summary.json's, and said "best validation loss 1.05 at epoch 2" beside a last epoch
    of 0.46. The run's own account of its best (summary.json, every epoch) wins where the journal lost epochs."""
    from trainbus.kernel.run_details import run_details
    from trainbus.proto.journal_format import iter_records

    run_dir = tmp_path / "a-completed"
    shutil.copytree(every_status[0] / "a-completed", run_dir)
    outcome = json.loads((run_dir / "summary.json").read_text())["outcome"]
    journal = run_dir / JOURNAL_NAME
    records = list(iter_records(journal))
    best_epoch_end = next(r for r in records if r[2]["type"] == "end_epoch" and r[2]["epoch"] == outcome["best_epoch"])
    damaged = bytearray(journal.read_bytes())
    damaged[best_epoch_end[0]] = 0xc1  # a byte msgpack never uses: the read stops before the best epoch's end
    journal.write_bytes(bytes(damaged))

    details = run_details(run_dir)
    assert details["journal_damage"] and outcome["best_epoch"] not in [row["epoch"] for row in details["epoch_table"]]
    assert details["best"] == {"validation_loss": outcome["best_validation_loss"], "epoch": outcome["best_epoch"]}


def test_a_continued_run_lists_the_epochs_its_last_session_planned(tmp_path):
    """`run --resume RUN --epochs 8` extends a run: its config.json says 8, while the journal's head (all that
    list reads of its start) holds only the first session's start_training_session (epochs 5)."""
    run_dir = tmp_path / "runs" / "continued"
    run_dir.mkdir(parents=True)
    _write_long_journal(run_dir / JOURNAL_NAME, batches_before=20_000, batches_after=10)
    (run_dir / "config.json").write_text(json.dumps({"target": "big.py:build", "epochs": 8}))
    (run,) = list_runs(tmp_path / "runs")
    assert run["epochs"] == 8, run["epochs"]


def _two_session_run(run_dir: Path, first_ts: float, second_ts: float, end_ts: float) -> None:
    """A run continued in place: a session of 60 s from first_ts, one from second_ts to end_ts (its last event)."""
    seq = 0

    def event(type_, ts, step, epoch, **data):
        nonlocal seq
        seq += 1
        return pack(event_to_map(Event(seq=seq, run=run_dir.name, type=type_, ts=ts, step=step, epoch=epoch,
                                       data=data)))
    run_dir.mkdir(parents=True)
    with open(run_dir / JOURNAL_NAME, "wb") as f:
        f.write(event("start_training_session", first_ts, 0, 0, epochs=4, device="cpu", model="M", parameters=1))
        f.write(event("end_epoch", first_ts + 60, 10, 1, training_loss=0.5, validation_loss=0.4))
        f.write(event("start_training_session", second_ts, 10, 1, epochs=4, device="cpu", model="M", parameters=1))
        f.write(event("end_epoch", end_ts, 20, 2, training_loss=0.3, validation_loss=0.2))
    (run_dir / "config.json").write_text(json.dumps({"target": "m.py:build", "epochs": 4}))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / "kernel.pid").write_text(gone.stdout)  # its kernel is gone: died


@pytest.mark.parametrize("status", ["died", "completed"])
def test_show_of_a_continued_run_says_which_session_each_time_is_of(tmp_path, status):
    """`started` was the first session's start and `lasted` the latest session's length (a completed run), or the
    time from the first start to the last event, the hours between the sessions included (a run that died): said
    as `started 10:00, lasted 1m 40s (the latest session)` or `lasted 30m 50s`, neither saying when the latest
    session began. A run's duration is its latest session's, in runs list too."""
    first = time.time() - 3600
    run_dir = tmp_path / "runs" / "r1"
    _two_session_run(run_dir, first, first + 1800, first + 1900)
    if status == "completed":
        (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "duration_s": 100.0}))
    (listed,) = list_runs(tmp_path / "runs")
    assert (listed["status"], listed["duration_s"]) == (status, 100.0), listed
    shown = json.loads(cli("runs", "show", "r1", "--runs-dir", str(tmp_path / "runs"), "--json"))
    assert shown["duration_s"] == 100.0 and len(shown["sessions"]) == 2, shown
    text = cli("runs", "show", "r1", "--runs-dir", str(tmp_path / "runs"))
    started = [line for line in text.splitlines() if line.startswith("  started")]
    when = lambda ts: datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")  # noqa: E731
    assert started == [f"  started     {when(first)} (the first of 2 sessions); the latest {when(first + 1800)}, "
                       f"lasted 1m 40s"], text


def test_a_stop_mid_epoch_leaves_that_epoch_out_of_the_best(tmp_path, monkeypatch):
    """A partial epoch's validation follows fewer batches: never the run's best, in runs show as in summary.json; the
    run's last metrics, that epoch's, are said to be of it, not of a last (whole) epoch."""
    from fixture_targets import open_gate

    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))  # the plugin process imports tests/fixture_plugins.py
    # 6 steps an epoch: a stop in epoch 4, its line journaled when the kernel has the stop
    stopper = PluginConfig("stopper", "fixture_plugins:StopAtStep", {"step": 20, "then_log": True})
    # Held at the gate until the kernel has the stop: a reply that came after four more paced steps (a busy box)
    # landed at epoch 4's end, and no epoch was partial.
    gate = tmp_path / "gate"
    open_gate(gate, 21)

    def open_once_stopped() -> None:
        journal = wait_until(lambda: next((tmp_path / "runs").glob(f"*/{JOURNAL_NAME}"), None), 120, "a journal")
        wait_until(lambda: JournalTail(journal).of("log", "stopper"), 120, "the stopper's line", poll_s=0.05)
        open_gate(gate, 60)

    threading.Thread(target=open_once_stopped, daemon=True).start()
    result = run_training(RunConfig(target=PACED, epochs=10, runs_dir=str(tmp_path / "runs"), plugins=[stopper],
                                    ready_timeout_s=120, hyperparameters={"batch_size": 256, "step_sleep_s": 0,
                                                                          "gate": str(gate)}))
    assert result.status == "stopped" and result.outcome["steps"] in (21, 22), result.outcome
    shown = json.loads(cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path / "runs"), "--json"))
    partial = [row for row in shown["epoch_table"] if row["partial"]]
    assert len(partial) == 1 and partial[0] == shown["epoch_table"][-1], shown["epoch_table"]
    assert shown["best"]["epoch"] == result.outcome["best_epoch"] != partial[0]["epoch"], shown["best"]
    text = cli("runs", "show", result.run_id, "--runs-dir", str(tmp_path / "runs"))
    assert f"{partial[0]['epoch']} (partial)" in text, text
    last = [line for line in text.splitlines() if line.startswith(("  training ", "  validation "))]
    assert len(last) == 2 and all(line.endswith(f"(epoch {partial[0]['epoch']}, partial)") for line in last), text
    # summary.json, `runs list` (from the directory, then from the registry) and the run's end line say it too
    done = result.outcome["epochs_completed"]
    assert result.outcome["last_epoch_partial"] is True and done + 1 == partial[0]["epoch"], result.outcome
    for _ in range(2):
        (row,) = json.loads(cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json"))
        assert row["last_epoch_partial"] is True, row
        listed = fork_cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), env={"COLUMNS": "300"}).stdout
        assert f"{done}/10 + partial {done + 1}" in listed, listed
    (compared,) = json.loads(cli("runs", "compare", result.run_id, "--runs-dir", str(tmp_path / "runs"), "--json"))
    assert compared["last_epoch_partial"] is True, compared
    compared = fork_cli("runs", "compare", result.run_id, "--runs-dir", str(tmp_path / "runs"), env={"COLUMNS": "300"})
    assert f" {done} + partial {done + 1} " in compared.stdout, compared.stdout
    from trainbus.kernel.cli_common import out
    from trainbus.kernel.cli_run_summary import print_summary

    with out.capture() as said:
        print_summary(result)
    assert f"validation loss {result.outcome['validation_loss']:.4f}" in said.get(), said.get()
    assert f"(epoch {done + 1}, partial)\n" in said.get(), said.get()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two completed runs whose ids start alike: x-alpha and x-beta."""
    runs_dir = tmp_path_factory.mktemp("two_runs") / "runs"
    for run_id in ("x-alpha", "x-beta"):
        assert run_training(RunConfig(target=TINY, epochs=1, runs_dir=str(runs_dir), plugins=[]),
                            run_id=run_id).status == "completed"
    return runs_dir


def _trainbus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`trainbus ARGS` in a process of its own, forked (kernel_process.cli): the console script's own start (0.4 s of
    CPU against 0.27 s forked for runs show, and seconds on a busy box) is not what these sixty commands test."""
    return fork_cli(*args, cwd=cwd)


def _in_process(*args: str) -> subprocess.CompletedProcess:
    """`trainbus ARGS` in this process (as cli() above), shown as _trainbus shows a forked one, for the commands a
    test runs many times over (each forked one ~0.27 s of CPU): an exception the command does not turn into its
    exit code raises here, the test's failure."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(["trainbus", *args], result.exit_code, result.stdout, result.stderr)


def _error_line(r: subprocess.CompletedProcess) -> str:
    """Exit 2 with exactly one line, `error: ...`, on stderr and nothing on stdout; returns that line."""
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and r.stderr.count("error:") == 1, r.stderr
    return r.stderr.strip()


@pytest.mark.parametrize("command", [["runs", "show"], ["runs", "plot"], ["runs", "stop"], ["runs", "delete", "--yes"],
                                     ["runs", "resume"], ["plugins", "attach", "-", "cpu"], ["attach"]])
def test_a_run_id_that_is_not_utf_8_is_no_run_in_one_line(command, two_runs):
    """A run id with a byte that is not UTF-8 (a terminal of another encoding, a paste): the registry's lookup of
    run-id prefixes died on it (UnicodeEncodeError: surrogates not allowed) with a traceback; no run id has one."""
    runs_dir = two_runs
    odd = os.fsdecode(b"x-\xff")
    words = [odd if word == "-" else word for word in command] + ([] if "-" in command else [odd])
    line = _error_line(_trainbus(*words, "--runs-dir", str(runs_dir)))
    assert "no run 'x-\\udcff'" in line, line
    assert sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) == ["x-alpha", "x-beta"]


def test_plot_and_resume_take_a_unique_start_of_a_run_id_as_show_does(two_runs, tmp_path):
    plots = tmp_path / "plots"
    drawn = _trainbus("runs", "plot", "x-a", "--runs-dir", str(two_runs), "--out", str(plots))
    assert drawn.returncode == 0 and (plots / "loss.png").is_file(), drawn.stderr
    # the run it names is found (and refused here only because it completed every epoch it planned)
    line = _error_line(_trainbus("run", "--resume", "x-a", "--runs-dir", str(two_runs)))
    assert line.startswith("error: run x-alpha has completed (1 epoch); nothing to resume"), line

    for command in (["runs", "plot", "x-"], ["run", "--resume", "x-"]):
        line = _error_line(_trainbus(*command, "--runs-dir", str(two_runs)))
        assert f"run 'x-' is ambiguous in {two_runs}: x-alpha, x-beta" in line, line
    assert sorted(p.name for p in two_runs.iterdir() if p.is_dir()) == ["x-alpha", "x-beta"], "no run made"


def test_compare_lists_a_run_named_twice_once(two_runs):
    """By its id twice, by a unique start and its id, by its directory: one row, in the order first named."""
    alpha = str(two_runs / "x-alpha")
    compared = json.loads(cli("runs", "compare", "x-beta", "x-alpha", "x-a", alpha, "x-beta", "--runs-dir",
                              str(two_runs), "--json"))
    assert [row["id"] for row in compared] == ["x-beta", "x-alpha"], compared


def test_a_prefix_is_unique_only_counting_the_runs_the_registry_alone_holds(tmp_path):
    """A run the daemon holds without a directory (queued; failed before its kernel made one) shares the prefix:
    `runs delete y-` picked y-alpha, the one run with a directory."""
    from trainbus.kernel.registry import Registry

    (tmp_path / "y-alpha").mkdir()
    (tmp_path / "y-alpha" / "config.json").write_text("{}")
    with Registry(tmp_path) as registry:
        registry.record([{"id": "y-alpha", "dir": str(tmp_path / "y-alpha"), "status": "completed"}], time.time())
        registry.submit({"id": "y-beta", "argv": ["x.py:f"], "cwd": str(tmp_path), "state": "ended",
                         "submitted_ts": time.time()},
                        {"id": "y-beta", "status": "failed"}, time.time())
    with pytest.raises(RunLookupError, match="run 'y-' is ambiguous in .*: y-alpha, y-beta \\(give more of the id\\)"):
        resolve_run("y-", tmp_path)
    assert resolve_run("y-a", tmp_path) == (tmp_path / "y-alpha").resolve()
    line = _error_line(_trainbus("runs", "delete", "y-", "--yes", "--runs-dir", str(tmp_path)))
    assert "is ambiguous" in line and (tmp_path / "y-alpha").is_dir(), line
    shown = _trainbus("runs", "show", "y-b", "--runs-dir", str(tmp_path))  # unique: the registry's run
    assert shown.returncode == 0 and shown.stdout.startswith("run y-beta: failed"), (shown.stdout, shown.stderr)


def test_a_file_given_to_resume_wins_over_a_run_id_it_starts(two_runs, tmp_path):
    (tmp_path / "x-a").write_text("not a checkpoint\n")
    line = _error_line(_trainbus("run", "--resume", "x-a", "--runs-dir", str(two_runs), "--plugins", "",
                                 cwd=tmp_path))
    assert "x-a is neither a checkpoint (.pt) nor a run directory; --resume takes a run id" in line, line
    assert sorted(p.name for p in two_runs.iterdir() if p.is_dir()) == ["x-alpha", "x-beta"], "no run made"


def test_list_says_a_filter_matched_none_rather_than_that_there_are_no_runs(two_runs):
    text = cli("runs", "list", "--runs-dir", str(two_runs), "--status", "running,died")
    assert text.strip() == (f"no run matched --status running,died; {two_runs} has 2 runs "
                            f"(`trainbus runs list` alone lists every run)"), text
    text = cli("runs", "list", "--runs-dir", str(two_runs), "--target", "nowhere.py")
    assert text.startswith("no run matched --target nowhere.py;"), text
    assert json.loads(cli("runs", "list", "--runs-dir", str(two_runs), "--status", "died", "--json")) == []


@pytest.mark.parametrize("given", ["./specs.py", "tests/./specs.py:tiny"])
def test_a_target_filter_written_with_dot_slash_finds_the_runs_of_that_file(two_runs, given):
    """A shell's tab completion writes `./specs.py`; the runs recorded as `.../tests/specs.py:tiny` were not found."""
    found = json.loads(cli("runs", "list", "--runs-dir", str(two_runs), "--target", given, "--json"))
    assert sorted(run["id"] for run in found) == ["x-alpha", "x-beta"]


def test_a_file_where_a_directory_belongs_is_named_as_a_file(two_runs, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    line = _error_line(_trainbus("runs", "list", "--runs-dir", str(a_file)))
    assert line == f"error: the runs directory {a_file} is a file, not a directory (is --runs-dir right?)", line
    line = _error_line(_trainbus("runs", "plot", "x-alpha", "--runs-dir", str(two_runs), "--out", str(a_file)))
    assert line.startswith(f"error: --out {a_file} is a file, not a directory: name a directory"), line
    line = _error_line(_trainbus("runs", "plot", "x-alpha", "--runs-dir", str(two_runs), "--out",
                                 str(a_file / "plots")))
    assert line.startswith(f"error: --out {a_file / 'plots'}: cannot make that directory (Not a directory)"), line
    # `--out "$PLOTS"` unset: the PNGs were drawn into the directory the command ran in
    line = _error_line(_trainbus("runs", "plot", "x-alpha", "--runs-dir", str(two_runs), "--out", "", cwd=tmp_path))
    assert line.startswith("error: Invalid value for '--out': is empty: name a directory, or leave --out out for "
                           "RUN_DIR/plots"), line
    assert not list(tmp_path.glob("*.png"))


def test_plugin_trouble_names_a_crash_the_run_ended_before_restarting():
    from trainbus.kernel.run_overview import _plugin_trouble

    plugins = {"late": {"state": "exited", "restarts": 0, "crashes": ["exit code 3"]},
               "fine": {"state": "exited", "restarts": 0, "crashes": []},
               "raiser": {"state": "exited", "restarts": 0, "crashes": [], "errors_logged": 3}}
    assert _plugin_trouble(plugins, {}) == ["late crashed (exit code 3)", "raiser 3 errors logged"]


def test_show_names_a_plugins_logged_errors_and_failed_checkpoints_as_list_does(every_status, tmp_path):
    """`runs list` named them as trouble; `runs show`'s plugin table said "-" for the same run."""
    runs_dir, _ = every_status
    copy = tmp_path / "runs" / "b-stopped"
    shutil.copytree(runs_dir / "b-stopped", copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["plugins"]["stopper"].update(errors_logged=2, checkpoints_failed=1)
    (copy / "summary.json").write_text(json.dumps(summary))
    shown = json.loads(cli("runs", "show", str(copy), "--json"))["plugins"]["stopper"]
    assert shown["errors_logged"] == 2 and shown["checkpoints_failed"] == 1, shown
    row = next(line for line in cli("runs", "show", str(copy)).splitlines() if line.startswith("stopper"))
    assert "2 errors logged (kernel.log); 1 checkpoint failed" in row, row


def test_a_torn_summary_is_said_to_be_torn_not_a_kernel_that_died_without_one(tmp_path):
    from trainbus.kernel.run_overview import run_overview

    result = run_training(RunConfig(target=TINY, epochs=1, runs_dir=str(tmp_path), plugins=[]), run_id="torn")
    summary = Path(result.run_dir) / "summary.json"
    summary.write_text(summary.read_text()[:100])
    (Path(result.run_dir) / "kernel.pid").unlink()  # its kernel (this process, here) is no longer around
    run = run_overview(Path(result.run_dir))
    assert run["status"] == "died" and run["detail"].startswith("summary.json is unreadable ("), run["detail"]
    # its last event that is not a heartbeat (one may follow the final event while the bus closes)
    final = next(e for e in read_events(Path(result.run_dir) / JOURNAL_NAME) if e.type == "end_training_session")
    assert run["detail"].endswith(f"the journal ends with end_training_session (seq {final.seq})"), run["detail"]


SUMMARIES_OF_WRONG_TYPES = {
    "no status and every field wrong": lambda real: {"status": 5, "outcome": "x", "plugins": [1], "duration_s": "long"},
    "a status and an outcome of text": lambda real: {**real, "outcome": "x"},
    "plugins as a list": lambda real: {**real, "plugins": [1]},
    "a duration of text": lambda real: {**real, "duration_s": "long"},
    # Python's json writes and reads Infinity: list, show and compare died on it (OverflowError), found by an audit
    "an infinite duration": lambda real: {**real, "duration_s": math.inf},
    "steps as text": lambda real: {**real, "outcome": {**real["outcome"], "steps": "3"}},
    "a plugin's crashes as a number": lambda real: {**real, "plugins": {"p": {"state": "exited", "crashes": 3}}},
}


def test_a_summary_with_fields_of_the_wrong_type_is_unreadable_as_a_torn_one_is(tmp_path):
    """`runs show` of a summary.json edited by hand died on it: AttributeError: 'list' object has no attribute
    'items'."""
    from trainbus.kernel.run_overview import run_overview

    result = run_training(RunConfig(target=TINY, epochs=1, runs_dir=str(tmp_path / "runs"), plugins=[]), run_id="R")
    summary = Path(result.run_dir) / "summary.json"
    real = json.loads(summary.read_text())
    (Path(result.run_dir) / "kernel.pid").unlink()  # its kernel (this process, here) is no longer around
    for case, make in SUMMARIES_OF_WRONG_TYPES.items():
        summary.write_text(json.dumps(make(real)))
        run = run_overview(Path(result.run_dir))
        assert run["status"] == "died" and run["detail"].startswith("summary.json "), (case, run["detail"])
        assert "unreadable" in run["detail"] or "no run status" in run["detail"], (case, run["detail"])
        shown = cli("runs", "show", result.run_dir)
        assert shown.startswith(f"run R: died ({run['detail']}"), (case, shown)
        assert json.loads(cli("runs", "show", result.run_dir, "--json"))["status"] == "died", case
        compared = _in_process("runs", "compare", result.run_dir, result.run_dir)
        assert compared.returncode == 0 and "Traceback" not in compared.stderr, (case, compared.stderr)
        # the registry keeps an ended run's row as it was: read from its directory again, it is died
        assert _in_process("runs", "reindex", "--runs-dir", str(tmp_path / "runs")).returncode == 0, case
        listed = _in_process("runs", "list", "--runs-dir", str(tmp_path / "runs"))
        assert listed.returncode == 0 and "died" in listed.stdout, (case, listed.stdout, listed.stderr)


CONFIGS_OF_WRONG_TYPES = {
    "a target of a number": lambda real: {**real, "target": 5},
    "a target of a list": lambda real: {**real, "target": [1]},
    "epochs of a list": lambda real: {**real, "epochs": [1]},
    "flags of text": lambda real: {**real, "flags": "x"},
    "flags of a list": lambda real: {**real, "flags": [1]},
    "hyperparameters of text": lambda real: {**real, "hyperparameters": "x"},
    "plugins of a number": lambda real: {**real, "plugins": 5},
    "a list, not an object": lambda real: [1],
    # runs plot: "error: trainbus.sdk.settings.SettingsError: plot_dpi = 'x' is not allowed; ...", no plots drawn
    "a plot setting of text": lambda real: {**real, "plugins": [{
        "name": "visualization", "target": "trainbus.plugins.visualization:VisualizationPlugin",
        "settings": {"plot_dpi": "x", "every_n_steps": -5}, "command": []}]},
}


@pytest.fixture(scope="module")
def runs_of_wrong_types(tmp_path_factory) -> Path:
    """A runs directory of one whole run ("R") and a copy of it for each CONFIGS_OF_WRONG_TYPES case, named by it,
    whose config.json holds that case: one run trained, copied ten times."""
    runs = tmp_path_factory.mktemp("wrong-types") / "runs"
    result = run_training(RunConfig(target=TINY, epochs=1, runs_dir=str(runs), plugins=[]), run_id="R")
    real = json.loads((Path(result.run_dir) / "config.json").read_text())
    for n, make in enumerate(CONFIGS_OF_WRONG_TYPES.values()):
        shutil.copytree(result.run_dir, runs / f"case-{n}")
        (runs / f"case-{n}" / "config.json").write_text(json.dumps(make(real)))
    return runs


def _no_traceback(done: subprocess.CompletedProcess, *what) -> None:
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Error" not in done.stderr, \
        (*what, done.stderr)


# A run's config.json edited by hand (a target of a number, flags of a list, ...): `runs list`, `runs show`, `runs
# compare` each died on it with a traceback (AttributeError: 'int' object has no attribute 'rpartition'), so one such
# run hid every other run of the directory; `runs plot` said `error: AttributeError: ...` and `runs reindex` that it
# could not write the registry (found by a bad-input audit). A field of the wrong type is now read as one that is not
# there, as a run from before trainbus recorded it.

def test_runs_whose_config_json_holds_fields_of_the_wrong_type_are_listed_beside_the_others(runs_of_wrong_types):
    runs = runs_of_wrong_types
    for command in (["runs", "reindex"], ["runs", "list"], ["runs", "compare"]):
        _no_traceback(_in_process(*command, "--runs-dir", str(runs)), command)
    listed = json.loads(_in_process("runs", "list", "--json", "--runs-dir", str(runs)).stdout)
    assert {run["id"]: run["status"] for run in listed} == {
        "R": "completed", **{f"case-{n}": "completed" for n in range(len(CONFIGS_OF_WRONG_TYPES))}}


@pytest.mark.parametrize("n", range(len(CONFIGS_OF_WRONG_TYPES)), ids=list(CONFIGS_OF_WRONG_TYPES))
def test_a_run_whose_config_json_holds_a_field_of_the_wrong_type_is_shown_and_plotted(runs_of_wrong_types, n,
                                                                                        tmp_path):
    run_dir = str(runs_of_wrong_types / f"case-{n}")
    _no_traceback(_in_process("runs", "show", run_dir), "show")
    assert json.loads(_in_process("runs", "show", run_dir, "--json").stdout)["status"] == "completed"
    _no_traceback(_trainbus("runs", "plot", run_dir, "--out", str(tmp_path / "plots")), "plot")


@pytest.mark.parametrize("content, warning", [
    ('{"target": 5, "epochs": [1]}', "config.json's target is a whole number, not text; its epochs is a list, not a "
                                     "whole number: runs show leaves them out"),
    ('{"target": "x.py:build", ', "config.json is unreadable (Expecting property name enclosed in double quotes: "
                                  "line 1 column 26 (char 25)): runs show leaves out its target, flags and "
                                  "hyperparameters"),
    ("[1]", "config.json holds a list, not an object: runs show leaves out its target, flags and hyperparameters"),
])
def test_runs_show_of_a_damaged_config_json_says_what_it_leaves_out(runs_of_wrong_types, tmp_path, content, warning):
    """It showed '-' for the target (runs list showed the journal's) and said nothing of why."""
    run_dir = tmp_path / "R"
    shutil.copytree(runs_of_wrong_types / "R", run_dir)
    (run_dir / "config.json").write_text(content)
    for as_json in ([], ["--json"]):
        shown = _in_process("runs", "show", str(run_dir), *as_json)
        assert shown.returncode == 0 and shown.stderr == f"trainbus: warning: {warning}\n", shown.stderr
    whole = _in_process("runs", "show", str(runs_of_wrong_types / "R"))
    assert whole.returncode == 0 and not whole.stderr, whole.stderr


def test_a_kernel_pid_of_another_host_is_not_taken_for_a_dead_process_here(tmp_path):
    """A runs directory on a shared filesystem: a kernel on a compute node is neither alive nor dead to the login
    node's pid table, so runs list, attach and a plugin started by hand go by what the run wrote instead."""
    import socket

    from trainbus.kernel.kernel_pid import kernel_process
    from trainbus.sdk.kernel_watch import kernel_died

    dead_here = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_here.wait()
    (tmp_path / "kernel.pid").write_text(f"{dead_here.pid}\n")  # no kernel.host: a trainbus from before it
    assert kernel_process(tmp_path) == (dead_here.pid, False)
    (tmp_path / "kernel.host").write_text(f"{socket.gethostname()}\n")
    assert kernel_process(tmp_path) == (dead_here.pid, False)
    assert kernel_died(tmp_path) == (f"the run's kernel (pid {dead_here.pid}) is gone and wrote no summary.json: "
                                     f"the run died")
    (tmp_path / "kernel.host").write_text("another-host\n")
    assert kernel_process(tmp_path) == (None, None) and kernel_died(tmp_path) is None


def test_show_says_how_many_checkpoints_are_on_disk_and_that_it_lists_the_newest_three(tmp_path, kernels):
    """Five kept (save_top_k -1, the default): the count is 5 and the list 3, which the line says. Each epoch waits
    at the gate until the previous one's checkpoint is written: a fast run skips a snapshot while both buffers are
    being persisted."""
    from trainbus.kernel.plugin_names import resolve_plugin

    from fixture_targets import open_gate
    from helpers import run_config

    gate, steps_per_epoch = tmp_path / "gate", 3  # the digits demo's training set in batches of 512
    cfg = run_config(tmp_path / "runs", [resolve_plugin("checkpoint", {})], epochs=5,
                     target=f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits", batch_size=512, step_sleep_s=0,
                     gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    for epoch in range(1, 6):
        open_gate(gate, epoch * steps_per_epoch)
        saved = kernel.wait_event("checkpoint_saved", lambda e, epoch=epoch: e.data.get("epoch") == epoch,
                                  timeout_s=120)
        assert saved.data["step"] == epoch * steps_per_epoch, saved.data
    assert kernel.result(timeout_s=120)["status"] == "completed"
    text = cli("runs", "show", kernel.run_id, "--runs-dir", str(tmp_path / "runs"))
    assert "checkpoints: 5 saved (5 still on disk, the newest 3 below), 0 failed, 0 skipped" in text, text
    listed = [line for line in text.splitlines() if line.startswith("  ") and "(epoch " in line]
    assert [re.search(r"\(epoch (\d+)", line)[1] for line in listed] == ["3", "4", "5"], text


def test_show_of_a_moved_runs_directory_finds_its_checkpoints_where_they_are_now(tmp_path):
    """The journal names each checkpoint by the path it was saved at: once the runs directory was moved (or copied
    elsewhere, the original deleted) `runs show` said `2 saved (0 still on disk)` and named the old paths, though
    every checkpoint was there in the run's directory."""
    from trainbus.kernel.plugin_names import resolve_plugin

    before = tmp_path / "before"
    result = run_training(RunConfig(target=TINY, epochs=2, runs_dir=str(before), checkpoint_every_n_epochs=1,
                                    plugins=[resolve_plugin("checkpoint", {})]), run_id="r1")
    assert result.status == "completed"
    saved = json.loads(cli("runs", "show", "r1", "--runs-dir", str(before), "--json"))["checkpoints"]["saved"]
    assert saved and all(c["present"] for c in saved), saved
    after = tmp_path / "after"
    before.rename(after)
    text = cli("runs", "show", "r1", "--runs-dir", str(after))
    assert f"checkpoints: {len(saved)} saved ({len(saved)} still on disk" in text, text
    moved = json.loads(cli("runs", "show", "r1", "--runs-dir", str(after), "--json"))["checkpoints"]["saved"]
    assert [c["path"] for c in moved] == [c["path"].replace(str(before), str(after)) for c in saved], moved
    assert all(c["present"] and Path(c["path"]).is_file() for c in moved), moved


@pytest.fixture
def someone_elses_run(tmp_path):
    """A runs directory with a run of ours (it died) and another user's run directory (0700, not ours), and how to
    run a command as a user who cannot read the latter: root reads everything, so root runs it without
    CAP_DAC_OVERRIDE (setpriv), the other directory owned by nobody."""
    runs_dir = tmp_path / "runs"
    for name in ("mine", "theirs"):
        (runs_dir / name).mkdir(parents=True)
        (runs_dir / name / "config.json").write_text(json.dumps({"target": "t.py:build", "epochs": 2}))
    theirs, lost = runs_dir / "theirs", runs_dir / "lost+found"  # a runs directory at a filesystem's root has one
    lost.mkdir()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every directory, and there is no setpriv to run a command without that")
        os.chown(theirs / "config.json", 65534, 65534)
        for folder in (theirs, lost):
            os.chown(folder, 65534, 65534)
            folder.chmod(0o700)
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:
        for folder in (theirs, lost):
            folder.chmod(0o000)
        prefix = []
    yield runs_dir, prefix
    for folder in (theirs, lost):
        folder.chmod(0o700)


def test_a_run_directory_this_user_cannot_read_is_listed_unreadable_beside_the_others(someone_elses_run):
    """`--status unreadable` is documented to pick someone else's run directories: one in the runs directory cost
    `runs list` (and compare) a PermissionError traceback, listing none of the runs; `runs show`, `plot`, `resume`
    and `delete` of it were a traceback too."""
    runs_dir, prefix = someone_elses_run
    listed = subprocess.run([*prefix, *trainbus_cmd(), "runs", "list", "--runs-dir", str(runs_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    runs = {run["id"]: run for run in json.loads(listed.stdout)}
    assert sorted(runs) == ["mine", "theirs"], runs  # not lost+found, which no run is
    assert runs["mine"]["status"] == "died", runs
    assert (runs["theirs"]["status"], runs["theirs"]["detail"]) == ("unreadable", "Permission denied"), runs
    picked = subprocess.run([*prefix, *trainbus_cmd(), "runs", "list", "--runs-dir", str(runs_dir), "--status",
                             "unreadable"], capture_output=True, text=True, timeout=60)
    assert picked.returncode == 0 and [line.split()[:2] for line in picked.stdout.splitlines()[1:]] == [
        ["theirs", "unreadable"]], (picked.stdout, picked.stderr)
    compared = subprocess.run([*prefix, *trainbus_cmd(), "runs", "compare", "--runs-dir", str(runs_dir)],
                              capture_output=True, text=True, timeout=60)
    assert compared.returncode == 0 and "theirs" in compared.stdout, compared.stderr
    theirs = (runs_dir / "theirs").resolve()
    for command in (["show", "theirs"], ["plot", "th"], ["resume", "theirs"], ["delete", "theirs", "--yes"]):
        done = subprocess.run([*prefix, *trainbus_cmd(), "runs", *command, "--runs-dir", str(runs_dir)],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stderr) == (2, f"error: run theirs cannot be read: {theirs}: Permission denied "
                                                     f"(another user's run directory, or a disk error); `trainbus "
                                                     f"runs list --status unreadable` lists such runs\n"), command


def test_runs_list_json_gives_an_unreadable_run_every_key_the_others_have(someone_elses_run):
    """A script reads `runs list --json` entries by key: an unreadable run's had 6 of the 26 (no `epochs`, no
    `flags`, ...), a KeyError in a loop that read every other run fine."""
    runs_dir, prefix = someone_elses_run
    listed = subprocess.run([*prefix, *trainbus_cmd(), "runs", "list", "--runs-dir", str(runs_dir), "--json"],
                            capture_output=True, text=True, timeout=60)
    runs = {run["id"]: run for run in json.loads(listed.stdout)}
    assert runs["theirs"]["status"] == "unreadable" and sorted(runs["theirs"]) == sorted(runs["mine"]), runs
    assert (runs["theirs"]["flags"], runs["theirs"]["plugin_trouble"], runs["theirs"]["epochs"]) == ({}, [], None)


def test_a_runs_directory_this_user_cannot_read_is_one_error_line(someone_elses_run):
    """A --runs-dir someone else's (0700) cost `runs list`, `compare`, `show`, `delete`, `stop` and `daemon status` a
    PermissionError traceback, exit 1."""
    runs_dir, prefix = someone_elses_run
    runs_dir.chmod(0o000)
    try:
        for command in (["runs", "list"], ["runs", "list", "--json"], ["runs", "compare"], ["runs", "show", "mine"],
                        ["runs", "delete", "mi", "--yes"], ["runs", "plot", "mine"], ["runs", "stop", "mine"],
                        ["daemon", "status"]):
            done = subprocess.run([*prefix, *trainbus_cmd(), *command, "--runs-dir", str(runs_dir)],
                                  capture_output=True, text=True, timeout=60)
            assert (done.returncode, done.stdout, done.stderr.count("\n")) == (2, "", 1), (command, done.stderr)
            assert done.stderr.startswith(f"error: cannot read the runs directory {runs_dir}: Permission denied"), \
                (command, done.stderr)
    finally:
        runs_dir.chmod(0o755)
    assert (runs_dir / "mine").is_dir()


def test_show_takes_any_name_a_peer_attached_by_hand_said_hello_with(every_status, tmp_path):
    """A peer attached by hand says hello under any string: `runs show` took each for a plugin of the run and
    looked for its plugins/NAME.log, which for 300 characters raised ENAMETOOLONG (the whole command failed) and for
    "../kernel" named kernel.log as that peer's log; a name with a newline split its table row."""
    run_dir = tmp_path / "a-completed"
    shutil.copytree(every_status[0] / "a-completed", run_dir)
    journal = run_dir / JOURNAL_NAME
    last = read_events(run_dir)[-1]
    names = ["n" * 300, "../kernel", "two\nlines", "attach-\x1b[2J"]
    seq = last.seq
    with open(journal, "ab") as f:  # the peers' plugin_ready and plugin_exited, as the kernel journals them
        for name in names:
            for type_, data in (("plugin_ready", {"plugin": name, "pid": 1, "delivery": "best_effort"}),
                                ("plugin_exited", {"plugin": name, "exit_code": 0})):
                seq += 1
                f.write(pack({"v": 1, "seq": seq, "run": last.run, "type": type_, "ts": last.ts, "step": last.step,
                              "epoch": last.epoch, "data": data}))
    shown = json.loads(cli("runs", "show", str(run_dir), "--json"))["plugins"]
    assert {name: shown[name]["log"] for name in names[:3]} == dict.fromkeys(names[:3]), shown
    table = cli("runs", "show", str(run_dir))  # (an attach- name is listed apart, as a client)
    assert "two\\x0alines" in table and "\nlines" not in table and "\x1b" not in table, table


def test_show_says_a_peer_that_never_said_bye_is_gone_once_the_run_has_ended(every_status, tmp_path):
    """A plugin attached by hand that said no bye (killed, or its machine gone) stayed `running` in `runs show`
    after the run had ended: the journal's last word of it was its plugin_ready."""
    run_dir = tmp_path / "a-completed"
    shutil.copytree(every_status[0] / "a-completed", run_dir)
    last = read_events(run_dir)[-1]
    with open(run_dir / JOURNAL_NAME, "ab") as f:  # its plugin_ready, as the kernel journals a hand-attached peer's
        f.write(pack({"v": 1, "seq": last.seq + 1, "run": last.run, "type": "plugin_ready", "ts": last.ts,
                      "step": last.step, "epoch": last.epoch,
                      "data": {"plugin": "watcher", "pid": 1, "delivery": "durable"}}))
    shown = json.loads(cli("runs", "show", str(run_dir), "--json"))["plugins"]
    assert shown["watcher"]["state"] == "gone with the run (no bye journaled)", shown
    assert all(p["state"] != "running" for p in shown.values()), shown
    # a died run (its kernel gone without a summary): none of its plugins said a last word either
    (run_dir / "summary.json").unlink()
    gone = subprocess.Popen(["true"])  # a pid that was a process and is no more
    gone.wait()
    (run_dir / "kernel.pid").write_text(f"{gone.pid}\n")
    shown = json.loads(cli("runs", "show", str(run_dir), "--json"))
    assert shown["status"] == "died", shown["status"]
    assert {p["state"] for p in shown["plugins"].values()} == {"gone with the kernel"}, shown["plugins"]
