"""More than one process: `trainbus run --nproc 2` through torch.distributed.run, gloo on the CPU, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TESTS_DIR, trainbus_cmd
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import FINAL_WEIGHTS
from trainbus.proto import JOURNAL_NAME

PROBED = f"{TESTS_DIR / 'fixture_targets.py'}:probed_digits"


def train(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    tmp_path.mkdir(exist_ok=True)
    proc = subprocess.run(trainbus_cmd() + ["run", PROBED, "--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                            *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()] if (tmp_path / "runs").is_dir() else []
    assert proc.returncode == 0 and len(runs) == 1, proc.stdout + proc.stderr
    return proc, runs[0]


def probes(run_dir: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (run_dir / f"probe-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def test_two_processes_train_the_demo_as_one_run(tmp_path):
    proc, run_dir = train(tmp_path, "--nproc", "2", "--epochs", "3", "--plugins", "metrics_log")
    events = read_events(run_dir)
    # one event stream, from rank 0: gap-free, one session, the cluster in it and in summary.json
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    [start] = [e for e in events if e.type == "start_training_session"]
    assert start.data["cluster"]["world_size"] == 2 and start.data["cluster"]["kind"] == "torchelastic"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["cluster"]["rank"] == 0
    assert proc.stdout.count("completed after 3 epochs") == 1  # rank 1 prints nothing of its own
    # the same weights on both ranks after every epoch, each rank training on its half of the data
    rank0, rank1 = probes(run_dir)
    assert len(rank0) == len(rank1) == 3 and rank0 == rank1
    steps = [e.step for e in events if e.type == "end_epoch"]
    assert [p["batches"] for p in rank0] == steps
    # validation over all of the data (both halves reduced): it learns
    epochs = [e for e in events if e.type == "end_epoch"]
    assert epochs[-1].data["validation_metrics"]["accuracy"] > 0.8


def test_a_stop_reaches_every_rank_at_the_same_step(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[plugins.stopper]\ntarget = "fixture_plugins:StopAtStep"\nsettings = {step = 10}\n')
    proc, run_dir = train(tmp_path, "--nproc", "2", "--epochs", "3", "--config", str(config))
    events = read_events(run_dir)
    [stop] = [e for e in events if e.type == "stop_requested"]
    assert "enough at step 10" in stop.data["reasons"][0] and stop.step >= 10
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["outcome"]["steps"] == stop.step
    rank0, rank1 = probes(run_dir)
    assert rank0 == rank1 and rank0[-1]["batches"] == stop.step  # both stopped after the same batch


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


@pytest.mark.slow  # three two-process runs (~40 s on 2 cores): run with -m slow
def test_a_two_process_run_killed_mid_epoch_resumes_exactly(tmp_path):
    """kill -9 of the launcher's whole process group (agent and both ranks) once an epoch-2 checkpoint is on
    disk, then `--resume ID`: the final weights of an uninterrupted two-process run."""
    config = tmp_path / "run.toml"
    config.write_text("[run]\ncheckpoint_every_n_steps = 8\ncheckpoint_every_n_epochs = 0\n")
    common = ["--nproc", "2", "--epochs", "3", "--plugins", "checkpoint", "--config", str(config)]
    _, reference = train(tmp_path / "reference", *common)

    runs = tmp_path / "killed" / "runs"
    proc = subprocess.Popen(trainbus_cmd() + ["run", PROBED, "--device", "cpu", "--runs-dir", str(runs), *common,
                                              "--set", "step_sleep_s=0.03"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, saved = time.monotonic() + 180, []
        while not saved and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            journals = list(runs.glob(f"*/{JOURNAL_NAME}"))
            saved = [e for e in read_events(journals[0].parent) if e.type == "checkpoint_saved" and e.epoch == 2] \
                if journals else []
        assert saved, "no epoch-2 checkpoint within 180 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    run_dir = journals[0].parent
    assert not (run_dir / "summary.json").exists()  # killed, not finished

    resumed = subprocess.run(trainbus_cmd() + ["run", "--nproc", "2", "--resume", run_dir.name, "--runs-dir", str(runs)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    events = read_events(run_dir)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one journal, gap-free across the resume
    [load] = [e for e in events if e.type == "load_checkpoint"]
    assert load.data["epoch"] >= 2
    final = [torch.load(d / FINAL_WEIGHTS, weights_only=True)["model_state_dict"] for d in (reference, run_dir)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
