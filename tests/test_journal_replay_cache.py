"""Replays from closed journal segments: several durable plugins catching up at once (a resumed run's, all from seq 1)
are each served from their segment decompressed once, not decompressed again at every batch."""

from __future__ import annotations

from trainbus.kernel.journal import Journal
from trainbus.proto.codec import encode_event
from trainbus.proto.journal_format import closed_segments
from trainbus.proto.messages import Event


def _records(first: int, count: int) -> list[bytes]:
    return [encode_event(Event(seq=s, run="r", type="end_training_batch", ts=1.0 + s, step=s, epoch=1,
                               data={"batch_index": s, "loss": 1.0 / s}, n=[s, s, 0, 0]))
            for s in range(first, first + count)]


def test_five_plugins_replaying_in_five_segments_are_each_served_from_memory(tmp_path):
    journal = Journal(tmp_path / "events", segment_bytes=16 * 1024)
    seq = 1
    while len(closed_segments(tmp_path / "events")) < 12:
        journal.append(_records(seq, 50), seq)
        seq += 50
    segments = closed_segments(tmp_path / "events")
    # five durable plugins, each replaying in a segment of its own, asking in turn (the kernel serves them so)
    readers = [segments[i].first for i in (0, 2, 4, 6, 8)]
    for _ in range(2):
        for i, at in enumerate(readers):
            first, count = journal.read_batch(at, 10, 1 << 20)[:2]
            assert (first, count) == (at, 10)
            readers[i] = first + count
    # the disk's copies garbled: what is still served came from the segments decompressed for the first batches
    for segment in segments:
        segment.path.write_bytes(b"not gzip")
    for _ in range(2):
        for i, at in enumerate(readers):
            first, count = journal.read_batch(at, 10, 1 << 20)[:2]
            assert (first, count) == (at, 10), f"reader {i} at seq {at}: its segment was decompressed again"
            readers[i] = first + count
    journal.close()
