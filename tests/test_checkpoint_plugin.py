"""The checkpoint plugin, driven without sockets: real snapshots from kernel/snapshot.py, real files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainbus.kernel.checkpointing import find_checkpoint, load_checkpoint
from trainbus.kernel.snapshot import SnapshotBuffers
from trainbus.plugins.checkpoint import CheckpointPlugin, files_to_keep
from trainbus.proto import Event, pack, unpack
from trainbus.proto.checkpoint_format import MANIFEST, read_manifest, sha256_of
from trainbus.sdk import Harness, SettingsError

LOSSES = [0.5, 0.3, 0.4, 0.2, 0.6]  # validation loss after epochs 1..5: the best two are epochs 4 and 2


class Trainer:
    """A small model and Adam after real steps, and the state the kernel's loop would snapshot."""

    def __init__(self, width: int = 4):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1)
        self.step, self.epoch = 0, 0
        self.width = width

    def train_epoch(self) -> None:
        self.epoch += 1
        self.step += 1
        self.model(torch.randn(8, self.width)).pow(2).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()

    def state(self, metrics: dict) -> dict:
        """The shape of kernel/loop_checkpoints.py's training_state()."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "metrics": dict(metrics),
            "hyperparameters": {"lr": 0.01, "width": self.width},
            "trainbus": {"format": 1, "epoch": self.epoch, "step": self.step, "epoch_complete": True,
                         "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
        }


@pytest.fixture
def buffers(tmp_path):
    b = SnapshotBuffers(f"test-{os.getpid()}-{tmp_path.name}", [tmp_path])
    yield b
    b.close()


def snapshot_data(buffers: SnapshotBuffers, state: dict, metrics: dict, reason: str = "epoch") -> dict:
    """A save_checkpoint event's data as a plugin receives it: through msgpack, tuples become lists."""
    snapshot = buffers.take(state, lambda slot: slot == 0)
    return unpack(pack({**snapshot.event_data(), "reason": reason, "metrics": metrics}))


def save(h: Harness, trainer: Trainer, buffers: SnapshotBuffers, validation_loss: float | None = None) -> list[dict]:
    """validation_loss None: a checkpoint before the first epoch ended, which has no metrics yet (kernel/loop.py
    gives a checkpoint the latest epoch's, and every epoch of a run with a validation loader reports its loss)."""
    metrics = {} if validation_loss is None else {"validation_loss": validation_loss, "validation_accuracy": 0.9}
    data = snapshot_data(buffers, trainer.state(metrics), metrics)
    return h.feed("save_checkpoint", step=trainer.step, epoch=trainer.epoch, **data)


def run_epochs(h: Harness, buffers: SnapshotBuffers, losses: list[float], width: int = 4) -> Trainer:
    trainer = Trainer(width)
    for loss in losses:
        trainer.train_epoch()
        save(h, trainer, buffers, loss)
    return trainer


def checkpoints(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".pt")


def manifest(directory: Path) -> list[dict]:
    """Every entry; a torn line (a crash mid-append) is skipped, as resume does."""
    return read_manifest(directory / MANIFEST)



def harness(tmp_path: Path, **settings) -> Harness:
    return Harness(CheckpointPlugin(settings), run_dir=str(tmp_path))


# -- one checkpoint -------------------------------------------------------------------------------

def test_a_checkpoint_loads_with_weights_only_and_equals_the_training_state(tmp_path, buffers):
    h = harness(tmp_path)
    trainer = Trainer()
    trainer.train_epoch()  # Adam's state exists from the first step on
    metrics = {"validation_loss": 0.25, "validation_accuracy": 0.9}
    state = trainer.state(metrics)
    replies = h.feed("save_checkpoint", step=1, epoch=1, **snapshot_data(buffers, state, metrics))

    path = tmp_path / "checkpoints" / "epoch001-step000001.pt"
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"epoch", "step", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
                           "metrics", "hyperparameters", "trainbus"}
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(loaded["model_state_dict"][name], tensor)
    original = trainer.optimizer.state_dict()
    assert list(loaded["optimizer_state_dict"]["state"]) == list(original["state"]) == [0, 1, 2, 3]  # int keys
    for index, moments in original["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["optimizer_state_dict"]["state"][index][key], value)
    assert loaded["optimizer_state_dict"]["param_groups"][0]["betas"] == (0.9, 0.999)  # a tuple again
    assert loaded["trainbus"]["rng"]["python"] == state["trainbus"]["rng"]["python"]  # nested tuples
    assert torch.equal(loaded["trainbus"]["rng"]["torch"], state["trainbus"]["rng"]["torch"])
    assert loaded["scheduler_state_dict"] == trainer.scheduler.state_dict()
    assert loaded["metrics"] == {"validation_loss": 0.25, "validation_accuracy": 0.9}

    entry = manifest(path.parent)[0]
    assert entry["file"] == path.name and entry["size"] == path.stat().st_size and entry["sha256"] == sha256_of(path)
    assert (entry["step"], entry["epoch"], entry["seq"]) == (1, 1, 1)
    assert replies == [{"v": 1, "type": "checkpoint_saved", "seq": 1, "path": str(path), "step": 1, "epoch": 1,
                        "sha256": entry["sha256"], "size": entry["size"]}]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_last_pt_is_the_newest_checkpoint_and_resume_accepts_it(tmp_path, buffers):
    h = harness(tmp_path)
    run_epochs(h, buffers, [0.5, 0.4])
    directory = tmp_path / "checkpoints"
    newest = directory / "epoch002-step000002.pt"
    assert (directory / "last.pt").stat().st_ino == newest.stat().st_ino
    # kernel/checkpointing.py is the reader: the run directory, and last.pt itself, resolve to the newest
    assert find_checkpoint(str(directory / "last.pt"), str(tmp_path)) == directory / "last.pt"
    assert sha256_of(find_checkpoint(str(tmp_path), str(tmp_path))) == sha256_of(newest)
    assert load_checkpoint(directory / "last.pt")["epoch"] == 2


def test_a_replayed_save_is_answered_from_the_manifest_not_written_twice(tmp_path, buffers):
    h = harness(tmp_path)
    trainer = Trainer()
    trainer.train_epoch()
    data = snapshot_data(buffers, trainer.state({}), {})
    event = Event(seq=7, run=h.run_id, type="save_checkpoint", ts=0.0, step=1, epoch=1, data=data)
    h.plugin.handle(event)
    h.plugin.handle(event)  # the plugin crashed after the manifest line, before its ack
    first, second = h.plugin.outbox
    assert first == second and first["type"] == "checkpoint_saved"
    assert [e["file"] for e in manifest(tmp_path / "checkpoints")] == ["epoch001-step000001.pt", "last.pt"]


def test_a_replayed_save_that_retention_has_since_removed_is_neither_written_again_nor_failed(tmp_path, buffers):
    """A persister killed often replays old save_checkpoints; one saved and then deleted by retention (max_total)
    must not be read from a buffer that holds another snapshot by now ("overwritten": checkpoint_failed)."""
    h = harness(tmp_path, max_total=1)
    trainer = Trainer()
    events = []
    for seq in (7, 9):
        trainer.train_epoch()
        data = snapshot_data(buffers, trainer.state({}), {})  # slot 0 each time: the first is overwritten
        events.append(Event(seq=seq, run=h.run_id, type="save_checkpoint", ts=0.0, step=trainer.step,
                            epoch=trainer.epoch, data=data))
        h.plugin.handle(events[-1])
    assert checkpoints(tmp_path / "checkpoints") == ["epoch002-step000002.pt", "last.pt"]
    h.plugin.outbox.clear()
    h.plugin.handle(events[0])  # replayed after a restart
    assert [m["type"] for m in h.plugin.outbox] == ["log"] and "since removed by retention" in h.plugin.outbox[0]["text"]
    assert checkpoints(tmp_path / "checkpoints") == ["epoch002-step000002.pt", "last.pt"]


def test_the_manifest_is_compacted_past_its_stale_lines_and_still_resolves_and_recognises_replays(
        tmp_path, buffers, monkeypatch):
    """A run that checkpoints every few steps for days would grow the manifest (read at every save) without end:
    past MANIFEST_STALE_LINES lines of deleted files it is rewritten with what is still needed."""
    from trainbus.plugins import checkpoint

    monkeypatch.setattr(checkpoint, "MANIFEST_STALE_LINES", 6)
    monkeypatch.setattr(checkpoint, "RETIRED_KEPT", 2)
    h, trainer, directory, events, lengths = harness(tmp_path, max_total=2), Trainer(), tmp_path / "checkpoints", [], []
    for seq in range(1, 16):
        trainer.train_epoch()
        data = snapshot_data(buffers, trainer.state({}), {})
        events.append(Event(seq=seq, run=h.run_id, type="save_checkpoint", ts=0.0, step=trainer.step,
                            epoch=trainer.epoch, data=data))
        h.plugin.handle(events[-1])
        lengths.append(len(manifest(directory)))
    # 2 files + last.pt's line + 2 retired kept, then 6 stale lines (3 saves, each a file's and last.pt's line)
    # more before the next rewrite: never more than 2 + 1 + 2 + 6 + 2 lines
    assert max(lengths) <= 13 and lengths[-1] < 2 * 15, lengths
    assert lengths.count(5) >= 2, f"compacted more than once, to the 5 lines needed: {lengths}"
    entries = manifest(directory)
    assert [e["seq"] for e in entries if "alias_of" not in e and e["file"] != "last.pt"][-2:] == [14, 15]
    assert sum(e["file"] == "last.pt" for e in entries) >= 1
    assert checkpoints(directory) == ["epoch014-step000014.pt", "epoch015-step000015.pt", "last.pt"]
    assert find_checkpoint(str(tmp_path), str(tmp_path)).name in ("last.pt", "epoch015-step000015.pt")
    assert load_checkpoint(find_checkpoint(str(tmp_path), str(tmp_path)))["epoch"] == 15
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
    h.plugin.outbox.clear()
    h.plugin.handle(events[12])  # the newest deleted one, replayed after a restart: its line was kept
    assert [m["type"] for m in h.plugin.outbox] == ["log"] and "since removed by retention" in h.plugin.outbox[0]["text"]
    assert checkpoints(directory) == ["epoch014-step000014.pt", "epoch015-step000015.pt", "last.pt"]


def test_a_manifest_of_kept_checkpoints_only_is_never_rewritten(tmp_path, buffers, monkeypatch):
    from trainbus.plugins import checkpoint

    monkeypatch.setattr(checkpoint, "MANIFEST_STALE_LINES", 6)
    h = harness(tmp_path, save_top_k=-1, save_last=False)
    run_epochs(h, buffers, [0.5] * 10)
    assert len(manifest(tmp_path / "checkpoints")) == 10  # every line is a file on disk


def test_filename_takes_metrics_and_survives_a_missing_one(tmp_path, buffers):
    h = harness(tmp_path, filename="e{epoch:02d}-{validation_loss:.3f}")
    trainer = run_epochs(h, buffers, [0.12345])
    trainer.train_epoch()
    save(h, trainer, buffers, validation_loss=None)  # a step checkpoint before any validation
    assert checkpoints(tmp_path / "checkpoints") == ["e01-0.123.pt", "e02-na.pt", "last.pt"]


def test_step_checkpoints_under_an_epoch_and_loss_template_are_each_a_file_of_their_own(tmp_path, buffers):
    h = harness(tmp_path, filename="epoch{epoch:03d}-{validation_loss:.4f}")
    trainer = Trainer()
    trainer.train_epoch()  # epoch 1, step 1
    paths = []
    for step, validation_loss in ((1, None), (2, None), (2, None), (3, 0.5), (4, 0.5)):  # step 2 twice: a redo
        trainer.step = step
        (reply,) = save(h, trainer, buffers, validation_loss)
        paths.append(Path(reply["path"]).name)
    assert paths == ["epoch001-na.pt", "epoch001-na-step000002.pt", "epoch001-na-step000002-2.pt",
                     "epoch001-0.5000.pt", "epoch001-0.5000-step000004.pt"]
    assert checkpoints(tmp_path / "checkpoints") == sorted(paths + ["last.pt"])
    assert [e["file"] for e in manifest(tmp_path / "checkpoints") if "alias_of" not in e] == paths


def test_a_template_field_that_no_epoch_reports_is_written_na_and_said_once(tmp_path, buffers):
    h = harness(tmp_path, filename="{val_loss:.4f}")  # a typo of validation_loss
    trainer = Trainer()
    trainer.train_epoch()
    save(h, trainer, buffers)
    assert not h.replies_of("log"), "no epoch has ended: na is a metric not measured yet, nothing more to say"
    for loss in (0.5, 0.4):
        trainer.train_epoch()
        save(h, trainer, buffers, loss)
    assert [(r["level"], r["text"]) for r in h.replies_of("log")] == [("warning", (
        "checkpoint filename '{val_loss:.4f}': val_loss is not among the metrics an epoch reported "
        "(validation_loss, validation_accuracy), so it is written na; fix the template"))]
    assert checkpoints(tmp_path / "checkpoints") == ["last.pt", "na-step000002.pt", "na-step000003.pt", "na.pt"]


def test_a_torn_manifest_line_does_not_swallow_the_next_entry(tmp_path, buffers):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "manifest.jsonl").write_text('{"file": "epoch000-step0')  # a crash mid-append
    run_epochs(harness(tmp_path), buffers, [0.5])
    assert [e["file"] for e in manifest(directory)] == ["epoch001-step000001.pt", "last.pt"]


# -- retention ------------------------------------------------------------------------------------

def test_top_k_keeps_the_best_by_the_monitor_and_the_newest(tmp_path, buffers):
    h = harness(tmp_path, monitor="validation_loss", mode="min", save_top_k=2)
    run_epochs(h, buffers, LOSSES)
    directory = tmp_path / "checkpoints"
    assert checkpoints(directory) == ["epoch002-step000002.pt", "epoch004-step000004.pt",
                                      "epoch005-step000005.pt", "last.pt"]
    assert len(h.replies_of("checkpoint_saved")) == 5  # each was written; older ones were deleted later
    assert len([e for e in manifest(directory) if "alias_of" not in e]) == 5  # lines stay; resume skips gone files


def test_mode_max_ranks_the_other_way(tmp_path, buffers):
    h = harness(tmp_path, monitor="validation_loss", mode="max", save_top_k=1, save_last=False)
    run_epochs(h, buffers, LOSSES)
    assert checkpoints(tmp_path / "checkpoints") == ["epoch005-step000005.pt"]


def test_keep_last_only(tmp_path, buffers):
    h = harness(tmp_path, save_top_k=0, save_last=True)
    run_epochs(h, buffers, LOSSES)
    assert checkpoints(tmp_path / "checkpoints") == ["epoch005-step000005.pt", "last.pt"]


def test_best_only_writes_nothing_that_would_not_be_kept(tmp_path, buffers):
    h = harness(tmp_path, monitor="validation_loss", save_top_k=1, save_last=False)
    run_epochs(h, buffers, LOSSES)
    assert checkpoints(tmp_path / "checkpoints") == ["epoch004-step000004.pt"]
    assert [r["step"] for r in h.replies_of("checkpoint_saved")] == [1, 2, 4]  # epochs 3 and 5: not better
    assert len(h.replies_of("log")) == 2 and "not among the best 1" in h.replies_of("log")[0]["text"]
    assert not h.replies_of("checkpoint_failed")


def test_max_total_removes_the_oldest(tmp_path, buffers):
    h = harness(tmp_path, max_total=2)
    run_epochs(h, buffers, LOSSES)
    assert checkpoints(tmp_path / "checkpoints") == ["epoch004-step000004.pt", "epoch005-step000005.pt", "last.pt"]


def test_max_total_never_removes_the_best(tmp_path, buffers):
    h = harness(tmp_path, monitor="validation_loss", max_total=2)
    run_epochs(h, buffers, [0.1, 0.5, 0.4, 0.3])
    assert checkpoints(tmp_path / "checkpoints") == ["epoch001-step000001.pt", "epoch004-step000004.pt", "last.pt"]


@pytest.mark.parametrize(("settings", "kept"), [
    ({"monitor": "", "save_top_k": -1, "save_last": True, "max_total": 0}, {"a", "b", "c", "d"}),
    ({"monitor": "", "save_top_k": 2, "save_last": False, "max_total": 0}, {"c", "d"}),  # no monitor: k newest
    ({"monitor": "", "save_top_k": 5, "save_last": False, "max_total": 0}, {"a", "b", "c", "d"}),  # fewer than k
    ({"monitor": "loss", "save_top_k": 2, "save_last": False, "max_total": 0}, {"b", "c"}),
    ({"monitor": "loss", "save_top_k": 1, "save_last": True, "max_total": 0}, {"b", "d"}),
    ({"monitor": "loss", "save_top_k": 1, "save_last": True, "max_total": 1}, {"b", "d"}),  # both guarded
    ({"monitor": "loss", "save_top_k": -1, "save_last": False, "max_total": 3}, {"b", "c", "d"}),
])
def test_files_to_keep(settings, kept):
    entries = [{"file": "a", "metrics": {"loss": 0.9}}, {"file": "b", "metrics": {"loss": 0.1}},
               {"file": "c", "metrics": {"loss": 0.1}}, {"file": "d", "metrics": {"loss": float("nan")}}]
    assert files_to_keep(entries, mode="min", **settings) == kept


# -- failures -------------------------------------------------------------------------------------

def test_a_reused_buffer_is_reported_not_written(tmp_path, buffers):
    h = harness(tmp_path)
    trainer = Trainer()
    trainer.train_epoch()
    stale = snapshot_data(buffers, trainer.state({}), {})
    snapshot_data(buffers, trainer.state({}), {})  # the kernel reused slot 0 for the next snapshot
    replies = h.feed("save_checkpoint", step=1, epoch=1, **stale)
    assert [(r["type"], r["reason"]) for r in replies] == [
        ("checkpoint_failed", "snapshot overwritten before it could be persisted")]
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_vanished_buffer_is_reported(tmp_path, buffers):
    h = harness(tmp_path)
    trainer = Trainer()
    data = snapshot_data(buffers, trainer.state({}), {})
    buffers.close()  # the kernel ended and removed its buffers
    (reply,) = h.feed("save_checkpoint", step=0, epoch=0, **data)
    assert reply["type"] == "checkpoint_failed" and "cannot be read" in reply["reason"]


def test_a_vanished_buffer_of_a_continued_runs_earlier_session_is_said_as_that_not_as_a_failure(tmp_path, buffers,
                                                                                                  capfd):
    """A resumed run replays its earlier sessions to the persister (catch_up); a save_checkpoint left unsaved when
    that session's kernel died points at a buffer that went with it. Its log said "checkpoint at step N failed:
    snapshot buffer ... cannot be read", a failure of nothing this session asked for."""
    h = harness(tmp_path)
    h.plugin.session_seq = 1000  # this kernel's first seq: everything fed here is an earlier session's
    data = snapshot_data(buffers, Trainer().state({}), {})
    buffers.close()
    assert h.feed("save_checkpoint", step=7, epoch=1, **data) == []
    said = capfd.readouterr().err
    assert "of the run's earlier session, not saved then" in said and "failed" not in said, said


def test_a_directory_that_cannot_exist_fails_the_save_with_its_cause(tmp_path, buffers):
    (tmp_path / "a-file").write_text("not a directory")
    h = harness(tmp_path, dirpath="a-file/checkpoints")  # relative to the run directory, tmp_path
    (said,) = h.replies  # at setup, and not fatal
    assert "Not a directory (errno 20)" in said["text"]
    trainer = Trainer()
    trainer.train_epoch()
    replies = save(h, trainer, buffers, 0.5)
    assert [r["type"] for r in replies] == ["checkpoint_failed"]
    assert "Not a directory (errno 20)" in replies[0]["reason"]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, buffers):
    h = harness(tmp_path)
    trainer = run_epochs(h, buffers, [0.5])
    directory = tmp_path / "checkpoints"
    before = {name: sha256_of(directory / name) for name in checkpoints(directory)}
    lines = (directory / "manifest.jsonl").read_text()
    trainer.train_epoch()
    blocked = directory / f".tmp-epoch002-step000002.pt-{os.getpid()}"
    blocked.mkdir()  # root ignores permissions; a directory where the temp file goes fails any user
    (reply,) = save(h, trainer, buffers, 0.4)
    assert reply["type"] == "checkpoint_failed"
    assert reply["reason"].startswith("Is a directory (errno 21) writing ")
    assert "epoch002-step000002.pt" in reply["reason"]
    assert {name: sha256_of(directory / name) for name in checkpoints(directory)} == before
    assert (directory / "manifest.jsonl").read_text() == lines
    assert blocked.is_dir()  # not ours to remove


@pytest.fixture
def tiny_tmpfs(mount_tmpfs):
    return mount_tmpfs("tiny", 64 * 1024)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path, buffers, tiny_tmpfs):
    h = harness(tmp_path, dirpath=tiny_tmpfs.name)  # mounted in the run directory, tmp_path
    run_epochs(h, buffers, [0.5])  # a small model fits
    before = {name: sha256_of(tiny_tmpfs / name) for name in checkpoints(tiny_tmpfs)}
    lines = (tiny_tmpfs / "manifest.jsonl").read_text()
    big = Trainer(width=200)  # ~160 KB of weights, three times that with Adam's moments
    big.train_epoch()
    big.epoch, big.step = 2, 2
    (reply,) = save(h, big, buffers, 0.4)
    assert reply["type"] == "checkpoint_failed"
    assert reply["reason"].startswith(f"No space left on device (errno 28) writing {tiny_tmpfs}/epoch002")
    assert {name: sha256_of(tiny_tmpfs / name) for name in checkpoints(tiny_tmpfs)} == before
    assert (tiny_tmpfs / "manifest.jsonl").read_text() == lines
    assert not [p for p in tiny_tmpfs.iterdir() if p.name.startswith(".tmp-")]
    assert sha256_of(find_checkpoint(str(tiny_tmpfs), str(tmp_path))) == before["epoch001-step000001.pt"]


# -- setup ----------------------------------------------------------------------------------------

def test_setup_removes_temporaries_of_dead_writers_only(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [directory / f".tmp-epoch001-step000001.pt-{dead.pid}", directory / f".tmp-last.pt-{os.getpid()}"]
    live = directory / f".tmp-epoch001-step000001.pt-{os.getppid()}"  # another live process writing here
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    harness(tmp_path)
    assert [p.exists() for p in stale] == [False, False] and live.exists()


@pytest.mark.parametrize("settings", [
    {"mode": "lowest"},
    {"save_top_k": 0, "save_last": False},
    {"save_top_k": -2},
    {"max_total": -1},
    {"priority": "high"},
    {"filename": "sub/epoch{epoch}"},
    {"filename": "{}"},
    {"filename": "last"},
    {"unknown": 1},
])
def test_bad_settings_are_refused(tmp_path, settings):
    with pytest.raises(SettingsError):
        harness(tmp_path, **settings)


WRITER_PRIORITY = """
import json, os, sys, threading
import torch  # before the nice: the plugin imports it, which took minutes at nice 10 beside CPU burners
from trainbus.plugins.checkpoint import CheckpointPlugin

os.nice(10)  # what the supervisor gives every plugin
plugin = CheckpointPlugin({"priority": sys.argv[1]}, run_dir=sys.argv[2])
plugin.bind_sender(lambda message: None)  # what the runner does, on the handler thread
def priority():
    tid = threading.get_native_id()
    return [os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)]
seen = {"writer": plugin.writer.submit(priority).result(), "handler": priority()}
plugin.teardown()
print(json.dumps(seen))
"""


@pytest.mark.parametrize("priority, policy, nice", [
    ("background", os.SCHED_OTHER, 19), ("low", os.SCHED_OTHER, 10), ("idle", os.SCHED_IDLE, 10)])
def test_the_writing_thread_alone_goes_below_the_plugin(tmp_path, priority, policy, nice):
    """Snapshots are written on a thread of their own, lowered; the handler thread (its other handlers, teardown, the
    interpreter's exit at the run's end) and the I/O thread stay at the plugin's priority."""
    if os.getpriority(os.PRIO_PROCESS, 0) > 10:
        pytest.skip("this test starts from a nice below 10")
    done = subprocess.run([sys.executable, "-c", WRITER_PRIORITY, priority, str(tmp_path)], capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["writer"] == [policy, nice]
    assert seen["handler"] == [os.SCHED_OTHER, 10]


@pytest.mark.parametrize("started, loaded", [("by the run before training", True),
                                             ("by the run while training runs", False), ("by hand", False)])
def test_the_plugin_imports_torch_before_its_hello_only_when_the_run_starts_it_before_training(tmp_path, started,
                                                                                             loaded):
    """Constructed (before its hello) in a process of its own: the run's own plugin, started in the kernel's ready wait,
    has torch loaded then, so its first checkpoint finds it ready; one started while training runs (a restart or an
    attach: TRAINBUS_TRAINING) or by hand leaves it to setup's thread, so its hello is not held up for seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRAINBUS_KERNEL_PID", "TRAINBUS_TRAINING")}
    if started != "by hand":
        env["TRAINBUS_KERNEL_PID"] = str(os.getpid())
    if started == "by the run while training runs":
        env["TRAINBUS_TRAINING"] = "1"
    code = ("import sys; from trainbus.plugins.checkpoint import CheckpointPlugin; "
            f"CheckpointPlugin({{}}, run_id='r', run_dir={str(tmp_path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(loaded), out.stdout
