"""The run directory's disk fills up while training runs: a real tmpfs, a real ENOSPC, real processes.

Full for a second, then freed: nothing is lost, the journal is complete and gap-free and every durable
plugin ends with every seq. Full for good: the run stops at a step boundary, `trainbus run` says so in
one line naming the disk and the fix, exits 1, and leaves a journal that ends at a whole record.
Nothing is mocked: a filler file takes every free page of the tmpfs, and keeps taking what is freed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest

from helpers import PLUGIN_START_S, recorded
from kernel_process import Command, KernelProcess, cli, of, wait_until
from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import iter_records

PACED = "fixture_targets:paced_digits"  # the digits demo with a sleep per step (tests/fixture_targets.py)
STEPS_PER_EPOCH = 45  # the digits demo at batch size 32
FIX = "free space there"  # the words of the one line that says what to do (kernel/journal.py)


class Filler:
    """Keeps a filesystem full: writes a file until ENOSPC, then takes every page that is freed, until released.

    A refused journal write is truncated back to its last whole record, which frees pages; the filler takes
    them at once, so the disk stays full for the kernel however it retries.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "filler"
        self.full = threading.Event()
        self.error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="filler", daemon=True)

    def __enter__(self) -> Filler:
        self._thread.start()
        assert self.full.wait(30), f"the filler never saw ENOSPC: {self.error}"
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Stop filling and delete the filler: the space is back."""
        self._stop.set()
        self._thread.join(10)
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            big, small = bytes(1 << 20), bytes(4096)
            while not self._stop.is_set():
                try:
                    os.write(fd, small if self.full.is_set() else big)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        self.error = exc
                        self.full.set()
                        return
                    self.full.set()
                    time.sleep(0.002)
        finally:
            os.close(fd)


def whole_journal(path: Path) -> list[dict]:
    """The journal read two ways, ours and msgpack's plain Unpacker; they agree, the seqs run 1..N, the file
    ends at the end of its last whole record. Returns the records."""
    records = list(iter_records(path))
    assert records, f"{path} holds no record"
    assert path.stat().st_size == records[-1][1], "the journal does not end at a whole record"
    maps = [record for _, _, record in records]
    with open(path, "rb") as f:
        assert list(msgpack.Unpacker(f, raw=False)) == maps  # nothing torn, nothing extra, anyone can read it
    assert [m["seq"] for m in maps] == list(range(1, len(maps) + 1)), "the journal has a gap"
    assert [(e.seq, e.type) for e in read_events(path)] == [(m["seq"], m["type"]) for m in maps]
    return maps


def no_traceback_in(run_dir: Path) -> None:
    for path in [run_dir / "kernel.log", *sorted((run_dir / "plugins").glob("*.log"))]:
        if path.exists():
            assert "Traceback" not in path.read_text(errors="replace"), f"{path}:\n{path.read_text()[-3000:]}"


# -- (a) full for a second, then freed ---------------------------------------------------------------


def test_a_disk_full_for_a_second_loses_nothing(tmp_path, mount_tmpfs, kernels):
    runs = mount_tmpfs("runs", 8 << 20)
    record = tmp_path / "recorder.txt"  # outside the tmpfs: the durable plugin itself never meets the full disk
    cfg = RunConfig(target=PACED, epochs=4, seed=0, device="cpu", runs_dir=str(runs), checkpoint_every_n_epochs=0,
                    drain_timeout_s=60, hyperparameters={"step_sleep_s": 0.02},
                    plugins=[PluginConfig("recorder", "fixture_plugins:Recorder", {"path": str(record)})])
    assert cfg.journal_backlog_mb >= 64  # the default: a second of events is far below it
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_ready("recorder")
    kernel.wait_step(STEPS_PER_EPOCH + 10)  # mid-epoch 2
    journal = kernel.run_dir / JOURNAL_NAME

    with Filler(runs):
        time.sleep(0.3)  # what fitted in the journal's last page is written by now
        held_at, step_at = journal.stat().st_size, kernel.journal.step()
        time.sleep(1.0)
        assert journal.stat().st_size == held_at, "the journal grew on a full disk"
        assert kernel.proc.poll() is None, f"the kernel exited on a full disk:\n{kernel.stderr()}"
    freed_step = kernel.wait_step(step_at + 1, timeout_s=10)  # journaled again once the space is back

    result = kernel.result(timeout_s=120)
    assert result["status"] == "completed", result
    assert result["error"] is None and result["undrained"] == {}
    assert result["bus"].get("journal_write_errors", 0) >= 1, "the kernel never met the full disk"
    assert result["outcome"]["epochs_completed"] == 4 and not result["outcome"]["stopped_early"]
    assert json.loads((kernel.run_dir / "summary.json").read_text())["status"] == "completed"

    maps = whole_journal(journal)
    types = [m["type"] for m in maps]
    assert types.count("end_training_batch") == 4 * STEPS_PER_EPOCH  # every step of the held-back second too
    assert freed_step > step_at
    final = next(m["seq"] for m in maps if m["type"] == "end_training_session")

    # the durable plugin handled every seq up to the final event, once and in order, each with the journal's type
    assert recorded(record) == [(m["seq"], m["type"]) for m in maps[:final]]
    assert result["plugins"]["recorder"]["restarts"] == 0  # held-back events never looked like a dead kernel

    assert "Traceback" not in kernel.stderr()
    no_traceback_in(kernel.run_dir)


def test_runs_stop_reaches_a_run_whose_disk_is_full(tmp_path, mount_tmpfs, kernels):
    """The moment a user most wants `runs stop`: the disk under a live run filled up. It printed a Python traceback
    (SQLite could not open the registry to look for a queued run of that name) and stopped nothing; now the stop
    goes in and the run stops. The command cannot see its stop journaled (the journal is what is full), and then
    said the run had died; it now reads the summary the kernel kept in $TMPDIR and says the run stopped for it."""
    runs = mount_tmpfs("runs", 8 << 20)
    cfg = RunConfig(target=PACED, epochs=50, seed=0, device="cpu", runs_dir=str(runs), checkpoint_every_n_epochs=0,
                    hyperparameters={"step_sleep_s": 0.02}, plugins=[])
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(10)
    with Filler(runs):
        stop = cli("runs", "stop", kernel.run_id, "--runs-dir", str(runs), timeout=120)
        assert "Traceback" not in stop.stderr, stop.stderr
        result = kernel.result(timeout_s=120)
    assert stop.returncode == 0 and "died" not in stop.stdout + stop.stderr, (stop.stdout, stop.stderr)
    assert f"stop sent to run {kernel.run_id} as attach-" in stop.stdout, stop.stdout
    assert "the run stopped for it and ended failed" in stop.stdout, stop.stdout
    if not (kernel.run_dir / "summary.json").exists():  # where the kernel kept it is named, and it is there
        kept = Path(tempfile.gettempdir()) / f"trainbus-kept-{os.getuid()}" / f"trainbus-{kernel.run_id}-summary.json"
        assert f"its summary is kept in {kept}" in stop.stdout and kept.is_file(), stop.stdout
    # stopped by it (the run ends `failed` all the same: its final weights went to $TMPDIR, said in its error)
    assert result["outcome"]["stopped_early"] and result["outcome"]["epochs_completed"] < 50, result
    assert [reason.partition(": ")[2] for reason in result["outcome"]["stop_reasons"]] == ["stop: trainbus runs stop"]


# -- (b) full for good -------------------------------------------------------------------------------


def run_config(path: Path, plugins: str | None) -> Path:
    """A TOML config: paced digits for far longer than the test lasts, a 0.01 MB journal backlog (about 40 steps of
    events: the run stops a second or so after the disk fills)."""
    text = (f'[run]\ntarget = "{PACED}"\nepochs = 50\ndevice = "cpu"\njournal_backlog_mb = 0.01\n'
            'checkpoint_every_n_epochs = 0\n\n[hyperparameters]\nstep_sleep_s = 0.02\n')
    path.write_text(text)
    return path


def processes_of(run_dir: Path) -> list[psutil.Process]:
    """Live processes whose environment names this run directory (the kernel's plugins)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("TRAINBUS_RUN_DIR") == str(run_dir) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.parametrize("plugins", ["none", "defaults"])
def test_a_disk_that_stays_full_stops_the_run_in_one_line(tmp_path, mount_tmpfs, plugins, request):
    """`trainbus run` on a disk that fills up for good, with no plugin and with the default ones (console and
    metrics_log, which write into the run directory too): exit 1, one line naming the disk and the fix, no
    traceback anywhere, a journal ending at a whole record, the summary written or one line saying why not."""
    runs = mount_tmpfs("runs", 4 << 20)
    args = ["run", "--config", str(run_config(tmp_path / "run.toml", plugins)), "--runs-dir", str(runs)]
    if plugins == "none":
        args += ["--plugins", ""]
    # the temporary directory, on another disk: where the trained weights go instead (short: where a run directory
    # too deep for a Unix socket path has its sockets)
    spare = Path(tempfile.mkdtemp(prefix="tb-"))
    request.addfinalizer(lambda: shutil.rmtree(spare, ignore_errors=True))
    proc = Command(*args, env={"TMPDIR": str(spare)})
    try:
        # the run has started and trains: only then does the disk fill up
        journal = wait_until(lambda: next((p for p in runs.glob(f"*/{JOURNAL_NAME}") if p.stat().st_size > 8000), None),
                             60, "the run's journal", poll_s=0.05)
        run_dir = journal.parent
        with Filler(runs):
            started = time.monotonic()
            proc.wait(timeout=90)
            stopped_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    both = out + err
    assert proc.returncode == 1, both
    assert "Traceback" not in both, both

    # one line names the disk (the journal's path on it) and the fix, and it is said once
    lines = [line for line in both.splitlines() if FIX in line]
    assert len(lines) == 1, both
    assert str(run_dir) in lines[0] and "No space left on device" in lines[0], lines[0]
    assert "[run] runs_dir" in lines[0] and "[run] journal_backlog_mb" in lines[0], lines[0]

    # stopped at a step boundary long before the 50 epochs were done
    match = re.search(r"failed after (\d+) epochs?, (\d+) steps?", out)
    assert match, out
    assert int(match[2]) < 50 * STEPS_PER_EPOCH and stopped_after < 60, (match[0], stopped_after)
    # what it trained is not lost with it: the weights at that step, in the temporary directory, and the line says so
    kept = spare / f"trainbus-kept-{os.getuid()}" / f"trainbus-{run_dir.name}-final.pt"
    assert f"; the weights as trained to step {match[2]} are in {kept};" in lines[0], lines[0]
    import torch
    assert torch.load(kept, weights_only=True)["step"] == int(match[2])

    # the journal ends at a whole record, gap-free from 1; the events the disk refused are beside the weights, and
    # appended as the line says, the journal holds the run through its final event
    whole_journal(journal)
    held = next((spare / f"trainbus-kept-{os.getuid()}").glob(f"trainbus-{run_dir.name}-{JOURNAL_NAME}.*"))
    assert f"cat {held} >> {journal}" in lines[0], lines[0]
    with open(journal, "ab") as f:
        f.write(held.read_bytes())
    assert "end_training_session" in [m["type"] for m in whole_journal(journal)]

    summary = run_dir / "summary.json"
    if summary.exists():
        written = json.loads(summary.read_text())
        assert written["status"] == "failed" and FIX in written["error"]
    else:
        said = [line for line in err.splitlines() if str(summary) in line]
        assert len(said) == 1 and said[0].startswith("trainbus: could not write") and "failed" in said[0], err

    no_traceback_in(run_dir)
    if plugins == "defaults":
        # the plugins were stopped (not left behind), and none crashed on the full disk
        wait_until(lambda: not processes_of(run_dir), 10, "the plugins to exit")
        assert "restarts" not in out and "crashed" not in out, out

    # A full disk is when a run must go: the registry that cannot be opened then (SQLite makes its -shm file) used
    # to refuse it ("cannot tell whether the daemon holds run ..."); with no daemon alive nothing else can hold it.
    with Filler(runs):
        deleted = cli("runs", "delete", run_dir.name, "--yes", "--runs-dir", str(runs), timeout=60)
    assert deleted.returncode == 0 and not run_dir.exists(), (deleted.stdout, deleted.stderr)


@pytest.mark.timeout(300)  # the old code's waits: 90 s, beside the run; on busy cores, more
def test_a_run_that_ends_on_a_full_disk_waits_for_no_plugin_that_cannot_hear_it(tmp_path, mount_tmpfs, request):
    """The disk fills while a run with the checkpoint plugin trains, and the run ends while it is still full (its
    events are held in memory: the backlog never overflows). Nothing is published before it is journaled, so
    the persister never saw the save events of the snapshots it holds, nor could any durable plugin see the
    final event: the run's last checkpoint waited its 60 s for a buffer, then the drain its 30 s, for nothing.
    Now the run ends as soon as it is done, with what it trained kept."""
    from trainbus.kernel.loop_checkpoints import LAST_CHECKPOINT_WAIT_S

    runs = mount_tmpfs("runs", 4 << 20)
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\ntarget = "{PACED}"\nepochs = 4\ndevice = "cpu"\ncheckpoint_every_n_epochs = 1\n\n'
                      f'[hyperparameters]\nstep_sleep_s = 0.02\n')
    spare = Path(tempfile.mkdtemp(prefix="tb-"))
    request.addfinalizer(lambda: shutil.rmtree(spare, ignore_errors=True))
    proc = Command("run", "--config", str(config), "--runs-dir", str(runs), "--plugins", "checkpoint,metrics_log",
                   env={"TMPDIR": str(spare)})
    try:
        # a first checkpoint is saved (the persister holds no buffer from before): only then does the disk fill up
        wait_until(lambda: next(runs.glob("*/checkpoints/*.pt"), None) or proc.poll() is not None, 60,
                   "the first checkpoint", poll_s=0.05)
        assert proc.poll() is None, proc.communicate()
        with Filler(runs):
            started = time.monotonic()
            proc.wait(timeout=3 * LAST_CHECKPOINT_WAIT_S)
            ended_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 1 and "the final weights could not be saved" in out, out + err
    assert f"failed after 4 epochs, {4 * STEPS_PER_EPOCH} steps" in out, out
    # training's rest takes seconds; the two waits for plugins that could not answer took 90 s
    assert ended_after < LAST_CHECKPOINT_WAIT_S, f"the run ended {ended_after:.0f} s after the disk filled"
    assert "did not catch up" in out, out  # said, not waited for: they replay what they missed on a resume


# -- a plugin on a full disk -------------------------------------------------------------------------


def test_a_plugin_whose_log_and_dead_letters_cannot_be_written_goes_on(tmp_path, mount_tmpfs):
    """A failing handler's dead letter and the SDK's line on stderr both meet ENOSPC: the plugin is not taken
    down by that (no crash, no restart), the kernel still hears of each failure, every other event is handled."""
    full = mount_tmpfs("full", 64 << 10)
    (full / "plugins").mkdir()
    (full / "stderr.log").touch()
    record = tmp_path / "handled.txt"
    cfg = RunConfig(epochs=2, seed=0, device="cpu", runs_dir=str(tmp_path / "runs"), checkpoint_every_n_epochs=0,
                    ready_timeout_s=PLUGIN_START_S,  # every event handled: the plugin is there from the first
                    plugins=[PluginConfig("poison", "fixture_plugins:FullDiskPoison",
                                          {"path": str(record), "poison_type": "end_epoch", "full_dir": str(full)})])
    with Filler(full):
        result = run_training(cfg)

    assert result.status == "completed" and result.undrained == {}, result
    assert result.plugins["poison"] == {"state": "exited", "restarts": 0, "crashes": [], "errors_logged": 2, "greeted": True}, \
        result.plugins
    events = read_events(result.run_dir)
    epochs = of(events, "end_epoch")
    logs = [e for e in of(events, "log", "poison") if "dead-lettered" in e.data["text"]]
    assert [int(re.search(r"seq (\d+)", e.data["text"])[1]) for e in logs] == [e.seq for e in epochs]
    for e in logs:  # the kernel hears where the dead letter could not go, and why
        assert "the dead letter could not be written to" in e.data["text"], e.data["text"]
        assert "No space left on device" in e.data["text"], e.data["text"]
    final = next(e.seq for e in events if e.type == "end_training_session")
    assert recorded(record) == [(e.seq, e.type) for e in events[:final] if e.type != "end_epoch"]


def test_metrics_log_on_a_full_disk_holds_records_and_writes_each_once(tmp_path, mount_tmpfs):
    """A refused write is cut back to the last whole line; the held records go out with the next write that
    fits: every record once, none torn, none twice (a buffered file wrote the same line once per retry)."""
    from trainbus.plugins.metrics_log import MetricsLogPlugin
    from trainbus.sdk import Harness

    disk = mount_tmpfs("metrics", 64 << 10)
    h = Harness(MetricsLogPlugin({"filename": f"{disk.name}/metrics.jsonl", "every_n_steps": 1}), run_dir=str(tmp_path))
    for step in range(1, 6):
        h.feed("end_training_batch", step=step, epoch=1, loss=0.5, batch_index=step - 1)
    with Filler(disk):
        for step in range(6, 66):  # more than the last page of the file holds
            h.feed("end_training_batch", step=step, epoch=1, loss=0.5, batch_index=step - 1)
        assert len(h.replies_of("log")) == 1, "the outage is said once"
    h.feed("end_epoch", step=65, epoch=1, training_loss=0.5)
    h.close()
    lines = (disk / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 67))


def test_tensorboard_files_on_a_full_disk_hold_records_and_write_each_once(tmp_path, mount_tmpfs):
    """TensorBoard's EventFileWriter stores its thread's first ENOSPC and raises it from every later call, space
    back or not: a disk full for a second as the run started left an empty event file for the whole run, and no
    error said so. Held like metrics_log's records instead: every scalar once, the outage said once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trainbus.plugins.visualization import TENSORBOARD_DIR, VisualizationPlugin
    from trainbus.sdk import Harness

    disk = mount_tmpfs("tensorboard", 64 << 10)
    h = Harness(VisualizationPlugin({"plots": False, "every_n_steps": 1}), run_dir=str(disk))
    with Filler(disk):  # full as the run starts: the event file cannot even be made
        h.feed("start_training_session", step=0, epoch=0, hyperparameters={"lr": 0.1})
        h.feed("end_training_batch", step=1, epoch=1, loss=0.5)
    for step in range(2, 6):
        h.feed("end_training_batch", step=step, epoch=1, loss=0.5)
    with Filler(disk):  # full again mid-run, for more than the last page of the file holds
        for step in range(6, 206):
            h.feed("end_training_batch", step=step, epoch=1, loss=0.5)
    h.feed("end_epoch", step=205, epoch=1, training_loss=0.5, validation_loss=0.4, lr=0.1)
    h.feed("end_training_session", step=205, epoch=1)
    h.close()
    assert len(h.replies_of("log")) == 2, "each outage is said once"
    accumulator = EventAccumulator(str(disk / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("loss/train_step")] == list(range(1, 206))
    assert [s.step for s in accumulator.Scalars("loss/validation")] == [205]


def test_a_disk_full_before_the_run_starts_is_one_line_and_leaves_no_half_made_run(tmp_path, mount_tmpfs):
    """Room for the run directory itself and little else: the kernel.pid, config.json or credential write fails."""
    from conftest import trainbus

    runs = mount_tmpfs("runs", 64 * 1024)
    (runs / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))  # one page left, or none
    done = trainbus("run", "--epochs", "1", "--plugins", "", "--runs-dir", str(runs), check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot set up the run directory {runs}/") and "No space left on device" in line \
        and "free space there, or give --runs-dir another place" in line, done.stderr
    assert [p.name for p in runs.iterdir()] == ["filler"] or sorted(p.name for p in runs.iterdir()) == [
        "filler", "registry.sqlite"], list(runs.iterdir())


def test_the_daemon_and_its_queue_on_a_full_disk_are_one_line_each(tmp_path, mount_tmpfs):
    """A runs directory whose disk is full: `run --detach` and `daemon status` printed a Python traceback
    (sqlite3.OperationalError), `daemon start --foreground` one (ENOSPC writing daemon.pid), and `daemon start`
    said `the daemon exited at start: no log`. Each is now one line naming the disk and the fix, nothing queued."""
    from conftest import trainbus

    disk = mount_tmpfs("disk", 64 * 1024)
    runs = disk / "runs"
    runs.mkdir(mode=0o755)
    with Filler(disk):
        for args, code, said in [
                (["run", "--detach"], 2, "registry.sqlite cannot be written ("),
                (["daemon", "start"], 2, "error: the daemon exited at start: its disk is full (No space left on "
                                         f"device); free space in {runs}"),
                (["daemon", "start", "--foreground"], 2, f"error: cannot write {runs}/.daemon/daemon.pid (No space "
                                                         f"left on device); free space there"),
                (["daemon", "status"], 3, f"no daemon serves {runs}; its queue is unknown: {runs}/registry.sqlite "
                                          f"cannot be read (")]:
            done = trainbus(*args, "--runs-dir", str(runs), check=False)
            assert done.returncode == code and "Traceback" not in done.stderr, (args, done.stderr)
            assert said in (done.stderr or done.stdout) and (done.stderr or done.stdout).count("\n") == 1, \
                (args, done.stdout, done.stderr)
    listed = trainbus("runs", "list", "--runs-dir", str(runs), check=False)
    assert listed.stdout == f"no runs in {runs}\n", "nothing was queued"


def test_taking_a_run_off_the_queue_on_a_full_disk_is_one_line(tmp_path, mount_tmpfs):
    """`daemon cancel RUN` (and `runs stop RUN`, which takes a queued run off the queue) with the runs directory's
    disk full printed a Python traceback (sqlite3.OperationalError). One line naming the registry and the fix; the run
    stays queued."""
    from conftest import trainbus

    disk = mount_tmpfs("disk", 1 << 20)
    runs = disk / "runs"
    runs.mkdir(mode=0o755)
    queued = trainbus("run", "--detach", "--runs-dir", str(runs), check=False)
    assert queued.returncode == 0, queued.stderr
    run_id = re.search(r"queued run ([0-9a-f-]+)", queued.stderr + queued.stdout)[1]
    with Filler(disk):
        for args in (["daemon", "cancel", run_id], ["runs", "stop", run_id]):
            done = trainbus(*args, "--runs-dir", str(runs), check=False)
            assert "Traceback" not in done.stderr, (args, done.stderr)
            assert (done.returncode, done.stdout) == (2, ""), (args, done.stdout, done.stderr)
            said = done.stderr
            assert said.startswith(f"error: cannot take run {run_id} off the queue: {runs}/registry.sqlite cannot be "
                                   f"read (") and said.endswith("free space there (a full disk says this)\n"), (args, said)
    listed = trainbus("runs", "list", "--runs-dir", str(runs), "--status", "queued", check=False)
    assert run_id in listed.stdout, "it stays queued"


# -- the command's own output on a full disk ---------------------------------------------------------


@pytest.mark.parametrize("stderr_there_too", [False, True])
def test_a_full_disk_under_the_commands_output_costs_the_output_only(tmp_path, mount_tmpfs, stderr_there_too):
    """`trainbus run > train.log` (nohup, a batch script) with train.log's disk full by the run's end: the run's
    summary cannot be printed. That is said once on stderr, naming the file and the fix, and the command exits as
    the run ended (0: completed); it died in a traceback of rich's frames and exited 1. With `2>&1` there is nowhere
    to say it: the exit code alone is right."""
    disk = mount_tmpfs("out", 64 << 10)
    log_path, err_path = disk / "train.log", tmp_path / "stderr.txt"
    err_path.write_text("")  # read below, stderr there or not
    runs = tmp_path / "runs"
    proc = Command("run", PACED, "step_sleep_s=0.02", "--epochs", "2", "--plugins", "", "--device", "cpu",
                   "--runs-dir", str(runs), output=log_path, errors=None if stderr_there_too else err_path,
                   env={"PYTHONPATH": str(Path(__file__).parent)})
    try:
        wait_until(lambda: next(runs.glob(f"*/{JOURNAL_NAME}"), None), 60, "the run's journal", poll_s=0.05)
        with open(log_path, "ab") as pad:  # the file's last page made whole: the next line needs a new one
            pad.write(b"." * (-log_path.stat().st_size % 4096))
        with Filler(disk):
            proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads(next(runs.glob("*/summary.json")).read_text())
    assert summary["status"] == "completed", summary
    said = err_path.read_text()
    assert proc.returncode == 0, said
    if stderr_there_too:
        return
    assert "Traceback" not in said, said
    lines = [line for line in said.splitlines() if str(log_path) in line]
    assert len(lines) == 1, said
    assert "No space left on device" in lines[0] and "free space there" in lines[0], lines[0]


def test_the_console_plugin_on_a_full_output_disk_says_so_once_and_goes_on(tmp_path, mount_tmpfs):
    """The console plugin prints into the kernel's stdout: a `train.log` on a full disk failed every one of its
    handlers (each a traceback, an error logged, `console N errors logged` in `runs list`). It now says once, as a
    warning naming the file, and drops the rest: no error, no restart."""
    disk = mount_tmpfs("out", 64 << 10)
    log_path, err_path = disk / "train.log", tmp_path / "stderr.txt"
    log_path.write_bytes(b"." * 4095 + b"\n")  # a whole page from earlier runs: the next line needs a new one
    runs = tmp_path / "runs"
    with Filler(disk):
        done = Command("run", "--epochs", "2", "--plugins", "console", "--device", "cpu", "--runs-dir", str(runs),
                       output=log_path, errors=err_path, append=True)  # `>> train.log 2> stderr.txt`
        try:
            done.wait(timeout=180)
        finally:
            done.kill()
    said = err_path.read_text()
    assert done.returncode == 0 and "Traceback" not in said, said
    run_dir = next(runs.glob("*/summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    console = summary["plugins"]["console"]
    assert console["state"] == "exited" and console["restarts"] == 0 and not console.get("errors_logged"), console
    warnings = [e.data["text"] for e in of(read_events(run_dir), "log", "console")]
    assert len(warnings) == 1 and str(log_path) in warnings[0] and "No space left on device" in warnings[0], warnings
    no_traceback_in(run_dir)


def test_events_the_disk_refuses_to_the_end_are_kept_and_rejoin_the_journal(tmp_path, mount_tmpfs, request):
    """The disk fills mid-run and stays full, but the held events stay under journal_backlog_mb (the default
    64 MiB: hours of a small run), so training ends as planned. The events the disk never took were dropped with the
    process, named nowhere (runs list showed the run `died` at the epoch the disk filled). They are now kept in the
    temporary directory, as the weights are, and the error line names that file and how it rejoins the journal."""
    runs = mount_tmpfs("runs", 4 << 20)
    spare = Path(tempfile.mkdtemp(prefix="tb-"))
    request.addfinalizer(lambda: shutil.rmtree(spare, ignore_errors=True))
    proc = Command("run", PACED, "step_sleep_s=0.02", "--epochs", "3", "--plugins", "", "--device", "cpu",
                   "--runs-dir", str(runs), env={"TMPDIR": str(spare)})
    try:
        journal = wait_until(lambda: next((p for p in runs.glob(f"*/{JOURNAL_NAME}") if p.stat().st_size > 8000), None),
                             60, "the run's journal", poll_s=0.05)
        with Filler(runs):
            proc.wait(timeout=120)
            held_from = whole_journal(journal)[-1]["seq"] + 1  # read while the disk is still full
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert proc.returncode == 1 and "Traceback" not in out + err, out + err
    kept_in = spare / f"trainbus-kept-{os.getuid()}"
    kept = [p for p in kept_in.iterdir() if p.name.startswith(f"trainbus-{journal.parent.name}-{JOURNAL_NAME}.")]
    assert len(kept) == 1, list(kept_in.iterdir())
    lines = [line for line in out.splitlines() if str(kept[0]) in line]
    assert len(lines) == 1 and f"(seq {held_from}-" in lines[0] and "No space left on device" in lines[0], out
    assert f"cat {kept[0]} >> {journal}" in lines[0], lines[0]

    # what the line says to do makes the journal whole: gap-free from 1 through the run's final event
    with open(journal, "ab") as f:
        f.write(kept[0].read_bytes())
    maps = whole_journal(journal)
    summary = journal.parent / "summary.json"
    if not summary.exists():  # refused too (the filler holds every page but one it has not taken back yet)
        said = [line for line in err.splitlines() if str(summary) in line]
        moved = kept_in / f"trainbus-{journal.parent.name}-summary.json"
        assert len(said) == 1 and f"it is in {moved}: move it to {summary} once" in said[0], err
        shutil.move(moved, summary)
    listed = cli("runs", "list", "--json", "--runs-dir", str(runs))
    assert json.loads(listed.stdout)[0]["status"] == "failed", listed.stdout
    assert "end_training_session" in [m["type"] for m in maps[-3:]], [m["type"] for m in maps[-5:]]
    assert [m["type"] for m in maps].count("end_training_batch") == 3 * STEPS_PER_EPOCH


def _journal_kept_elsewhere(run_dir: Path):
    """A closed journal of run_dir holding seqs 1-10, whose 11-1999 its full disk refused: they are in the file
    Journal.kept_elsewhere names, to rejoin it when it is opened again."""
    from test_journal import envelope

    from trainbus.kernel.journal import Journal
    from trainbus.proto import pack

    journal = Journal(run_dir / JOURNAL_NAME)
    assert journal.append([pack(envelope(seq)) for seq in range(1, 11)], 1) == 10
    with Filler(run_dir.parent):
        journal.append([pack(envelope(seq)) for seq in range(11, 2000)], 11)  # more than the last page holds
        assert journal.close() is not None and journal.kept_elsewhere is not None
    return journal


def test_a_continued_run_puts_the_events_kept_elsewhere_back_in_its_journal(tmp_path, mount_tmpfs, monkeypatch):
    """The events a kernel kept in $TMPDIR as it closed on a full disk come back when the run's journal opens again
    (`trainbus runs resume`, which the daemon's log advises for such a run): a continued run went on from the last
    seq on disk, over theirs, so they could no longer rejoin it."""
    from test_journal import envelope

    from trainbus.kernel.journal import Journal
    from trainbus.proto import pack

    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setenv("TMPDIR", str(spare))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    run_dir = mount_tmpfs("runs", 1 << 20) / "run-1"
    run_dir.mkdir()
    journal = _journal_kept_elsewhere(run_dir)
    assert journal.kept_elsewhere.parent == spare / f"trainbus-kept-{os.getuid()}"
    assert journal.kept_elsewhere.name.endswith(".11-1999")

    reopened = Journal(run_dir / JOURNAL_NAME)
    assert reopened.last_seq == 1999 and not journal.kept_elsewhere.exists()
    assert reopened.append([pack(envelope(2000))], 2000) == 1
    reopened.close()
    assert [e.seq for e in read_events(run_dir)] == list(range(1, 2001))


def test_events_kept_in_another_temporary_directory_than_the_resumes_still_rejoin_the_journal(tmp_path, mount_tmpfs,
                                                                                              monkeypatch):
    """The kernel's $TMPDIR was full too, so Python's gettempdir() passed it over for /tmp and the events went there;
    the line said "`trainbus runs resume` (with this TMPDIR) puts them back", but a resume with that TMPDIR, freed
    by then, looked in it alone: the run went on from the last seq on disk, over the kept events' seqs, and they
    could never rejoin the journal. A resume looks in every temporary directory; so does `runs list` for a summary."""
    from trainbus.kernel.journal import Journal
    from trainbus.proto.kept_files import kept_summary

    where_kept, resumed_with = tmp_path / "tmp", tmp_path / "tmpdir"
    where_kept.mkdir()
    resumed_with.mkdir()
    monkeypatch.setenv("TMPDIR", str(where_kept))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    run_dir = mount_tmpfs("runs", 1 << 20) / "run-1"
    run_dir.mkdir()
    journal = _journal_kept_elsewhere(run_dir)
    assert journal.kept_elsewhere.parent.parent == where_kept
    (journal.kept_elsewhere.parent / "trainbus-run-1-summary.json").write_text('{"status": "failed"}')

    # the resume's TMPDIR is another directory; the one that holds them is still a temporary directory Python takes
    monkeypatch.setenv("TMP", str(where_kept))
    monkeypatch.setenv("TMPDIR", str(resumed_with))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert tempfile.gettempdir() == str(resumed_with)
    assert kept_summary("run-1") == (journal.kept_elsewhere.parent / "trainbus-run-1-summary.json",
                                     {"status": "failed"})
    reopened = Journal(run_dir / JOURNAL_NAME)
    assert reopened.last_seq == 1999 and not journal.kept_elsewhere.exists()
    reopened.close()
    assert [e.seq for e in read_events(run_dir)] == list(range(1, 2000))


def test_a_continued_run_that_writes_its_own_summary_and_weights_removes_the_ones_an_earlier_session_kept(
        tmp_path, monkeypatch, request):
    """An earlier session's summary.json and final.pt, kept in $TMPDIR because the run directory's disk was full,
    stayed there after `runs resume` trained the run to its end and wrote its own in place: left, they are what
    that session's message still told the user to move back, over the new ones."""
    from helpers import PLUGIN_START_S, run_config
    from trainbus.kernel.plugin_names import resolve_plugin

    spare = Path(tempfile.mkdtemp(prefix="tb-"))  # short: a run directory's sockets may go there
    request.addfinalizer(lambda: shutil.rmtree(spare, ignore_errors=True))
    monkeypatch.setenv("TMPDIR", str(spare))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    first = run_training(run_config(tmp_path / "runs", [resolve_plugin("checkpoint", {})], epochs=1,
                                    checkpoint_every_n_epochs=1, ready_timeout_s=PLUGIN_START_S))
    assert first.status == "completed", first
    kept = spare / f"trainbus-kept-{os.getuid()}"
    kept.mkdir(mode=0o700)
    stale = [kept / f"trainbus-{first.run_id}-summary.json", kept / f"trainbus-{first.run_id}-final.pt"]
    for path in stale:
        path.write_text("as the full disk left it")
    other = kept / "trainbus-another-run-final.pt"
    other.write_text("another run's")
    # continued without a plugin: what removes the kept files is the kernel's own summary and weights
    resumed = run_training(run_config(tmp_path / "runs", epochs=2, resume=first.run_dir), run_id=first.run_id,
                           continue_run=True)
    assert resumed.status == "completed" and resumed.run_id == first.run_id, resumed
    assert [p.name for p in stale if p.exists()] == [] and other.exists()
    assert (Path(first.run_dir) / "final.pt").is_file() and (Path(first.run_dir) / "summary.json").is_file()
    log = (Path(first.run_dir) / "kernel.log").read_text()
    assert all(f"removed {p}, kept there by an earlier session of this run" in log for p in stale), log


def test_a_listing_whose_output_the_full_disk_refuses_exits_1(tmp_path, mount_tmpfs):
    """`trainbus runs list --json > runs.json` on a full disk made nothing but that file: it is said once, naming
    the file, and the exit is 1 (a script must not take the cut file for the listing), without a traceback."""
    from conftest import trainbus_cmd

    runs = tmp_path / "runs"
    assert run_training(RunConfig(epochs=1, seed=0, device="cpu", runs_dir=str(runs))).status == "completed"
    disk = mount_tmpfs("out", 64 << 10)
    out_path = disk / "runs.json"
    with Filler(disk), open(out_path, "wb") as out_file:
        done = subprocess.run([*trainbus_cmd(), "runs", "list", "--json", "--runs-dir", str(runs)], stdout=out_file,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if str(out_path) in line]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "free space there" in lines[0], done.stderr


def test_attach_json_into_a_full_disk_says_so_in_one_line_and_exits_1(tmp_path, mount_tmpfs, kernels):
    """`trainbus attach --json RUN > events.jsonl` on a full disk: the client died in a traceback of its print.
    It now says once on stderr, naming the file and the fix, and stops with exit 1 at once (the stream is all it
    makes: a script must not take the cut file for it)."""
    from conftest import trainbus_cmd

    cfg = RunConfig(target=PACED, epochs=50, seed=0, device="cpu", runs_dir=str(tmp_path / "runs"),
                    checkpoint_every_n_epochs=0, hyperparameters={"step_sleep_s": 0.02}, plugins=[])
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(5)
    disk = mount_tmpfs("out", 64 << 10)
    out_path = disk / "events.jsonl"
    with Filler(disk), open(out_path, "wb") as out_file:
        done = subprocess.run([*trainbus_cmd(), "attach", "--json", kernel.run_id, "--runs-dir", cfg.runs_dir],
                              stdout=out_file, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert str(out_path) in done.stderr and "No space left on device" in done.stderr, done.stderr
    assert "free space there" in done.stderr and "attach stops" in done.stderr, done.stderr
    assert kernel.proc.poll() is None, "the run goes on"


@pytest.mark.parametrize("as_json", [True, False])
def test_attach_to_an_ended_run_into_a_full_disk_says_so_as_for_a_live_one(as_json, tmp_path, kernels):
    """README: attach's output the disk refuses "is one `error:` line naming the file and the fix ... exit 1". A run
    that has ended is told from its directory, not by the client: that said `trainbus: warning: ... what follows is
    not written there`, though nothing follows. It is attach's line now, whichever way the run is told."""
    from conftest import trainbus_cmd

    cfg = RunConfig(target=PACED, epochs=1, seed=0, device="cpu", runs_dir=str(tmp_path / "runs"),
                    checkpoint_every_n_epochs=0, hyperparameters={"step_sleep_s": 0.0}, plugins=[])
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    assert kernel.result(timeout_s=120)["status"] == "completed"
    with open("/dev/full", "wb") as full:
        done = subprocess.run([*trainbus_cmd(), "attach", *["--json"] * as_json, kernel.run_id, "--runs-dir",
                               cfg.runs_dir], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr == ("error: cannot write to /dev/full (No space left on device); "
                                                    "free space there, or send the output elsewhere: attach "
                                                    "stops\n"), done.stderr


def spare_temp_dir_and_run(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """TMPDIR set to a fresh directory (what a full run-directory disk's files go to), and a run directory, run-1."""
    spare = tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setenv("TMPDIR", str(spare))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    run_dir = tmp_path / "runs" / "run-1"
    run_dir.mkdir(parents=True)
    return spare, run_dir


def test_events_kept_elsewhere_rejoin_the_journal_only_from_a_directory_no_one_else_can_write(tmp_path, monkeypatch):
    """The temporary directory is everyone's: a file there named as a run's kept events, made by another user who
    read the run id off `ps`, would have been appended to the run's journal at its resume (events forged into the
    record that durable plugins replay). Kept files live in an owner-only directory of ours; one that is not
    owner-only is refused, and nothing in it rejoins the journal."""
    from test_journal import envelope

    from trainbus.proto.kept_files import kept_dir
    from trainbus.kernel.journal import Journal
    from trainbus.proto import pack

    spare, run_dir = spare_temp_dir_and_run(tmp_path, monkeypatch)
    journal = Journal(run_dir / JOURNAL_NAME)
    assert journal.append([pack(envelope(seq)) for seq in range(1, 11)], 1) == 10
    journal.close()
    forged = b"".join(pack(envelope(seq)) for seq in range(11, 21))
    (spare / f"trainbus-run-1-{JOURNAL_NAME}.11-20").write_bytes(forged)  # where such files went before
    shared = spare / f"trainbus-kept-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # made by someone else's hand: writable by all
    (shared / f"trainbus-run-1-{JOURNAL_NAME}.11-20").write_bytes(forged)

    reopened = Journal(run_dir / JOURNAL_NAME)
    assert reopened.last_seq == 10
    reopened.close()
    with pytest.raises(PermissionError, match="not an owner-only directory"):
        kept_dir()
    shared.chmod(0o700)
    assert kept_dir() == shared


def test_a_run_whose_summary_was_kept_in_the_temp_dir_is_listed_as_it_ended_not_died(tmp_path, monkeypatch):
    """A run whose disk filled up ends with its summary.json in $TMPDIR/trainbus-kept-UID (the kernel's last line
    says so): `runs list` and `runs show` found none in the run directory and a kernel gone, and listed it `died`.
    They now read the kept one, from an owner-only directory of ours alone, and say where it is."""
    from trainbus.kernel.run_overview import run_overview

    spare, run_dir = spare_temp_dir_and_run(tmp_path, monkeypatch)
    (run_dir / "config.json").write_text("{}\n")
    assert run_overview(run_dir)["status"] == "died"
    kept = spare / f"trainbus-kept-{os.getuid()}"
    kept.mkdir(mode=0o777)
    kept.chmod(0o777)  # not owner-only: anyone could have put a summary there
    summary = {"status": "failed", "error": "No space left on device", "duration_s": 1.0, "outcome": {"steps": 7}}
    (kept / "trainbus-run-1-summary.json").write_text(json.dumps(summary))
    assert run_overview(run_dir)["status"] == "died"
    kept.chmod(0o700)
    listed = run_overview(run_dir)
    assert (listed["status"], listed["error"], listed["steps"]) == ("failed", "No space left on device", 7), listed
    assert listed["detail"] == (f"its disk was full: its summary is kept in {kept / 'trainbus-run-1-summary.json'}; "
                                f"move it into {run_dir} once there is room"), listed
    shown = cli("runs", "show", "run-1", "--runs-dir", str(tmp_path / "runs"))  # the same TMPDIR: the test's env
    assert shown.returncode == 0 and "failed (its disk was full: its summary is kept in" in shown.stdout, shown.stdout


def test_a_resume_refused_for_want_of_a_checkpoint_names_the_weights_its_full_disk_kept_elsewhere(tmp_path,
                                                                                                  monkeypatch):
    """A run without the checkpoint plugin whose disk filled up kept the weights it trained in $TMPDIR/trainbus-kept-
    UID (its error says so); `runs resume` of it once the disk had room said only `that run has no checkpoints ...;
    run it again instead`: days of training trained again, the weights there forgotten."""
    spare, run_dir = spare_temp_dir_and_run(tmp_path, monkeypatch)
    (run_dir / "config.json").write_text(json.dumps({"target": "demo", "epochs": 3}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"run_id": "run-1", "status": "failed", "error": "disk full",
                                                      "outcome": {"epochs_completed": 1}}) + "\n")
    refused = cli("runs", "resume", "run-1", "--runs-dir", str(tmp_path / "runs"))
    plain = ("error: --resume run-1: that run has no checkpoints (it ran without the checkpoint plugin, or ended "
             "before its first); run it again instead")
    assert (refused.returncode, refused.stderr) == (2, plain + "\n"), refused.stderr
    kept = spare / f"trainbus-kept-{os.getuid()}"
    kept.mkdir(mode=0o700)
    (kept / "trainbus-run-1-final.pt").write_bytes(b"weights")
    refused = cli("runs", "resume", "run-1", "--runs-dir", str(tmp_path / "runs"))
    assert (refused.returncode, refused.stderr) == (2, (
        f"{plain}; the weights it trained are kept in {kept / 'trainbus-run-1-final.pt'} (its disk was full): move "
        f"them to {run_dir.resolve() / 'final.pt'}\n")), refused.stderr


def test_a_resume_refused_for_want_of_a_checkpoint_names_the_events_its_full_disk_kept_elsewhere(tmp_path,
                                                                                                 monkeypatch):
    """A run without the checkpoint plugin whose disk refused its last events kept them in $TMPDIR/trainbus-kept-UID,
    its error line saying `trainbus runs resume` puts them back; that resume refused the run (no checkpoint) without
    a word of them, and no journal opened to take them back: the run's record stayed short of its end, unsaid."""
    from test_journal import envelope

    from trainbus.proto import pack

    spare, run_dir = spare_temp_dir_and_run(tmp_path, monkeypatch)
    (run_dir / "config.json").write_text(json.dumps({"target": "demo", "epochs": 3}) + "\n")
    (run_dir / JOURNAL_NAME).write_bytes(b"".join(pack(envelope(seq)) for seq in range(1, 11)))
    kept = spare / f"trainbus-kept-{os.getuid()}"
    kept.mkdir(mode=0o700)
    events = kept / f"trainbus-run-1-{JOURNAL_NAME}.11-20"
    events.write_bytes(b"".join(pack(envelope(seq)) for seq in range(11, 21)))
    refused = cli("runs", "resume", "run-1", "--runs-dir", str(tmp_path / "runs"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.rstrip().endswith(
        f"; the events its disk refused are kept in {events}: append them to its journal once there is room: "
        f"cat {events} >> {run_dir.resolve() / JOURNAL_NAME}"), refused.stderr
