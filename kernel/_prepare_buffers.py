"""Allocate and touch the kernel's two snapshot buffers in a process of their own (run as a script: stdlib only).

    python _prepare_buffers.py NBYTES NAME DIRECTORY...

For each slot, the first DIRECTORY where a NBYTES file can be allocated gets NAME-slot<i>, created 0600,
its space reserved and every page written once; prints `<slot> <path>` per slot made, or `<slot> error
<why>`. Writing the pages here is what makes the kernel's first snapshot cheap: the pages already exist, so
the kernel's copy into them only maps them (kernel/snapshot.py, SnapshotBuffers.prepare). Each file it made is
held (a shared POSIX lock, kernel/buffer_files.py) from then until it exits, so no other kernel takes it for a
dead one's before this one's kernel holds it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sys

SLOTS = 2
PAGE = mmap.PAGESIZE


def prepare(path: str, nbytes: int) -> int:
    """Make one buffer; its open file, held, which the caller keeps open until the process exits."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is None:  # macOS: sparse, touched below
            os.ftruncate(fd, nbytes)
        else:
            fallocate(fd, 0, nbytes)
        with mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED) as mapping:
            for offset in range(0, nbytes, PAGE):
                mapping[offset] = 0
        fcntl.lockf(fd, fcntl.LOCK_SH)  # after the mapping's own descriptor closed, which would drop it
    except OSError:
        os.unlink(path)
        os.close(fd)
        raise
    return fd


def main(argv: list[str]) -> None:
    nbytes, name, directories = int(argv[0]), argv[1], argv[2:]
    held = []  # closed as the process exits, once the kernel has read every line
    for slot in range(SLOTS):
        failures = []
        for directory in directories:
            path = os.path.join(directory, f"{name}-slot{slot}")
            try:
                held.append(prepare(path, nbytes))
            except OSError as exc:
                failures.append(f"{directory}: {exc.strerror or exc}")
                continue
            print(slot, path, flush=True)
            break
        else:
            print(slot, "error", "; ".join(failures), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
