"""Which device this process trains on: the config's, checked against the GPUs visible, or one GPU a rank."""

from __future__ import annotations

import torch

from .cluster import Cluster
from .config import RunConfig
from .config_checks import ONE_GPU_PER_RANK
from .spec import SpecError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(cfg: RunConfig, cluster: Cluster) -> torch.device:
    """The device this process trains on: cfg.device, checked against the GPUs visible, or one GPU a rank."""
    device = pick_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {cfg.device} requested but no CUDA GPU is visible; use --device cpu or auto")
    if device.index is not None:
        if cluster.distributed:
            raise SpecError(ONE_GPU_PER_RANK.format(device=cfg.device))
        if device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise SpecError(f"device {cfg.device}, but {count} GPU{'s' * (count != 1)} {'are' if count != 1 else 'is'} "
                            f"visible (cuda:0 to cuda:{count - 1}, as CUDA_VISIBLE_DEVICES numbers them); give one "
                            f"of those")
        torch.cuda.set_device(device)  # what the user's own .cuda() and torch's defaults take too
    if device.type == "cuda" and cluster.distributed:
        device = gpu_of_rank(cluster.local_rank, cluster.local_world_size, torch.cuda.device_count())
    return device


def gpu_of_rank(local_rank: int, local_ranks: int, visible: int) -> torch.device:
    """The GPU of this machine's local_rank-th process: one a process, as torchrun and srun lay them out. More
    processes than GPUs is one line, not CUDA's "invalid device ordinal" from deep in the first copy to it; said by
    every process of the machine, not only those without a GPU: the others would wait for those to meet them."""
    if local_ranks > visible:
        raise SpecError(f"{local_ranks} processes on this machine train on a GPU each, but {visible} "
                        f"GPU{'s' * (visible != 1)} {'are' if visible != 1 else 'is'} visible: start at most "
                        f"{visible} (--nproc {visible}), or make more visible (CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", local_rank)
