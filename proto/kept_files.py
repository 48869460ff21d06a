"""What a kernel keeps in the temporary directory when its run directory's disk refuses it (the summary, the final
weights, the journal's last events), and finding it again: the kernel writes there (kernel/session.py,
kernel/journal.py); `runs list`/`show` (kernel/runs.py) and a client whose command the run may have ended on
(plugins/dashboard.py) read there. The names are messages.kept_dir_name and kept_name."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .messages import SUMMARY_NAME, kept_dir_name, kept_name


def own_temp_dir(name: str, create: bool = True) -> Path | None:
    """`name` in the temporary directory ($TMPDIR, /tmp), an owner-only directory of this user's, made if missing
    and `create`. Not /tmp itself: a name there that another user can make first is one they can read or forge.
    PermissionError when the one there is not ours or not owner-only; None when there is none and not `create`."""
    path = Path(tempfile.gettempdir()) / name
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not an owner-only directory of this user's: remove it, or set TMPDIR "
                              f"to another directory")
    return path


def kept_dir(create: bool = True) -> Path | None:
    """Where what a full run-directory disk refused is kept (the final weights, the summary, the journal's last
    events): an owner-only directory of ours in the temporary directory ($TMPDIR, /tmp; another disk, as a rule).
    Not /tmp itself: a name there that another user can make first is one they can read, or, for the events a
    resume appends back to the journal, forge. OSError when the one there is not ours or not owner-only; None when
    there is none and `create` is false."""
    return own_temp_dir(kept_dir_name(os.getuid()), create)


def kept_summary(run_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The summary run `run_id`'s kernel kept in kept_dir, with its path; None where there is none, it is no JSON
    object, or the folder is not an owner-only one of ours (anyone can make one in /tmp)."""
    try:
        folder = kept_dir(create=False)
    except OSError:
        return None
    if folder is None:
        return None
    path = folder / kept_name(run_id, SUMMARY_NAME)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (path, summary) if isinstance(summary, dict) else None
