"""Where each rank of a stalled run waits. Rank 0's bus thread sees the loop stand still (kernel/stall_watch.py), but
its own stack mostly shows a collective waiting for the others: the rank that froze is elsewhere. Every other rank of
rank 0's machine dumps its threads' stacks when sent SIGUSR2 (faulthandler, from C: a rank inside a collective or any
C call answers all the same), appending them to a file of the run directory; rank 0 asks each and reads the answer.

A rank runs nothing for it but a thread that waits for the run directory and registers. Ranks of other machines are
not asked (no signal reaches them)."""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from .stall_watch import STACK_FRAMES_MAX

STACKS = "rank{}.stacks.txt"  # in the run directory: a header line, then each dump appended
ASK = signal.SIGUSR2  # torchrun, srun and Lightning's SLURM requeue use SIGUSR1 and SIGTERM; the user's own wins
# faulthandler writes at once (a rank swapped out may take longer); the bus thread, which asks, waits this long
ANSWER_WAIT_S = 1.0
RUN_DIR_WAIT_S = 600.0  # a rank waits this long for rank 0 to make the run directory (its plugins start first)
_HEADER = re.compile(r"trainbus rank (\d+) pid (\d+) started ([0-9.]+) main thread (0x[0-9a-f]+)\n")
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+) \(most recent call first\):$", re.MULTILINE)
_FRAME = re.compile(r'^  File "(.*)", line (\d+) in (.*)$')


class StackAnswer:
    """In a rank other than 0, of rank 0's machine: its stacks, dumped when rank 0 asks (SIGUSR2). The ranks start
    training while rank 0 still makes the run directory: a thread waits for it, then registers. Nothing is
    registered when the signal is already the user's: rank 0 then says the rank is not listening."""

    def __init__(self, run_dir: Path, rank: int, wait_s: float = RUN_DIR_WAIT_S):
        self.file = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        if signal.getsignal(ASK) in (signal.SIG_DFL, None):
            threading.Thread(target=self._listen, args=(Path(run_dir), rank, wait_s), daemon=True,
                             name="trainbus-stacks").start()

    def _listen(self, run_dir: Path, rank: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not run_dir.is_dir():
            if self._closed.wait(0.2) or time.monotonic() > deadline:
                return
        with self._lock:
            if self._closed.is_set():
                return
            try:
                self.file = open(run_dir / STACKS.format(rank), "w", encoding="utf-8")  # noqa: SIM115 (kept open)
                # registered before the header says so: rank 0 asks only a rank whose header it reads, and the
                # signal's default action ends the process
                faulthandler.register(ASK, file=self.file, all_threads=True, chain=False)
                self.file.write(f"trainbus rank {rank} pid {os.getpid()} started {psutil.Process().create_time()!r} "
                                f"main thread {threading.main_thread().ident:#x}\n")
                self.file.flush()
            except (OSError, RuntimeError):  # the directory gone meanwhile; a full disk
                if self.file is not None:
                    self._forget()

    def close(self) -> None:
        """Rank 0 asks no more (the file is gone). The handler and its open file stay until the process exits: a
        question already on its way then ends no process, and its dump lands in that unlinked file, not in another
        file that took its descriptor. Nothing is left in the run directory (the dumps rank 0 read are in its
        kernel.log)."""
        self._closed.set()
        with self._lock:
            if self.file is not None:
                self._forget()

    def _forget(self) -> None:
        try:
            if os.stat(self.file.name).st_ino == os.fstat(self.file.fileno()).st_ino:  # not a later rank's file
                os.unlink(self.file.name)
        except OSError:
            pass


def ask_ranks(run_dir: Path, pids: dict[int, int], is_user_file: Callable[[str], bool],
              wait_s: float = ANSWER_WAIT_S) -> list[dict[str, Any]]:
    """Each rank of `pids` (rank -> process id, rank 0's machine) but 0, asked for its stacks: {"rank", "where",
    "stack"} as stall_watch.thread_stack says a thread's (the rank's main thread, where it trains), or {"rank",
    "error"} saying why there is none."""
    asked: dict[int, tuple[Path, int]] = {}
    answers: dict[int, dict[str, Any]] = {}
    for rank, pid in sorted(pids.items()):
        if rank == 0:
            continue
        path = Path(run_dir) / STACKS.format(rank)
        why = _cannot_ask(path, pid)
        if why:
            answers[rank] = {"rank": rank, "error": why}
            continue
        try:
            asked[rank] = (path, path.stat().st_size)
            os.kill(pid, ASK)
        except OSError as exc:
            asked.pop(rank, None)
            answers[rank] = {"rank": rank, "error": f"could not be asked: {exc.strerror or exc}"}
    deadline, sizes = time.monotonic() + wait_s, {rank: before for rank, (_, before) in asked.items()}
    while asked and time.monotonic() < deadline:
        time.sleep(0.05)
        for rank, (path, before) in list(asked.items()):
            size = _size(path)
            if size > before and size == sizes[rank]:  # written, and no more since the last look: the whole dump
                answers[rank] = {"rank": rank, **_answer(path, before, is_user_file)}
                del asked[rank]
            sizes[rank] = size
    for rank in asked:
        answers[rank] = {"rank": rank, "error": f"no answer within {wait_s:g} s"}
    return [answers[rank] for rank in sorted(answers)]


def described(rank: dict[str, Any]) -> str:
    """One answer of ask_ranks as kernel.log says it: why there is none, or where the rank waits and its stack."""
    if "error" in rank:
        return f"rank {rank['rank']}: {rank['error']}"
    where = f" in your code at {rank['where']}" if rank["where"] else ""
    return f"rank {rank['rank']}{where}:\n{''.join(rank['stack']) or '-'}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cannot_ask(path: Path, pid: int) -> str:
    """Why the rank of `pid` is not to be sent the signal ("" when it is): only a process that registered for it,
    this very one (a pid reused by another process would be killed by SIGUSR2's default action)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = _HEADER.fullmatch(f.readline())
    except OSError:
        return "not listening for the question (SIGUSR2 taken by the user's code, or its run directory not writable)"
    if header is None or int(header[2]) != pid:
        return "its stacks file is not its own"
    try:
        if psutil.Process(pid).create_time() != float(header[3]):
            return "its process is gone"
    except psutil.Error:
        return "its process is gone"
    return ""


def _answer(path: Path, before: int, is_user_file: Callable[[str], bool]) -> dict[str, Any]:
    """The main thread's frames in the dump appended after `before` bytes: {"where", "stack"}, or {"error"}."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = _HEADER.fullmatch(f.readline())
            f.seek(before)
            dump = f.read(1 << 20)
    except OSError as exc:
        return {"error": f"its answer could not be read: {exc.strerror or exc}"}
    blocks = list(_THREAD.finditer(dump))
    main = [i for i, block in enumerate(blocks) if header is not None and int(block[1], 16) == int(header[4], 16)]
    if not main:
        return {"error": "its answer names no training thread"}
    end = blocks[main[0] + 1].start() if main[0] + 1 < len(blocks) else len(dump)
    frames = [m.groups() for m in map(_FRAME.match, dump[blocks[main[0]].end():end].splitlines()) if m]
    frames = frames[:STACK_FRAMES_MAX][::-1]  # the innermost, last: as Python's tracebacks
    where = next((f"{name}, line {line}" for name, line, _ in reversed(frames)
                  if not name.startswith("<") and is_user_file(name)), "")
    return {"where": where,
            "stack": [f'  File "{name}", line {line}, in {function}\n' for name, line, function in frames]}
