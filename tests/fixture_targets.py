"""Training targets the tests run: the digits demo, paced so a run lasts a known wall time (paced_digits,
digits_slowly, digits_for_seconds: monitors sample on a clock), or probed (probed_digits). The small
synthetic specs (tiny, failing) are in specs.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

from trainbus.kernel.digits import build

GATE_TIMEOUT_S = 300.0  # a gate the test never opens fails the run instead of hanging it


class _Paced:
    """Yields a loader's batches, sleeping `step_sleep_s` before each: the arithmetic is untouched.

    With a `gate` file, batch N (counted over every epoch from 1) is not yielded before the file says N or
    more (open_gate): a test that must act during the run holds training where it needs it, however slowly
    a busy machine runs the test and the plugins."""

    def __init__(self, loader, step_sleep_s: float, gate: Path | None = None):
        self.loader = loader
        self.step_sleep_s = step_sleep_s
        self.gate = gate
        self.batches = 0

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.step_sleep_s)
            self.batches += 1
            if self.gate is not None:
                _wait_for_gate(self.gate, self.batches)
            yield batch

    def __len__(self):
        return len(self.loader)


def paced_digits(hyperparameters: dict):
    """The digits demo with a sleep per training step (hyperparameter `step_sleep_s`, default 10 ms).

    Weights come out bit-identical to the unpaced demo with the same seed and batch size, so a paced
    faulty run compares with an unpaced fault-free one; the pacing only makes the run last long enough
    for a test to act at chosen steps from outside.
    """
    step_sleep_s = float(hyperparameters.pop("step_sleep_s", 0.01))
    gate = hyperparameters.pop("gate", "")
    if os.environ.get("RANK", "0") != str(hyperparameters.pop("gate_rank", os.environ.get("RANK", "0"))):
        gate = ""  # the gate holds one rank alone: the others wait for it in a collective
    diverged = hyperparameters.pop("diverged", False)  # every loss NaN, as a run that diverged has them
    spec = build(hyperparameters)
    spec.train_loader = _Paced(spec.train_loader, step_sleep_s, Path(gate) if gate else None)
    if diverged:
        loss_fn = spec.loss_fn
        spec.loss_fn = lambda outputs, targets: loss_fn(outputs, targets) * float("nan")
    return spec


def slow_build(hyperparameters: dict):
    """paced_digits whose build() waits for the file `build_gate` first: a kernel held before it has a run
    directory, as one loading a large dataset is. It touches `build_gate`.waiting once it waits."""
    gate = Path(hyperparameters.pop("build_gate"))
    gate.with_name(gate.name + ".waiting").touch()
    _wait_for_gate(gate, 1)
    return paced_digits(hyperparameters)


def digits_slowly(hyperparameters: dict):
    """The digits demo (45 training batches an epoch), each batch `batch_s` seconds slower (default 0.03)."""
    batch_s = float(hyperparameters.pop("batch_s", 0.03))
    spec = build(hyperparameters)
    spec.train_loader = _Paced(spec.train_loader, batch_s)
    return spec


class _ForSeconds:
    """Cycles through a loader's batches, busy, until `seconds` have passed since the epoch's first batch."""

    def __init__(self, loader, seconds: float):
        self.loader = loader
        self.seconds = seconds

    def __iter__(self):
        end = time.monotonic() + self.seconds
        while True:
            for batch in self.loader:
                yield batch
                if time.monotonic() >= end:
                    return


def digits_for_seconds(hyperparameters: dict):
    """The digits demo, each training epoch lasting `epoch_s` seconds (default 0.5) of real computation,
    however fast the machine."""
    epoch_s = float(hyperparameters.pop("epoch_s", 0.5))
    spec = build(hyperparameters)
    spec.train_loader = _ForSeconds(spec.train_loader, epoch_s)
    return spec


def open_gate(gate: Path, batches: int) -> None:
    """Let a gated run (paced_digits' `gate`) train up to `batches` batches; atomically, the run reads it."""
    temporary = gate.with_name(gate.name + ".tmp")
    temporary.write_text(str(batches))
    os.replace(temporary, gate)


def _wait_for_gate(gate: Path, batch: int) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while _opened_to(gate) < batch:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{gate} held batch {batch} for {GATE_TIMEOUT_S:.0f} s: the test never opened it")
        time.sleep(0.01)


def _opened_to(gate: Path) -> int:
    try:
        return int(gate.read_text())
    except FileNotFoundError:
        return 0


class _RankProbe:
    """A scheduler (stepped at each epoch's end, after validation) that appends this rank's view to
    RUN_DIR/probe-rank<R>.jsonl: its training batches so far and a hash of its weights, bit for bit."""

    def __init__(self, model, step_sleep_s: float = 0.0):
        self.model, self.batches, self.step_sleep_s = model, 0, step_sleep_s
        model.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.batches += module.training
        if module.training and self.step_sleep_s:
            time.sleep(self.step_sleep_s)  # pacing (the arithmetic is untouched), so a test can act mid-run

    def step(self):
        import hashlib
        import json

        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in self.model.parameters()))
        path = Path(os.environ["RUN_DIR"]) / f"probe-rank{os.environ.get('RANK', '0')}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps({"batches": self.batches, "weights": digest.hexdigest()}) + "\n")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def probed_digits(hyperparameters: dict):
    """The digits demo, each rank recording its weights and batches at every epoch's end (_RankProbe)."""
    step_sleep_s = float(hyperparameters.pop("step_sleep_s", 0.0))
    spec = build(hyperparameters)
    spec.scheduler = _RankProbe(spec.model, step_sleep_s)
    return spec


class _GatedRestore:
    """A scheduler that changes nothing, whose load_state_dict (a resume restoring the checkpoint) touches
    `gate`.waiting-PID and waits for the gate: a continued run held between its resume's checks and its journal."""

    def __init__(self, gate: Path):
        self.gate = gate

    def step(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        self.gate.with_name(f"{self.gate.name}.waiting-{os.getpid()}").touch()
        _wait_for_gate(self.gate, 1)


def restore_gated(hyperparameters: dict):
    """paced_digits whose resume waits, as it restores its checkpoint, for the file `restore_gate` (_GatedRestore)."""
    gate = Path(hyperparameters.pop("restore_gate"))
    spec = paced_digits(hyperparameters)
    spec.scheduler = _GatedRestore(gate)
    return spec


class _SaysDevices:
    """A loader that, as training starts, writes the CUDA_VISIBLE_DEVICES its process was given to
    RUN_DIR/devices.txt (the run directory exists by then; at build time it does not yet). Written whole, by a
    rename: a test waits for the file to exist and reads it at once, and on busy cores it met it still empty."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
        path = Path(os.environ["RUN_DIR"]) / "devices.txt"
        path.with_suffix(".tmp").write_text(seen)
        path.with_suffix(".tmp").replace(path)
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def devices_digits(hyperparameters: dict):
    """paced_digits that records the daemon's placement, as the user's code sees it (_SaysDevices)."""
    spec = paced_digits(hyperparameters)
    spec.train_loader = _SaysDevices(spec.train_loader)
    return spec


class _FailsOnRank:
    """Yields a loader's batches; on the rank named, raises at its `at`-th training batch."""

    def __init__(self, loader, rank: str, at: int):
        self.loader, self.rank, self.at = loader, rank, at

    def __iter__(self):
        for i, batch in enumerate(self.loader, 1):
            if os.environ.get("RANK") == self.rank and i == self.at:
                raise ValueError(f"bad batch {i} on rank {self.rank}")
            yield batch

    def __len__(self):
        return len(self.loader)


def fails_on_rank_1(hyperparameters: dict):
    """The digits demo whose rank 1 raises at its third training batch (`fail_at`): the user's error on a rank
    other than 0, which rank 0 reports."""
    at = int(hyperparameters.pop("fail_at", 3))
    spec = build(hyperparameters)
    spec.train_loader = _FailsOnRank(spec.train_loader, "1", at)
    return spec


class _RanksOwnShare:
    """The training set shared out by the user's own loader (a stream, or a loader per rank with distributed_sampler =
    false), unevenly: rank 1 gets `fewer` batches fewer than rank 0."""

    def __init__(self, dataset, batch_size: int, fewer: int):
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        indices = list(range(rank, len(dataset), world))
        self.indices = indices[: len(indices) - fewer * batch_size * (rank == 1)]
        self.dataset, self.batch_size = dataset, batch_size

    def batches(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield self.dataset[self.indices[start:start + self.batch_size]]


def uneven_digits(hyperparameters: dict):
    """probed_digits whose ranks' training batches are not as many: the user shared the data out themselves (the
    stream `kind`, as the warning about an IterableDataset asks; or `sized`, DataLoaders of their own under
    distributed_sampler = false), rank 1 getting `fewer` batches fewer."""
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    kind, fewer = hyperparameters.pop("kind", "stream"), int(hyperparameters.pop("fewer", 2))
    spec = probed_digits(hyperparameters)
    if kind == "validation":  # the validation stream's shards all on rank 0 (fewer files than ranks): none on 1
        validation = spec.validation_loader

        class Shards(IterableDataset):
            def __iter__(self):
                return iter(validation if os.environ.get("RANK", "0") == "0" else [])
        spec.validation_loader = DataLoader(Shards(), batch_size=None)
        return spec
    share = _RanksOwnShare(spec.train_loader.dataset, spec.train_loader.batch_size, fewer)
    if fewer < 0:  # rank 1's share is empty (fewer files than ranks)
        share.indices = share.indices if os.environ.get("RANK", "0") == "0" else []
    if kind == "stream":
        class Stream(IterableDataset):
            def __iter__(self):
                return share.batches()
        spec.train_loader = DataLoader(Stream(), batch_size=None)
    else:
        spec.train_loader = DataLoader(torch.utils.data.Subset(share.dataset, share.indices),
                                       batch_size=share.batch_size, shuffle=True)
    return spec


def _kill_once(rank: str) -> None:
    import signal

    marker = Path(f"killed-rank{rank}")
    if os.environ.get("RANK") == rank and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def killed_once(hyperparameters: dict):
    """The digits demo whose rank `kill_rank` kills itself with SIGKILL once (the out-of-memory killer's way): as it
    builds (`kill_at` 0) or in its `kill_at`-th training forward (a file in the working directory says it did: the
    restarted group trains on)."""
    rank, at = str(hyperparameters.pop("kill_rank", 0)), int(hyperparameters.pop("kill_at", 3))
    if at == 0:
        _kill_once(rank)
    spec = build(hyperparameters)
    forwards = [0]

    def count(module, args, output):
        forwards[0] += module.training
        if forwards[0] == at:
            _kill_once(rank)

    spec.model.register_forward_hook(count)
    return spec


class _SignalsRank0InAnAgreement:
    """A metric (always 0) by which, at training batch `at` (an agreement's step: distributed.AGREE_EVERY), rank 1
    sends rank 0 a SIGTERM once rank 0 has entered that agreement's broadcast (RUN_DIR/rank0-at-agreement, touched by
    rank 0's torch.distributed.broadcast as it is called: after rank 0 read that no signal came), and only then joins
    it: rank 0 waits in the broadcast as the signal comes, and its handler runs as the broadcast returns."""

    def __init__(self, model, at: int):
        self.model, self.at, self.batches = model, at, 0

    def __call__(self, outputs, targets) -> float:
        import signal

        self.batches += self.model.training
        if not self.model.training or self.batches != self.at:
            return 0.0
        run_dir = Path(os.environ["RUN_DIR"])
        there = run_dir / "rank0-at-agreement"
        if os.environ.get("RANK") == "0":
            self._arm(there)
            return 0.0
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not there.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(int((run_dir / "kernel.pid").read_text()), signal.SIGTERM)
        return 0.0

    def _arm(self, there: Path) -> None:
        """The next broadcast (the agreement at this step: the loop's next collective) touches `there` as it is
        called."""
        import torch.distributed as dist

        broadcast = dist.broadcast

        def touching(*args, **kwargs):
            dist.broadcast = broadcast
            there.touch()
            return broadcast(*args, **kwargs)
        dist.broadcast = touching


def signalled_in_an_agreement(hyperparameters: dict):
    """probed_digits whose rank 0 gets a SIGTERM from rank 1 while it waits in the ranks' agreement at training batch
    `at` (default 16: the first; _SignalsRank0InAnAgreement)."""
    at = int(hyperparameters.pop("at", 16))
    spec = probed_digits(hyperparameters)
    spec.metrics["signal"] = _SignalsRank0InAnAgreement(spec.model, at)
    return spec
