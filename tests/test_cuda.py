"""The CUDA paths, where a GPU is present (skipped elsewhere: CI has none): GPU snapshots into pinned buffers on a
side stream, no per-step host sync on the training thread, the precisions that need CUDA, and NCCL."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest
import torch

from trainbus.kernel.config import RunConfig
from trainbus.kernel.session import run_training
from trainbus.kernel.buffer_files import SHM_DIR
from trainbus.kernel.snapshot import SLOTS, SnapshotBuffers
from trainbus.plugins._snapshot_reader import read_snapshot

from helpers import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MB = 1 << 20


def gpu_state() -> dict:
    return {"w": torch.randn(8 * MB // 4, device="cuda"), "h": torch.randn(1000, device="cuda").half(),
            "rng": torch.get_rng_state(), "epoch": 3}


@pytest.mark.parametrize("where, prepared, pinned", [
    ("shm", True, True),  # the default place, prepared beforehand: registered with CUDA
    ("disk", True, False),  # a run directory's file system: CUDA refuses it ("invalid argument"); training goes on
    ("shm", False, False),  # allocated by the take itself, on the training thread: never registered there
])
def test_a_gpu_state_is_copied_whole_after_what_training_queued_into_buffers_pinned_where_they_can_be(
        tmp_path, where, prepared, pinned):
    state = gpu_state()
    buffers = SnapshotBuffers(f"test-{os.getpid()}-cuda-{where}", [SHM_DIR if where == "shm" else tmp_path])
    try:
        if prepared:
            buffers.prepare(state)
            buffers._join_adopter()
            assert [b.pinned for b in buffers._buffers] == [pinned] * SLOTS
        # the state's last write queued behind ~50 ms of GPU work on training's stream: the side stream's copy must
        # wait for it (a copy that did not would read the old values)
        torch.cuda._sleep(100_000_000)
        state["w"].mul_(2)
        snapshot = buffers.take(state, lambda slot: True)
        assert [b.pinned for b in buffers._buffers] == [pinned] * SLOTS
        read = read_snapshot(snapshot.event_data()).state
        assert read["w"].equal(state["w"].cpu()) and read["h"].equal(state["h"].cpu())
        assert read["rng"].equal(state["rng"]) and read["epoch"] == 3
        assert torch.ones(4, device="cuda").sum().item() == 4  # no CUDA error left for training's next launch
    finally:
        buffers.close()
    assert not list(tmp_path.glob("trainbus-*")) and not list(SHM_DIR.glob(f"{buffers.name}-*"))


def training_thread_syncs(tmp_path, batch_size: int) -> tuple[int, int]:
    """(host syncs the training thread made, steps) in a run of the digits demo on CUDA: torch's sync debug mode
    warns at each one, in the thread that made it."""
    seen: list[bool] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen.append(threading.current_thread() is threading.main_thread())

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run_training(RunConfig(epochs=2, device="cuda", runs_dir=str(tmp_path / f"b{batch_size}"),
                                            plugins=[], hyperparameters={"batch_size": batch_size}))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert result.status == "completed", result.error
    return sum(seen), result.outcome["steps"]


def test_the_training_thread_adds_no_host_sync_per_step(tmp_path):
    """The same epochs in 4x the steps: as many syncs on the training thread (epoch ends, setup), not more."""
    few, few_steps = training_thread_syncs(tmp_path, 64)
    many, many_steps = training_thread_syncs(tmp_path, 16)
    assert many_steps >= 4 * few_steps - 8
    assert many <= few + 2, f"{few} syncs in {few_steps} steps, {many} in {many_steps}"


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_the_cuda_precisions_train_the_demo_and_are_recorded(tmp_path, precision):
    result = run_training(RunConfig(epochs=3, device="cuda", runs_dir=str(tmp_path), plugins=[], precision=precision))
    assert result.status == "completed", result.error
    assert result.outcome["validation_metrics"]["accuracy"] > 0.7
    assert f'"precision": "{precision}"' in (Path(result.run_dir) / "config.json").read_text()


def test_a_gpu_named_by_its_index_trains_there_and_one_past_the_last_is_one_line(tmp_path):
    last = torch.cuda.device_count() - 1
    result = run_training(RunConfig(epochs=1, device=f"cuda:{last}", runs_dir=str(tmp_path), plugins=[]))
    assert result.status == "completed", result.error
    assert torch.cuda.current_device() == last
    from trainbus.kernel.spec import SpecError

    with pytest.raises(SpecError, match=rf"device cuda:{last + 1}, but {last + 1} GPUs? (is|are) visible"):
        run_training(RunConfig(epochs=1, device=f"cuda:{last + 1}", runs_dir=str(tmp_path), plugins=[]))


def test_nccl_with_one_rank_trains_through_ddp_and_agrees(tmp_path):
    """The group's code on NCCL where one GPU allows it: one rank (a group of one is what `--nproc 1` never
    starts, so it is set up here as torchrun's rank 0 would be)."""
    import torch.distributed as dist

    from trainbus.kernel.cluster import Cluster
    from trainbus.kernel.distributed import Ranks, distribute
    from trainbus.kernel.loop import Loop
    from trainbus.kernel.replies import Control
    from trainbus.kernel.other_ranks import SilentBus
    from trainbus.kernel.spec import build_spec
    from trainbus.kernel.stepping import Stepper

    device = torch.device("cuda", 0)
    ranks = Ranks(Cluster("torchelastic", world_size=1, main_port=free_port()), device)
    try:
        assert dist.get_backend() == "nccl"
        spec = build_spec("trainbus.kernel.digits:build", {"epochs": 2})
        spec.model.to(device)
        stepper = Stepper(spec.model, spec.optimizer, device)
        distribute(spec, stepper, ranks, device, RunConfig(device="cuda"))
        outcome = Loop(spec, SilentBus(), device, stepper=stepper, ranks=ranks).run()
        assert outcome.epochs_completed == 2 and outcome.validation_metrics["accuracy"] > 0.5
        assert ranks.agree(Control(should_stop=True)).should_stop and ranks.sum([1.5, 2]) == [1.5, 2.0]
    finally:
        ranks.close()
