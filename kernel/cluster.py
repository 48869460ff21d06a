"""Which cluster environment launched this process: torchrun (TorchElastic), SLURM's srun, or none.

Read from the environment the launcher sets, as Lightning's TorchElasticEnvironment and SLURMEnvironment do,
so `trainbus run` under `torchrun` or `srun` needs no flags. torchrun's variables win when both are set
(torchrun inside a SLURM allocation: it is the launcher of this process).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Mapping

LAUNCH_RUN_ID = "TRAINBUS_LAUNCH_RUN_ID"  # `trainbus run --nproc` picks the run id for every rank it starts
# `trainbus run --nproc` tells its ranks how it launched them (JSON: nproc, nnodes, max_restarts, rdzv_endpoint):
# config.json keeps it, so `--resume RUN` alone launches the run again the same way.
LAUNCH = "TRAINBUS_LAUNCH"
# ... and where a rank writes a mistake in the command (the one `error:` line, exit 2 in one process) instead of
# printing it and failing: every rank would print it, and torchrun restart the group for it (--max-restarts).
LAUNCH_ERRORS = "TRAINBUS_LAUNCH_ERRORS"
# ... and its own pid: each rank it starts (in a session of its own) ends the run when that process is gone (pids.py)
LAUNCHER_PID = "TRAINBUS_LAUNCHER_PID"

TORCHELASTIC_VARS = ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # Lightning's detect()
SLURM_INTERACTIVE = ("bash", "interactive")  # `srun --pty bash`: a shell, not the job's tasks


class ClusterError(ValueError):
    """The launcher's variables contradict each other; the message names them."""


def launch_run_id() -> str | None:
    """$TRAINBUS_LAUNCH_RUN_ID, the run id a launcher or the daemon chose; ClusterError for one that is not a single
    name: a stale or hand-set `../x` would put the run directory outside the runs directory."""
    value = os.environ.get(LAUNCH_RUN_ID)
    if value and (value in (".", "..") or "/" in value or "\0" in value or len(value.encode(errors="replace")) > 255):
        raise ClusterError(f"${LAUNCH_RUN_ID} {value!r} is not a run id (one name: no '/', not . or ..); `trainbus run "
                           f"--nproc` and the daemon set it for the processes they start: unset it")
    return value or None


class PeerGone(Exception):
    """A collective before the run began broke because another rank went away: that rank's own error (or its
    exit, which the launcher reports) says why, and this rank adds nothing but a line."""


@dataclass(frozen=True)
class Cluster:
    kind: str  # "single", "torchelastic" or "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    local_world_size: int = 1  # the ranks on this machine (rank 0's: 0..local_world_size-1)
    main_address: str = "127.0.0.1"
    main_port: int = 0  # 0: not set (a single process needs none)
    restart_count: int = 0  # torchrun's restarts of the group so far (--max-restarts): above 0, the run goes on

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """What start_training_session and summary.json say about it."""
        return asdict(self)


def detect(env: Mapping[str, str] | None = None) -> Cluster:
    env = os.environ if env is None else env
    if all(name in env for name in TORCHELASTIC_VARS):
        cluster = Cluster("torchelastic", rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                          local_rank=_int(env, "LOCAL_RANK"), node_rank=_int(env, "GROUP_RANK"),
                          local_world_size=_int(env, "LOCAL_WORLD_SIZE"),
                          main_address=env.get("MASTER_ADDR", "127.0.0.1"), main_port=_int(env, "MASTER_PORT", 0),
                          restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0))
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE:
        job = env.get("SLURM_JOB_ID", "")
        # Lightning's default: a port from the job id, so every task of the job agrees without talking
        port = _int(env, "MASTER_PORT", 15000 + int(job[-4:]) if job[-4:].isdigit() else 0)
        cluster = Cluster("slurm", rank=_int(env, "SLURM_PROCID", launcher="slurm"),
                          world_size=_int(env, "SLURM_NTASKS", launcher="slurm"),
                          local_rank=_int(env, "SLURM_LOCALID", 0), node_rank=_int(env, "SLURM_NODEID", 0),
                          # "2(x3)" or "2,1": the first node's count, with SLURM's default block distribution
                          local_world_size=int(re.match(r"\d*", env.get("SLURM_TASKS_PER_NODE", "")).group() or 1),
                          main_address=env.get("MASTER_ADDR") or first_host(env.get("SLURM_NODELIST", "127.0.0.1")),
                          main_port=port)
    elif env.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):  # one process of many, launched some other way
        missing = [name for name in TORCHELASTIC_VARS if name not in env]
        raise ClusterError(f"WORLD_SIZE is {env['WORLD_SIZE']} but {', '.join(missing)} not set: launch the ranks with "
                           f"`trainbus run --nproc N`, torchrun or srun, which set them all")
    else:
        return Cluster("single")
    if not 0 <= cluster.rank < cluster.world_size:
        raise ClusterError(f"{cluster.kind}: rank {cluster.rank} is not below world size {cluster.world_size}; "
                           f"the launcher's variables do not agree")
    if cluster.distributed and not cluster.main_port:  # rank 0 would listen on a free port no other rank knows
        fix = ("as torchrun does, or launch with `trainbus run --nproc N` or torchrun" if cluster.kind == "torchelastic"
               else "or run the tasks in a job (SLURM_JOB_ID gives the port)")
        raise ClusterError(f"{cluster.kind}: {cluster.world_size} ranks, but MASTER_PORT is not set: set it (and "
                           f"MASTER_ADDR) to a port free on rank 0's machine, {fix}")
    return cluster


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07", "rack[1-2]-n[01-04].ib" -> "rack1-n01.ib"
    (zero-padding kept; each range gives its first value, as Lightning's _resolve_root_node_address does)."""
    match = re.match(r"(?:[^,\[\]]|\[[^\[\]]+\])+", nodelist.strip())  # up to the first comma outside a range
    if match is None:
        raise ClusterError(f"SLURM_NODELIST {nodelist!r} is not a node list")
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", match.group())


def restarts_left(env: Mapping[str, str] | None = None) -> int:
    """How many more times torchrun restarts the group when this attempt fails (--max-restarts): its run then goes
    on in place, so a failure now is not the run's end."""
    env = os.environ if env is None else env
    try:
        return max(int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) - int(env.get("TORCHELASTIC_RESTART_COUNT", 0)), 0)
    except ValueError:
        return 0


# What a launcher sets that says it launched this process, and how to launch it instead: said when one of its
# other variables is missing (set by hand, or copied from another job's environment).
_LAUNCHERS = {
    "torchelastic": (", ".join(TORCHELASTIC_VARS[:-1]) + f" and {TORCHELASTIC_VARS[-1]} are",
                     "launch the ranks with `trainbus run --nproc N` or torchrun, which set them all, or unset them"),
    "slurm": ("SLURM_NTASKS is", "start the tasks with srun, which sets them all, or unset SLURM_NTASKS"),
}


def _int(env: Mapping[str, str], name: str, default: int | None = None, launcher: str = "torchelastic") -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            set_ones, fix = _LAUNCHERS[launcher]
            raise ClusterError(f"{name} is not set, though {set_ones}: {fix} to train in one process")
        return default
    try:
        return int(value)
    except ValueError:
        raise ClusterError(f"{name}={value!r} is not an integer: give it a whole number, or unset it") from None
