"""More than one process: `trainbus run --nproc 2` through torch.distributed.run, gloo on the CPU, real processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import psutil
import pytest

from conftest import TESTS_DIR, child_path_with_tests
from fixture_targets import open_gate
from helpers import PLUGIN_START_S, assert_same_weights, free_port, seeded_rng
from kernel_process import Command, cli, wait_until
from trainbus.kernel.journal import read_events
from trainbus.proto import JOURNAL_NAME

PROBED = f"{TESTS_DIR / 'fixture_targets.py'}:probed_digits"


def train(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", PROBED, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), *args, timeout=300,
               cwd=tmp_path)  # the launcher forked with torch loaded; its ranks start as torchrun starts them
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()] if (tmp_path / "runs").is_dir() else []
    assert proc.returncode == 0 and len(runs) == 1, proc.stdout + proc.stderr
    return proc, runs[0]


def probes(run_dir: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (run_dir / f"probe-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def test_a_stop_and_a_checkpoint_reach_every_rank_at_the_same_step(tmp_path):
    """A checkpoint is a collective (every rank's RNG gathered): a rank that missed it would hang the run,
    which the bounded train() turns into a failure."""
    rng, seed = seeded_rng()
    checkpoint_at = rng.randint(1, 30)  # mid-epoch, or just before an epoch's end (23 steps an epoch)
    config = tmp_path / "run.toml"
    config.write_text('[plugins.stopper]\ntarget = "fixture_plugins:StopAtStep"\nsettings = {step = 40}\n'
                      f'[plugins.checkpointer]\ntarget = "fixture_plugins:CheckpointAtStep"\n'
                      f'settings = {{step = {checkpoint_at}}}\n')
    # Epochs to spare: the stop is acted on when it comes, and on a busy box the plugins' replies can come seconds
    # after their step. With 3 epochs (69 steps in ~3 s) a run beside two CPU burners ended before the stop came.
    proc, run_dir = train(tmp_path, "--nproc", "2", "--epochs", "50", "--config", str(config))
    events = read_events(run_dir)
    [stop] = [e for e in events if e.type == "stop_requested"]
    assert "enough at step 40" in stop.data["reasons"][0] and stop.step >= 40
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["outcome"]["steps"] == stop.step
    rank0, rank1 = probes(run_dir)
    assert rank0 == rank1 and rank0[-1]["batches"] == stop.step  # both stopped after the same batch
    # taken where the ranks next agreed after the reply came (no checkpoint plugin: rank 0 says it skipped it)
    [checkpoint] = [e for e in events if e.type == "checkpoint_skipped"]
    assert checkpoint_at <= checkpoint.step <= stop.step, f"TRAINBUS_TEST_SEED={seed}"


@pytest.fixture(scope="module")
def three_epochs_on_two_ranks(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """Three two-process epochs of the demo (23 steps a rank each) that several tests read: 3-batch accumulation, a
    checkpoint due every 10 steps, and a run.toml whose [plugins] table is the checkpoint plugin alone (the default
    plugins left out, which is said). Its process (what it printed) and its run directory, for reading only (a test
    continuing it continues a copy). A two-process run costs two ranks' torch imports: ~10 s on 2 cores.

    lr 0.003, three times the demo's: 3-batch accumulation steps a third as often, and at the demo's lr the
    validation accuracy after 3 epochs was 0.69, under what test_two_processes_train_the_demo_as_one_run asks."""
    where = tmp_path_factory.mktemp("three_epochs_on_two_ranks")
    config = where / "run.toml"
    config.write_text("[run]\ncheckpoint_every_n_steps = 10\naccumulate_grad_batches = 3\n[hyperparameters]\n"
                      "lr = 0.003\n[plugins.checkpoint]\n")
    with child_path_with_tests():
        proc, run_dir = train(where, "--nproc", "2", "--epochs", "3", "--config", str(config))
    return proc, run_dir


def test_two_processes_train_the_demo_as_one_run(three_epochs_on_two_ranks):
    proc, run_dir = three_epochs_on_two_ranks
    events = read_events(run_dir)
    # one event stream, from rank 0: gap-free, one session, the cluster in it and in summary.json
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    [start] = [e for e in events if e.type == "start_training_session"]
    assert start.data["cluster"]["world_size"] == 2 and start.data["cluster"]["kind"] == "torchelastic"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["cluster"]["rank"] == 0
    assert proc.stdout.count("completed after 3 epochs") == 1  # rank 1 prints nothing of its own
    # a step is each rank's batch (half the one-process run's steps): the summary line says so, not the bare count
    steps = summary["outcome"]["steps"]
    assert f"completed after 3 epochs, {steps} steps of 2 processes (a batch each), " in proc.stdout, proc.stdout
    shown = cli("runs", "show", str(run_dir), timeout=60).stdout
    assert "  processes   2 (torchelastic)\n" in shown, shown
    # the same weights on both ranks after every epoch, each rank training on its half of the data
    rank0, rank1 = probes(run_dir)
    assert len(rank0) == len(rank1) == 3 and rank0 == rank1
    assert not list(run_dir.glob("rank*.stacks.txt"))  # rank 1's, for rank 0 to ask its stacks, gone with it
    steps = [e.step for e in events if e.type == "end_epoch"]
    assert [p["batches"] for p in rank0] == steps
    # validation over all of the data (both halves reduced): it learns
    epochs = [e for e in events if e.type == "end_epoch"]
    assert epochs[-1].data["validation_metrics"]["accuracy"] > 0.8
    # an epoch's batches are counted over both ranks' shares, and so is what was planned (46/23 before)
    per_rank = epochs[0].step  # a rank's batches an epoch (a step each)
    assert [(e.data["training_batch_count"], e.data["batches_planned"]) for e in epochs] == [(2 * per_rank,) * 2] * 3


def test_a_checkpoint_agreed_inside_an_accumulation_lands_at_its_end_on_every_rank(three_epochs_on_two_ranks):
    """Due at step 10, agreed at 16 (the ranks agree every 16 steps) while a 3-batch accumulation is open: taken
    at 18, where it closes, by every rank (a collective: a rank that missed it would hang the bounded run)."""
    _, run_dir = three_epochs_on_two_ranks
    steps = [e.step for e in read_events(run_dir) if e.type == "save_checkpoint" and e.epoch == 1]
    assert steps == [18, 23], steps  # then the epoch's end (23 steps a rank)


def test_an_epochs_last_short_accumulation_steps_on_gradients_averaged_over_every_rank(three_epochs_on_two_ranks):
    """23 batches a rank, accumulated 3 at a time: the epoch's last 2 close no cycle, so DDP skipped their all-reduce
    (no_sync), and each rank stepped on its own gradients there: the ranks' weights parted at the first epoch's end."""
    _, run_dir = three_epochs_on_two_ranks
    rank0, rank1 = probes(run_dir)
    assert rank0 == rank1


@pytest.mark.parametrize("env, kind", [({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                                        "SLURM_NODEID": "0", "SLURM_NODELIST": "node[01-02]", "SLURM_JOB_ID": "4242",
                                        "SLURM_JOB_NAME": "train.sh"}, "slurm"), ({}, "single")])
def test_a_job_step_as_srun_starts_it_is_detected(tmp_path, monkeypatch, env, kind):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _, run_dir = train(tmp_path, "--epochs", "1", "--plugins", "")
    [start] = [e for e in read_events(run_dir) if e.type == "start_training_session"]
    assert start.data["cluster"]["kind"] == kind and start.data["cluster"]["world_size"] == 1
    assert (run_dir / JOURNAL_NAME).is_file()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], Path]:
    """The two-process run the kill tests interrupt (a checkpoint every 8 steps, 23 steps an epoch), trained
    without a break: its arguments, and its run directory."""
    where = tmp_path_factory.mktemp("reference")
    config = where / "run.toml"
    config.write_text(f"[run]\ncheckpoint_every_n_steps = 8\ncheckpoint_every_n_epochs = 0\n"
                      f"ready_timeout_s = {PLUGIN_START_S}\n")  # checkpoints from the first steps on
    args = ["--nproc", "2", "--epochs", "3", "--plugins", "checkpoint", "--config", str(config)]
    with child_path_with_tests():
        _, run_dir = train(where, *args)
    return args, run_dir


def start_paced(runs: Path, args: list[str], output: Path) -> Command:
    """The reference's run, slowed (30 ms a batch, the arithmetic untouched) so that a test can act mid-epoch; its
    output (both streams) to `output`. The launcher is forked with torch loaded (kernel_process.Command: ~3 s of
    torch import less a test); its ranks start as torchrun starts them."""
    return Command("run", PROBED, "--device", "cpu", "--runs-dir", str(runs), *args, "--set", "step_sleep_s=0.03",
                   output=output)


def wait_for_checkpoint(runs: Path, epoch: int, proc: Command) -> Path:
    """The run's directory, once a checkpoint of that epoch is on disk."""
    def saved() -> Path | None:
        assert proc.poll() is None, "the run ended before the checkpoint the test waits for"
        journals = list(runs.glob(f"*/{JOURNAL_NAME}"))
        if journals and any(e.type == "checkpoint_saved" and e.epoch == epoch for e in read_events(journals[0].parent)):
            return journals[0].parent
        return None
    return wait_until(saved, 180, f"an epoch-{epoch} checkpoint", poll_s=0.2)


def kill_launch(proc: subprocess.Popen | Command) -> None:
    """kill -9 of the launcher and everything under it: torchrun starts each rank in a session of its own, out
    of the launcher's process group."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def rank_pid(launcher: int, rank: int) -> int:
    """The training process of that rank among the launcher's (torchrun's) children: the one with RANK=rank."""
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if "trainbus.kernel.cli" in child.cmdline() and child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:  # gone meanwhile
            continue
    raise AssertionError(f"no training process of rank {rank} under pid {launcher}")


@pytest.mark.slow  # three two-process runs (~40 s on 2 cores): run with -m slow
def test_a_two_process_run_killed_mid_epoch_resumes_exactly(tmp_path, reference):
    """kill -9 of the launcher, both ranks and the plugins once an epoch-2 checkpoint is on disk, then
    `--resume ID`: the final weights of an uninterrupted two-process run."""
    args, reference_dir = reference
    runs = tmp_path / "runs"
    proc = start_paced(runs, args, tmp_path / "output.txt")
    try:
        run_dir = wait_for_checkpoint(runs, 2, proc)
    finally:
        kill_launch(proc)
    assert not (run_dir / "summary.json").exists()  # killed, not finished

    # `--resume ID` and nothing else: launched again in two processes, as its config.json says it was
    resumed = cli("run", "--resume", run_dir.name, "--runs-dir", str(runs), timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = read_events(run_dir)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one journal, gap-free across the resume
    assert [e.data["cluster"]["world_size"] for e in events if e.type == "start_training_session"] == [2, 2]
    [load] = [e for e in events if e.type == "load_checkpoint"]
    assert load.data["epoch"] >= 2
    assert_same_weights(run_dir, reference_dir)
    assert_same_epochs(run_dir, reference_dir)


@pytest.mark.parametrize("whom", ["the launcher", "rank 0 under --max-restarts"])
def test_a_sigterm_ends_a_two_process_run_interrupted_with_exit_130(tmp_path, whom):
    """SIGTERM to `trainbus run --nproc 2` (as systemd or a shell's kill sends it), or to rank 0 alone: the run
    ends interrupted and the command exits 130; torchrun does not take the interrupted group for a failure to
    restart."""
    runs = tmp_path / "runs"
    restarts = ["--max-restarts", "1"] if "max-restarts" in whom else []
    proc = start_paced(runs, ["--nproc", "2", *restarts, "--epochs", "20", "--plugins", ""], tmp_path / "output.txt")
    run_dir, _ = signalled_after_a_step(proc, runs, signal.SIGTERM, lambda run_dir: proc.pid if whom == "the launcher"
                                        else int((run_dir / "kernel.pid").read_text()))
    output = (tmp_path / "output.txt").read_text()
    assert proc.returncode == 130, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["cluster"]["restart_count"] == 0, summary
    assert summary["outcome"]["stop_reasons"] == ["kernel: stop: interrupted (SIGTERM)"], summary["outcome"]
    assert "error:" not in output, output


def test_a_sigterm_that_comes_as_rank_0_waits_in_an_agreement_stops_every_rank_at_the_same_step(tmp_path):
    """A SIGTERM to rank 0 as it waited in the ranks' agreement (torchrun passing on a Ctrl-C, while rank 1 had not
    joined yet): rank 0 broadcast 'go on', then read the signal again as the broadcast returned and stopped alone;
    rank 1 went on into its next all-reduce, and gloo aborted rank 0 ('Received data size doesn't match'): no
    summary, the run `died`. Every rank now acts on what was agreed, so both stop at the next agreement."""
    proc = cli("run", f"{TESTS_DIR / 'fixture_targets.py'}:signalled_in_an_agreement", "--device", "cpu",
               "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs", "3", "--plugins", "",
               timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert proc.returncode == 130 and (run_dir / "summary.json").is_file(), output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["outcome"]["stop_reasons"] == ["kernel: stop: interrupted (SIGTERM)"], summary["outcome"]
    rank0, rank1 = probes(run_dir)
    assert rank0 == rank1 and rank0[-1]["batches"] == summary["outcome"]["steps"] > 16, (rank0, rank1)
    assert "error:" not in output, output


@pytest.mark.slow  # a two-process run and its restart (~25 s each on 2 cores): run with -m slow
@pytest.mark.parametrize("rank", [0, 1])  # 0 owns the journal and the plugins; 1 dies under rank 0's collective
def test_a_rank_killed_mid_epoch_is_restarted_and_the_run_goes_on_exactly(tmp_path, reference, rank):
    """`--max-restarts 1`: kill -9 of one rank once an epoch-2 checkpoint is on disk; torchrun restarts the
    group, which continues the same run in place from that checkpoint: the reference's final weights."""
    args, reference_dir = reference
    runs = tmp_path / "runs"
    proc = start_paced(runs, [*args, "--max-restarts", "1"], tmp_path / "output.txt")
    try:
        run_dir = wait_for_checkpoint(runs, 2, proc)
        os.kill(rank_pid(proc.pid, rank), signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "output.txt").read_text()
    finally:
        if proc.poll() is None:
            kill_launch(proc)
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [run_dir.name]  # the same run, not a new one
    events = read_events(run_dir)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one journal, gap-free across the restart
    sessions = [e for e in events if e.type == "start_training_session"]
    assert [s.data["cluster"]["restart_count"] for s in sessions] == [0, 1]
    [load] = [e for e in events if e.type == "load_checkpoint"]
    assert load.data["epoch"] >= 2 and load.seq > sessions[1].seq
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert_same_weights(run_dir, reference_dir)
    assert_same_epochs(run_dir, reference_dir)
    if rank == 1:  # rank 0 saw the collective fail and said so: not as the run's end
        output = (tmp_path / "output.txt").read_text()
        assert "torchrun restarts the group (1 restart left): the run goes on in place" in output, output[-3000:]


@pytest.mark.parametrize("rank", [0, 1])  # 0: the launcher says it (no summary); 1: rank 0 does, in the summary
def test_a_rank_killed_by_a_signal_is_named_not_the_collective_it_broke(tmp_path, rank):
    """kill -9 of one rank (the out-of-memory killer's way): the user read gloo's "Connection reset by peer ...
    GLHF!" of the rank that lived, blamed on it (rank 1's, when rank 0 was killed), and rank 0 waited 10 s for a
    rank that was gone. Now the killed rank is named, with its pid, and nothing else; exit 1."""
    runs = tmp_path / "runs"
    proc = start_paced(runs, ["--nproc", "2", "--epochs", "20", "--plugins", ""], tmp_path / "output.txt")
    run_dir, killed = signalled_after_a_step(proc, runs, signal.SIGKILL, lambda _: rank_pid(proc.pid, rank))
    output = (tmp_path / "output.txt").read_text()
    assert proc.returncode == 1, output
    assert "gloo" not in output and "Traceback" not in output, output
    if rank == 0:
        run_id = run_dir.name
        assert output.rstrip().endswith(
            f"error: rank 0 (pid {killed}) was killed by SIGKILL (kill -9, or the out-of-memory killer: `dmesg` says "
            f"which)\ntrainbus: run {run_id} died; `trainbus runs resume {run_id}` continues it from its newest "
            f"checkpoint"), output
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == (
            f"rank 1: its process (pid {killed}) ended without a word: killed (kill -9, the out-of-memory killer: "
            f"`dmesg` says which) or an os._exit"), summary["error"]
        assert f"  error: {summary['error']}" in output, output
        # the code did not fail it, so it can go on: only the launcher, which saw the signal, can say so
        assert output.rstrip().endswith(f"trainbus: `trainbus runs resume {run_dir.name}` continues it from its "
                                        f"newest checkpoint"), output


def test_a_rank_killed_as_it_starts_is_named_not_the_rank_torchrun_then_stopped(tmp_path):
    """kill -9 of rank 1 before the ranks meet: torchrun ends rank 0 with SIGTERM, and that rank was named as
    killed too, 'by SIGTERM (kill -9, or the out-of-memory killer ...)': the cause was the one line of two."""
    runs = tmp_path / "runs"
    proc = start_paced(runs, ["--nproc", "2", "--plugins", ""], tmp_path / "output.txt")
    try:
        killed = wait_until(lambda: _rank_pid_or_none(proc.pid, 1), 120, "rank 1's process", poll_s=0.05)
        os.kill(killed, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_launch(proc)
    output = (tmp_path / "output.txt").read_text()
    assert proc.returncode == 1, output
    assert output.splitlines()[-1] == (f"error: rank 1 (pid {killed}) was killed by SIGKILL (kill -9, or the "
                                       f"out-of-memory killer: `dmesg` says which)"), output
    assert "rank 0" not in output, output


def _rank_pid_or_none(launcher: int, rank: int) -> int | None:
    try:
        return rank_pid(launcher, rank)
    except AssertionError:
        return None


def ctrl_c_once_it_waits(launch: Command, what: str, meanwhile: Callable[[], object] = lambda: None,
                         timeout_s: float = 120) -> str:
    """Ctrl-C to a --nnodes launch once it says what it waits for ("to meet at"), after `meanwhile`; its stderr.
    The launch is killed whatever happens."""
    try:
        meanwhile()
        wait_until(lambda: launch.stderr_path.is_file() and "to meet at" in launch.stderr_path.read_text(), 120,
                   what, poll_s=0.2)
        launch.send_signal(signal.SIGINT)
        return launch.communicate(timeout=timeout_s)[1]
    finally:
        launch.kill()


def signalled_after_a_step(proc: Command, runs: Path, sig: int,
                           whom: Callable[[Path], int]) -> tuple[Path, int]:
    """Once the run of `trainbus run --nproc` (proc) has trained a step, `sig` to whom(run_dir); then the
    launcher's end. (run_dir, the pid signalled)."""
    try:
        run_dir = wait_for_a_step(runs)
        target = whom(run_dir)
        os.kill(target, sig)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_launch(proc)
    return run_dir, target


def wait_for_a_step(runs: Path) -> Path:
    """The directory of the run in `runs`, once it has trained a step."""
    journal = wait_until(lambda: next(runs.glob(f"*/{JOURNAL_NAME}"), None), 180, "the run's journal")
    wait_until(lambda: any(e.type == "end_training_batch" for e in read_events(journal.parent)), 180, "a step")
    return journal.parent


def assert_same_epochs(run_dir: Path, reference_dir: Path) -> None:
    """Each epoch's figures as the uninterrupted run's (the latest end_epoch of each: a resumed epoch's totals
    sum each rank's share once; rank 0's counted twice and rank 1's not at all before)."""
    def epochs(where: Path) -> dict[int, dict]:
        return {e.epoch: {k: e.data[k] for k in ("training_loss_total", "training_batch_count", "batches_planned",
                                                  "training_metrics", "validation_loss_total")}
                for e in read_events(where) if e.type == "end_epoch"}
    assert epochs(run_dir) == epochs(reference_dir)


def test_two_agents_stand_in_for_two_machines(tmp_path):
    """--nnodes 2: two `trainbus run`s meet at one rendezvous endpoint, one process each; rank 0's node owns the
    run (one directory, one journal), and both train it. The other machine's `trainbus run` printed nothing at all
    as it succeeded; it says in one line that its ranks finished, and where the run is kept."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = ["run", PROBED, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--epochs", "2", "--plugins",
               "metrics_log", "--nnodes", "2", "--rdzv-endpoint", endpoint]
    # the agents forked with torch loaded (kernel_process.Command), each as `trainbus run` would start; their ranks
    # start as torchrun starts them
    agents = [Command(*command, cwd=tmp_path, output=tmp_path / f"agent{i}.txt") for i in range(2)]
    try:
        for agent in agents:
            agent.wait(timeout=300)
        outputs = [(tmp_path / f"agent{i}.txt").read_text() for i in range(2)]
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_launch(agent)
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    events = read_events(run_dir)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    [start] = [e for e in events if e.type == "start_training_session"]
    assert start.data["cluster"]["world_size"] == 2 and start.data["cluster"]["node_rank"] == 0
    assert "".join(outputs).count("completed after 2 epochs") == 1  # told once, by rank 0's node
    [other] = [text for text in outputs if f"run {run_dir.name}: completed" not in text]
    said = [line for line in other.splitlines() if line.startswith(f"run {run_dir.name}: ")]
    assert len(said) == 1 and said[0].startswith(f"run {run_dir.name}: node 1's rank 1 trained 2 epochs, ") \
        and " steps (completed); rank 0's machine (" in said[0] and said[0].endswith(f"{run_dir} there"), other
    rank0, rank1 = probes(run_dir)  # rank 1, on the other node, trained the same run in the same directory
    assert len(rank0) == 2 and rank0 == rank1


def test_a_rank_that_raises_is_named_with_its_error_in_rank_0s_journal_and_summary(tmp_path):
    target = f"{TESTS_DIR / 'fixture_targets.py'}:fails_on_rank_1"
    proc = cli("run", target, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs",
               "2", "--plugins", "", timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert summary["error"].startswith("rank 1: ValueError: bad batch 3 on rank 1 (in your code: "), summary["error"]
    # rank 0's own error is the collective rank 1 broke: gloo's "Connection closed by peer ... GLHF!" adds nothing
    assert "gloo" not in summary["error"] and "rank 0" not in summary["error"], summary["error"]
    [failed] = [e for e in read_events(run_dir) if e.type == "run_failed"]
    assert failed.data["error"] == summary["error"] and "in __iter__" in failed.data["traceback"]
    # the user's frames, in summary.json and on rank 1's stderr; none of ours there
    assert summary["trace"].startswith("rank 1: Traceback (most recent call last; your code only):"), summary["trace"]
    assert "fixture_targets.py" in summary["trace"] and "kernel/loop.py" not in summary["trace"]
    assert "fixture_targets.py" in proc.stderr and "kernel/loop.py" not in proc.stderr, proc.stderr
    assert summary["outcome"]["steps"] == failed.step > 0, (summary["outcome"], failed.step)
    # said once, by rank 0: not by rank 1 too, nor torch's lines about its workers, nor a SIGTERM nobody sent
    both = proc.stdout + proc.stderr
    assert both.count("Traceback") == 1 and both.count("bad batch 3 on rank 1 (in your code") == 1, both
    assert "closing signal" not in both and "exitcode" not in both and "SIGTERM" not in both, both


def test_a_stall_names_where_each_rank_of_the_machine_waits(tmp_path):
    """Under torchrun a hang is mostly one rank stuck (its loader, its file system) while the others wait for it in a
    collective: rank 0's own stack, the one its bus thread can read, shows only the wait. Each other rank of the
    machine now dumps its stacks when rank 0 asks (SIGUSR2, faulthandler: answered from inside a collective too), and
    training_stalled carries them: rank 1 is named where the user's code holds it."""
    gate = tmp_path / "gate"
    open_gate(gate, 3)  # rank 1's batch 4 waits in the user's loader; rank 0 waits for it in DDP's all-reduce
    (tmp_path / "stall.toml").write_text("[run]\nstalled_after_s = 1.0\n")
    runs = tmp_path / "runs"
    command = Command("run", f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits", "--device", "cpu", "--runs-dir",
                      str(runs), "--nproc", "2", "--epochs", "1", "--plugins", "console", "--config",
                      str(tmp_path / "stall.toml"), "--set", f"gate={gate}", "--set", "gate_rank=1", "--set",
                      "step_sleep_s=0", cwd=tmp_path)
    try:
        def stalled():
            journal = [p for p in runs.glob(f"*/{JOURNAL_NAME}")] if runs.is_dir() else []
            found = [e for e in read_events(journal[0].parent) if e.type == "training_stalled"] if journal else []
            return found[0] if found else None
        event = wait_until(stalled, 240, "training_stalled", poll_s=0.2)
        [rank_1] = event.data["ranks"]
        fixture = str((TESTS_DIR / "fixture_targets.py").resolve())
        assert rank_1["rank"] == 1 and rank_1["where"].startswith(fixture + ", line "), rank_1
        assert any("in _wait_for_gate" in frame for frame in rank_1["stack"]), rank_1["stack"]
        assert rank_1["stack"][-1].startswith(f'  File "{fixture}", line '), rank_1["stack"]  # innermost last
        assert not event.data["where"] or "_wait_for_gate" not in "".join(event.data["stack"])  # rank 0 waits
        [run_dir] = [p.parent for p in runs.glob(f"*/{JOURNAL_NAME}")]  # beside it: the runs' registry
        assert "rank 1 in your code at " + fixture in (run_dir / "kernel.log").read_text()
        assert (run_dir / "rank1.stacks.txt").is_file()
    finally:
        open_gate(gate, 10**6)
    out, err = command.communicate(timeout=240)
    assert command.returncode == 0, out + err
    [run_dir] = [p for p in runs.iterdir() if p.is_dir()]
    assert [e.type for e in read_events(run_dir)].count("training_resumed") == 1
    assert re.search(r"training has stood still .*; rank 1 in your code at .*fixture_targets\.py, line \d+; their "
                     r"stacks: ", out + err), out + err


def on_two_ranks(tmp_path, source: str) -> tuple[subprocess.CompletedProcess, str, Path]:
    """`trainbus run train.py:build --nproc 2` of this source: the process, all it printed, the target file."""
    target = tmp_path / "train.py"
    target.write_text(source)
    proc = cli("run", f"{target}:build", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2",
               "--plugins", "console", timeout=300, cwd=tmp_path)
    return proc, proc.stdout + proc.stderr, target


def test_the_same_error_on_every_rank_is_said_once_naming_the_ranks(tmp_path):
    proc, both, target = on_two_ranks(tmp_path, "from trainbus.kernel.digits import build as digits\n\n"
                                      "def loss(outputs, targets):\n    raise ValueError('boom in loss')\n\n"
                                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n"
                                      "    spec.loss_fn = loss\n    return spec\n")
    assert proc.returncode == 1, both
    error = f"ValueError: boom in loss (in your code: {target}, line 4) (ranks 0, 1)"
    assert f"  error: {error}" in proc.stdout and both.count("Traceback") == 1, both
    assert "SIGTERM" not in both and "closing signal" not in both and "ChildFailedError" not in both, both
    [summary] = (tmp_path / "runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["error"] == error


def test_a_build_failing_on_one_rank_alone_is_said_once_with_the_users_frames(tmp_path):
    """Rank 1's build raised (data only some ranks have): it told the launcher and left, and rank 0's next
    collective broke, which printed gloo's 40-line traceback of our frames before the user's one line; and the line
    did not say which rank's build it was."""
    proc, both, target = on_two_ranks(tmp_path, "import os\nfrom trainbus.kernel.digits import build as digits\n\n"
                                      "def build(hyperparameters):\n    if os.environ['RANK'] == '1':\n"
                                      "        raise ValueError('no data on this rank')\n"
                                      "    return digits(hyperparameters)\n")
    assert proc.returncode == 2, both
    assert both.count("Traceback") == 1 and both.count("ValueError: no data on this rank") == 2, both
    # named as a rank's error in training is: the other ranks built
    assert both.rstrip().endswith(f"error: rank 1: {target}:build raised ValueError: no data on this rank (in your "
                                  f"code: {target}, line 6)"), both
    assert "gloo" not in both and "kernel/" not in both, both


def test_rank_0_waits_for_every_rank_of_its_machine_to_say_what_failed(tmp_path):
    """Beside busy cores a rank failing at the same step as rank 0 may write its file seconds later: rank 0 waits
    for each rank of its machine, not for the first file nor for a fixed time; a machine of its own, no wait."""
    import threading
    import time

    from trainbus.kernel.failures import RANK_ERROR, rank_errors

    def write(rank: int) -> None:
        (tmp_path / RANK_ERROR.format(rank)).write_text(json.dumps(
            {"rank": rank, "error": "ValueError: boom", "traceback": "", "trace": ""}))

    write(1)
    (tmp_path / RANK_ERROR.format(3)).write_text("{\"rank\": ")  # half written: read again
    late = threading.Timer(0.5, write, [2])
    late.start()
    try:
        error, _, _ = rank_errors(tmp_path, "ValueError: boom", "", "", local_ranks=3, wait_s=120)
    finally:
        late.cancel()
    assert error == "ValueError: boom (ranks 0, 1, 2)"
    started = time.monotonic()
    assert rank_errors(tmp_path / "alone", "ValueError: boom", "", "", local_ranks=1, wait_s=120)[0] == \
        "ValueError: boom"
    assert time.monotonic() - started < 60  # not waited out (the margin of a busy machine)


def test_a_batch_sampler_of_the_users_is_refused_with_what_works_across_ranks():
    """The advice was a DistributedSampler, which a loader with a batch_sampler cannot take."""
    import torch
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

    from trainbus.kernel.distributed import shard

    class Buckets(BatchSampler):  # a user's own: length-bucketing, say
        pass

    data = torch.zeros(10, 2)
    loader = DataLoader(data, batch_sampler=Buckets(SequentialSampler(data), batch_size=4, drop_last=False))
    with pytest.raises(ValueError) as said:
        shard(loader, 0, "train_loader")
    assert str(said.value) == (
        "train_loader has a batch_sampler of its own (Buckets), whose batches trainbus cannot share out across ranks: "
        "have it yield only this rank's batches (torch.distributed.get_rank() and get_world_size() tell which), then "
        "set [run] distributed_sampler = false")


def test_more_processes_than_gpus_is_one_line_naming_the_fix():
    """Rank 1 of a machine with one visible GPU got cuda:1, and CUDA's "invalid device ordinal" at its first copy."""
    import torch

    from trainbus.kernel.devices import gpu_of_rank
    from trainbus.kernel.spec import SpecError

    assert [gpu_of_rank(rank, 2, 2) for rank in (0, 1)] == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(SpecError) as said:
        gpu_of_rank(0, 2, 1)  # rank 0 too: it would wait for rank 1 at their first collective
    assert str(said.value) == ("2 processes on this machine train on a GPU each, but 1 GPU is visible: start at most "
                               "1 (--nproc 1), or make more visible (CUDA_VISIBLE_DEVICES)")


def test_a_rank_says_where_in_the_step_its_error_came_from_as_rank_0_does(tmp_path):
    """A model of torch's modules fed the wrong shape fails in no frame of the user's: rank 0's error says where in
    the step; another rank's file said the bare error, so the same error on both ranks was said twice."""
    import torch

    from trainbus.kernel.failures import RANK_ERROR, rank_errors, write_rank_error
    from trainbus.kernel.stepping import Stepper

    model = torch.nn.Linear(4, 2)
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    try:
        stepper.batch(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), torch.nn.functional.cross_entropy)
    except RuntimeError as exc:
        exc.__traceback__ = exc.__traceback__.tb_next  # as the loop meets it: this test's frame would be the user's
        write_rank_error(tmp_path, 1, exc, beside_rank_0=False)
    said = json.loads((tmp_path / RANK_ERROR.format(1)).read_text())["error"]
    assert said.endswith("(in the model's forward, given inputs a float32 tensor of shape (3, 5))"), said
    assert rank_errors(tmp_path, said, "", "", local_ranks=2)[0] == f"{said} (ranks 0, 1)"


def test_a_rank_failing_before_rank_0_made_the_run_directory_writes_its_file_once_it_is_there(tmp_path):
    """An idle rank 1 reaches its first loss while rank 0 still makes the run directory and starts plugins: it
    waits for the directory rather than saying the error alone on its stderr; with none made, it says it."""
    import threading
    import time

    from trainbus.kernel.failures import read_rank_errors, write_rank_error

    run_dir = tmp_path / "run"
    threading.Timer(0.5, run_dir.mkdir).start()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        said = write_rank_error(run_dir, 1, exc, beside_rank_0=True, wait_s=120)
    assert said == "" and [e["error"].split(" (in your code")[0] for e in read_rank_errors(run_dir)] == \
        ["ValueError: boom"]
    try:
        raise ValueError("boom")
    except ValueError as exc:
        said = write_rank_error(tmp_path / "never", 1, exc, beside_rank_0=True, wait_s=0.2)
    assert "\nerror: rank 1: ValueError: boom" in said, said
    # rank 0 gone before it made one (a port taken): what broke this rank's collective; no wait for it
    gone = subprocess.Popen(["true"])
    gone.wait()
    started = time.monotonic()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        said = write_rank_error(tmp_path / "never", 1, exc, beside_rank_0=True, wait_s=120, main_pid=gone.pid)
    assert "\nerror: rank 1: ValueError: boom" in said and time.monotonic() - started < 60
    # ... and its collective failing because rank 0 exited: one line pointing at rank 0's error, no gloo traceback
    try:
        raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                           "peer [127.0.0.1]:60079. This is typically caused by a remote worker crashing.")
    except RuntimeError as exc:
        said = write_rank_error(tmp_path / "never", 1, exc, beside_rank_0=True, wait_s=120, main_pid=gone.pid)
        alive = write_rank_error(tmp_path / "never", 1, exc, beside_rank_0=True, wait_s=0.2, main_pid=os.getpid())
    assert said == ("trainbus: rank 1 stopped: rank 0 exited before it made the run directory, which broke this rank's "
                    "collective (rank 0's error says why)\n"), said
    assert "\nerror: rank 1: RuntimeError: [" in alive, alive  # rank 0 alive: not known to be its doing
    # a rank of another machine: rank 0 never waits for its file, so it does not wait to write it
    started = time.monotonic()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        said = write_rank_error(tmp_path / "never", 3, exc, beside_rank_0=False, wait_s=120)
    assert "\nerror: rank 3: ValueError: boom" in said and time.monotonic() - started < 60


def test_what_the_checks_before_the_run_say_is_said_once_under_nproc(three_epochs_on_two_ranks):
    """The command's notes and warnings (a [plugins] table that leaves the default plugins out) were said by the
    command and again by each rank it started: three times under --nproc 2."""
    proc, _ = three_epochs_on_two_ranks  # its run.toml's [plugins] table: the checkpoint plugin alone
    assert proc.stderr.count("trainbus: note: ") == 1, proc.stderr
    assert proc.stderr.count("'s [plugins] table is the run's whole plugin list") == 1, proc.stderr


def test_a_mistake_in_the_command_under_nproc_is_said_once_with_exit_2_and_no_restart(tmp_path):
    proc = cli("run", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--max-restarts", "2",
               "--precision", "16-mixed", timeout=300, cwd=tmp_path)
    said = ("error: precision 16-mixed needs a CUDA device (float16 autocast with a loss scaler) and this run asks "
            "for device cpu; use bf16-mixed on the CPU")  # the launcher's, before any rank imports torch
    assert proc.returncode == 2 and proc.stderr.count(said) == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(said) and "Traceback" not in proc.stderr, proc.stderr
    assert "restart" not in proc.stderr.lower() and not (tmp_path / "runs").exists(), proc.stderr


@pytest.mark.parametrize("options, said", [
    (["--nproc", "2", "--nnodes", "2"], "error: --nnodes 2 needs --rdzv-endpoint HOST:PORT, the same on every machine: "
                                        "one of them, and a port free there"),
    # said as if --nnodes were missing ("add --nnodes N") to a command that gave --nnodes 1
    (["--nproc", "2", "--nnodes", "1", "--rdzv-endpoint", "127.0.0.1:9"],
     "error: --rdzv-endpoint is where the machines of a --nnodes N run meet, and this run has one (--nnodes 1, the "
     "default): give --nnodes N for N machines, or drop --rdzv-endpoint"),
])
def test_launch_options_that_do_not_fit_together_are_one_line_before_any_process_starts(tmp_path, options, said):
    proc = cli("run", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), *options, timeout=120, cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (2, said), proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing was started"


def test_more_processes_than_the_command_may_have_cpus_is_one_line_before_any_starts(tmp_path):
    """`run --nproc 100000` (a typo for 10) started ranks, each importing torch, until the launcher itself was killed
    for memory: on a 2-core box the load stood at ~200 for 40 minutes, the ranks it had started orphaned. More
    processes than the CPUs the command may use train slower, not faster, so N is bounded by those CPUs."""
    usable = len(os.sched_getaffinity(0))
    proc = cli("run", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", str(usable + 1),
               timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"error: --nproc {usable + 1}: this command may use {usable} CPU{'s' * (usable != 1)}, and each process "
        f"trains on one at least (more processes than CPUs train slower, not faster): give --nproc {usable} or "
        f"fewer"), proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing was started"
    # queued for this host's daemon, the run would fail so as the daemon starts it: said at once, nothing queued
    proc = cli("run", "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", str(usable + 1),
               "--detach", timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --nproc {usable + 1}: "), proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing was queued"


def test_a_launcher_killed_with_sigkill_leaves_no_files_behind_once_another_launch_has_run(tmp_path):
    """Each `run --nproc` made /tmp/trainbus-launch-*.errors and removed it at its end, which a launcher killed with
    SIGKILL never reached; and torchrun's logs went to a torchelastic_* directory of /tmp that no launch ever removed
    (986 of them on this machine). Both now live in the launch's own directory of an owner-only one in the temp dir:
    removed at its end, and, for a launcher killed, by the next launch."""
    from kernel_process import Command

    tmp, runs = tmp_path / "tmp", tmp_path / "runs"
    tmp.mkdir()
    target = tmp_path / "train.py"
    target.write_text("import os, time\nfrom pathlib import Path\n\n"
                      "def build(hyperparameters):\n    Path(f\"building-{os.environ['RANK']}\").touch()\n"
                      "    time.sleep(300)\n")
    killed = Command("run", f"{target}:build", "--device", "cpu", "--runs-dir", str(runs), "--nproc", "2",
                     "--plugins", "", cwd=tmp_path, env={"TMPDIR": str(tmp)})
    try:
        wait_until(lambda: all((tmp_path / f"building-{rank}").exists() for rank in (0, 1)), 120,
                   "both ranks building", poll_s=0.1)
    finally:
        kill_launch(killed)
    assert list(tmp.rglob("*errors*")), "the killed launcher's file, which the next launch is to remove"
    # the next launch: one that makes its directory and ends without starting a rank (two more ranks' torch imports,
    # ~5 s, that the files left behind do not depend on): a --nnodes 2 launch waiting for its other machine, ended
    # with Ctrl-C once it says it waits (its handlers set: the end removes its own directory)
    endpoint = f"127.0.0.1:{free_port()}"
    proc = Command("run", "--device", "cpu", "--runs-dir", str(runs), "--nnodes", "2", "--rdzv-endpoint", endpoint,
                   cwd=tmp_path, env={"TMPDIR": str(tmp)},
                   constants={"trainbus.kernel.launch_wait.WAITING_SAID_AFTER_S": SAID_AFTER_S})
    err = ctrl_c_once_it_waits(proc, "the next launch waiting for its other machine")
    assert proc.returncode == 130 and err.strip().endswith(f"to meet at {endpoint}; nothing was made"), err
    # (torchinductor_<user>: a cache torch keeps for the user, one for all launches)
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if not p.name.startswith("torchinductor_"))
    assert left == [f"trainbus-launch-{os.getuid()}"], left


def test_a_scratch_directory_is_removed_by_the_next_one_made_once_no_running_process_holds_it(tmp_path, monkeypatch):
    """What lets the next launch remove a killed launcher's directory (kernel/private_dirs.py): the lock its process
    held, which a kill -9 lets go, and which a running process keeps."""
    from trainbus.kernel.private_dirs import process_scratch_dir, remove_scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = ("import time\nfrom trainbus.kernel.private_dirs import process_scratch_dir\n"
            "print(process_scratch_dir('scratch'), flush=True)\ntime.sleep(300)\n")
    makers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TMPDIR": str(tmp_path)}) for _ in range(2)]
    try:
        running, killed = [Path(maker.stdout.readline().strip()) for maker in makers]
        makers[1].kill()
        makers[1].wait()
        assert running.is_dir() and killed.is_dir()
        ours = process_scratch_dir("scratch")
        assert running.is_dir() and not killed.exists() and ours.is_dir() and ours not in (running, killed)
        remove_scratch_dir(ours)
        assert not ours.exists() and sorted(p.name for p in (tmp_path / "scratch").iterdir()) == [running.name]
    finally:
        for maker in makers:
            maker.kill()
            maker.wait()


# -- sharing out a loader's data ------------------------------------------------------------------------------

def test_a_sampler_of_the_users_own_is_shared_out_as_it_samples():
    """Each rank takes every other index of the same draw: the user's subset, nothing outside it, no index twice
    within an epoch (but the padding), a new draw each epoch, the training's RNG untouched."""
    import torch
    from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler

    from trainbus.kernel.distributed import ShardedSampler

    subset = list(range(0, 64, 4))  # 16 of 64 samples
    ranks = [ShardedSampler(SubsetRandomSampler(subset), 2, rank, seed=7, drop_last=False) for rank in (0, 1)]
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    first = [list(r) for r in ranks]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert len(first[0]) == len(first[1]) == len(ranks[0]) == 8
    assert sorted(first[0] + first[1]) == subset  # shared out: together exactly the subset
    assert first[0] != sorted(first[0])  # and shuffled, as the user's sampler does
    for r in ranks:
        r.set_epoch(1)
    assert [list(r) for r in ranks] != first and sorted(sum((list(r) for r in ranks), [])) == subset
    # an odd count is padded as DistributedSampler pads, or cut with drop_last
    odd = [ShardedSampler(SubsetRandomSampler(subset[:5]), 2, rank, 7, drop_last=False) for rank in (0, 1)]
    assert [len(list(r)) for r in odd] == [3, 3] and set(sum((list(r) for r in odd), [])) == set(subset[:5])
    cut = [ShardedSampler(SubsetRandomSampler(subset[:5]), 2, rank, 7, drop_last=True) for rank in (0, 1)]
    assert [len(list(r)) for r in cut] == [2, 2]
    # weights: only what the weights allow
    weighted = ShardedSampler(WeightedRandomSampler([0.0, 1.0, 0.0, 1.0], 10), 2, 1, 7, drop_last=False)
    assert set(weighted) <= {1, 3} and len(list(weighted)) == 5


def test_shard_keeps_the_kind_of_sampler_and_leaves_a_stream_alone(tmp_path):
    import torch
    import torch.distributed as dist
    from torch.utils.data import (DataLoader, DistributedSampler, IterableDataset, SubsetRandomSampler,
                                  TensorDataset)

    from trainbus.kernel.distributed import ShardedSampler, shard, unshardable

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    data = TensorDataset(torch.arange(20.0))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert isinstance(shard(DataLoader(data, batch_size=4, shuffle=True), 0, "x").sampler, DistributedSampler)
        assert isinstance(shard(DataLoader(data, batch_size=4), 0, "x").sampler, DistributedSampler)
        own = shard(DataLoader(data, batch_size=4, sampler=SubsetRandomSampler([1, 2, 3])), 0, "x")
        assert isinstance(own.sampler, ShardedSampler) and sorted(int(v) for b in own for v in b[0]) == [1, 2, 3]
        stream = DataLoader(Stream(), batch_size=4)
        assert shard(stream, 0, "x") is stream and "IterableDataset" in unshardable(stream)
        assert shard([1, 2], 0, "x") == [1, 2] and "not a DataLoader" in unshardable([1, 2])
    finally:
        dist.destroy_process_group()


# How long a waiting rank or machine is quiet before it says what it waits for, in the tests of that line: the
# product's 10 s (WAITING_SAID_AFTER_S) is for users, and these tests are about the line and the signal after it
SAID_AFTER_S = 1.0


def _waiting_ranks_stopped_by_sigterm(envs: list[dict[str, str]], runs: Path) -> list[str]:
    """`trainbus run` as a rank of 2 under each of `envs` at once (each waits out WAITING_SAID_AFTER_S, SAID_AFTER_S
    here: together, once), whose others never come: once each says what it waits for, SIGTERM; their stderr, after
    each exited 130."""
    from kernel_process import Command

    procs = [Command("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--device", "cpu", "--runs-dir", str(runs),
                     "--plugins", "", env=env,
                     constants={"trainbus.kernel.distributed.WAITING_SAID_AFTER_S": SAID_AFTER_S}) for env in envs]
    said = []
    try:
        for proc in procs:
            wait_until(lambda: proc.stderr_path.is_file() and "for the other ranks to join" in
                       proc.stderr_path.read_text(), 120, "the line saying what the rank waits for", poll_s=0.2)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            said.append(proc.communicate(timeout=60)[1])
            assert proc.returncode == 130, said[-1]
    finally:
        for proc in procs:
            proc.kill()
    return said


def test_ranks_and_machines_waiting_for_others_that_never_come_say_so_and_stop_on_a_signal(tmp_path):
    """`trainbus run` in a batch script of `sbatch --ntasks 2` without srun: one task of two, whose rendezvous waits
    in C++ (30 min) for a rank that never starts. It sat there without a word, and no signal reached its handler:
    SIGTERM, Ctrl-C and `timeout` did nothing. Now it says after a while what it waits for (and, under SLURM, the
    srun it lacks), and a SIGTERM ends it at once: exit 130, one line, nothing made.

    Beside it, both tasks of an srun started, but rank 0's host (the first of SLURM_NODELIST) is a name this machine
    cannot resolve: the ranks retried it for 30 min, and the line after 10 s blamed a missing srun. Now it names the
    host and MASTER_ADDR; SIGTERM still ends the wait.

    And `--nnodes 2` run on one machine only: torchrun's rendezvous waits for the other (10 min) before it starts a
    rank. It waited without a word, and a Ctrl-C reached no handler: exit 130, nothing said. Now the wait is said
    once, with the endpoint and the fix, and Ctrl-C ends it in one line, exit 130, nothing made. (All three wait out
    the 10 s before their line side by side: SAID_AFTER_S here.)"""
    from kernel_process import Command

    machine_runs, endpoint = tmp_path / "machine-runs", f"127.0.0.1:{free_port()}"
    machine = Command("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--device", "cpu", "--runs-dir", str(machine_runs),
                      "--plugins", "", "--nnodes", "2", "--rdzv-endpoint", endpoint,
                      constants={"trainbus.kernel.launch_wait.WAITING_SAID_AFTER_S": SAID_AFTER_S})
    err = ctrl_c_once_it_waits(machine, "the line saying what the machine waits for",
                               meanwhile=lambda: _ranks_waiting_for_others_that_never_come(tmp_path / "runs"),
                               timeout_s=60)
    assert machine.returncode == 130, err
    waiting, stopped = err.strip().splitlines()
    assert waiting.startswith("trainbus: has waited ") and f"--nnodes 2 to meet at {endpoint}: run this same" \
        in waiting, err
    assert stopped == f"trainbus: Ctrl-C while waiting for the 2 machines of --nnodes 2 to meet at {endpoint}; " \
                      f"nothing was made", err
    assert not machine_runs.exists() or not [p for p in machine_runs.iterdir() if p.is_dir()]


def _ranks_waiting_for_others_that_never_come(runs: Path) -> None:
    """The test above's two SLURM ranks (one whose others never start, one whose rank 0 host does not resolve),
    SIGTERM'd once each said what it waits for; what each said, checked."""
    alone = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost",
             "SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "job.sh", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port())}
    unresolved = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                  "SLURM_NODELIST": "nosuch[01-02].invalid", "SLURM_JOB_ID": "78", "SLURM_JOB_NAME": "job.sh",
                  "MASTER_PORT": str(free_port())}
    err, unresolved_err = _waiting_ranks_stopped_by_sigterm([alone, unresolved], runs)
    waiting, stopped = err.strip().splitlines()
    assert waiting.startswith("trainbus: rank 0 of 2 (slurm) has waited ") and "`srun trainbus run ...`" in waiting
    assert stopped == (f"trainbus: SIGTERM: rank 0 of 2 was still waiting for the other ranks at "
                       f"127.0.0.1:{alone['MASTER_PORT']}; nothing was made"), err
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]
    [waiting] = [line for line in unresolved_err.splitlines() if "for the other ranks to join" in line]
    assert (f"at nosuch01.invalid:{unresolved['MASTER_PORT']}, a host this machine cannot resolve: set MASTER_ADDR "
            f"to rank 0's host (its name or IP address) for every rank; Ctrl-C stops it") in waiting, unresolved_err
    assert "srun" not in waiting, unresolved_err


def test_ctrl_c_while_the_ranks_build_is_said_once_and_ends_in_one_line(tmp_path):
    """Ctrl-C to `run --nproc 2` while the ranks build (load data): torchrun hands it to every rank, and each said
    'stopping once the model and data are built', then the command exited 130 with no word of how it ended. Now the
    machine's first rank says it, and the command ends as one process does: 'before the run began; nothing was made'."""
    from kernel_process import Command

    target = tmp_path / "train.py"
    target.write_text("import os, time\nfrom pathlib import Path\n"
                      "from trainbus.kernel.digits import build as digits\n\n"
                      "def build(hyperparameters):\n    Path(f\"building-{os.environ['RANK']}\").touch()\n"
                      "    end = time.monotonic() + 120\n"
                      "    while not Path('built').exists() and time.monotonic() < end:\n        time.sleep(0.05)\n"
                      "    return digits(hyperparameters)\n")
    runs = tmp_path / "runs"
    proc = Command("run", f"{target}:build", "--device", "cpu", "--runs-dir", str(runs), "--nproc", "2",
                   "--plugins", "", cwd=tmp_path)
    try:
        wait_until(lambda: all((tmp_path / f"building-{rank}").exists() for rank in (0, 1)), 120,
                   "both ranks building", poll_s=0.1)
        proc.send_signal(signal.SIGINT)
        # the builds end once the Ctrl-C is said (a rank saying it twice would say it meanwhile too), not after a
        # fixed sleep that a loaded machine may outlast before the signal comes
        wait_until(lambda: "stopping once the model and data are built" in proc.stderr_path.read_text(), 120,
                   "the Ctrl-C said", poll_s=0.1)
        (tmp_path / "built").touch()
        _, err = proc.communicate(timeout=120)
    finally:
        (tmp_path / "built").touch()
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("stopping once the model and data are built") == 1, err
    assert err.strip().endswith("trainbus: Ctrl-C before the run began; nothing was made"), err
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]


def test_the_rendezvous_watch_says_the_wait_once_and_nothing_once_a_rank_runs():
    from trainbus.kernel.launch_wait import WAITING_SAID_AFTER_S, RendezvousWatch

    said, ranks = [], []
    watch = RendezvousWatch(2, "node0:29400", said.append, began=100.0, started=lambda: bool(ranks))
    watch.tick(100.0 + WAITING_SAID_AFTER_S - 0.1)
    assert said == []
    watch.tick(100.0 + WAITING_SAID_AFTER_S)
    watch.tick(100.0 + 3 * WAITING_SAID_AFTER_S)
    assert len(said) == 1 and "has waited 10 s for the 2 machines" in said[0]
    ranks.append(1)
    watch.tick(200.0)
    assert watch.started and len(said) == 1
    alone = RendezvousWatch(1, None, said.append, began=0.0, started=lambda: False)
    alone.tick(1000.0)  # --standalone: nothing to wait for but torchrun itself
    assert len(said) == 1


def test_rank_0_at_a_port_in_use_says_so_in_one_line_naming_master_port(tmp_path):
    """srun's ranks meet at a port made from the job id (or MASTER_PORT): one another program holds on rank 0's
    machine. Rank 0 printed c10d's 40-line traceback through our frames ('EADDRINUSE ... address already in use');
    now one line names the port and MASTER_PORT, exit 2, and nothing is made."""
    import socket

    from kernel_process import Command

    runs = tmp_path / "runs"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "localhost",
               "SLURM_JOB_ID": "79", "SLURM_JOB_NAME": "job.sh", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        proc = Command("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--device", "cpu", "--runs-dir", str(runs),
                       "--plugins", "", env=env)
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 2, err  # a mistake in how the ranks were set up, as a --listen port taken is
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "in use" in err and "MASTER_PORT" in err, err
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()]


@pytest.mark.parametrize("kind", ["stream", "sized"])
def test_ranks_given_uneven_batches_by_the_users_loader_end_the_epoch_together(tmp_path, kind):
    """The user shares the data out in their own loader (a stream, as the IterableDataset warning asks; or loaders
    of their own under distributed_sampler = false), and rank 1 gets 2 batches fewer. Rank 1 left the epoch while
    rank 0 was in DDP's all-reduce of its next batch: gloo aborted rank 1 ('Is there a distributed collective
    mismatch?'), which the run's error called a kill -9 with `runs resume` as the fix (NCCL would wait 30 min).
    Now every rank ends the epoch at the fewest, with one warning, and trains on as one run."""
    config = tmp_path / "run.toml"
    config.write_text("[run]\ncheckpoint_every_n_epochs = 1\n" + "distributed_sampler = false\n" * (kind == "sized"))
    target = f"{TESTS_DIR / 'fixture_targets.py'}:uneven_digits"
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", target, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs", "2",
               "--plugins", "checkpoint", "--config", str(config), f"--set=kind=\"{kind}\"", timeout=300, cwd=tmp_path)
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()] if (tmp_path / "runs").is_dir() else [None]
    assert proc.returncode == 0 and run_dir is not None, proc.stdout + proc.stderr
    rank0, rank1 = probes(run_dir)
    assert rank0 == rank1 and len(rank0) == 2  # the same weights after each epoch, the same batches trained
    epochs = [e for e in read_events(run_dir) if e.type == "end_epoch"]
    assert [e.data["training_batch_count"] for e in epochs] == [2 * rank0[0]["batches"]] * 2
    assert proc.stderr.count("different numbers of batches") == 1, proc.stderr


def test_a_failed_attempt_of_a_run_without_checkpoints_says_its_restart_goes_on_from_where_it_began(tmp_path):
    """--max-restarts 1 and no checkpoint plugin, rank 1 raising at its third batch each attempt: rank 0's summary of
    the first said the run went on 'from its newest checkpoint', of which there was none; it began again."""
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", f"{TESTS_DIR / 'fixture_targets.py'}:fails_on_rank_1", "--device", "cpu", "--runs-dir",
               str(tmp_path / "runs"), "--nproc", "2", "--epochs", "1", "--plugins", "", "--max-restarts", "1",
               timeout=300, cwd=tmp_path)
    both = proc.stdout + proc.stderr
    said = [line.strip() for line in proc.stdout.splitlines() if "torchrun restarts the group" in line]
    assert proc.returncode == 1 and said == ["torchrun restarts the group (1 restart left): the run goes on in place "
                                             "from where it began (it has no checkpoint yet)"], both


@pytest.mark.parametrize("rank, at", [(0, 5), (1, 0)])  # rank 0 mid-epoch; rank 1 as it builds, before the run began
def test_a_rank_killed_while_restarts_are_left_is_named_with_the_restart(tmp_path, rank, at):
    """kill -9 of a rank under --max-restarts 1: where rank 0 could not say it (it was the one killed, or the run had
    not begun), the group restarted without a word of why, the next attempt's lines following the last's."""
    target = f"{TESTS_DIR / 'fixture_targets.py'}:killed_once"
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", target, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs", "1",
               "--plugins", "", "--max-restarts", "1", f"--set=kill_rank={rank}", f"--set=kill_at={at}", timeout=300,
               cwd=tmp_path)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0 and (tmp_path / f"killed-rank{rank}").exists(), both
    said = [line for line in proc.stderr.splitlines() if "was killed by SIGKILL" in line]
    assert len(said) == 1 and said[0].startswith(f"trainbus: rank {rank} (pid "), both
    # no checkpoint plugin: the restart goes on from where the run began, which the line said was its newest checkpoint
    assert said[0].endswith("torchrun restarts the group (1 restart left): the run goes on in place from where it "
                            "began (it has no checkpoint yet)"), both
    assert both.count("completed after 1 epoch") == 1, both


def test_a_resume_on_another_number_of_processes_says_so(tmp_path, three_epochs_on_two_ranks):
    """A run trained on 2 ranks (under torchrun or srun by hand, where config.json records no launch; or --nproc 1
    given) continued in 1 process: it went on without a word, its steps now counting twice the batches an epoch,
    its data order and RNG streams none that the 2 would have had. Said once, naming both counts."""
    _, trained = three_epochs_on_two_ranks
    run_dir = tmp_path / "runs" / trained.name  # a copy, continued in place: the other tests read the original
    shutil.copytree(trained, run_dir)
    proc = cli("run", "--resume", str(run_dir), "--epochs", "4", "--nproc", "1", "--plugins", "checkpoint",
               timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [line for line in proc.stderr.splitlines() if "processes" in line and "warning" in line]
    assert len(said) == 1 and "2 processes" in said[0] and "1 process" in said[0], proc.stderr


def test_a_validation_stream_with_no_batch_on_one_rank_validates_on_the_others(tmp_path):
    """The user's validation stream, shared out by files, has fewer files than ranks: rank 1 gets none. Each rank
    asked its own share for a batch, and rank 1's 'validation_loader gave no batch: it is empty' failed the run,
    while the validation set (every rank's share) had batches, as it has in one process."""
    target = f"{TESTS_DIR / 'fixture_targets.py'}:uneven_digits"
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", target, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs", "1",
               "--plugins", "", '--set=kind="validation"', timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run_dir] = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    [end] = [e for e in read_events(run_dir) if e.type == "end_validation_loop"]
    assert end.data["validation_batch_count"] == 2 and end.data["validation_metrics"]["accuracy"] > 0, end.data


def test_a_training_stream_with_no_batch_on_one_rank_is_said_as_that(tmp_path):
    """Rank 1's share of the user's training stream is empty, rank 0's is not: the ranks step together, so no rank
    trains, and each said 'train_loader gave no batch in epoch 1: it is empty', which rank 0's share was not."""
    target = f"{TESTS_DIR / 'fixture_targets.py'}:uneven_digits"
    tmp_path.mkdir(exist_ok=True)
    proc = cli("run", target, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"), "--nproc", "2", "--epochs", "1",
               "--plugins", "", "--set=fewer=-1", timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [summary] = (tmp_path / "runs").glob("*/summary.json")
    error = json.loads(summary.read_text())["error"]
    assert "it is empty" not in error and "1 of the 2 ranks" in error, error


def test_the_ranks_of_a_launcher_killed_with_sigkill_end_the_run_interrupted(tmp_path):
    """kill -9 of `run --nproc 2` alone (a job's hard kill, the out-of-memory killer taking the launcher): its ranks,
    each in a session of its own, trained on unseen to the run's end, holding their CPUs or GPUs, with no one left
    to stop them. Each now takes its launcher's end as a SIGTERM: the run ends interrupted, its summary written."""
    runs = tmp_path / "runs"
    proc = start_paced(runs, ["--nproc", "2", "--epochs", "40", "--plugins", ""], tmp_path / "output.txt")
    ranks = []
    try:
        run_dir = wait_for_a_step(runs)  # mid-run
        ranks = [psutil.Process(rank_pid(proc.pid, rank)) for rank in (0, 1)]
        proc.kill()
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, (tmp_path / "output.txt").read_text()[-3000:]
    finally:
        for process in ranks:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["outcome"]["epochs_completed"] < 40, summary["outcome"]


def test_under_srun_rank_0_killed_is_said_by_the_rank_its_death_stopped(tmp_path):
    """Two tasks of an srun (no launcher of ours to say it), rank 0 killed with SIGKILL mid-epoch: rank 1's collective
    broke, and it wrote that to its file for rank 0 to say, then exited 1 without a word. The job's output held
    nothing of why. Now rank 1 says rank 0 ended without a word, and how to go on."""
    from kernel_process import Command

    runs, port = tmp_path / "runs", str(free_port())
    tasks = [Command("run", f"{TESTS_DIR / 'fixture_targets.py'}:killed_once", "--device", "cpu", "--runs-dir",
                     str(runs), "--plugins", "", "--set=kill_rank=0", "--set=kill_at=5", cwd=tmp_path,
                     env={"SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                          "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "80",
                          "SLURM_JOB_NAME": "job.sh", "SLURM_TASKS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": port}) for rank in (0, 1)]
    try:
        _, err = tasks[1].communicate(timeout=300)
        tasks[0].wait(timeout=60)
    finally:
        for task in tasks:
            task.kill()
    assert tasks[0].returncode == -signal.SIGKILL and tasks[1].returncode == 1, err
    [run_dir] = [p for p in runs.iterdir() if p.is_dir()]
    assert err.startswith("error: rank 1 stopped: rank 0 (pid ") and "ended without a word" in err, err
    assert f"`trainbus runs resume {run_dir.name}`" in err and "Traceback" not in err, err


def test_ctrl_c_mid_run_under_nproc_says_where_the_run_stops(tmp_path):
    """Ctrl-C to `run --nproc 2` mid-epoch: 'stopping at the next batch boundary', said by rank 0, which stops where
    the ranks next agree (every 16 steps, and each epoch's end), up to 15 steps on."""
    runs = tmp_path / "runs"
    proc = start_paced(runs, ["--nproc", "2", "--epochs", "20", "--plugins", ""], tmp_path / "output.txt")
    signalled_after_a_step(proc, runs, signal.SIGINT, lambda run_dir: proc.pid)
    output = (tmp_path / "output.txt").read_text()
    assert proc.returncode == 130, output
    assert "trainbus: Ctrl-C: stopping where the ranks next agree (within 16 steps)" in output, output
    assert "next batch boundary" not in output, output
