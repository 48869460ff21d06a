"""What a kernel keeps in the temporary directory when its run directory's disk refuses it (the summary, the final
weights, the journal's last events), and finding it again: the kernel writes there (kernel/run_end.py,
kernel/kept_events.py); `runs list`/`show` (kernel/run_json.py) and a client whose command the run may have ended on
(plugins/dashboard.py) read there. The names are messages.kept_dir_name and kept_name."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .messages import SUMMARY_NAME, kept_dir_name, kept_name


def own_temp_dir(name: str, create: bool = True, temp: str | None = None) -> Path | None:
    """`name` in the temporary directory ($TMPDIR, /tmp; or `temp`), an owner-only directory of this user's, made if
    missing and `create`. Not /tmp itself: a name there that another user can make first is one they can read or
    forge. PermissionError when the one there is not ours or not owner-only; None when there is none and not
    `create`."""
    path = Path(temp or tempfile.gettempdir()) / name
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


# Where Python's gettempdir() looks, in its order (tempfile._candidate_tempdir_list, less the working directory): it
# takes the first that takes a file, so a kernel whose $TMPDIR was full kept its files in /tmp.
_TEMP_VARIABLES = ("TMPDIR", "TEMP", "TMP")
_TEMP_DIRS = ("/tmp", "/var/tmp", "/usr/tmp")


def kept_dirs() -> list[Path]:
    """kept_dir, then the same folder in every other temporary directory a kernel may have kept files in (its $TMPDIR
    full, or another $TMPDIR than this process's): each an owner-only directory of ours that exists."""
    found: list[Path] = []
    candidates = [tempfile.gettempdir(), *filter(None, map(os.environ.get, _TEMP_VARIABLES)), *_TEMP_DIRS]
    for temp in dict.fromkeys(os.path.abspath(c) for c in candidates):
        path = Path(temp) / kept_dir_name(os.getuid())
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077:
            found.append(path)
    return found


def kept_summary(run_id: str) -> tuple[Path, dict[str, Any]] | None:
    """The summary run `run_id`'s kernel kept in a kept_dirs folder, with its path; None where there is none, it is
    no JSON object, or the folder is not an owner-only one of ours (anyone can make one in /tmp)."""
    for folder in kept_dirs():
        path = folder / kept_name(run_id, SUMMARY_NAME)
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict):
            return path, summary
    return None
