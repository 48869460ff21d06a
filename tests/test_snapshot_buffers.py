"""The kernel's snapshot buffers on real files: allocation up front (both slots at the first snapshot), fallback,
and a checkpoint skipped, never waited for, while a persister holds both."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from trainbus.kernel.journal import read_events
from trainbus.kernel.loop import Loop
from trainbus.kernel.loop_checkpoints import LAST_CHECKPOINT_WAIT_S
from trainbus.kernel.run_bus import close_bus, open_bus
from trainbus.kernel.buffer_files import remove_stale_buffers, snapshot_directories
from trainbus.kernel.snapshot import SLOTS, SnapshotBuffers
from trainbus.plugins._snapshot_reader import read_snapshot
from trainbus.proto import events as ev, pack, unpack

from specs import TRAIN_BATCHES, tiny

MB = 1 << 20


def state_of(nbytes: int) -> dict:
    return {"w": torch.arange(nbytes // 4, dtype=torch.float32), "epoch": 1}


def test_both_buffers_are_allocated_at_the_first_snapshot(tmp_path):
    buffers = SnapshotBuffers(f"test-{os.getpid()}-prep", [tmp_path])
    try:
        first = buffers.take(state_of(8 * MB), lambda slot: True)  # no persist in flight yet: both free
        second = tmp_path / f"{buffers.name}-slot1"
        size = second.stat().st_size
        assert size >= 8 * MB and second.stat().st_blocks * 512 >= size  # allocated, not sparse
        inode = second.stat().st_ino
        snapshot = buffers.take(state_of(8 * MB), lambda slot: slot == 1)
        assert snapshot.buffer == str(second) and second.stat().st_ino == inode  # used as prepared
        assert first.buffer != snapshot.buffer
        # A grown state (Adam's moments appear after step 1) while slot 1 is being persisted: slot 0 grows,
        # slot 1 stays as it is until it is free.
        buffers.take(state_of(16 * MB), lambda slot: slot == 0)
        assert Path(first.buffer).stat().st_size >= 16 * MB
        assert second.stat().st_ino == inode and second.stat().st_size < 16 * MB
    finally:
        buffers.close()
    assert not list(tmp_path.glob("trainbus-*"))


def test_prepared_buffers_are_made_by_another_process_and_the_first_snapshot_maps_them(tmp_path):
    buffers = SnapshotBuffers(f"test-{os.getpid()}-prepared", [tmp_path])
    try:
        buffers.prepare(state_of(8 * MB))
        process = buffers._preparer
        buffers._join_adopter()  # what the first snapshot does: normally long done by then
        assert process.returncode == 0 and process.pid != os.getpid()
        made = {slot: tmp_path / f"{buffers.name}-slot{slot}" for slot in (0, 1)}
        inodes = {slot: path.stat().st_ino for slot, path in made.items()}
        for path in made.values():  # allocated and every page written: resident, not sparse
            assert path.stat().st_size >= 8 * MB and path.stat().st_blocks * 512 >= path.stat().st_size
            assert oct(path.stat().st_mode & 0o777) == "0o600"
        first = buffers.take(state_of(8 * MB), lambda slot: True)
        second = buffers.take(state_of(8 * MB), lambda slot: slot == 1)
        assert {first.buffer, second.buffer} == {str(p) for p in made.values()}
        assert {slot: path.stat().st_ino for slot, path in made.items()} == inodes  # used as made
        assert read_snapshot(first.event_data()).state["w"].equal(state_of(8 * MB)["w"])
    finally:
        buffers.close()
    assert not list(tmp_path.glob("trainbus-*"))


def test_closing_while_the_preparer_works_leaves_nothing_behind(tmp_path):
    buffers = SnapshotBuffers(f"test-{os.getpid()}-closing", [tmp_path])
    buffers.prepare(state_of(64 * MB))
    buffers.close()
    assert not list(tmp_path.glob("trainbus-*"))


def test_default_places_are_shm_then_the_run_directory_or_the_chosen_one_alone(tmp_path):
    assert snapshot_directories(tmp_path) == [Path("/dev/shm"), tmp_path]
    assert snapshot_directories(tmp_path, "/mnt/fast") == [Path("/mnt/fast")]


def test_a_full_shm_falls_back_to_the_run_directory(tmp_path, mount_tmpfs):
    shm = mount_tmpfs("shm", 64 * 1024)  # Docker's /dev/shm is 64 MB: too small for most models
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    buffers = SnapshotBuffers(f"test-{os.getpid()}-fallback", [shm, run_dir])
    try:
        state = state_of(1 * MB)
        snapshot = buffers.take(state, lambda slot: slot == 0)
        assert Path(snapshot.buffer).parent == run_dir
        mapped = read_snapshot(unpack(pack(snapshot.event_data())))
        assert torch.equal(mapped.state["w"], state["w"])
        assert list(shm.iterdir()) == []  # the failed attempt left nothing behind
    finally:
        buffers.close()


def test_no_room_anywhere_is_one_error_naming_each_place(tmp_path, mount_tmpfs):
    shm, run_dir = mount_tmpfs("shm", 64 * 1024), mount_tmpfs("run", 64 * 1024)
    buffers = SnapshotBuffers(f"test-{os.getpid()}-full", [shm, run_dir])
    try:
        with pytest.raises(OSError) as raised:
            buffers.take(state_of(1 * MB), lambda slot: slot == 0)
        message = str(raised.value)
        assert message.startswith("no room for a 1 MB snapshot buffer")
        assert f"{shm}: No space left on device" in message and f"{run_dir}: No space left on device" in message
        assert list(shm.iterdir()) == [] and list(run_dir.iterdir()) == []
    finally:
        buffers.close()


class HoldingPersister:
    """A persister attached by hand to a real bus (raw pyzmq + msgpack on the run's control socket, with the run's
    credential): its hello declares the checkpoint capability, and then it neither acks nor settles any
    save_checkpoint, so each buffer a snapshot went into stays busy for as long as the test likes. It heartbeats
    to stay alive. One thread only (a ZeroMQ socket)."""

    def __init__(self, bus, run_dir: Path):
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(bus.control_endpoint)
        self.send("hello", name="holder", pid=os.getpid(), subscriptions=[""], replies=[], delivery="best_effort",
                  votes=[], capabilities=["checkpoint"], secret=(Path(run_dir) / "credential").read_text().strip())
        assert self.dealer.poll(30_000), "no answer to the persister's hello"
        answer = msgpack.unpackb(self.dealer.recv(), raw=False)
        assert answer["type"] == "welcome", answer

    def send(self, type_: str, **fields) -> None:
        self.dealer.send(msgpack.packb({"v": 1, "type": type_, **fields}))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_with_both_buffers_held_a_due_checkpoint_is_skipped_and_training_goes_on(tmp_path, monkeypatch, caplog):
    """PROTOCOL.md 6.3: when both buffers are busy the kernel skips the checkpoint (checkpoint_skipped) rather
    than wait. A real bus, checkpointer, buffers and loop (tiny: 3 steps an epoch, 2 epochs), a checkpoint due at
    every step, and a persister (the test) that holds every buffer it is sent from its hello to the run's end.

    Steps 1 and 2 fill both slots; steps 3 to 6 find both busy: each is skipped, saying why, and the loop goes
    on to its next seam and to the run's end, all while the test still holds both buffers (so no buffer was ever
    freed for it to wait for), and both held snapshots are still intact in their buffers (skipped, not
    overwritten). A wait would also show as time: the kernel's only wait for a buffer (the run's last checkpoint)
    lasts LAST_CHECKPOINT_WAIT_S (60 s); the run, under 2 s here, gets half that, room for the busiest CI box.
    That wait is by design (the run's last snapshot is what last.pt should be) and comes here too, at step 6 (a
    checkpoint due after an epoch's last batch is the epoch's): it is made none, this test being about the others.
    Steps 3 and 6, each an epoch's last, are skipped at their epoch's end, so END_EPOCH follows those skips."""
    import trainbus.kernel.loop_checkpoints as loop_checkpoints

    monkeypatch.setattr(loop_checkpoints, "LAST_CHECKPOINT_WAIT_S", 0.0)
    buffers = SnapshotBuffers(f"test-{os.getpid()}-busy", [tmp_path])
    bus, checkpointer, sockets = open_bus("busy", tmp_path, plugins=[], buffers=buffers, every_n_steps=1)
    bus.start()
    persister = HoldingPersister(bus, tmp_path)
    outcome = []
    loop = Loop(tiny({}), bus, torch.device("cpu"), checkpointer=checkpointer)
    trainer = threading.Thread(target=lambda: outcome.append(loop.run()), name="training", daemon=True)
    try:
        trainer.start()
        deadline = time.monotonic() + LAST_CHECKPOINT_WAIT_S / 2
        while trainer.is_alive() and time.monotonic() < deadline:
            persister.send("heartbeat")  # alive: a silent persister would stop counting as one
            trainer.join(0.2)
        waited = trainer.is_alive()
        still_held = [slot for slot in range(SLOTS) if not checkpointer.slot_free(slot)]
        bus.flush_now()
        events = read_events(tmp_path)
        saves = [e for e in events if e.type == ev.SAVE_CHECKPOINT]
        intact = [read_snapshot(e.data).state["step"] for e in saves]  # raises if a skip overwrote one
    finally:
        persister.send("bye", reason="test over")  # a loop that waits for a buffer waits no more
        persister.close()
        trainer.join(LAST_CHECKPOINT_WAIT_S)
        close_bus(bus, tmp_path, sockets)
        checkpointer.close()
    assert not waited, "training waited for a persister to free a snapshot buffer"
    assert still_held == list(range(SLOTS)), "the test held both buffers for the whole run"
    steps = 2 * TRAIN_BATCHES
    assert outcome and outcome[0].steps == steps and outcome[0].epochs_completed == 2
    assert [(e.step, e.data["slot"]) for e in saves] == [(1, 0), (2, 1)] and intact == [1, 2]
    skipped = [e for e in events if e.type == ev.CHECKPOINT_SKIPPED]
    assert [(e.step, e.data["reason"]) for e in skipped] == \
        [(step, "both snapshot buffers are still being persisted") for step in range(3, steps + 1)]
    # kernel.log says the first (a run without the console plugin said none), not one a step
    said = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert said == ["checkpoint at step 3 skipped: both snapshot buffers are still being persisted (the persister "
                    "writes slower than checkpoints come: checkpoint less often, or have it write to a faster "
                    "disk); said once, `trainbus runs show` counts them"], said
    lifecycle = [e for e in events if e.type in ev.LIFECYCLE_EVENTS or e.type == ev.CHECKPOINT_SKIPPED]
    for skip in skipped:  # training went on: the loop's next seam follows each skip
        after = lifecycle[lifecycle.index(skip) + 1]
        assert after.type in (ev.START_TRAINING_BATCH, ev.END_EPOCH), (skip, after)


# -- buffers a dead kernel left ---------------------------------------------------------------------


def _reaped_pid() -> int:
    """The pid of a process that ran and was reaped: no process runs under it (for the moment)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def _buffer_file(directory: Path, pid: int, run_id: str) -> Path:
    path = directory / f"trainbus-{pid}-{run_id}-slot0"
    path.write_bytes(bytes(4096))
    return path


def test_a_buffer_is_removed_only_when_its_kernel_is_gone(tmp_path):
    """remove_stale_buffers, which each kernel runs at its start on its buffer directories (and the daemon when a
    run of its dies), against real processes. Removed: a buffer whose pid no process has, and one whose pid a
    process newer than the file now has (the pid was handed on: that process is not its kernel; these stayed
    forever). Kept: a live kernel's (this process's), one a live process holds locked whatever its pid says (a
    kernel in another pid namespace sharing /dev/shm, containers with --ipc=host: it was removed under the live
    run, whose checkpoints then all failed), and another user's (root removed those)."""
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    holder = None
    try:
        gone = _buffer_file(tmp_path, _reaped_pid(), "gone")
        handed_on = _buffer_file(tmp_path, newer.pid, "handed-on")
        an_hour_ago = time.time() - 3600
        os.utime(handed_on, (an_hour_ago, an_hour_ago))  # written before `newer` started
        live = _buffer_file(tmp_path, os.getpid(), "live")
        held = _buffer_file(tmp_path, _reaped_pid(), "held-elsewhere")
        holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(held)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
        theirs = _buffer_file(tmp_path, _reaped_pid(), "another-users")
        if os.getuid() == 0:
            os.chown(theirs, 65534, 65534)

        removed = remove_stale_buffers(tmp_path)

        assert sorted(removed) == sorted([gone, handed_on])
        assert sorted(tmp_path.iterdir()) == sorted([live, held, theirs])
    finally:
        for process in (newer, holder):
            if process is not None:
                process.kill()
                process.wait()


HOLD_AND_WAIT = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_SH)
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_kernels_buffers_are_held_and_a_killed_ones_removed_by_the_next_kernel(tmp_path):
    """The kernel holds its buffers (made by the preparer, or by itself) for as long as it has them; killed with
    SIGKILL it leaves them, and the next kernel removes them as it starts, saying so in its log. In a directory of
    the test's own (snapshot_dir): in /dev/shm any kernel starting in a test beside this one removes what a killed
    one left, and this test's own sweep removed theirs (it asserted that it removed nothing at all)."""
    buffers = tmp_path / "buffers"
    buffers.mkdir()
    from fixture_targets import open_gate
    from helpers import PLUGIN_START_S, run_config
    from kernel_process import KernelProcess
    from trainbus.kernel.plugin_names import resolve_plugin
    from trainbus.kernel.session import run_training

    gate = tmp_path / "gate"  # held at step 6 until killed, a snapshot taken at step 5
    open_gate(gate, 6)
    kernel = KernelProcess(run_config(tmp_path / "runs", [resolve_plugin("checkpoint", {})], 3,
                                      "fixture_targets:paced_digits", checkpoint_every_n_steps=5,
                                      checkpoint_every_n_epochs=0, ready_timeout_s=PLUGIN_START_S, gate=str(gate),
                                      snapshot_dir=str(buffers)),
                           tmp_path)
    try:
        kernel.wait_event(ev.SAVE_CHECKPOINT, timeout_s=PLUGIN_START_S)
        left = sorted(buffers.glob(f"trainbus-{kernel.pid}-{kernel.run_id}-slot*"))
        assert len(left) == SLOTS
        assert remove_stale_buffers(buffers) == [] and all(p.exists() for p in left)  # its kernel holds them
    finally:
        kernel.kill()
    assert all(p.exists() for p in left)  # what a kill -9 leaves

    after = run_training(run_config(tmp_path / "next", [], 1, "specs:tiny", snapshot_dir=str(buffers)))
    assert after.status == "completed", after
    assert not any(p.exists() for p in left)
    log = (Path(after.run_dir) / "kernel.log").read_text()
    assert f"left by kernels that are gone: {', '.join(p.name for p in left)}" in log, log
