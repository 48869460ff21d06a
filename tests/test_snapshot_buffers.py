"""The kernel's snapshot buffers on real files: allocation up front (both slots at the first snapshot), fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainbus.kernel.snapshot import SnapshotBuffers, snapshot_directories
from trainbus.plugins._snapshot_reader import read_snapshot
from trainbus.proto import pack, unpack

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
