"""What a DDP training step costs through trainbus next to a bare DDP loop, both launched by torchrun.

    .venv/bin/python scripts/bench/ddp_overhead.py            # small CNN, 2 processes, gloo: ~10 min (estimate)
    .venv/bin/python scripts/bench/ddp_overhead.py --quick    # 2 repetitions of 4 epochs: ~2 min
    .venv/bin/python scripts/bench/ddp_overhead.py --reps 1 --epochs 2 --retry-budget-s 0   # does it run

Three variants of the same training (kernel/digits.py with model="cnn": its model, optimizer, data and
batch size, one validation pass an epoch), each a fresh torchrun launch of 2 processes on the CPU
(gloo; torch's default threads under torchrun, which sets OMP_NUM_THREADS=1 for more than one process),
interleaved (A B C, B C A, ...) so that a shared machine's drift hits all of them alike:

- bare DDP: this script as torchrun's worker (--worker): _runs.py's bare loop (zero_grad,
  forward, loss, backward, step, the loss and the spec's accuracy read with .item(), running totals)
  around DistributedDataParallel, each rank on its DistributedSampler share (trainbus's own `shard`),
  the epoch totals summed over the ranks at each epoch's end, as trainbus sums them;
- trainbus, 0 plugins / default plugins (console, metrics_log): `trainbus run --nproc 2 model=cnn`,
  which adds rank 0's events and the ranks' agreement on its replies every 16 steps.

Per-step time is rank 0's: its wall-clock stamp after each step (the bare worker's own, the ts of
trainbus's end_training_batch events in the journal). A run's us/step is _runs.run_mean (the
mean over the epochs after the first, validation and the launch left out); the table gives the median
over repetitions and "vs bare", the median of each repetition's own ratio (paired, which cancels drift
between repetitions). Runs during which other processes took more than --quiet-cores of CPU are run
again (bounded).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, add_rerun_options, machine_line, median, quiet_note, table
from _runs import Measurer, batch_stamps, run_mean
from trainbus.kernel.journal import read_events

NPROC = 2
HP = {"model": "cnn"}
BARE, TB_NONE, TB_DEFAULT = "bare DDP", "trainbus, 0 plugins", "trainbus, default plugins"
VARIANTS = (BARE, TB_NONE, TB_DEFAULT)


# -- the bare DDP loop: this script, started by torchrun with --worker ------------------------------

def worker(out: Path, epochs: int, seed: int) -> None:
    """One rank of the bare DDP run; rank 0 writes its per-epoch step stamps to `out` (JSON)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trainbus.kernel.distributed import shard
    from trainbus.kernel.training_state import seed_everything
    from trainbus.kernel.memory import keep_freed_memory
    from trainbus.kernel.spec import build_spec
    from trainbus.kernel.target import DEFAULT_TARGET

    dist.init_process_group("gloo")
    seed_everything(seed)
    spec = build_spec(DEFAULT_TARGET, dict(HP))
    model = DistributedDataParallel(spec.model)
    train = shard(spec.train_loader, seed, "train_loader")
    validation = shard(spec.validation_loader, seed, "validation_loader")
    opt, loss_fn, metrics = spec.optimizer, spec.loss_fn, spec.metrics
    stamps = []
    with keep_freed_memory():  # as run_training trains ([run] keep_freed_memory)
        for epoch in range(1, epochs + 1):
            train.sampler.set_epoch(epoch)
            model.train()
            ts: list[float] = []
            loss_total, count, metric_totals = 0.0, 0, {name: 0.0 for name in metrics}
            for inputs, targets in train:
                opt.zero_grad(set_to_none=True)
                outputs = model(inputs)
                loss = loss_fn(outputs, targets)
                loss.backward()
                opt.step()
                loss_total, count = loss_total + loss.item(), count + 1
                with torch.no_grad():
                    for name, fn in metrics.items():
                        metric_totals[name] += fn(outputs, targets).item()
                ts.append(time.time())  # where the trainbus loop publishes end_training_batch
            stamps.append(ts)
            model.eval()
            with torch.no_grad():
                for inputs, targets in validation:
                    outputs = model(inputs)
                    loss_total += loss_fn(outputs, targets).item()
                    for name, fn in metrics.items():
                        metric_totals[name] += fn(outputs, targets).item()
            dist.all_reduce(torch.tensor([loss_total, count, *metric_totals.values()], dtype=torch.float64))
            if spec.scheduler is not None:
                spec.scheduler.step()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(stamps))
    # Both ranks done before either tears gloo down: without it a rank whose peer had already gone aborted now
    # and then ("terminate called without an active exception", SIGABRT: 2 launches of ~20 so far).
    dist.barrier()
    dist.destroy_process_group()


# -- the runs ---------------------------------------------------------------------------------------

def bare_run(epochs: int, seed: int, workdir: Path, log: Path) -> list[list[float]]:
    out = workdir / f"bare-{time.monotonic_ns()}.json"
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
            __file__, "--worker", str(out), "--epochs", str(epochs), "--seed", str(seed)], log)
    return json.loads(out.read_text())


def trainbus_run(plugins: str, epochs: int, seed: int, workdir: Path, log: Path) -> list[list[float]]:
    runs = workdir / f"runs-{time.monotonic_ns()}"
    launch([str(Path(sys.executable).parent / "trainbus"), "run", "--nproc", str(NPROC), "--device", "cpu",
            "--epochs", str(epochs), "--seed", str(seed), "--plugins", plugins, "--runs-dir", str(runs),
            *(f"{k}={v}" for k, v in HP.items())], log)
    [run_dir] = [p for p in runs.iterdir() if p.is_dir()]
    return batch_stamps(read_events(run_dir))


def launch(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[2] if command[1] == '-m' else 'trainbus run'} exited {proc.returncode}; "
                           f"see {log}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions of every variant (default 5)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run, the first not measured (default 21)")
    p.add_argument("--quick", action="store_true",
                   help="by default 2 repetitions of 4 epochs, retries for 20 s at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one rank of the bare run
    add_rerun_options(p)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker, args.epochs, args.seed)
        return 0
    if args.epochs is not None and args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch is warm-up, not measured")
    if args.quick:
        args.reps, args.epochs, args.retry_budget_s = args.reps or 2, args.epochs or 4, min(args.retry_budget_s, 20.0)
    args.reps, args.epochs = args.reps or 5, args.epochs or 21

    workdir = REPO / "runs" / f"bench-ddp-overhead-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True)
    log = workdir / "output.log"
    print(machine_line() + f", {NPROC} processes under torchrun, gloo")
    print(f"work dir {workdir} (the runs' output in output.log)", flush=True)
    measure = Measurer(args)
    run = {BARE: functools.partial(bare_run, args.epochs, args.seed, workdir, log),
           TB_NONE: functools.partial(trainbus_run, "", args.epochs, args.seed, workdir, log),
           TB_DEFAULT: functools.partial(trainbus_run, "console,metrics_log", args.epochs, args.seed, workdir, log)}
    per_rep: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for rep in range(args.reps):
            measure.settle()
            for variant in VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]:
                stamps = measure(run[variant])
                per_rep[variant].append(run_mean(stamps))
            print(f"  rep {rep + 1}/{args.reps}: "
                  + ", ".join(f"{v} {per_rep[v][-1] * 1e6:.0f}" for v in VARIANTS) + " us/step", flush=True)
    except BaseException:  # a failed launch: its output stays for whoever reads the error
        print(f"kept {workdir} for its output.log", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    over = {v: median([a / b for a, b in zip(per_rep[v], per_rep[BARE])]) - 1 for v in VARIANTS}
    rows = [[v, f"{median(per_rep[v]) * 1e6:.0f}", f"{min(per_rep[v]) * 1e6:.0f}-{max(per_rep[v]) * 1e6:.0f}",
             "-" if v == BARE else f"{over[v] * 100:+.1f} %"] for v in VARIANTS]
    print()
    print(table(["variant", "us/step (rank 0)", "rep range", "vs bare"], rows,
                f"small CNN, {NPROC} processes, gloo ({len(stamps[-1])} steps/epoch a rank x {args.epochs - 1} "
                f"measured epochs x {args.reps} reps)"))
    print("  " + quiet_note(measure.foreign, args.quiet_cores))
    print(measure.closing_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
