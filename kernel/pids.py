"""Whether a process still runs, one answer for the kernel's parts that ask (a daemon's job, rank 0 of a failing
rank, the kernel that left shared memory behind): a zombie is gone, and a reused pid is someone else."""

from __future__ import annotations


def process_alive(pid: int, started: float | None) -> bool:
    """Whether `pid` is still the process that started at `started` (None: any process under that pid)."""
    import psutil  # here: `trainbus runs ...` imports this module and asks only sometimes

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
