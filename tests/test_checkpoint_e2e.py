"""Checkpoints end to end, with real processes and real signals: exact resume after a kill -9 of the
kernel, kill -9 of the checkpoint plugin while it writes, a full disk, retention policies on real runs,
and what `trainbus run --resume` says when it cannot or must not resume. Nothing is mocked.

Numbers the tests rest on: the digits demo trains STEPS_PER_EPOCH steps per epoch at batch size 32;
the supervisor gives up on a plugin failing 6 times within 60 s, so one run takes at most
KILLS_PER_RUN kills of its checkpoint plugin (more kills = more runs).
Replay a random schedule with TRAINBUS_TEST_SEED=<the seed printed in the failure>.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from conftest import TESTS_DIR, child_path_with_tests
from fixture_targets import open_gate, paced_digits
from helpers import PLUGIN_START_S, assert_same_weights, run_config, seeded_rng
from kernel_process import Command, KernelProcess, cli, of, process_gone, wait_until
from trainbus.kernel.checkpointing import FINAL_WEIGHTS, CheckpointError, find_checkpoint, load_checkpoint
from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.run_overview import run_overview
from trainbus.kernel.loop import Loop
from trainbus.kernel.session import run_training
from trainbus.kernel.spec import build_spec
from trainbus.kernel.supervisor import MAX_RESTARTS
from trainbus.proto import Event, checkpoint_format
from trainbus.plugins._history import History
from trainbus.proto.checkpoint_format import sha256_of

PACED = "fixture_targets:paced_digits"  # the digits demo with a sleep per step: same weights, known pace
HEAVY = "test_checkpoint_e2e:heavy_digits"  # paced digits carrying BALLAST_MB of extra state
TRAIN_SAMPLES = 1797 - int(1797 * 0.2)  # kernel/digits.py: 1,797 images, 20 % held out for validation
STEPS_PER_EPOCH = math.ceil(TRAIN_SAMPLES / 32)  # 45
BALLAST_MB = 32  # a ~33 MB checkpoint: a write (torch.save + fsync) takes a few hundred ms here
KILLS_PER_RUN = 4  # < MAX_RESTARTS + 1: the 6th failure within 60 s would get the plugin given up
STARTUP_S = 180  # kernel/supervisor.py STARTUP_TIMEOUT_S: a (re)started plugin imports torch, starved on a busy box
TEMP_PREFIX = ".tmp-"  # plugins/_durable_files.py: where a checkpoint is written before its rename
LAST = "last.pt"

assert KILLS_PER_RUN <= MAX_RESTARTS


# -- targets and configs --------------------------------------------------------------------------


def heavy_digits(hyperparameters: dict):
    """paced_digits whose model carries `ballast_mb` MB more state (a buffer): a checkpoint slow enough to write
    that a kill lands mid-write, while a step costs what the digits demo costs."""
    ballast_mb = float(hyperparameters.pop("ballast_mb", BALLAST_MB))
    spec = paced_digits(hyperparameters)
    spec.model.register_buffer("ballast", torch.arange(int(ballast_mb * 2**20) // 4, dtype=torch.float32))
    return spec


def config(runs: Path, plugins=(), epochs: int = 3, target: str | None = None, every_n_steps: int = 0,
           every_n_epochs: int = 0, **settings) -> RunConfig:
    """run_config with checkpoints only where asked for, a longer drain (a checkpoint plugin catching up), and the
    plugins waited for before training (a snapshot is taken only while a persister is there)."""
    return run_config(runs, plugins, epochs, target, checkpoint_every_n_steps=every_n_steps,
                      checkpoint_every_n_epochs=every_n_epochs, drain_timeout_s=60,
                      **{"ready_timeout_s": PLUGIN_START_S, **settings})


def checkpointer(**settings):
    """The built-in checkpoint plugin, found by name like any installed plugin."""
    return resolve_plugin("checkpoint", settings)


# -- checking files ---------------------------------------------------------------------------------


def read_manifest(directory: Path) -> list[dict]:
    """Every whole line of the manifest; a torn last line (a kill mid-append) is skipped, as resume does."""
    return checkpoint_format.read_manifest(directory / checkpoint_format.MANIFEST)


def final_names(directory: Path) -> set[str]:
    """Checkpoint files under their final names (not temporaries)."""
    return {p.name for p in directory.iterdir() if p.suffix == ".pt" and not p.name.startswith(TEMP_PREFIX)}


class CheckpointAudit:
    """Checks a checkpoint directory the way a reader must be able to trust it, remembering what it verified.

    Every file under a final name must be whole (torch.load(weights_only=True) works) and match the
    size and sha256 of its name's latest manifest line. Two states are legal only in the instant a
    writer may be killed in (checked with strict=False): a file renamed into place whose line is not
    yet written (it is whole, and the replayed save rewrites it), and last.pt re-linked before its own
    line is written (it then matches the line of the checkpoint it links to). Files are read once:
    a final name is never written in place, so (inode, size, mtime) identifies what was verified.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._verified: dict[tuple, tuple[int, str]] = {}

    def check(self, strict: bool) -> list[str]:
        """Problems found, as lines (empty: all good); raises nothing, so callers can add context."""
        entries = read_manifest(self.directory)
        latest = {e["file"]: e for e in entries}
        durable = {(e["size"], e["sha256"]) for e in entries if e["file"] != LAST and "alias_of" not in e}
        problems = []
        for name in sorted(final_names(self.directory)):
            try:
                size, digest = self._verify(self.directory / name)
            except FileNotFoundError:
                continue  # deleted by retention while we looked: a file that is gone cannot mislead
            except Exception as exc:
                problems.append(f"{name} does not load: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            entry = latest.get(name)
            matches_own = entry is not None and (entry.get("size"), entry.get("sha256")) == (size, digest)
            if matches_own:
                continue
            if name == LAST and not strict and (size, digest) in durable:
                continue  # re-linked to a durable checkpoint, its own line not written yet
            if entry is None and not strict:
                continue  # renamed into place, line not written yet: whole (it loaded), replay rewrites it
            problems.append(f"{name} ({size} bytes, sha256 {digest[:12]}) does not match its manifest line "
                            f"{ {k: entry.get(k) for k in ('size', 'sha256', 'seq')} if entry else None }")
        return problems

    def _verify(self, path: Path) -> tuple[int, str]:
        with open(path, "rb") as f:  # one open file: what we hash and load is one inode even if renamed over
            st = os.fstat(f.fileno())
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self._verified:
                data = f.read()
                torch.load(io.BytesIO(data), weights_only=True)
                self._verified[key] = (len(data), hashlib.sha256(data).hexdigest())
        return self._verified[key]


# -- 1. resume after kill -9 of the kernel is exact ------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill-free run of the digits demo by epochs and seed: a future of its RunResult, each run once per module,
    in a thread of this process while the first test's killed run goes on in its subprocess (both mostly wait). No
    plugin: a resumed run is compared with the run no checkpoint ever touched (the digits demo and paced_digits,
    unpaced or not, train the same weights)."""
    cache: dict[tuple[int, int], Future] = {}
    pool = ThreadPoolExecutor(1)

    def run(epochs: int, seed: int):
        result = run_training(config(tmp_path_factory.mktemp("uninterrupted"), epochs=epochs, seed=seed))
        assert result.status == "completed", result.error
        return result

    def get(epochs: int, seed: int) -> Future:
        if (epochs, seed) not in cache:
            cache[epochs, seed] = pool.submit(run, epochs, seed)
        return cache[epochs, seed]

    yield get
    pool.shutdown(wait=True)


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_boundary"])
def test_resume_after_kill_9_of_the_kernel_is_exact(tmp_path, kernels, uninterrupted, where):
    """An uninterrupted run vs. the same run killed in epoch 2 and resumed from its run directory.

    mid_epoch: step checkpoints only (every 7 steps, none at an epoch end), killed as soon as one of
    epoch 2 is durable; the resume starts inside an epoch. epoch_boundary: epoch checkpoints only,
    killed once epoch 1's is durable and epoch 2 is 10 steps in; the resume starts at an epoch's start.
    """
    epochs, seed = 3, 7
    schedule = {"every_n_steps": 7} if where == "mid_epoch" else {"every_n_epochs": 1}
    # Held 20 steps into epoch 3 until the kill: beside busy cores the checkpoint plugin's first writes can lag
    # the run by seconds, and a run that reached its end before the kill proves nothing.
    gate = tmp_path / "gate"
    open_gate(gate, 2 * STEPS_PER_EPOCH + 20)
    kernel = KernelProcess(config(tmp_path / "killed", [checkpointer()], epochs, target=PACED, seed=seed,
                                  step_sleep_s=0.02, gate=str(gate), **schedule), tmp_path)
    kernels.append(kernel)
    reference_run = uninterrupted(epochs, seed)  # trains while this run goes towards its kill, if not already run
    # mid_epoch: one of epoch 2's, or (when a loaded box skipped them all, both buffers still being written)
    # one of epoch 3's before the gate: a resume inside an epoch either way
    saved = kernel.wait_event("checkpoint_saved", lambda e: e.data["epoch"] in ((2, 3) if where == "mid_epoch"
                                                                              else (1,)), timeout_s=120)
    if where == "epoch_boundary":
        kernel.wait_step(STEPS_PER_EPOCH + 10)
    kernel.kill()
    reference = reference_run.result(timeout=120)
    assert reference.status == "completed"
    events = kernel.journal.poll()
    killed_at = kernel.journal.step()
    assert not of(events, "end_training_session")
    # before the end (on a loaded box a late write may put the kill in epoch 3: any point before the end will do)
    assert STEPS_PER_EPOCH < killed_at < epochs * STEPS_PER_EPOCH, f"killed at step {killed_at}"

    resumed = run_training(config(tmp_path / "resumed", [checkpointer()], epochs, seed=seed,
                                  resume=str(kernel.run_dir), **schedule))
    assert resumed.status == "completed"
    events = read_events(resumed.run_dir)
    loads = of(events, "load_checkpoint")
    assert len(loads) == 1
    state = torch.load(loads[0].data["path"], weights_only=True)["trainbus"]
    assert state["step"] >= saved.data["step"]  # the newest durable checkpoint: the one we saw, or a later one
    assert state["step"] <= killed_at
    if where == "mid_epoch":
        assert not state["epoch_complete"] and 0 < loads[0].data["batches_done"] < STEPS_PER_EPOCH
        assert loads[0].data["epoch"] == state["epoch"] >= 2
    else:
        assert state["epoch_complete"] and loads[0].data["batches_done"] == 0
        assert loads[0].data["epoch"] == state["epoch"] + 1 and state["step"] == state["epoch"] * STEPS_PER_EPOCH
    # the step count continues where the checkpoint was taken, and ends where the uninterrupted run did
    assert of(events, "end_training_batch")[0].step == state["step"] + 1
    assert resumed.outcome["steps"] == reference.outcome["steps"] == epochs * STEPS_PER_EPOCH
    assert resumed.outcome["epochs_completed"] == epochs
    assert_same_weights(resumed.run_dir, reference.run_dir)
    # and the last epoch's validation metrics, computed after the resume, are the uninterrupted run's
    assert resumed.outcome["validation_loss"] == reference.outcome["validation_loss"]


def test_a_run_continued_from_its_last_epochs_checkpoint_ends_in_that_epoch(tmp_path, kernels, uninterrupted):
    """A kernel killed after the last epoch's checkpoint (in the final drain, here) leaves nothing to train: the
    continued run trained no epoch and kept the epoch it started with, 0, so its final.pt said epoch 0 beside the
    uninterrupted run's 1 (the same weights), and its end_training_session (metrics.jsonl's session_end) epoch 0;
    its summary had no losses or metrics (no epoch of this session's ended), so runs list showed no validation."""
    held = PluginConfig(name="held", target="fixture_plugins:HeldAtTheEnd", settings={"release": str(tmp_path / "no")})
    kernel = KernelProcess(config(tmp_path / "runs", [checkpointer(), held], epochs=1, every_n_epochs=1), tmp_path)
    kernels.append(kernel)
    reference = uninterrupted(1, 0).result(timeout=120)
    kernel.wait_event("checkpoint_saved", lambda e: e.data["epoch"] == 1, timeout_s=120)
    kernel.wait_event("end_training_session", timeout_s=120)
    kernel.kill()  # the drain waits for `held`, which never finishes its last handler
    resumed = run_training(config(tmp_path / "runs", [checkpointer()], epochs=1, every_n_epochs=1,
                                  resume=str(kernel.run_dir)), run_id=kernel.run_id, continue_run=True)
    assert resumed.status == "completed", resumed.error
    events = [e for e in read_events(kernel.run_dir) if e.seq >= of(read_events(kernel.run_dir),
                                                                      "load_checkpoint")[0].seq]
    assert not of(events, "end_training_batch"), "nothing was left to train"
    assert [(e.epoch, e.step) for e in of(events, "end_training_session")] == [(1, STEPS_PER_EPOCH)]
    assert_same_weights(resumed.run_dir, reference.run_dir)
    # what the run ended with is its last epoch's, as the uninterrupted run's: runs list and show said no validation
    for key in ("training_loss", "validation_loss", "validation_metrics", "training_metrics"):
        assert resumed.outcome[key] == reference.outcome[key], key
    listed = json.loads(cli("runs", "list", "--runs-dir", str(tmp_path / "runs"), "--json").stdout)
    assert listed[0]["validation_loss"] == reference.outcome["validation_loss"], listed[0]


@pytest.mark.timeout(360)  # three runs (the killed one, the resume, the reference): beside busy cores, minutes
def test_resume_by_run_id_alone_continues_the_run_in_place(tmp_path, kernels, uninterrupted):
    """kill -9 mid-epoch, then `trainbus run --resume ID` and nothing else: the same directory and config, the
    journal going on gap-free, the weights of an uninterrupted run, and a history with every epoch once."""
    epochs, seed, runs = 3, 7, tmp_path / "runs"
    gate, held_at = tmp_path / "gate", STEPS_PER_EPOCH  # training goes only as far as the gate says
    open_gate(gate, held_at)
    cfg = config(runs, [checkpointer(), resolve_plugin("metrics_log", {"every_n_steps": 0})], epochs, target=PACED,
                 seed=seed, every_n_steps=7, step_sleep_s=0.0, gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    reference_run = uninterrupted(epochs, seed)  # trains while this run is killed and resumed, if not already run

    def saved_in_epoch_2() -> bool:
        """Once a checkpoint of epoch 2 is on disk; till then epoch 2 goes on a checkpoint interval at a time, from
        the time the checkpoint plugin is ready (training never waits for a plugin, and on a busy machine its start,
        importing torch, can outlast an epoch) and only while no snapshot is being persisted: one due while both
        buffers are still being written (epoch 1's, on a busy machine) is skipped, so the gate must not let a
        whole epoch 2 of skipped ones by."""
        nonlocal held_at
        events = kernel.journal.poll()
        assert not of(events, "end_training_session"), "the run ended before a checkpoint of epoch 2 was saved"
        if not of(events, "plugin_ready", "checkpoint"):
            return False
        settled = {e.data["seq"] for e in of(events, "checkpoint_saved") + of(events, "checkpoint_failed")}
        if any(e.data["epoch"] == 2 for e in of(events, "checkpoint_saved")):
            return True
        pending = [e for e in of(events, "save_checkpoint") if e.seq not in settled]
        if not pending and kernel.journal.step() >= held_at:
            held_at += 7
            open_gate(gate, held_at)
        return False

    wait_until(saved_in_epoch_2, 120, "a checkpoint of epoch 2")
    kernel.kill()
    killed_at = kernel.journal.step()
    before = kernel.journal.poll()[-1].seq
    open_gate(gate, epochs * STEPS_PER_EPOCH)  # the resumed run reads the same gate

    proc = cli("run", "--resume", kernel.run_id, "--runs-dir", str(runs), cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"continuing run {kernel.run_id} from" in proc.stderr and "epoch 2, batch" in proc.stderr, proc.stderr
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [kernel.run_id], "continued in place, no new run directory"
    summary = json.loads((kernel.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outcome"]["epochs_completed"] == epochs

    events = read_events(kernel.run_dir)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)) and len(events) > before
    assert len(of(events, "start_training_session")) == 2 and len(of(events, "load_checkpoint")) == 1
    resumed_at = of(events, "load_checkpoint")[0].step
    assert STEPS_PER_EPOCH < resumed_at <= killed_at
    history = History.from_journal(kernel.run_dir)
    assert [e.epoch for e in history.epochs] == [1, 2, 3] and history.finished
    records = [json.loads(line) for line in (kernel.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2, 3], "each epoch's record once"

    reference = reference_run.result(timeout=180)
    assert_same_weights(kernel.run_dir, reference.run_dir)


def test_snapshot_buffers_are_prepared_for_a_persister_that_says_hello_after_the_first_step(tmp_path, kernels):
    """The buffers are made by a preparer process before the first snapshot even when the checkpoint plugin is
    not there at the first step (the loop used to ask for them at that step only, so a late persister's first
    snapshot allocated and paged in both buffers on the training thread: seconds for a large model)."""
    gate = tmp_path / "gate"
    open_gate(gate, 3)
    cfg = config(tmp_path / "runs", [checkpointer()], 1, target=PACED, every_n_epochs=1, step_sleep_s=0.0,
                 gate=str(gate))
    cfg.ready_timeout_s = 0.0  # training starts at once, before the plugin has imported torch
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(3, timeout_s=STARTUP_S)
    kernel.wait_ready("checkpoint", timeout_s=STARTUP_S)
    assert of(kernel.journal.poll(), "plugin_ready", "checkpoint")[0].step >= 1, "the persister came after step 1"
    open_gate(gate, STEPS_PER_EPOCH)
    assert kernel.result(timeout_s=STARTUP_S)["status"] == "completed"
    assert of(read_events(kernel.run_dir), "checkpoint_saved"), "the epoch's checkpoint was written"
    log = (kernel.run_dir / "kernel.log").read_text()
    assert "made before the first snapshot by a preparer process" in log, log
    assert "allocated by the run's first snapshot" not in log, log


# -- 2. kill -9 the checkpoint plugin while it writes ----------------------------------------------


@pytest.fixture(scope="module")
def heavy_reference(tmp_path_factory):
    """Kill-free runs of heavy_digits (no plugin, no pacing), by epochs: a future of the run dir, each run once
    per module, in a thread of this process while the first test's own run goes on in its subprocess."""
    cache: dict[int, Future] = {}
    pool = ThreadPoolExecutor(1)

    def run(epochs: int) -> str:
        result = run_training(config(tmp_path_factory.mktemp("heavy_reference"), epochs=epochs, target=HEAVY,
                                     step_sleep_s=0.0))
        assert result.status == "completed"
        return result.run_dir

    def get(epochs: int) -> Future:
        if epochs not in cache:
            cache[epochs] = pool.submit(run, epochs)
        return cache[epochs]

    yield get
    pool.shutdown(wait=True)


def kill_the_checkpoint_plugin_while_it_writes(tmp_path: Path, kernels: list, heavy_reference, kills: int) -> None:
    """Each kill takes about one checkpoint interval of the gated run (5 steps) on an idle box; on a busy one the
    starved plugin takes several (2 epochs ended before the fourth kill beside two CPU burners): 9 epochs for 4 kills,
    5 for 2 (100 steps or more a kill either way). The run trains every epoch after the kills, a checkpoint every 5
    steps (33 MB each), which a longer run pays for in seconds. Unpaced: the gate alone sets how far training goes
    while the kills land (a sleep per step made the ~200 steps after them last ~5 s more, the gate held anyway)."""
    epochs = max(5, 2 * kills + 1)
    rng, seed = seeded_rng()
    gate = tmp_path / "gate"  # training goes only as far as the test lets it: the kills land before the run ends
    cfg = config(tmp_path / "runs", [checkpointer(max_total=3)], epochs, target=HEAVY, every_n_steps=5,
                 step_sleep_s=0.0, gate=str(gate))
    kernel = KernelProcess(cfg, tmp_path)
    reference = heavy_reference(epochs)  # started now, if not already run: it trains while this run starts
    kernels.append(kernel)
    directory = kernel.run_dir / "checkpoints"
    audit = CheckpointAudit(directory)

    def train_until_saved(after_seq: int) -> Event:
        """Let training on, a checkpoint interval (5 steps) at a time, until a save_checkpoint after after_seq."""
        for _ in range(epochs * STEPS_PER_EPOCH // 5):
            saves = [e for e in kernel.journal.of("save_checkpoint") if e.seq > after_seq]
            if saves:
                return saves[0]
            allowed = kernel.journal.step() + 5
            open_gate(gate, allowed)
            kernel.wait_step(allowed, timeout_s=STARTUP_S)
        raise AssertionError(f"no save_checkpoint after seq {after_seq} in the whole run")

    train_until_saved(0)
    first = kernel.wait_event("checkpoint_saved", timeout_s=STARTUP_S)
    write_s = first.ts - next(e.ts for e in kernel.journal.of("save_checkpoint") if e.seq == first.data["seq"])
    killed_pids, deaths, log = [], [], []
    after_seq = 0
    for i in range(kills):
        pid = kernel.wait_ready("checkpoint", timeout_s=STARTUP_S, not_in=killed_pids)
        ready = [e for e in kernel.journal.of("plugin_ready", "checkpoint") if e.data["pid"] == pid][-1]
        save = train_until_saved(max(after_seq, ready.seq))
        after_seq = save.seq
        delay = rng.uniform(0.0, 1.5 * write_s)
        time.sleep(max(0.0, save.ts + delay - time.time()))
        mid_write = any(p.name.startswith(TEMP_PREFIX) for p in directory.iterdir())
        os.kill(pid, signal.SIGKILL)
        deaths.append(time.time())
        wait_until(lambda pid=pid: process_gone(pid), 5, f"checkpoint plugin pid {pid} to die")
        killed_pids.append(pid)
        log.append(f"kill {i + 1}: {delay * 1000:.0f} ms after save_checkpoint seq {save.seq} (step {save.step})"
                   f"{', temp file present' if mid_write else ''}")
        problems = audit.check(strict=False)  # the restarted plugin is still in backoff: nothing moves
        assert not problems, f"after {log[-1]} (seed {seed}):\n" + "\n".join(problems)

    # the last kill's restart ready before the rest of the run, which unpaced takes about a second: checkpoints
    # land after the last kill, written by a process started after it
    kernel.wait_ready("checkpoint", timeout_s=STARTUP_S, not_in=killed_pids)
    open_gate(gate, epochs * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S + 120)
    why = f"(seed {seed}; a write took {write_s * 1000:.0f} ms)\n" + "\n".join(log)
    print(why)
    assert result["status"] == "completed", why
    assert result["undrained"] == {}, why
    summary = result["plugins"]["checkpoint"]
    assert (summary["state"], summary["restarts"], summary["crashes"][:kills]) == ("exited", kills,
                                                                                   ["signal SIGKILL"] * kills), why
    # On a starved box (two CPU burners beside the suite) the last process, drained (undrained is empty), can take
    # longer than the run's exit time, stretched while it waits for a CPU, to go: killed then, which is the run's
    # end being bounded, not a loss.
    assert all(re.match(r"still running \d+ s after the run's end", c) for c in summary["crashes"][kills:]), why
    events = read_events(result["run_dir"])
    assert len(of(events, "plugin_restarted", "checkpoint")) == kills, why
    # checkpoints still land after the last kill, written by a process started after it
    later = [e for e in of(events, "checkpoint_saved", "checkpoint") if e.ts > deaths[-1]]
    assert later, f"no checkpoint_saved after the last kill {why}"
    assert not of(events, "checkpoint_failed"), why
    # at the end, everything strict: each file whole and matching its own latest line, no temporaries
    problems = audit.check(strict=True)
    assert not problems, why + "\n" + "\n".join(problems)
    assert not [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)], why
    assert len(final_names(directory) - {LAST}) <= 3, f"max_total=3 exceeded: {sorted(final_names(directory))}"
    # what resume would pick is verified and loads; last.pt is the newest checkpoint
    newest = find_checkpoint(str(kernel.run_dir), str(tmp_path / "runs"))
    assert os.path.samefile(newest, directory / LAST) or newest.name == LAST
    assert load_checkpoint(find_checkpoint(str(directory / LAST), ""))["step"] == max(
        e.data["step"] for e in of(events, "checkpoint_saved"))
    # training never noticed: the weights are those of the run without kills
    assert_same_weights(result["run_dir"], reference.result(timeout=120))
    assert not list(Path("/dev/shm").glob(f"trainbus-*-{kernel.run_id}-slot*")), "snapshot buffers left behind"


@pytest.mark.timeout(KILLS_PER_RUN * STARTUP_S)  # a hang guard: each kill waits for a restarted plugin's torch import
@pytest.mark.parametrize("round_", [0, pytest.param(1, marks=pytest.mark.slow)])  # a second round of random kills: soak
def test_checkpoint_plugin_killed_while_writing_loses_nothing(tmp_path, kernels, heavy_reference, round_):
    """Kills at random delays after save_checkpoint events: 2 in the suite's round (each waits out a restart, most
    of this test's time), KILLS_PER_RUN in the soak's (-m slow)."""
    kill_the_checkpoint_plugin_while_it_writes(tmp_path, kernels, heavy_reference, KILLS_PER_RUN if round_ else 2)


@pytest.mark.slow
@pytest.mark.timeout(KILLS_PER_RUN * STARTUP_S)
@pytest.mark.parametrize("round_", range(5))
def test_checkpoint_plugin_killed_while_writing_soak(tmp_path, kernels, heavy_reference, round_):
    """5 more runs x KILLS_PER_RUN kills (20 in all)."""
    kill_the_checkpoint_plugin_while_it_writes(tmp_path, kernels, heavy_reference, KILLS_PER_RUN)


# -- 3. disk full -----------------------------------------------------------------------------------


def checkpoint_size_of_the_digits_demo() -> int:
    """Bytes of one checkpoint of the digits demo after a step (Adam's state exists from then on)."""
    torch.manual_seed(0)
    spec = build_spec("trainbus.kernel.digits:build", {})
    inputs, targets = next(iter(spec.train_loader))
    spec.loss_fn(spec.model(inputs), targets).backward()
    spec.optimizer.step()
    loop = Loop(spec, bus=None, device=torch.device("cpu"))
    loop.latest_metrics = {"training_loss": 1.0, "validation_loss": 1.0, "training_accuracy": 1.0,
                           "validation_accuracy": 1.0}
    buffer = io.BytesIO()
    torch.save(loop.training_state(epoch_complete=True), buffer)
    return buffer.tell()


FULL_DISK_RUN = "full-disk"


@pytest.fixture
def small_tmpfs(tmp_path, mount_tmpfs):
    """A tmpfs that holds one checkpoint of the digits demo and not two, as the checkpoints/ of run FULL_DISK_RUN.

    A checkpoint directory is inside its run's, so the run directory is made first (with a config.json, so that
    run_training goes on in it, continue_run) and the tmpfs mounted in it."""
    size = checkpoint_size_of_the_digits_demo()
    run_dir = tmp_path / "runs" / FULL_DISK_RUN
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}\n")
    # room for 1.5 checkpoints: the 2nd's temp file does not fit
    return mount_tmpfs(f"runs/{FULL_DISK_RUN}/checkpoints", size * 3 // 2), size


def test_a_full_disk_fails_that_checkpoint_keeps_the_earlier_ones_and_training_completes(tmp_path, small_tmpfs):
    mount_point, size = small_tmpfs
    directory = mount_point
    result = run_training(config(tmp_path / "runs", [checkpointer()], epochs=3, every_n_epochs=1),
                          run_id=FULL_DISK_RUN, continue_run=True)

    assert result.status == "completed" and result.outcome["epochs_completed"] == 3
    assert (Path(result.run_dir) / FINAL_WEIGHTS).is_file()
    events = read_events(result.run_dir)
    saved, failed = of(events, "checkpoint_saved"), of(events, "checkpoint_failed")
    assert [e.data["epoch"] for e in saved] == [1], f"a checkpoint is ~{size} bytes; saved: {[e.data for e in saved]}"
    assert [e.data["seq"] for e in failed] == [e.seq for e in of(events, "save_checkpoint")][1:]
    # the one kept, what it takes, and the fix: by default every checkpoint is kept
    assert all(re.search(r"No space left on device \(errno 28\) writing .* \(the 1 checkpoint kept there takes "
                         r"[\d.]+ MiB; free space, or keep fewer: checkpoint settings save_top_k or max_total\)$",
                         e.data["reason"]) for e in failed), [e.data["reason"] for e in failed]
    assert result.plugins["checkpoint"]["checkpoints_failed"] == len(failed) >= 1  # in summary.json and runs list
    assert f"checkpoint {len(failed)} checkpoint{'s' * (len(failed) != 1)} failed" in \
        run_overview(Path(result.run_dir))["plugin_trouble"]
    for event in failed:
        assert "No space left on device (errno 28)" in event.data["reason"], event.data["reason"]
        assert str(directory) in event.data["reason"]  # where: the file it could not write
    # the earlier checkpoint is intact, listed, and what a resume would load
    entries = [e for e in read_manifest(directory) if "alias_of" not in e]
    assert [e["epoch"] for e in entries] == [1]
    path = directory / entries[0]["file"]
    assert (path.stat().st_size, sha256_of(path)) == (entries[0]["size"], entries[0]["sha256"])
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert find_checkpoint(str(directory), "") == path
    assert final_names(directory) == {path.name, LAST}  # no partial file under a final name
    assert not [p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]  # failed temps removed


# -- 4. retention policies on real runs -------------------------------------------------------------


POLICIES = {
    "top_k": {"monitor": "validation_loss", "mode": "min", "save_top_k": 2},
    "best_only": {"monitor": "validation_loss", "save_top_k": 1, "save_last": False},
    "keep_last": {"save_top_k": 0, "save_last": True},
    "max_total": {"monitor": "validation_loss", "save_top_k": -1, "max_total": 3},
}


def expected_files(policy: str, epochs: list[tuple[int, int, float]]) -> tuple[set[str], bool]:
    """(checkpoint files that must remain, whether last.pt must), from (epoch, step, validation_loss) rows.

    Derived here from the stated rules, not from the plugin's code: ranking by loss, lower first, the
    older first on a tie; the newest always stays with save_last; max_total drops the oldest first but
    never the newest nor the best.
    """
    name = {e: f"epoch{e:03d}-step{s:06d}.pt" for e, s, _ in epochs}
    ranked = [e for e, _, _ in sorted(epochs, key=lambda row: (row[2], row[0]))]
    newest = epochs[-1][0]
    if policy == "top_k":
        keep, last = set(ranked[:2]) | {newest}, True
    elif policy == "best_only":
        keep, last = {ranked[0]}, False
    elif policy == "keep_last":
        keep, last = {newest}, True
    else:
        keep, last = [e for e, _, _ in epochs], True
        while len(keep) > 3:
            keep.remove(next(e for e in keep if e not in (newest, ranked[0])))
        keep = set(keep)
    return {name[e] for e in keep}, last


@pytest.mark.parametrize("policy", POLICIES)
def test_retention_policy_on_a_real_run(tmp_path, kernels, policy):
    epochs = 6
    # lr 0.03: the validation loss goes up and down (seed 0: best at epoch 2, newest not the best),
    # so the policies keep different files; the expectation is derived from this run's own metrics.
    # Gated: an epoch trains only once the plugin has handled the last snapshot (saved it, or said it is not kept).
    # A snapshot due while both buffers are still being written is skipped by design, and beside two CPU burners
    # 5 of 8 ungated epochs were: too few left to tell the policies apart.
    gate = tmp_path / "gate"
    kernel = KernelProcess(config(tmp_path / "runs", [checkpointer(**POLICIES[policy])], epochs=epochs,
                                  every_n_epochs=1, target=PACED, step_sleep_s=0.0, lr=0.03, gate=str(gate)), tmp_path)
    kernels.append(kernel)

    def handled(save: Event) -> bool:
        return any(e.seq > save.seq and (e.type == "checkpoint_saved" and e.data["seq"] == save.seq
                                         or e.type == "log" and "snapshot not written" in e.data["text"])
                   for e in kernel.journal.poll())

    for epoch in range(1, epochs + 1):
        open_gate(gate, epoch * STEPS_PER_EPOCH)
        save = kernel.wait_event("save_checkpoint", lambda e, epoch=epoch: e.epoch == epoch, timeout_s=STARTUP_S)
        wait_until(lambda save=save: handled(save), STARTUP_S, f"the plugin to handle epoch {epoch}'s snapshot")
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed"
    events = read_events(result["run_dir"])
    snapshotted = {e.epoch for e in of(events, "save_checkpoint")}
    skipped = [e.epoch for e in of(events, "checkpoint_skipped")]
    assert snapshotted == set(range(1, epochs + 1)), f"snapshots skipped at epochs {skipped}"
    rows = [(e.epoch, e.step, e.data["validation_loss"]) for e in of(events, "end_epoch") if e.epoch in snapshotted]
    keep, last = expected_files(policy, rows)
    directory = Path(result["run_dir"]) / "checkpoints"
    assert final_names(directory) == keep | ({LAST} if last else set()), f"validation losses {rows}"
    newest = max(keep)
    if last:
        assert os.path.samefile(directory / LAST, directory / newest)
    assert not CheckpointAudit(directory).check(strict=True)
    if policy == "best_only":  # nothing is written that would not be kept: only new bests
        improved = [e for i, (e, _, loss) in enumerate(rows) if all(loss < r[2] for r in rows[:i])]
        assert [e.data["epoch"] for e in of(events, "checkpoint_saved")] == improved, f"validation losses {rows}"
    else:
        assert [e.data["epoch"] for e in of(events, "checkpoint_saved")] == [e for e, _, _ in rows]
    assert not of(events, "checkpoint_failed")
    assert len(of(events, "end_epoch")) == epochs
    # `runs show` tells the files retention kept from those it removed
    from trainbus.kernel.run_details import run_details

    shown = {Path(c["path"]).name: c["present"] for c in run_details(Path(result["run_dir"]))["checkpoints"]["saved"]}
    assert {name for name, present in shown.items() if present} == keep, shown


def test_the_runs_last_checkpoint_waits_for_a_buffer_instead_of_being_skipped(tmp_path):
    """Epochs shorter than a persist: snapshots due while both buffers are being written are skipped, but not
    the last one (training is over: waiting costs it nothing), so last.pt is the trained model."""
    result = run_training(config(tmp_path / "runs", [checkpointer()], epochs=4, every_n_epochs=1, target=HEAVY,
                                 step_sleep_s=0.0, batch_size=256))
    assert result.status == "completed"
    events = read_events(result.run_dir)
    assert 4 in {e.data["epoch"] for e in of(events, "checkpoint_saved")}, \
        [(e.type, e.epoch) for e in events if "checkpoint" in e.type]
    assert [e.epoch for e in of(events, "checkpoint_skipped")] != [4]
    assert load_checkpoint(Path(result.run_dir) / "checkpoints" / LAST)["epoch"] == 4


# -- what resume says when it cannot, or must not -----------------------------------------------------


def test_no_room_for_a_snapshot_buffer_skips_that_checkpoint_and_training_completes(tmp_path, mount_tmpfs):
    # A snapshot_dir too small for the digits demo's state: before buffers were allocated up front, the
    # copy into a sparse file on a full tmpfs killed training with SIGBUS.
    cfg = config(tmp_path / "runs", [checkpointer()], epochs=2, every_n_epochs=1)
    cfg.snapshot_dir = str(mount_tmpfs("shm", 16 * 1024))
    result = run_training(cfg)

    assert result.status == "completed" and result.outcome["epochs_completed"] == 2
    events = read_events(result.run_dir)
    skipped = of(events, "checkpoint_skipped")
    assert len(skipped) == 2 and not of(events, "save_checkpoint")
    assert skipped[0].data["reason"].startswith("no room for a ")
    assert "No space left on device" in skipped[0].data["reason"]
    assert f"checkpoint at step {skipped[0].step} skipped: no room for a " in (Path(result.run_dir) / "kernel.log").read_text()


def test_a_disk_full_at_the_end_fails_the_run_in_one_line_and_closes_it_cleanly(tmp_path, mount_tmpfs, monkeypatch,
                                                                                   request):
    # A multi-day run whose disk fills up by the end: no traceback out of run_training, no partial
    # final.pt, plugins stopped, summary written. (Before, torch.save's error escaped and skipped all that.) The
    # weights are not lost with it: the temporary directory, on another disk, has them, and the line says where.
    runs = mount_tmpfs("runs", 4 << 20)  # the run's journal and logs fit; 8 MB of final weights do not
    spare = Path(tempfile.mkdtemp(prefix="tb-"))  # short: the run's sockets go there too when its path is too long
    request.addfinalizer(lambda: shutil.rmtree(spare, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", str(spare))
    result = run_training(config(runs, [PluginConfig("metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin")],
                                 epochs=1, target=HEAVY, ballast_mb=8, step_sleep_s=0.0))
    assert result.status == "failed"
    assert result.error.startswith("training completed, but the final weights could not be saved to ")
    kept = spare / f"trainbus-kept-{os.getuid()}" / f"trainbus-{Path(result.run_dir).name}-{FINAL_WEIGHTS}"
    assert result.error.endswith(f"No space left on device (errno 28); they were saved to {kept} instead: move them "
                                 f"to {Path(result.run_dir) / FINAL_WEIGHTS} once its disk has space"), result.error
    assert torch.load(kept, weights_only=True)["epoch"] == 1
    run_dir = Path(result.run_dir)
    assert not (run_dir / FINAL_WEIGHTS).exists() and not list(run_dir.glob(f".{FINAL_WEIGHTS}*"))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert result.plugins["metrics_log"]["state"] == "exited"


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("run", *args, cwd=cwd)  # forked with torch loaded


@pytest.fixture(scope="module")
def one_checkpointed_epoch(tmp_path_factory) -> Path:
    """The run directory of one epoch of the paced demo (batch size 256: 6 steps) with its epoch's checkpoint, trained
    once for the tests below that need such a run (each waited ~3 s more for its checkpoint plugin's torch import):
    not to be changed; `copy_of_it` gives a test a copy of its own."""
    with child_path_with_tests():
        result = run_training(config(tmp_path_factory.mktemp("one_checkpointed_epoch") / "runs", [checkpointer()], 1,
                                     target=PACED, every_n_epochs=1, step_sleep_s=0.0, batch_size=256))
    assert result.status == "completed", result.error
    return Path(result.run_dir)


def copy_of(run_dir: Path, runs: Path) -> Path:
    """A copy of a run directory in `runs`, under its run id: a run of that runs directory (moved, as a user may)."""
    runs.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_dir, runs / run_dir.name, symlinks=True))


def test_resume_from_nothing_is_one_clear_line_and_exit_2(tmp_path):
    proc = run_cli(tmp_path, "--resume", "nonexistent")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nonexistent" in lines[0], proc.stderr
    assert "no such run id" in lines[0]
    assert proc.stdout.strip() == ""
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run was started


def test_a_completed_run_is_resumed_only_to_train_it_longer(tmp_path, one_checkpointed_epoch):
    """A completed run's --resume would train nothing and rewrite its summary: refused in one line, the summary
    untouched; with --epochs above its count it trains the epochs after the last and the summary counts all."""
    runs = tmp_path / "runs"
    run_dir = copy_of(one_checkpointed_epoch, runs)  # a completed run of 1 epoch, with its epoch's checkpoint
    before = (run_dir / "summary.json").read_text()
    for args in ((), ("--epochs", "1")):
        proc = run_cli(tmp_path, "--resume", run_dir.name, "--runs-dir", str(runs), *args)
        assert proc.returncode == 2 and proc.stderr == (
            f"error: run {run_dir.name} has completed (1 epoch); nothing to resume (to train it longer: "
            f"`trainbus run --resume {run_dir.name} --epochs N` with N above 1)\n"), proc.stderr
    assert (run_dir / "summary.json").read_text() == before
    elsewhere = tmp_path / "elsewhere"  # from another directory, the command it suggests names the runs directory
    elsewhere.mkdir()
    proc = run_cli(elsewhere, "--resume", run_dir.name, "--runs-dir", str(runs))
    assert f"`trainbus run --resume {run_dir.name} --runs-dir {runs} --epochs N`" in proc.stderr, proc.stderr
    proc = cli("runs", "resume", run_dir.name, "--runs-dir", str(runs), "--detach", cwd=tmp_path)  # for the daemon:
    assert f"`trainbus run --resume {run_dir.name} --detach --epochs N`" in proc.stderr, proc.stderr  # so is its fix

    # `runs resume` takes `run`'s options, as README says: --epochs here (and --plugins: none is under test)
    proc = cli("runs", "resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "2", "--plugins", "", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # the same for a run that ended before its planned epochs: fewer than it trained would train none
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    proc = run_cli(tmp_path, "--resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "1")
    assert proc.returncode == 2 and proc.stderr == (
        f"error: run {run_dir.name} has trained 2 epochs; --epochs 1 would train none: give more than 2, or leave "
        f"--epochs out to train the epochs it planned\n"), proc.stderr
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert summary["status"] == "completed" and summary["outcome"]["epochs_completed"] == 2, summary
    assert isinstance(summary["outcome"]["validation_loss"], float)
    assert [e.epoch for e in of(read_events(run_dir), "end_epoch")] == [1, 2]


def test_a_run_whose_checkpoints_went_to_a_dirpath_resumes_from_there(tmp_path):
    """checkpoint.dirpath puts a run's checkpoints beside checkpoints/, not in it: `--resume RUN` finds them there
    (its config.json says where), as `--max-restarts` and the daemon do when they continue a run."""
    runs = tmp_path / "runs"
    result = run_training(config(runs, [checkpointer(dirpath="kept/ckpt")], 1, target=PACED, every_n_epochs=1,
                                 step_sleep_s=0.0, batch_size=256))
    run_dir = Path(result.run_dir)
    assert not (run_dir / "checkpoints").exists() and (run_dir / "kept/ckpt" / checkpoint_format.MANIFEST).is_file()
    assert find_checkpoint(run_dir.name, str(runs)).parent == run_dir / "kept/ckpt"
    proc = run_cli(tmp_path, "--resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"continuing run {run_dir.name} from {run_dir / 'kept/ckpt'}" in proc.stderr, proc.stderr
    assert [e.epoch for e in of(read_events(run_dir), "end_epoch")] == [1, 2]


def test_resuming_a_run_still_going_or_one_without_checkpoints_is_refused_saying_which(tmp_path):
    """A live run (no checkpoint yet): `--resume` says it is still going and how to stop it, not that it has no
    checkpoints. Once it has ended with none, `--resume --detach` says so now instead of queueing a run that
    would fail."""
    runs = tmp_path / "runs"
    # long enough (killed below) that a CLI started slowly on a busy box still finds it going
    kernel = KernelProcess(config(runs, [], 20, target=PACED, step_sleep_s=0.05), tmp_path)
    try:
        kernel.wait_step(2, timeout_s=120)
        proc = run_cli(tmp_path, "--resume", kernel.run_id, "--runs-dir", str(runs))
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: run {kernel.run_id} is still going"), proc.stderr
        assert f"trainbus runs stop {kernel.run_id}" in proc.stderr
    finally:
        kernel.kill()
    proc = run_cli(tmp_path, "--resume", kernel.run_id, "--runs-dir", str(runs), "--detach")
    assert proc.returncode == 2 and "that run has no checkpoints" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not (runs / ".daemon").exists(), "a run was queued"


def test_two_resumes_of_one_run_at_once_continue_it_once_and_the_other_is_refused_in_one_line(tmp_path):
    """Two `runs resume RUN` at once (two terminals, a script run twice) both passed the check that no kernel holds
    the journal, which a kernel takes only once its run is set up: both rewrote kernel.pid, config.json and the
    registry row, then the one that came second to the journal failed with `cannot set up the run directory ...
    free space there`, its pid left in kernel.pid: the run that trained on was listed `died`. Held here between
    the check and the journal (its checkpoint's restore waits at a gate), the second is refused at once."""
    runs, gate = tmp_path / "runs", tmp_path / "restore-gate"
    result = run_training(config(runs, [checkpointer()], 1, target="fixture_targets:restore_gated", every_n_epochs=1,
                                 step_sleep_s=0.0, batch_size=256, restore_gate=str(gate)))
    assert result.status == "completed", result.error
    # no plugin: what is tested is the hold on the run between the check and the journal, which no plugin joins
    command = ["runs", "resume", result.run_id, "--runs-dir", str(runs), "--epochs", "2", "--plugins", ""]
    procs = [Command(*command, cwd=tmp_path) for _ in range(2)]  # forked with torch loaded: two processes still
    try:
        wait_until(lambda: len(list(tmp_path.glob("restore-gate.waiting-*"))) == 2
                   or any(p.poll() is not None for p in procs), 180, "both resumes at their restore, or one refused")
        open_gate(gate, 1)
        said = [(p.wait(timeout=180), *p.communicate(timeout=10)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    (winner, won), (_, lost) = sorted(zip(procs, said), key=lambda pair: pair[1][0])
    assert [won[0], lost[0]] == [0, 2], said
    assert lost[2] == (f"error: --resume {result.run_id}: another process holds this run (a kernel starting to "
                       f"continue it, or `trainbus runs delete`); wait for it to end, or stop it (`trainbus runs stop "
                       f"{result.run_id}`)\n"), lost[2]
    run_dir = Path(result.run_dir)
    assert (run_dir / "kernel.pid").read_text().split() == [str(winner.pid)]  # the kernel that trained it
    overview = run_overview(run_dir)
    assert (overview["status"], overview["epochs_completed"]) == ("completed", 2), overview


def test_a_checkpoint_copied_out_of_its_run_starts_a_new_run_and_a_non_checkpoint_is_one_line(tmp_path,
                                                                                             one_checkpointed_epoch):
    """README: `--resume FILE.pt` starts a new run from that checkpoint. A copy kept elsewhere (no manifest beside
    it) is taken as it is; a file that only looks like one is refused in one line, and nothing is started."""
    runs = tmp_path / "runs"
    run_dir = copy_of(one_checkpointed_epoch, runs)
    copy = tmp_path / "kept" / "mine.pt"
    copy.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", copy)
    # at the epochs it ends, a new run from it would train nothing: said, nothing started
    proc = run_cli(tmp_path, "--resume", str(copy), "--runs-dir", str(tmp_path / "none"), "--epochs", "1",
                   "--plugins", "", "--set", "batch_size=256")
    assert proc.returncode == 2 and f"error: checkpoint {copy} ends epoch 1 and this run trains 1: a new run from " \
        f"it would train nothing; give --epochs above 1" in proc.stderr, proc.stderr
    assert not any((tmp_path / "none").glob("*/config.json"))
    proc = run_cli(tmp_path, "--resume", str(copy), "--runs-dir", str(runs), "--epochs", "2", "--plugins", "",
                   "--set", "batch_size=256")
    assert proc.returncode == 0, proc.stderr
    new_run = next(p for p in runs.iterdir() if p.is_dir() and p.name != run_dir.name)
    assert [e.epoch for e in of(read_events(new_run), "end_epoch")] == [2]  # went on after the copy's epoch 1
    assert "optimizer" not in proc.stderr  # the same flags: what the saved optimizer holds is the run's own
    # another lr: the saved optimizer's state holds its lr too, which it goes on with; said, not left to be found in
    # `runs show`'s per-epoch lr while config.json says the other (found by a docs audit)
    proc = run_cli(tmp_path, "--resume", str(copy), "--runs-dir", str(runs / "lr"), "--epochs", "2", "--plugins", "",
                   "--set", "batch_size=256", "lr=0.5")
    assert proc.returncode == 0 and (f"trainbus: warning: the optimizer goes on as {copy} saved it, its settings "
                                     f"with its state: lr 0.001 (built 0.5), not what this run's build gave it; a new "
                                     f"run without --resume trains with those\n") in proc.stderr, proc.stderr
    fake = tmp_path / "kept" / "fake.pt"
    fake.write_text("not a checkpoint\n")
    proc = run_cli(tmp_path, "--resume", str(fake), "--runs-dir", str(tmp_path / "other"))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: refusing checkpoint {fake}: torch.load cannot "
                                                           f"read it"), proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "other").exists()


def _damaged(state: dict, damage: str) -> dict:
    """A copy of a checkpoint's state with one field made what a garbled or hand-edited file holds."""
    state = copy.deepcopy(state)
    resume = state["trainbus"]
    if damage == "resume state a string":
        state["trainbus"] = "x"
    elif damage == "another format":
        resume["format"] = 2
    elif damage == "no step":
        del resume["step"]
    elif damage == "step a string":
        resume["step"] = "x"
    elif damage == "epoch below 1":
        resume["epoch"] = -5
    elif damage == "epoch_complete a string":
        resume["epoch_complete"] = "x"
    elif damage == "no rng":
        del resume["rng"]
    elif damage == "rng torch cannot take":
        resume["rng"] = {"torch": torch.zeros(3)}
    elif damage == "mid-epoch without batches_done":
        resume["epoch_complete"] = False
        del resume["batches_done"]
    elif damage == "model_state_dict a list":
        state["model_state_dict"] = [1]
    elif damage == "optimizer_state_dict a string":
        state["optimizer_state_dict"] = "x"
    elif damage == "no optimizer_state_dict":
        del state["optimizer_state_dict"]
    elif damage == "optimizer_state_dict without param_groups":
        del state["optimizer_state_dict"]["param_groups"]
    elif damage == "metrics a string":
        state["metrics"] = "x"
    elif damage == "hyperparameters a list":
        state["hyperparameters"] = [1]
    return state


DAMAGES = ("resume state a string", "another format", "no step", "step a string", "epoch below 1",
           "epoch_complete a string", "no rng", "rng torch cannot take", "mid-epoch without batches_done",
           "model_state_dict a list", "optimizer_state_dict a string", "metrics a string", "hyperparameters a list",
           # "does not fit trainbus.kernel.digits:build's model: 'optimizer_state_dict'; give the target it was
           # trained with": the target it was trained with was given
           "no optimizer_state_dict", "optimizer_state_dict without param_groups")


def test_resuming_from_a_runs_final_weights_says_where_its_checkpoints_are(tmp_path, one_checkpointed_epoch):
    """final.pt sits beside checkpoints/ and loads like a checkpoint, but holds the weights alone: `--resume
    RUN/final.pt` said only that it was not a trainbus checkpoint, leaving the user to find what is one."""
    final = one_checkpointed_epoch / FINAL_WEIGHTS
    proc = run_cli(tmp_path, "--resume", str(final), "--runs-dir", str(tmp_path / "new"), "--epochs", "2",
                   "--plugins", "", "--set", "batch_size=256")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"error: {final} is a run's final weights, which hold no resume state: resume from a file in "
        f"{one_checkpointed_epoch / 'checkpoints'}, or continue the run itself (`trainbus runs resume "
        f"{one_checkpointed_epoch.name}`)"), proc.stderr


def test_a_checkpoint_whose_fields_are_garbled_is_refused_in_one_line_and_starts_no_run(tmp_path,
                                                                                       one_checkpointed_epoch):
    """--resume FILE.pt of a checkpoint torch loads but whose fields are not what trainbus wrote (a hand-edited or
    garbled file, one of another tool): each was a Python traceback (AttributeError, KeyError, TypeError in
    restore_weights or Loop.resume), or a run that started and failed 40 s later (a step that is a string), or one
    that trained from epoch -4 (found by a bad-input audit). Now one `error:` line naming the field, exit 2, no run."""
    state = torch.load(one_checkpointed_epoch / "checkpoints" / "last.pt", weights_only=True)
    kept = tmp_path / "kept"
    kept.mkdir()
    for damage in DAMAGES:
        path = kept / (damage.replace(" ", "-") + ".pt")
        torch.save(_damaged(state, damage), path)
        proc = run_cli(tmp_path, "--resume", str(path), "--runs-dir", str(tmp_path / "new"), "--epochs", "2",
                       "--plugins", "", "--set", "batch_size=256")
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, (damage, proc.stderr)
        assert lines[0].startswith(f"error: refusing checkpoint {path}: "), (damage, lines[0])
        assert "Traceback" not in proc.stderr and not proc.stdout.strip(), (damage, proc.stdout)
        assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir()), damage  # no run started
    # the undamaged state still resumes
    whole = kept / "whole.pt"
    torch.save(state, whole)
    proc = run_cli(tmp_path, "--resume", str(whole), "--runs-dir", str(tmp_path / "new"), "--epochs", "2",
                   "--plugins", "", "--set", "batch_size=256")
    assert proc.returncode == 0, proc.stderr


RECORDED_CONFIGS_OF_WRONG_TYPES = {
    "text, not an object": lambda real: "s",
    "null": lambda real: None,
    "hyperparameters of text": lambda real: {**real, "hyperparameters": "x"},
    "flags of a list": lambda real: {**real, "flags": [1]},
    "a target of a number": lambda real: {**real, "target": 5},
    "epochs of text": lambda real: {**real, "epochs": "x"},
    "a seed of text": lambda real: {**real, "seed": "x"},
    "launch of text": lambda real: {**real, "launch": "x"},
    "a plugin without a name": lambda real: {**real, "plugins": [{"name": 5, "target": "x:Y"}]},
}


def test_a_run_whose_config_json_holds_a_field_of_the_wrong_type_is_not_continued_and_keeps_its_files(
        tmp_path, one_checkpointed_epoch):
    """`trainbus runs resume RUN` of a run whose config.json was edited by hand (text instead of an object, flags
    of a list, epochs of text, ...): a Python traceback (AttributeError: 'str' object has no attribute 'pop',
    TypeError: '<=' not supported ...) where a torn config.json is one line (found by a bad-input audit). Now it is
    that line too, naming the field, exit 2, and the run's files are as they were."""
    run_dir = copy_of(one_checkpointed_epoch, tmp_path / "runs")
    real = json.loads((run_dir / "config.json").read_text())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "config.json"}
    for case, make in RECORDED_CONFIGS_OF_WRONG_TYPES.items():
        (run_dir / "config.json").write_text(json.dumps(make(real)))
        for command in (["runs", "resume", str(run_dir)], ["run", "--resume", str(run_dir)]):
            proc = cli(*command, "--epochs", "3", cwd=tmp_path)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2 and len(lines) == 1, (case, command, proc.stderr)
            unreadable = f"error: cannot continue {run_dir}: {run_dir / 'config.json'} is unreadable ("
            assert lines[0].startswith(unreadable), (case, lines[0])
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()
                if p.is_file() and p.name != "config.json"} == before, case  # nothing lost, nothing written
        assert (run_dir / "config.json").read_text() == json.dumps(make(real)), case


def test_a_run_whose_config_json_is_gone_is_not_continued_as_a_new_run(tmp_path, one_checkpointed_epoch):
    """`trainbus runs resume RUN` of a run whose config.json was deleted started a new run from its checkpoint, with
    another id, the default target, plugins (no checkpoint plugin) and epochs, saying only `resuming from ...` (found
    by a checkpoints audit): its directory was taken for a checkpoint directory. It is the run's, to continue in
    place, so it is refused as a torn config.json is: one line naming the file and the way on; nothing made."""
    run_dir = copy_of(one_checkpointed_epoch, tmp_path / "runs")
    (run_dir / "config.json").unlink()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    for command in (["runs", "resume", str(run_dir)], ["run", "--resume", str(run_dir)],
                    ["run", "--resume", run_dir.name, "--runs-dir", str(run_dir.parent)]):
        proc = cli(*command, "--epochs", "3", cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, (command, proc.stderr)
        assert lines[0].startswith(f"error: cannot continue {run_dir}: {run_dir / 'config.json'} is unreadable ("), \
            (command, lines[0])
        assert lines[0].endswith(f"--resume {run_dir / 'checkpoints' / 'last.pt'}"), (command, lines[0])
        assert sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir()) == [run_dir.name], command
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before, command


def test_a_manifest_line_with_fields_of_the_wrong_type_is_skipped_as_a_torn_one_is(tmp_path, one_checkpointed_epoch):
    """checkpoints/manifest.jsonl with a line whose step is text (an edit by hand, another tool's line): `runs
    resume` died sorting the entries (TypeError: '<' not supported between 'str' and 'int') with a traceback (found
    by a bad-input audit). Such a line is skipped as a torn one is, and the run continues from its newest verified
    checkpoint; so is a line naming a file outside the manifest's folder, which retention would have deleted."""
    run_dir = copy_of(one_checkpointed_epoch, tmp_path / "runs")
    outside = tmp_path / "mine.pt"
    outside.write_bytes(b"not to be touched")
    with open(run_dir / "checkpoints" / "manifest.jsonl", "a") as manifest:
        for line in ({"file": "last.pt", "step": "x", "time": "y", "size": 1, "sha256": "z"},
                     {"file": "last.pt", "step": 99, "epoch": [1], "size": "big", "sha256": 5},
                     {"file": "../../../mine.pt", "step": 1000, "epoch": 9, "size": 17, "sha256": sha256_of(outside)}):
            manifest.write(json.dumps(line) + "\n")
    proc = cli("runs", "resume", str(run_dir), "--epochs", "2", "--set", "batch_size=256", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"from {run_dir / 'checkpoints'}" in proc.stderr and "mine.pt" not in proc.stderr, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["outcome"]["epochs_completed"] == 2
    assert outside.read_bytes() == b"not to be touched"
    shown = cli("runs", "show", str(run_dir))
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr


class Tripwire:
    """Touches a file when unpickled: if a resume ever ran code from a checkpoint, the file would exist."""

    def __init__(self, path: str):
        self.path = path

    def __setstate__(self, state: dict) -> None:
        Path(state["path"]).touch()
        self.__dict__.update(state)


def test_a_checkpoint_holding_a_pickled_object_is_refused_in_one_line_and_exit_2(tmp_path):
    marker = tmp_path / "code-ran"
    directory = tmp_path / "runs" / "poisoned" / "checkpoints"
    directory.mkdir(parents=True)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    path = directory / "epoch001-step000045.pt"
    torch.save({"epoch": 1, "step": 45, "model_state_dict": model.state_dict(), "extra": Tripwire(str(marker)),
                "trainbus": {"format": 1, "epoch": 1, "step": 45, "epoch_complete": True}}, path)
    entry = {"file": path.name, "step": 45, "epoch": 1, "size": path.stat().st_size, "sha256": sha256_of(path)}
    (directory / "manifest.jsonl").write_text(json.dumps(entry) + "\n")  # listed, with the right hash

    proc = run_cli(tmp_path, "--resume", "poisoned")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    relative = path.relative_to(tmp_path)  # the run id resolves under ./runs, and the line names it so
    assert lines[0].startswith(f"error: refusing checkpoint {relative}: it holds pickled Python objects"), lines[0]
    assert "Tripwire" in lines[0] and "\x1b" not in lines[0]
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()) == ["poisoned"]  # no run was started
    # the tripwire works: what an unpickler does with it (restore its state) touches the marker
    Tripwire.__new__(Tripwire).__setstate__({"path": str(marker)})
    assert marker.exists()


def test_a_checkpoint_of_another_model_names_the_target_its_run_trained(tmp_path):
    """--resume FILE with a target whose model it does not fit: one line naming the mismatch and the command that
    fits (its run's config.json names the target it trained), exit 2, no run made."""
    directory = tmp_path / "runs" / "other" / "checkpoints"
    directory.mkdir(parents=True)
    trained = f"{TESTS_DIR / 'specs.py'}:tiny"
    (directory.parent / "config.json").write_text(json.dumps({"target": trained}) + "\n")
    path = directory / "epoch001-step000003.pt"
    torch.save({"epoch": 1, "step": 3, "model_state_dict": torch.nn.Linear(5, 3).state_dict(),
                "trainbus": {"format": 1, "epoch": 1, "step": 3, "epoch_complete": True}}, path)
    proc = run_cli(tmp_path, "--resume", str(path), "--plugins", "")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint {path} does not fit trainbus.kernel.digits:build's model: "), lines
    assert lines[0].endswith(f"; its run trained {trained}: `trainbus run {trained} --resume {path}`"), lines
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]


def test_a_checkpoint_of_the_same_target_with_other_flags_names_the_flags_its_run_trained_with(tmp_path):
    """`trainbus run train.py:build hidden=64 --resume` a checkpoint of hidden=32 was told to "give the target it was
    trained with", which it had: the flags of its run that differ are named now (not epochs: a new run from it trains
    beyond the checkpoint's), with the command that fits."""
    (tmp_path / "train.py").write_text(
        "import torch\n"
        "from trainbus.kernel import TrainingSpec\n\n\n"
        "def build(width: int = 5, lr: float = 0.1, name: str = 'a', epochs: int = 1):\n"
        "    model = torch.nn.Linear(width, 3)\n"
        "    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), epochs=epochs,\n"
        "                        loss_fn=torch.nn.functional.cross_entropy,\n"
        "                        train_loader=[(torch.ones(2, width), torch.zeros(2, dtype=torch.long))])\n")
    target = "train.py:build"
    directory = tmp_path / "runs" / "other" / "checkpoints"
    directory.mkdir(parents=True)
    (directory.parent / "config.json").write_text(json.dumps(
        {"target": target, "flags": {"width": 5, "lr": 0.1, "name": "b c", "epochs": 1}}) + "\n")
    path = directory / "epoch001-step000003.pt"
    torch.save({"epoch": 1, "step": 3, "model_state_dict": torch.nn.Linear(5, 3).state_dict(),
                "trainbus": {"format": 1, "epoch": 1, "step": 3, "epoch_complete": True}}, path)
    proc = run_cli(tmp_path, target, "width=4", "epochs=3", "--resume", str(path), "--plugins", "")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].endswith(f"; its run trained {target} with width=5 name=b c: `trainbus run {target} width=5 "
                             f"'name=b c' --resume {path}`"), lines


def three_checkpoints(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints with three files (steps 10, 20, 30) and the manifest that verifies them."""
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True)
    lines = []
    for step in (10, 20, 30):
        path = directory / f"step{step:06d}.pt"
        path.write_bytes(bytes([step]) * 100)
        lines.append(json.dumps({"file": path.name, "step": step, "epoch": 1, "size": 100, "sha256": sha256_of(path)}))
    (directory / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_a_damaged_newest_checkpoint_is_passed_over_saying_so(tmp_path):
    directory = three_checkpoints(tmp_path / "run")
    (directory / "step000020.pt").unlink()  # removed by retention: nothing to say
    damaged = directory / "step000030.pt"
    damaged.write_bytes(b"\xff" + damaged.read_bytes()[1:])  # one byte flipped: same size, another hash
    said: list[str] = []
    assert find_checkpoint(str(tmp_path / "run"), str(tmp_path), said) == directory / "step000010.pt"
    assert said == [f"checkpoint {damaged} does not match its manifest entry (size or sha256): damaged or changed "
                    f"since it was written, so an older one is taken"]


def test_a_run_with_no_intact_checkpoint_left_is_refused_naming_the_damaged_and_the_way_on(tmp_path):
    """Every checkpoint of a run damaged (or gone): `runs resume` said only `no verified checkpoint in MANIFEST (a file
    must exist and match ...)`, neither which files failed the check nor what to do (found by a checkpoints audit).
    The line names how many on disk are damaged, the newest of them, and that the run is to be run again."""
    directory = three_checkpoints(tmp_path / "run")
    manifest = directory / "manifest.jsonl"
    (directory / "step000010.pt").unlink()
    for name in ("step000020.pt", "step000030.pt"):
        (directory / name).write_bytes(b"\xff" * 50)  # cut short and overwritten
    os.link(directory / "step000030.pt", directory / "last.pt")  # as the plugin links it, with a line of its own
    with open(manifest, "a") as lines_of:
        lines_of.write(json.dumps({"file": "last.pt", "step": 30, "epoch": 1, "size": 100, "sha256": "0" * 64,
                                   "alias_of": "step000030.pt"}) + "\n")
    said: list[str] = []
    with pytest.raises(CheckpointError) as refused:
        find_checkpoint(str(tmp_path / "run"), str(tmp_path), said)
    assert str(refused.value) == (f"--resume {tmp_path / 'run'}: no verified checkpoint in {manifest}: 2 on disk do "
                                  f"not match their manifest entries (size or sha256), damaged or changed since they "
                                  f"were written (the newest: {directory / 'step000030.pt'}), and the rest are gone; "
                                  f"run it again instead")
    assert len(said) == 2, said  # each damaged checkpoint once, not its last.pt link again
    (directory / "step000020.pt").unlink()
    with pytest.raises(CheckpointError) as refused:
        find_checkpoint(str(tmp_path / "run"), str(tmp_path))
    assert str(refused.value) == (f"--resume {tmp_path / 'run'}: no verified checkpoint in {manifest}: "
                                  f"{directory / 'step000030.pt'} does not match its manifest entry (size or sha256), "
                                  f"damaged or changed since it was written, and the rest are gone; run it again "
                                  f"instead")
    for name in ("step000030.pt", "last.pt"):
        (directory / name).unlink()
    with pytest.raises(CheckpointError) as refused:
        find_checkpoint(str(tmp_path / "run"), str(tmp_path), said)
    assert str(refused.value) == (f"--resume {tmp_path / 'run'}: no verified checkpoint in {manifest}: every file it "
                                  f"lists is gone; run it again instead")


def test_a_run_whose_checkpoint_plugin_wrote_none_is_not_said_to_have_run_without_it(tmp_path):
    """A run with the checkpoint plugin whose every snapshot was skipped (no room for its buffers in snapshot_dir):
    `runs resume` said it "ran without the checkpoint plugin, or ended before its first", when it had the plugin and
    trained its epochs (found by a checkpoints audit). It says the plugin wrote none, and where to read why."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    plugin = {"name": "checkpoint", "target": "trainbus.plugins.checkpoint:CheckpointPlugin", "settings": {}}
    (run_dir / "config.json").write_text(json.dumps({"target": "demo", "epochs": 3, "plugins": [plugin]}) + "\n")
    with pytest.raises(CheckpointError) as refused:
        find_checkpoint("r", str(tmp_path / "runs"))
    assert str(refused.value) == (f"--resume r: that run has no checkpoints (its checkpoint plugin wrote none: each "
                                  f"was skipped or failed, or the run ended before its first; `trainbus runs show "
                                  f"{run_dir.resolve()}` says which); run it again instead")


class ProjectRun(NamedTuple):
    """A run of a project's train.py:build (the tiny spec), started in that directory: what it printed, and where."""
    project: Path
    run_dir: Path
    start_line: str


def started(proc: subprocess.CompletedProcess) -> str:
    """The start line of a command that ran a run (`trainbus: run ID on DEVICE: TARGET, plugins: ...`)."""
    assert proc.returncode == 0, proc.stderr
    return next(line for line in proc.stderr.splitlines() if line.startswith("trainbus: run "))


@pytest.fixture(scope="module")
def one_epoch_of_a_project(tmp_path_factory) -> ProjectRun:
    """`trainbus run train.py:build --epochs 1 --plugins checkpoint` in a project directory, the target given
    relative to it: run once for the tests below of resuming such a run (each ran its own, the same, and waited for
    its checkpoint plugin's torch import). Not to be changed: a test continues a copy of its own (copy_of)."""
    project = tmp_path_factory.mktemp("project")
    (project / "train.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
                                      f"from specs import tiny as build\n")
    runs = tmp_path_factory.mktemp("project_runs")
    with child_path_with_tests():
        line = started(run_cli(project, "train.py:build", "--epochs", "1", "--plugins", "checkpoint", "--runs-dir",
                               str(runs), "--device", "cpu"))
    [run_dir] = [d for d in runs.iterdir() if (d / "config.json").is_file()]
    return ProjectRun(project, run_dir, line)


def elsewhere_than(tmp_path: Path) -> Path:
    """A directory to resume from that is not the project's (no train.py there)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return elsewhere


def test_a_run_of_a_target_file_given_relative_resumes_from_another_directory(tmp_path, one_epoch_of_a_project):
    """config.json kept `train.py:build` as typed, so `--resume RUN` from anywhere but where the run started said
    "target file train.py does not exist", a fix the user never needed. The run's directory says where it began."""
    run_dir = copy_of(one_epoch_of_a_project.run_dir, tmp_path / "runs")
    again = run_cli(elsewhere_than(tmp_path), "--resume", str(run_dir), "--epochs", "2", "--plugins", "")
    assert again.returncode == 0, again.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["outcome"]["epochs_completed"] == 2, summary


def test_a_resume_keeps_the_recorded_target_and_says_what_each_session_trained_with(tmp_path, one_epoch_of_a_project):
    """`runs resume` from another directory rewrote config.json's target to an absolute path (and its cwd to the
    resume's), and a resume with --precision overwrote the recorded precision: nothing said any more that the first
    epoch trained in 32 bit. The target stays as typed, with the directory it is relative to; `runs show` (and its
    --json sessions) says each session's device, precision and compile when they differ."""
    project, runs = one_epoch_of_a_project.project, tmp_path / "runs"
    run_dir = copy_of(one_epoch_of_a_project.run_dir, runs)  # trained in 32 bit on the cpu
    again = cli("runs", "resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "2", "--precision",
                "bf16-mixed", "--plugins", "", cwd=elsewhere_than(tmp_path))
    assert again.returncode == 0, again.stderr
    recorded = json.loads((run_dir / "config.json").read_text())
    assert (recorded["target"], recorded["cwd"], recorded["precision"]) == ("train.py:build", str(project),
                                                                            "bf16-mixed"), recorded
    shown = cli("runs", "show", run_dir.name, "--runs-dir", str(runs)).stdout
    assert "trained on session 1: cpu, 32; session 2: cpu, bf16-mixed" in " ".join(shown.split()), shown
    sessions = json.loads(cli("runs", "show", run_dir.name, "--runs-dir", str(runs), "--json").stdout)["sessions"]
    assert [(s["device"], s["precision"], s["compile"]) for s in sessions] == [("cpu", "32", False),
                                                                               ("cpu", "bf16-mixed", False)]


def test_a_resume_names_the_target_as_the_fresh_run_did_where_that_still_names_it(tmp_path, one_epoch_of_a_project):
    """A fresh run's start line names its target as typed (`train.py:build`); its resume, from the same directory,
    named it by the absolute path config_of_run makes of it for a resume from elsewhere. From the same directory it is
    now as typed; from another, where `train.py` is not that file, it is still the absolute path."""
    project, runs, first = one_epoch_of_a_project.project, tmp_path / "runs", one_epoch_of_a_project.start_line
    run_dir = copy_of(one_epoch_of_a_project.run_dir, runs)
    assert first == f"trainbus: run {run_dir.name} on cpu: train.py:build, plugins: checkpoint", first
    here = started(cli("runs", "resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "2", cwd=project))
    assert here == first, (here, first)
    there = started(cli("runs", "resume", run_dir.name, "--runs-dir", str(runs), "--epochs", "3",
                       cwd=elsewhere_than(tmp_path)))
    assert there == f"trainbus: run {run_dir.name} on cpu: {project / 'train.py'}:build, plugins: checkpoint", there
    assert json.loads((run_dir / "config.json").read_text())["target"] == "train.py:build"


def test_a_persister_run_by_hand_with_a_relative_run_dir_has_its_checkpoints_taken(tmp_path, kernels):
    """README: `TRAINBUS_RUN_DIR=<run_dir> python -m trainbus.sdk module:Class` runs a plugin by hand. Given as a path
    relative to where it runs (as a shell user types one), the SDK kept it relative: the checkpoint plugin wrote its
    files in the right place, but each checkpoint_saved named them relative to its own directory, which the kernel,
    elsewhere, read from its own: refused ('outside .../checkpoints'), every checkpoint of the run unrecorded."""
    gate = tmp_path / "gate"
    open_gate(gate, 10)
    kernel = KernelProcess(config(tmp_path / "runs", epochs=1, target=PACED, every_n_steps=5, step_sleep_s=0.0,
                                  gate=str(gate)), tmp_path)
    kernels.append(kernel)
    kernel.wait_step(1, timeout_s=120)
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    env["TRAINBUS_RUN_DIR"] = os.path.relpath(kernel.run_dir, elsewhere)
    plugin = subprocess.Popen([sys.executable, "-m", "trainbus.sdk", "trainbus.plugins.checkpoint:CheckpointPlugin",
                               "--name", "by_hand"], cwd=elsewhere, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        ready = kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "by_hand", timeout_s=PLUGIN_START_S)
        open_gate(gate, 10**6)
        saved = kernel.wait_event("checkpoint_saved", lambda e: e.data["plugin"] == "by_hand", timeout_s=120,
                                  after_seq=ready.seq)
        assert Path(saved.data["path"]).is_absolute() and Path(saved.data["path"]).exists(), saved.data
    finally:
        plugin.terminate()
        print(plugin.communicate(timeout=60)[0])  # what it said, for a failure
    assert kernel.result(timeout_s=180)["status"] == "completed"
    assert "refused_settle_path" not in kernel.result()["bus"]


def test_the_checkpoint_stall_bench_runs_on_a_tiny_model(tmp_path):
    """docs/benchmarks.md records this script's figures: it must still drive the kernel's loop it times."""
    bench = TESTS_DIR.parent / "scripts" / "bench" / "checkpoint_stall.py"
    result = subprocess.run(
        [sys.executable, str(bench), "--dir", str(tmp_path), "--width", "64", "--layers", "2", "--steps", "12",
         "--every", "4", "--baseline-steps", "6", "--pairs", "1", "--overload-steps", "0", "--reps", "1",
         "--inline-reps", "1", "--ab-steps", "0", "--quiet-wait-s", "0"],
        capture_output=True, text=True, timeout=120, start_new_session=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "every 4 steps: 3 saved" in result.stdout, result.stdout[-2000:]
    # the run's last checkpoint (step 12) waits for a buffer after training: a row of its own, never a stall
    assert re.search(r"every 4 steps: the run's last, after training: waits for a buffer +1 ", result.stdout), \
        result.stdout[-2000:]
