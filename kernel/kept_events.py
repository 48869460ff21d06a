"""Events a journal's disk refused to the end: kept in the temporary directory as the journal closes ($TMPDIR, /tmp;
another disk, as a rule) rather than lost with the process, and found again when it reopens, so a continued run goes
on after them, not over their seqs."""

from __future__ import annotations

import logging
from pathlib import Path

from trainbus.proto.journal_format import iter_records
from trainbus.proto.kept_files import kept_dir, kept_dirs
from trainbus.proto.messages import kept_name

from .durable_writes import write_file

log = logging.getLogger("trainbus.kernel")


def keep(path: Path, first: int, last: int, records: list[bytes]) -> Path | None:
    """Events `first`-`last` of the journal at `path`, the disk refusing them, in a file of the temporary directory:
    the same records, so appending the file to the journal (`cat FILE >> events`) makes it whole. None when that is
    refused too."""
    name = f"{_kept_stem(path)}.{first}-{last}"
    kept = None
    try:
        kept = kept_dir() / name
        write_file(kept, b"".join(records))
    except OSError as exc:
        if kept is not None:
            kept.unlink(missing_ok=True)
        log.error("journal %s: events %d-%d could not be kept in the temporary directory either (%s): they are "
                  "lost", path, first, last, exc.strerror or exc)
        return None
    log.error("journal %s: events %d-%d, which its disk refused, are kept in %s", path, first, last, kept)
    return kept


def kept_to_rejoin(path: Path, next_seq: int) -> tuple[Path, bytes, list[int]] | None:
    """The kept events that go on at `next_seq` of the journal at `path`: the file, its records' bytes and where each
    record starts in them. Only a file that starts at that seq and holds whole, gap-free records."""
    try:
        kept_dir(create=False)
    except OSError as exc:  # not ours: nothing in it is taken into the journal (kept_dirs leaves it out)
        log.warning("journal %s: %s", path, exc)
    # any temporary directory: the kernel's $TMPDIR may have been full (its files went to /tmp), or another
    for kept in [k for directory in kept_dirs() for k in directory.glob(f"{_kept_stem(path)}.{next_seq}-*")]:
        records = list(iter_records(kept))
        if [r["seq"] for _, _, r in records] != list(range(next_seq, next_seq + len(records))) or not records:
            continue
        with open(kept, "rb") as f:
            blob = f.read(records[-1][1])
        return kept, blob, [offset for offset, _, _ in records]
    return None


def _kept_stem(path: Path) -> str:
    """The name, in the temporary directory, of a run's events its disk refused: trainbus-<run id>-events."""
    return kept_name(path.parent.name, path.name)
