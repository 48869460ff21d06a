"""The checkpoint plugin's file writing and snapshot mapping, on real files and real snapshot buffers."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from trainbus.kernel.snapshot import SnapshotBuffers
from trainbus.plugins._durable_files import STAGING_BYTES, DirectWriter, _set_direct, write_atomically
from trainbus.plugins._snapshot_reader import SnapshotError, read_snapshot
from trainbus.proto import pack, unpack
from trainbus.proto.checkpoint_format import sha256_of

# Pieces that cross the staging buffer's end and a block boundary, and an odd tail.
PIECES = [1, 4095, 4097, STAGING_BYTES - 3, 7, STAGING_BYTES + 4096, 123]


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
def test_the_writer_writes_exactly_what_it_was_given_and_hashes_it(tmp_path, direct):
    data = os.urandom(sum(PIECES))
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = DirectWriter(fd)
        if direct and not writer.direct:
            pytest.skip(f"the file system of {tmp_path} has no direct I/O")
        if not direct:
            writer.direct = _set_direct(fd, False)
        start = 0
        for n in PIECES:
            assert writer.write(memoryview(data)[start: start + n]) == n
            start += n
        writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == data  # exact length: the padded last block was cut off
    assert writer.size == len(data) and writer.sha256.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_state_written_atomically_loads_with_weights_only_and_matches_its_hash(tmp_path):
    torch.manual_seed(0)
    state = {"model_state_dict": torch.nn.Linear(300, 7).state_dict(), "epoch": 3, "odd": torch.arange(5, dtype=torch.int16)}
    path = tmp_path / "epoch003.pt"
    sha256, size = write_atomically(state, path)
    assert (sha256, size) == (sha256_of(path), path.stat().st_size)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["odd"], state["odd"])
    assert all(torch.equal(loaded["model_state_dict"][k], v) for k, v in state["model_state_dict"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch003.pt"]  # no temporary left


def _snapshot(buffers: SnapshotBuffers, state: dict) -> dict:
    snapshot = buffers.take(state, lambda slot: slot == 0)
    return unpack(pack(snapshot.event_data()))


def test_mapped_tensors_are_the_snapshot_and_each_has_its_own_storage(tmp_path):
    buffers = SnapshotBuffers(f"test-{os.getpid()}-map", [tmp_path])
    try:
        state = {"w": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.int64), "t": (torch.ones(2, dtype=torch.bfloat16),)}
        mapped = read_snapshot(_snapshot(buffers, state))
        assert torch.equal(mapped.state["w"], state["w"]) and torch.equal(mapped.state["b"], state["b"])
        assert isinstance(mapped.state["t"], tuple) and torch.equal(mapped.state["t"][0], state["t"][0])
        # torch.save writes a tensor's whole storage: a view of the whole buffer would write it per tensor
        assert mapped.state["w"].untyped_storage().nbytes() == 3 * 5 * 4
        mapped.check()
    finally:
        buffers.close()


def test_a_buffer_reused_while_it_was_written_is_never_renamed_into_place(tmp_path):
    buffers = SnapshotBuffers(f"test-{os.getpid()}-reuse", [tmp_path])
    try:
        mapped = read_snapshot(_snapshot(buffers, {"w": torch.zeros(1000)}))
        _snapshot(buffers, {"w": torch.ones(1000)})  # the kernel took the next snapshot into the same slot
        path = tmp_path / "checkpoints" / "epoch001.pt"
        path.parent.mkdir()
        with pytest.raises(SnapshotError, match="overwritten"):
            write_atomically(mapped.state, path, before_replace=mapped.check)
        assert os.listdir(path.parent) == []  # neither the final name nor a temporary
    finally:
        buffers.close()
