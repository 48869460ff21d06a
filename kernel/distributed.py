"""Training across processes with torch.distributed: the process group, DDP, sharded data, shared decisions.

Rank 0 owns the bus, the journal and the plugins; the other ranks publish nothing and spawn nothing.
A plugin's reply reaches rank 0 only, yet every rank must act on it at the same step (a stop heard by one
rank alone deadlocks the others in their next all-reduce). So the ranks agree every AGREE_EVERY steps and
at each epoch's end: rank 0 broadcasts what it holds (stop, checkpoint) over a gloo group, on the host,
and every rank acts on it at that same step. Between those points rank 0 holds its replies back. A step
costs one integer test; the agreement, a broadcast of two integers every AGREE_EVERY steps, costs
~0.1 ms on loopback: nothing next to DDP's own all-reduce of the gradients every step, and no device
sync on CUDA (the flags live in host memory). A stop lands at most AGREE_EVERY - 1 steps after it came.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler

from .cluster import Cluster, PeerGone
from .replies import NO_CONTROL, Control

AGREE_EVERY = 16  # steps between agreements on rank 0's replies
TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a rank (a slow validation, a vote)
WAITING_SAID_AFTER_S = 10.0  # a rank still waiting for the others this long says so, once


class GroupInterrupted(Exception):
    """Ctrl-C or SIGTERM while this rank waited for the others to join: nothing was made."""


class PortInUse(Exception):
    """Rank 0 cannot listen where the ranks meet (MASTER_ADDR:MASTER_PORT): another program holds the port."""


def join_group(cluster: Cluster, device: torch.device, interrupted: Callable[[], bool],
               say: Callable[[str], None]) -> "Ranks":
    """Ranks(cluster, device), waited for on a thread of its own.

    The rendezvous blocks in C++ until every rank has joined (up to TIMEOUT, 30 min), where Python runs no signal
    handler: a batch script's `trainbus run` under `sbatch --ntasks 2` without srun (one task, waiting for a second
    that never starts) sat there silent, deaf to Ctrl-C, SIGTERM and `timeout`. Here the main thread keeps
    handling signals: `interrupted()` true (the first Ctrl-C or SIGTERM) raises GroupInterrupted; and a wait past
    WAITING_SAID_AFTER_S is said once, with what the ranks are waiting for."""
    box: dict[str, Any] = {}
    # srun sets no MASTER_PORT: the port comes from the job id (cluster.detect), which the line about a taken one names
    port_from_job = cluster.kind == "slurm" and "MASTER_PORT" not in os.environ

    def join() -> None:
        try:
            box["ranks"] = Ranks(cluster, device)
        except BaseException as exc:  # noqa: BLE001 -- raised again on the main thread, which reports it
            box["error"] = exc

    # a daemon: a rank interrupted while the others never came exits without this thread's wait ending
    thread = threading.Thread(target=join, name="trainbus-rendezvous", daemon=True)
    thread.start()
    started, said = time.monotonic(), False
    while thread.is_alive():
        thread.join(0.1)
        if interrupted():
            raise GroupInterrupted(f"rank {cluster.rank} of {cluster.world_size} was still waiting for the other "
                                   f"ranks at {cluster.main_address}:{cluster.main_port}")
        if not said and time.monotonic() - started > WAITING_SAID_AFTER_S:
            said = True
            say(_waiting_line(cluster, time.monotonic() - started))
    if "error" in box:
        if _address_in_use(box["error"]):  # c10d's 40-line traceback through our frames, and the others wait on
            whose = " (srun's: 15000 + the job id's last 4 digits)" if port_from_job else ""
            raise PortInUse(f"rank 0 cannot listen at {cluster.main_address}:{cluster.main_port}{whose} for the other "
                            f"ranks to join: the port is in use on this machine (another program, or another job's "
                            f"ranks); set MASTER_PORT to a free port, the same for every rank") from None
        raise box["error"]
    return box["ranks"]


def _address_in_use(exc: BaseException) -> bool:
    """rank 0's store could not bind its port (the others connect to it): c10d's DistNetworkError, EADDRINUSE."""
    return isinstance(exc, dist.DistNetworkError) and "EADDRINUSE" in str(exc)


def _waiting_line(cluster: Cluster, waited_s: float) -> str:
    line = (f"rank {cluster.rank} of {cluster.world_size} ({cluster.kind}) has waited {waited_s:.0f} s for the other "
            f"ranks to join at {cluster.main_address}:{cluster.main_port}")
    if not _resolves(cluster.main_address):  # torch retries the name until TIMEOUT: no rank can meet there
        line += (", a host this machine cannot resolve: set MASTER_ADDR to rank 0's host (its name or IP address) "
                 "for every rank")
    elif cluster.kind == "slurm":  # the likely cause: a batch script that runs one task where its allocation has more
        line += (f"; SLURM_NTASKS is {cluster.world_size}: start one task a rank with srun (`srun trainbus run ...`), "
                 f"or run one process with --ntasks 1")
    return line + "; Ctrl-C stops it"


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:  # gaierror: no such name (or no DNS answer)
        return False
    return True


class Ranks:
    """This process's place in the group, and the few collectives the loop needs."""

    def __init__(self, cluster: Cluster, device: torch.device):
        self.cluster = cluster
        self.rank, self.world_size = cluster.rank, cluster.world_size
        self.main_pid: int | None = None  # rank 0's process id, once the ranks met (meet)
        self.local_pids: dict[int, int] = {}  # rank -> process id, for the ranks of rank 0's machine (meet)
        # env:// reads these; srun sets none of them, torchrun all
        os.environ.update(MASTER_ADDR=cluster.main_address, MASTER_PORT=str(cluster.main_port),
                          RANK=str(cluster.rank), WORLD_SIZE=str(cluster.world_size),
                          LOCAL_RANK=str(cluster.local_rank))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
        # decisions, RNG states and metric totals travel on the host, whatever the training backend
        self.host = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def meet(self, run_id: str) -> str:
        """Rank 0's run id, on every rank; and every rank's process id, so that rank 0 can tell a rank of its
        machine that died without a word (kill -9, the out-of-memory killer) from one still writing its error."""
        seen: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(seen, (run_id, os.getpid(), self.cluster.node_rank),
                                                        group=self.host))
        self.main_pid = seen[0][1]
        self.local_pids = {rank: pid for rank, (_, pid, node) in enumerate(seen) if node == seen[0][2]}
        return seen[0][0]

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank (the run id, the checkpoint to resume from), as the run is set up: a rank
        that failed meanwhile (its build raised) breaks it, which is PeerGone here, not gloo's traceback."""
        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self.host))
        return box[0]

    def _collective(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:
            if broken_by_a_peer(exc):
                raise PeerGone(f"rank {self.rank} stopped: another rank left as the run was set up (its own "
                               f"error says why)") from None
            raise

    def agree(self, control: Control) -> Control:
        """Rank 0's decision on every rank: stop and checkpoint flags (other ranks' own replies are none)."""
        flags = torch.tensor([control.should_stop, control.checkpoint_now], dtype=torch.int32)
        dist.broadcast(flags, src=0, group=self.host)
        if self.is_main:
            return control
        stop, checkpoint = bool(flags[0]), bool(flags[1])
        return Control(should_stop=stop, checkpoint_now=checkpoint) if stop or checkpoint else NO_CONTROL

    def all_have(self, has: bool) -> bool:
        """True when every rank has this step's batch. A loader the user shares out themselves (a stream, or
        distributed_sampler = false) may give one rank fewer: that rank would leave the epoch while another waits
        in DDP's all-reduce of its next batch (gloo aborts, NCCL waits out TIMEOUT), so such an epoch ends on every
        rank where the first runs out. One integer on the host a step, only for such loaders."""
        flag = torch.tensor([int(has)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.host)
        return bool(flag[0])

    def fewest(self, count: int | None) -> int | None:
        """The least of the ranks' counts; None when any rank's is unknown (a stream without a length)."""
        least = torch.tensor([-1 if count is None else count], dtype=torch.int64)
        dist.all_reduce(least, op=dist.ReduceOp.MIN, group=self.host)
        return None if least[0] < 0 else int(least[0])

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank (RNG states for a checkpoint)."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.host)
        return values

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (epoch totals and counts, so means are over all data)."""
        totals = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(totals, group=self.host)
        return totals.tolist()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ShardedSampler(Sampler[int]):
    """A sampler of the user's own (a subset, weights, an order of theirs) shared out over the ranks, as
    Lightning's DistributedSamplerWrapper does: every rank draws the epoch's indices from it, seeded by the run's
    seed and the epoch so that every rank draws the same ones (a sampler with a generator of its own draws from
    that: seed it the same on every rank), and takes every world_size-th of them; padded, as DistributedSampler
    pads, so each rank has as many (or cut short, with drop_last)."""

    def __init__(self, sampler: Any, num_replicas: int, rank: int, seed: int, drop_last: bool):
        self.sampler, self.num_replicas, self.rank, self.seed = sampler, num_replicas, rank, seed
        self.drop_last, self.epoch = drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.num_replicas if self.drop_last else -(-count // self.num_replicas)

    def __iter__(self):
        with torch.random.fork_rng(devices=[]):  # the training's own RNG goes on untouched
            torch.manual_seed(self.seed + self.epoch)
            indices = list(self.sampler)
        total = len(self) * self.num_replicas
        if len(indices) < total:
            indices += (indices * -(-total // max(len(indices), 1)))[: total - len(indices)]
        return iter(indices[self.rank:total:self.num_replicas])


def evenly_shared(loader: Any) -> bool:
    """Every rank gets as many batches of this loader an epoch: a DataLoader whose sampler is a DistributedSampler
    (ours, or the user's: each pads, or drops, to the same count) or a ShardedSampler, batched by torch's own."""
    return (isinstance(loader, DataLoader) and isinstance(loader.sampler, (DistributedSampler, ShardedSampler))
            and type(loader.batch_sampler).__module__ == "torch.utils.data.sampler")


def unshardable(loader: Any) -> str | None:
    """Why every rank would iterate this loader whole (a note for the user), or None when shard() shares it."""
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__}, not a DataLoader"
    if isinstance(loader.dataset, IterableDataset):
        return "a DataLoader over an IterableDataset (a stream has no indices to share out)"
    return None


def shard(loader: Any, seed: int, where: str) -> Any:
    """The loader with a DistributedSampler in place of its sampler, as Lightning does; one that already has
    one is kept. The shuffle follows the original (a RandomSampler shuffles), seeded by the run's seed; any other
    sampler of the user's is shared out as it samples (ShardedSampler). A loader that cannot be shared out (see
    unshardable) is kept as it is."""
    if unshardable(loader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.batch_sampler is not None and type(loader.batch_sampler).__module__ != "torch.utils.data.sampler":
        raise ValueError(f"{where} has a batch_sampler of its own ({type(loader.batch_sampler).__name__}), whose "
                         f"batches trainbus cannot share out across ranks: have it yield only this rank's batches "
                         f"(torch.distributed.get_rank() and get_world_size() tell which), then set [run] "
                         f"distributed_sampler = false")
    if loader.batch_size is None:
        raise ValueError(f"{where} has no batch_size (automatic batching off): give it a DistributedSampler yourself, "
                         f"or set [run] distributed_sampler = false")
    if isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                     drop_last=loader.drop_last)
    else:
        sampler = ShardedSampler(loader.sampler, dist.get_world_size(), dist.get_rank(), seed, loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor if loader.num_workers else None,
                      persistent_workers=loader.persistent_workers)


def distribute(spec: Any, stepper: Any, ranks: Ranks, device: torch.device, cfg: Any) -> list[str]:
    """The spec made ready for this rank: loaders sharded (unless the user opted out), training through DDP.
    Returns a warning for each loader every rank will iterate whole (for rank 0 to say)."""
    warnings = []
    if cfg.distributed_sampler:
        for where in ("train_loader", "validation_loader"):
            loader = getattr(spec, where)
            if loader is None:
                continue
            why = unshardable(loader)
            if why:
                warnings.append(f"{where} is {why}: every rank iterates all of it, so each sees the same data; "
                                f"share it out in your loader (torch.distributed.get_rank() and get_world_size())")
            setattr(spec, where, shard(loader, cfg.seed, where))
    stepper.distribute(ranks.wrap(spec.model, device))
    return warnings


def broken_by_a_peer(exc: BaseException) -> bool:
    """A collective failed because another rank went away: c10d's errors, gloo's transport (a RuntimeError out of
    DDP's backward hook), NCCL's."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "gloo/transport" in text or "NCCL" in text
