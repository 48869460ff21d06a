"""What failed: a failed run's one-line error with the user's frames, and, in a run of several processes, what
each rank wrote of its own failure for rank 0 (or the launcher) to say once."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

from .distributed import broken_by_a_peer
from .pids import process_alive
from .user_errors import error_line, user_trace
from .stepping import WHERE_IN_STEP

RANK_ERROR = "rank{}.error.json"  # in the run directory: what failed on a rank other than 0, for rank 0 to report
# How long rank 0, failing, waits for the other ranks of its machine to write what failed on them. A rank's file
# is written before it exits, so when rank 0 failed because another rank did (a broken collective) it is there
# already; when the same code failed on every rank each writes at once, however busy the cores (the wait ends
# when all have); only a failure of rank 0's alone, the others waiting in a collective, waits it out.
RANK_ERROR_WAIT_S = 10.0


def what_failed(exc: BaseException) -> tuple[str, str]:
    """The one-line error of a failed run, and the traceback trimmed to the user's frames. The line names where in
    the user's code; when none of it ran (a model of torch's modules: their frames are torch's), where in the step,
    " (in the model's forward, given inputs ...)", for an exception of the forward, the loss or the backward pass."""
    where, trace = user_trace(exc)
    note = getattr(exc, WHERE_IN_STEP, None)
    return error_line(exc) + (where or (f" ({note})" if isinstance(note, str) else "")), trace


def write_rank_error(run_dir: Path, rank: int, exc: BaseException, beside_rank_0: bool,
                     wait_s: float = RANK_ERROR_WAIT_S, main_pid: int | None = None) -> str:
    """What failed on this rank, for rank 0's run_failed and summary (the directory every rank shares). Returns
    what this rank says on its stderr: the traceback trimmed to the user's frames (the whole one when none of
    their code is in it: then the fault is ours, and our frames are the point), and the one-line error; nothing
    when it is on rank 0's machine and wrote its file, since rank 0 (or the launcher) says it then, once.

    A rank of rank 0's machine failing at its first batch may get there while rank 0 still makes the run
    directory (and starts its plugins): it waits for the directory, up to wait_s, and only while rank 0's process
    (main_pid) lives: rank 0 failing before it made one (a port taken) is what broke this rank's collective. A
    rank of another machine does not wait: rank 0 reads its file only on a shared file system, without waiting."""
    tail = "".join(traceback.format_exc().splitlines(keepends=True)[-30:])
    error, trace = what_failed(exc)  # as rank 0 says its own: the same error on every rank is then said once
    deadline = time.monotonic() + wait_s
    while beside_rank_0 and not Path(run_dir).is_dir() and time.monotonic() < deadline and (
            main_pid is None or process_alive(main_pid, None)):
        time.sleep(0.05)
    try:
        (Path(run_dir) / RANK_ERROR.format(rank)).write_text(
            json.dumps({"rank": rank, "error": error, "traceback": tail, "trace": trace,
                        "peer_gone": broken_by_a_peer(exc)}))
    except OSError:  # no run directory (rank 0 failed before it made one): its traceback is on its stderr instead
        if beside_rank_0 and main_pid is not None and broken_by_a_peer(exc) and not process_alive(main_pid, None):
            # Rank 0 failed as it set up (a port taken) and its exit broke this rank's collective: rank 0's error is
            # the one to read, and gloo's traceback of our frames here, one per rank, would bury it.
            return (f"trainbus: rank {rank} stopped: rank 0 exited before it made the run directory, which broke "
                    f"this rank's collective (rank 0's error says why)\n")
        beside_rank_0 = False
    return "" if beside_rank_0 else (trace or traceback.format_exc()) + f"error: rank {rank}: {error}\n"


def read_rank_errors(run_dir: Path) -> list[dict[str, Any]]:
    """What the ranks other than 0 wrote of their failures (write_rank_error), by rank."""
    found = []
    for path in sorted(Path(run_dir).glob(RANK_ERROR.format("*"))):
        try:
            said = json.loads(path.read_text())
        except (OSError, ValueError):  # being written: read again, or gone
            continue
        if isinstance(said, dict) and isinstance(said.get("rank"), int):
            found.append(said)
    return found


def rank_errors(run_dir: Path, error: str, tail: str, trace: str, local_ranks: int,
                wait_s: float = RANK_ERROR_WAIT_S, pids: dict[int, int] | None = None,
                peer_gone: bool = False) -> tuple[str, str, str]:
    """Rank 0's error, traceback and the user's frames in it, led by those the other ranks wrote: waiting, up to
    wait_s, for every rank of rank 0's machine (ranks 1..local_ranks-1) to have written; those of other machines
    are there only on a shared file system, and are not waited for.

    pids (rank -> process id, Ranks.local_pids): a rank whose process is gone without writing (kill -9, the
    out-of-memory killer) is not waited for, and is named as the cause. peer_gone: rank 0's own error is a
    collective another rank broke (gloo's "Connection reset by peer"); where another rank says why, that is the
    error, and rank 0's, and any other rank's broken collective, are left out of the line."""
    deadline, pids = time.monotonic() + wait_s, pids or {}
    waited_for = set(range(1, local_ranks))
    others, gone = read_rank_errors(run_dir), {}
    while True:
        missing = waited_for - {o["rank"] for o in others} - set(gone)
        if not missing or time.monotonic() >= deadline:
            break
        dead = {rank for rank in missing if rank in pids and not process_alive(pids[rank], None)}
        if dead:  # its file is written before it exits: read again, and what is still missing died without a word
            others = read_rank_errors(run_dir)
            gone.update({rank: pids[rank] for rank in dead - {o["rank"] for o in others}})
            continue
        time.sleep(0.05)
        others = read_rank_errors(run_dir)
    others += [{"rank": rank, "error": f"its process (pid {pid}) ended without a word: killed (kill -9, the "
                f"out-of-memory killer: `dmesg` says which) or an os._exit", "traceback": "", "trace": ""}
               for rank, pid in sorted(gone.items())]
    if any(not o.get("peer_gone") for o in others):  # a rank that says why: the broken collectives add nothing
        others = [o for o in others if not o.get("peer_gone")]
        if peer_gone:
            lead = "; ".join(f"rank {o['rank']}: {o['error']}" for o in others)
            return lead, _tracebacks(others, tail), \
                "".join(f"rank {o['rank']}: {o['trace']}" for o in others if o.get("trace"))
    # the same error on several ranks (the same code on each: the usual case) is said once, naming them
    same = [o["rank"] for o in others if o.get("error") == error]
    others = [o for o in others if o.get("error") != error]
    own = f"ranks {', '.join(map(str, [0, *same]))}" if same else "rank 0"
    if not others:
        return (f"{error} ({own})" if same else error), tail, trace
    lead = "; ".join(f"rank {o['rank']}: {o['error']}" for o in others)
    return (f"{lead} ({own}: {error})", _tracebacks(others, tail),
            "".join(f"rank {o['rank']}: {o['trace']}" for o in others if o.get("trace")) + trace)


def _tracebacks(others: list[dict[str, Any]], tail: str) -> str:
    """The other ranks' tracebacks, each under its rank, then rank 0's under its own: a rank killed without a word
    has none, and rank 0's (the broken collective it then met) read under that rank's name would say it was the
    cause."""
    said = "".join(f"rank {o['rank']}:\n" + (o["traceback"] or f"(no traceback: {o['error']})\n") for o in others)
    return said + (f"rank 0:\n{tail}" if said and tail else tail)
