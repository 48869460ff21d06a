"""What a client of a run (a plugin, attach, a command plugin's helper) can tell of its kernel: where to reach it on
another machine, whether it lives, is stopped or died, and the run's summary once it has ended."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import zmq

from trainbus.proto.messages import SUMMARY_NAME
from trainbus.proto.remote import (CLIENT_KEY_FIX, CONNECTION_FILE, SERVER_KEY, KeyFileError, endpoints, keys_dir,
                                   load_secret, load_server_key, names_connection_file, read_connection_file,
                                   secure_client)

KERNEL_PID, KERNEL_HOST = "kernel.pid", "kernel.host"  # the run's kernel's pid and host (kernel/kernel_pid.py)


def run_summary(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The run's summary.json, which its kernel writes when the run is over; None while it runs (or no run_dir)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_NAME).read_text()) if run_dir else None
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def disk_full(path: Path | None) -> bool:
    """Whether the disk holding `path` has no room left for a kernel's next write (under a page free)."""
    try:
        info = os.statvfs(path) if path is not None else None
    except OSError:
        return False
    return info is not None and info.f_bavail * info.f_frsize < 4096


def _local_kernel_pid(run_dir: Path | None) -> int | None:
    """The pid of the run's kernel when it runs on this machine (kernel/kernel_pid.py write_kernel_pid); None if
    unknown."""
    if run_dir is None:
        return None
    try:
        host = (Path(run_dir) / KERNEL_HOST).read_text().strip() if (Path(run_dir) / KERNEL_HOST).exists() else ""
        if host not in ("", socket.gethostname()):
            return None  # another machine's kernel: its pid means nothing here
        return int((Path(run_dir) / KERNEL_PID).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # a process that is not ours: alive as far as we can tell
    return False


def kernel_died(run_dir: Path | None) -> str | None:
    """Why the run's kernel is known to be gone without a summary (killed, out of memory); None if not known."""
    pid = _local_kernel_pid(run_dir)
    if pid is None or not _gone(pid):
        return None
    return f"the run's kernel (pid {pid}) is gone and wrote no {SUMMARY_NAME}: the run died"


def kernel_alive(run_dir: Path | None) -> int | None:
    """The pid of the run's kernel when it is known to run on this machine; None when it is gone or not known."""
    pid = _local_kernel_pid(run_dir)
    return pid if pid is not None and not _gone(pid) else None


def kernel_stopped(run_dir: Path | None) -> int | None:
    """The pid of the run's kernel when it is stopped (SIGSTOP, a debugger): it answers nothing until it runs again.
    None when it is not, or that cannot be known (not Linux, another machine, a frozen cgroup: that shows no state)."""
    pid = _local_kernel_pid(run_dir)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (comm) S ...": comm may hold spaces and parentheses
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None
    return pid if state in ("T", "t") else None


def connection_run_dir(connect: str) -> Path | None:
    """The folder of a connection.json given by path: the run directory when it is read in place, whose
    summary.json says whether the run has ended (a copy elsewhere has none); None for HOST:PORT."""
    path = Path(connect)
    return path.resolve().parent if names_connection_file(connect) and path.is_file() else None


def remote_endpoints(connect: str, key: str,
                     server_key: str = "") -> tuple[str, str, str, Callable[[zmq.Socket], None]]:
    """(control, events, bursts, secure) for a remote kernel (bursts "": a connection.json from a kernel without
    them): `secure(socket)` makes a socket a CURVE client with our key and the server's key pinned
    (trainbus.proto.remote.secure_client)."""
    if not key:
        raise ValueError(f"--connect needs --key FILE, this client's secret key file: {CLIENT_KEY_FIX}")
    if names_connection_file(connect):
        info = read_connection_file(Path(connect))
        control_endpoint, events_endpoint, bursts_endpoint = info["control"], info["events"], info["bursts"]
        pinned: bytes | Path = Path(server_key) if server_key else info["server_key"].encode("ascii")
    else:
        try:
            control_endpoint, events_endpoint, bursts_endpoint = endpoints(connect)
        except ValueError as exc:  # a run id or directory given with a key: name both forms a remote kernel has
            raise ValueError(f"{exc}: give the kernel's HOST:PORT or its run's connection.json") from None
        pinned = Path(server_key) if server_key else keys_dir() / f"{SERVER_KEY}.key"
        if not server_key and not pinned.exists():  # a laptop's key directory holds no server key: say the option
            raise KeyFileError(f"no server key {pinned} to pin for {connect}: give --server-key FILE (the host's "
                               f"server.key, or a copy of the run's {CONNECTION_FILE}), or copy the host's "
                               f"server.key there")
    # Read once, now: a missing or unreadable key is said at start, not left to a handshake that never ends, and
    # a key file moved or rotated while we run cannot fail a reconnect hours later.
    if isinstance(pinned, Path):
        pinned = load_server_key(pinned)
    return control_endpoint, events_endpoint, bursts_endpoint, functools.partial(
        secure_client, key_file=load_secret(Path(key), client=True), server_key=pinned)
