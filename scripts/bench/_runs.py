"""What every step-time bench runs and reads: the bare loop, a trainbus run, their per-step stamps, and a
measurer that repeats a run other processes disturbed."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import CpuWatch, median, wait_quiet
from trainbus.kernel.config import RunConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.training_state import seed_everything
from trainbus.kernel.memory import keep_freed_memory
from trainbus.kernel.session import run_training
from trainbus.kernel.spec import build_spec
from trainbus.kernel.target import DEFAULT_TARGET
from trainbus.proto import events as ev


def bare_run(hp: dict, epochs: int, seed: int, cpu: list | None = None, target: str = DEFAULT_TARGET,
             device: str = "cpu") -> list[list[float]]:
    """The trainbus loop's work without trainbus; returns per-epoch step stamps.

    With `cpu` (a list), appends this thread's CPU seconds for the training (not the spec's build).
    On CUDA, values stay on the device as the loop keeps them, and an epoch's last stamp is taken once the
    device has finished it (the loop's end_training_loop reads the epoch's loss total: a sync)."""
    seed_everything(seed)
    spec = build_spec(target, hp)
    spec.epochs = epochs
    device = torch.device(device)
    scalar = (lambda t: t.detach()) if device.type == "cuda" else (lambda t: t.item())  # as Loop._scalar
    model, opt, loss_fn, metrics = spec.model, spec.optimizer, spec.loss_fn, spec.metrics
    model.to(device)
    stamps = []
    with keep_freed_memory():  # as run_training trains ([run] keep_freed_memory)
        cpu0 = time.thread_time()
        for _epoch in range(1, epochs + 1):
            model.train()
            ts: list[float] = []
            loss_total, count, metric_totals = 0.0, 0, {name: 0.0 for name in metrics}
            for inputs, targets in spec.train_loader:
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
                opt.step()
                loss_value = scalar(loss)
                loss_total, count = loss_total + loss_value, count + 1
                with torch.no_grad():
                    for name, fn in metrics.items():
                        metric_totals[name] = metric_totals[name] + scalar(fn(outputs, targets))
                ts.append(time.time())  # where the trainbus loop publishes end_training_batch
            if device.type == "cuda":
                torch.cuda.synchronize()
                ts[-1] = time.time()
            stamps.append(ts)
            model.eval()
            with torch.no_grad():
                for inputs, targets in spec.validation_loader:
                    outputs = model(inputs.to(device))
                    targets = targets.to(device)
                    scalar(loss_fn(outputs, targets))
                    for name, fn in metrics.items():
                        scalar(fn(outputs, targets))
            if device.type == "cuda":  # the loop reads the validation totals too: no work left for the next epoch
                torch.cuda.synchronize()
            if spec.scheduler is not None:
                spec.scheduler.step()
    if cpu is not None:
        cpu.append(time.thread_time() - cpu0)
    return stamps


@contextlib.contextmanager
def output_to(path: Path):
    """Point this process's fd 1 and 2 (which a plugin named "console" inherits) at a file."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def trainbus_run(hp: dict, epochs: int, seed: int, plugins: list, runs_dir: Path, log: Path,
                 target: str = DEFAULT_TARGET, device: str = "cpu"):
    """run_training, and the per-epoch stamps of its end_training_batch events from the journal.

    On CUDA an epoch's last stamp is its end_training_loop's, published once the device has finished the epoch."""
    cfg = RunConfig(target=target, epochs=epochs, seed=seed, runs_dir=str(runs_dir), device=device,
                    hyperparameters=dict(hp), plugins=list(plugins))
    with output_to(log):
        t0 = time.time()
        result = run_training(cfg)
        t1 = time.time()
    if result.status != "completed":
        raise RuntimeError(f"trainbus run {result.run_dir} ended {result.status}: {result.error}; see {log}")
    events = read_events(result.run_dir)
    start = next(e.ts for e in events if e.type == ev.START_TRAINING_SESSION)
    end = next(e.ts for e in events if e.type == ev.END_TRAINING_SESSION)
    return batch_stamps(events, device), start - t0, t1 - end


def batch_stamps(events, device: str = "cpu") -> list[list[float]]:
    """A journal's per-epoch step stamps: its end_training_batch events' ts (on CUDA an epoch's last is its
    end_training_loop's, published once the device has finished the epoch)."""
    by_epoch: dict[int, list[float]] = {}
    for e in events:
        if e.type == ev.END_TRAINING_BATCH:
            by_epoch.setdefault(e.epoch, []).append(e.ts)
        elif e.type == ev.END_TRAINING_LOOP and device == "cuda":
            by_epoch[e.epoch][-1] = e.ts
    return [by_epoch[k] for k in sorted(by_epoch)]


def run_mean(stamps: list[list[float]], skip_epochs: int = 1) -> float:
    """Mean seconds per step over every epoch after the first: the sum of each epoch's first-to-last step
    span over the number of steps in those spans (epoch boundaries, with validation, left out). Counts
    every bus flush (every 100 ms) and plugin wake-up that fell inside training."""
    spans = [(ts[-1] - ts[0], len(ts) - 1) for ts in stamps[skip_epochs:] if len(ts) > 1]
    return sum(s for s, _ in spans) / sum(n for _, n in spans)


def epoch_means(stamps: list[list[float]], skip_epochs: int = 1) -> list[float]:
    """Mean seconds per step of each epoch after the first. Their median over all repetitions is the
    noise-robust second opinion: a neighbour's burst spoils one epoch, not the figure. (It can hide a
    cost that comes less often than once per epoch, hence not the headline.)"""
    return [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in stamps[skip_epochs:] if len(ts) > 1]


def step_medians(stamps: list[list[float]], skip_epochs: int = 1) -> float:
    return median([b - a for ts in stamps[skip_epochs:] for a, b in zip(ts, ts[1:])])


class Measurer:
    """Runs a measurement again (up to --max-retries times) when other processes took more than
    --quiet-cores of CPU meanwhile; keeps the quietest attempt. Retries stop after --retry-budget-s."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.foreign: list[float] = []
        self.retries = 0

    def closing_line(self) -> str:
        """What a bench prints last: how long it took, how many runs were repeated, the load it ended in."""
        load = os.getloadavg()
        return (f"total {time.monotonic() - self.started:.0f} s; {self.retries} run(s) repeated for noise; "
                f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")

    def settle(self) -> None:
        """Before a repetition: wait (bounded) for other processes to calm down, within the budget."""
        if time.monotonic() - self.started < self.args.retry_budget_s:
            wait_quiet(self.args.quiet_cores, self.args.quiet_wait_s)

    def __call__(self, fn):
        best = None
        for attempt in range(1 + self.args.max_retries):
            watch = CpuWatch()
            result = fn()
            foreign = watch.stop()
            if best is None or foreign < best[1]:
                best = (result, foreign)
            if (foreign <= self.args.quiet_cores or attempt == self.args.max_retries
                    or time.monotonic() - self.started > self.args.retry_budget_s):
                break  # the last attempt: nothing follows to count as repeated, or to wait for a quiet machine
            self.retries += 1
            wait_quiet(self.args.quiet_cores, self.args.quiet_wait_s)
        self.foreign.append(best[1])
        return best[0]
