"""Helpers the test modules share: building a run's config, reading what a Recorder saw, comparing weights."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from trainbus.kernel.config import RunConfig
from trainbus.kernel.checkpointing import FINAL_WEIGHTS

_RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


# A plugin's start (Python, its imports, torch for some) beside two CPU burners on 2 cores took over the kernel's
# default 15 s ready_timeout_s, and training went on without it. Tests whose checks need their plugins from the
# first step wait this long for them; the kernel starts as soon as every plugin said hello.
PLUGIN_START_S = 120.0


def run_config(runs_dir: str | Path, plugins=(), epochs: int | None = 1, target: str | None = None,
               **settings) -> RunConfig:
    """A run on the CPU, seed 0, in `runs_dir`: each of `settings` that names a RunConfig field sets it
    (drain_timeout_s=60, checkpoint_every_n_epochs=0, seed=7, ...), the rest are hyperparameters
    (batch_size=16, step_sleep_s=0.01, ...)."""
    fields = {k: v for k, v in settings.items() if k in _RUN_FIELDS}
    hyperparameters = {k: v for k, v in settings.items() if k not in _RUN_FIELDS}
    cfg = RunConfig(**{"seed": 0, "device": "cpu", **fields}, epochs=epochs, runs_dir=str(runs_dir),
                    hyperparameters=hyperparameters, plugins=list(plugins))
    if target:
        cfg.target = target
    return cfg


def recorded(path: str | Path) -> list[tuple[int, str]]:
    """(seq, type) lines a fixture_plugins.Recorder (or LiveRecorder, EpochVoter) wrote, in the order its
    handler saw them (duplicates after a replay kept)."""
    out = []
    for line in Path(path).read_text().splitlines():
        seq, _, type_ = line.partition(" ")
        out.append((int(seq), type_))
    return out


def metrics_records_expected(events, every_n_steps: int) -> list[tuple[str, int]]:
    """(kind, seq) of every record plugins/metrics_log.py writes for these events, in order."""
    expected = []
    for e in events:
        if e.type == "end_training_batch" and e.step % every_n_steps == 0:
            expected.append(("step", e.seq))
        elif e.type == "end_epoch":
            expected.append(("epoch", e.seq))
        elif e.type == "metric":
            expected.append(("metric", e.seq))
        elif e.type == "end_training_session":
            expected.append(("session_end", e.seq))
    return expected


def assert_same_tree(got, want, where: str) -> None:
    """Equal nested state: every tensor torch.equal (dtype and shape too), everything else ==."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), \
            f"{where} differs from the reference run"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for key in want:
            assert_same_tree(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def assert_same_weights(run_dir: str | Path, reference_dir: str | Path) -> None:
    """final.pt of both runs: model and optimizer state identical tensor by tensor, same epoch and step."""
    got = torch.load(Path(run_dir) / FINAL_WEIGHTS, weights_only=True)
    want = torch.load(Path(reference_dir) / FINAL_WEIGHTS, weights_only=True)
    assert_same_tree(got["model_state_dict"], want["model_state_dict"], "model_state_dict")
    assert_same_tree(got["optimizer_state_dict"], want["optimizer_state_dict"], "optimizer_state_dict")
    assert (got["epoch"], got["step"]) == (want["epoch"], want["step"])


def fresh_seed() -> int:
    """A seed for a test's random choices, printed in its failures: TRAINBUS_TEST_SEED=... replays it. Drawn from the
    OS, not from `random`'s global state, which a training run in the same process seeds the same way every time."""
    return int(os.environ.get("TRAINBUS_TEST_SEED", secrets.randbits(32)))


def seeded_rng() -> tuple[random.Random, int]:
    """Random choices from fresh_seed(), reproducible from the seed printed in every failure."""
    seed = fresh_seed()
    return random.Random(seed), seed


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's pick: never a fixed one another test may hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flood_connections(endpoints: list[str], each: int, seconds: float, pid: int,
                      per_s: float | None = None) -> tuple[int, int]:
    """Hold `each` plain TCP connections to every tcp://HOST:PORT of `endpoints` for `seconds`, reopening the ones
    the other side closes: a client with no key that opens connections and never finishes a handshake. Returns the
    file descriptors process `pid` held before, and the most it held meanwhile. per_s: at most that many opened a
    second (libzmq accepts them without the GIL, a burst faster than a loop of Python can count them)."""
    import resource
    import time

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * each * len(endpoints) + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(hard, wanted),
                                                    hard))
    held: dict[socket.socket, str] = {}  # each connection, with the endpoint it went to
    before = peak = descriptors()
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            for endpoint in endpoints:
                host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
                while sum(1 for to in held.values() if to == endpoint) < each:
                    try:
                        connection = socket.create_connection((host, int(port)), timeout=1.0)
                    except OSError:  # refused while the other side binds the port again: again next round
                        break
                    try:  # TCP's self-connect, while the port was unbound (it is in the ephemeral range): it
                        selfish = connection.getsockname() == connection.getpeername()  # would hold the port
                    except OSError:  # already cut
                        selfish = True
                    if selfish:
                        connection.close()
                        break
                    held[connection] = endpoint
                    if per_s:
                        time.sleep(1 / per_s)
            peak = max(peak, descriptors())
            for connection in list(held):  # the ones the other side cut: reopened next round
                connection.setblocking(False)
                try:
                    gone = connection.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    connection.close()
                    del held[connection]
    finally:
        for connection in held:
            connection.close()
    return before, peak


def ctrl_c_once_it_says(code: str, args: list[str], word: str, cwd: Path | None = None,
                        env: dict | None = None) -> tuple[int, str, str]:
    """`python -c code args...`, sent Ctrl-C (SIGINT) once its first line of output is `word` (the code holds
    where it said it until then: that moment, every time); (exit code, the rest of its stdout, its stderr)."""
    process = subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == f"{word}\n"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, out, err


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses: every free page taken."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (bytes(1 << 16), bytes(4096), b"\0"):
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return path
