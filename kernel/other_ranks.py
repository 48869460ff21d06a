"""How a rank other than 0 trains: the same loop with a bus that says nothing, no plugins, no files of the run's."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .cluster import LAUNCH_ERRORS
from .collector import freeze_before_training
from .config import RunConfig
from .distributed import Ranks, broken_by_a_peer
from .failures import write_rank_error
from .interrupts import Interrupts
from .loop import Loop
from .memory import keep_freed_memory
from .pids import gone_within
from .rank_stacks import StackAnswer
from .run_end import RunResult
from .spec import TrainingSpec
from .stepping import Stepper

RANK_0_GONE_S = 5.0  # a rank whose collective rank 0's death broke waits this long to see it gone (pids.gone_within)


class SilentBus:
    """The bus of a rank other than 0: it publishes nothing and hears nothing (rank 0 tells it what to do)."""

    def publish(self, type_: str, step: int, epoch: int, data: dict[str, Any]) -> None:
        pass

    def take_replies(self) -> list:
        return []

    def await_votes(self, type_: str, timeout_s: float) -> list[str]:
        return []


def run_other_rank(spec: TrainingSpec, stepper: Stepper, ranks: Ranks, device: torch.device, cfg: RunConfig,
                   resume_state: dict[str, Any] | None, resume_from: Path | None, run_id: str,
                   run_dir: Path) -> RunResult:
    """Train as one of ranks 1..N-1: the same loop, no bus, no plugins, no files (rank 0 keeps the run)."""
    started = time.monotonic()
    loop = Loop(spec, SilentBus(), device, vote_timeout_s=cfg.vote_timeout_s, stepper=stepper, ranks=ranks)
    if resume_state is not None:
        loop.resume(resume_state, str(resume_from))
    # rank 0, seeing training stand still, asks where this rank waits (a signal only reaches its own machine)
    stacks = StackAnswer(run_dir, ranks.rank) if ranks.rank in ranks.local_pids else None
    # A SIGTERM or Ctrl-C reaches every rank (torchrun and srun pass them on): rank 0 decides, and every rank
    # stops at the step it broadcasts; one rank stopping alone would leave the others waiting in a collective.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in Interrupts.SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        freeze_before_training()
        with keep_freed_memory(cfg.keep_freed_memory):
            outcome = loop.run()
    except BaseException as exc:  # said here (the user's frames), then torchrun ends the group on our exit (signals
        # are ignored here: a KeyboardInterrupt is the user's own)
        beside_rank_0 = ranks.cluster.node_rank == 0
        said = write_rank_error(run_dir, ranks.rank, exc, beside_rank_0,
                                main_pid=ranks.main_pid if beside_rank_0 else None)
        if (not said and beside_rank_0 and broken_by_a_peer(exc) and ranks.main_pid is not None
                and not os.environ.get(LAUNCH_ERRORS) and gone_within(ranks.main_pid, RANK_0_GONE_S)
                and not (run_dir / "summary.json").exists()):  # which rank 0 writes as it ends, failed or not
            # rank 0, which says the run's end, is gone without a word (kill -9, the out-of-memory killer): under
            # `run --nproc` the launcher says so; under srun or the user's torchrun, this rank, or no one
            said = (f"error: rank {ranks.rank} stopped: rank 0 (pid {ranks.main_pid}) ended without a word: killed "
                    f"(kill -9, the out-of-memory killer: `dmesg` says which) or an os._exit; `trainbus runs resume "
                    f"{run_id}` continues the run from its newest checkpoint\n")
        print(said, end="", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stacks is not None:
            stacks.close()
    ranks.close()
    return RunResult(run_id=run_id, run_dir=str(run_dir), status="stopped" if outcome.stopped_early else "completed",
                     duration_s=round(time.monotonic() - started, 3), outcome=asdict(outcome), plugins={},
                     cluster=ranks.cluster.describe())
