"""What a training step costs with trainbus, with PyTorch Lightning and in a bare loop, side by side in one run.

    .venv/bin/pip install -e '.[bench]'                          # Lightning, against the torch installed
    .venv/bin/python scripts/bench/vs_lightning.py               # CPU: tiny MLP and small CNN, ~5 min (estimate)
    .venv/bin/python scripts/bench/vs_lightning.py --threads 1   # the same with torch on one intra-op thread
    .venv/bin/python scripts/bench/vs_lightning.py --quick       # ~1-2 min: fewer repetitions and epochs
    .venv/bin/python scripts/bench/vs_lightning.py --only cnn --reps 9   # one model, more repetitions
    .venv/bin/python scripts/bench/vs_lightning.py --device cuda # the launch-bound and compute-bound GPU models

Seven variants of the same training (the spec's model, optimizer, data, batch size, epochs and one
validation pass per epoch), interleaved (A B C ..., B C ... A, ...) so that a shared machine's drift
hits all of them alike:

- bare: scripts/bench/_runs.py's bare loop (bare_run) doing the trainbus loop's work (zero_grad,
  forward, loss, backward, step, the loss and the spec's accuracy read with .item(), running totals);
- trainbus, 0 plugins / default plugins (console, metrics_log) / default + monitors (cpu, memory,
  perf; gpu on CUDA) / per-step log (console, metrics_log with every_n_steps = 1: every step's loss
  written to metrics.jsonl): run_training(RunConfig(...)); console's output goes to a log file;
- Lightning, minimal: a LightningModule doing the same work per step (the loss and accuracy read into
  running totals after Lightning's optimizer step), Trainer(logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0), validation every epoch;
- Lightning, self.log per step: the same with self.log("loss", loss) in training_step, a CSVLogger and
  log_every_n_steps=1 (every step's loss written to metrics.csv, as metrics_log writes it above).

Every variant trains with freed memory kept (kernel/memory.py), as run_training does by default, so
the figures compare the loops, not malloc settings; torch keeps its default thread count unless
--threads says otherwise. Per-step time comes from wall-clock stamps taken once per step: the bare
loop's own, the ts of trainbus's end_training_batch events in the journal, a stamp in the
LightningModule's on_train_batch_end. On CUDA, where a stamp is taken when a step's kernels are queued,
an epoch's last stamp is taken once the device has finished the epoch. A run's us/step is
_runs.run_mean: the mean over the epochs after the first, validation left out. The tables give
the median over repetitions; "vs bare" and "vs Lightning minimal" are paired (the median of each
repetition's own ratio, which cancels drift between repetitions). The acceptance checks of issue #15
end the output as PASS/FAIL lines; runs during which other processes took more than --quiet-cores of
CPU are repeated (bounded), and a check on noisy runs says so.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, add_rerun_options, machine_line, median, quiet_note, table
from _runs import Measurer, bare_run, output_to, run_mean, trainbus_run
from trainbus.kernel.config_file import load_config
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.digits import accuracy
from trainbus.kernel.training_state import seed_everything
from trainbus.kernel.memory import keep_freed_memory
from trainbus.kernel.spec import TrainingSpec, build_spec
from trainbus.kernel.target import DEFAULT_TARGET

try:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
except ImportError:
    if not {"-h", "--help"} & set(sys.argv[1:]):  # its help needs no Lightning
        print("error: vs_lightning.py needs Lightning: .venv/bin/pip install -e '.[bench]' (or pip install "
              "'lightning>=2.4')", file=sys.stderr)
        sys.exit(2)
    L = types.SimpleNamespace(LightningModule=object)

BARE = "bare"
TB_NONE, TB_DEFAULT, TB_MONITORS, TB_LOG = ("trainbus, 0 plugins", "trainbus, default plugins",
                                            "trainbus, default + monitors", "trainbus, per-step log")
L_MINIMAL, L_LOG = "Lightning, minimal", "Lightning, self.log per step"
VARIANTS = (BARE, TB_NONE, TB_DEFAULT, TB_MONITORS, TB_LOG, L_MINIMAL, L_LOG)
MONITORS = ("cpu", "memory", "perf")  # and gpu on CUDA

GPU_TARGET = "vs_lightning:gpu_mlp"
GPU_VALIDATION_BATCHES = 4


@dataclass
class Case:
    name: str
    target: str
    hp: dict
    epochs: int  # the first is warm-up, not measured


CPU_CASES = [Case("tiny MLP", DEFAULT_TARGET, {"model": "mlp"}, 21),
             Case("small CNN", DEFAULT_TARGET, {"model": "cnn"}, 21)]
GPU_CASES = [Case("launch-bound", GPU_TARGET, {"width": 1024, "batch_size": 512, "steps_per_epoch": 100}, 11),
             Case("compute-bound", GPU_TARGET, {"width": 4096, "batch_size": 2048, "steps_per_epoch": 40}, 11)]


@dataclass
class Check:
    """One acceptance line of issue #15: a variant's paired overhead over bare (0.05 = +5 %) against a limit."""

    label: str
    cases: tuple[str, ...]
    variant: str
    limit: Callable[[dict[str, float]], float] = field(repr=False)  # from every variant's overhead


CHECKS = [
    Check("default plugins' overhead <= 1/5 of Lightning minimal's", ("tiny MLP",), TB_DEFAULT,
          lambda over: over[L_MINIMAL] / 5),
    Check("default plugins <= 2 % over bare", ("small CNN",), TB_DEFAULT, lambda over: 0.02),
    Check("per-step logging's overhead <= 1/10 of Lightning's per-step self.log", ("tiny MLP", "small CNN"), TB_LOG,
          lambda over: over[L_LOG] / 10),
    Check("default plugins <= 5 % over bare", ("launch-bound",), TB_DEFAULT, lambda over: 0.05),
    Check("default plugins <= 1 % over bare", ("compute-bound",), TB_DEFAULT, lambda over: 0.01),
]


# -- the GPU models -------------------------------------------------------------------------------

class DeviceBatches:
    """Batches sliced from tensors already on the device, reshuffled each pass: no DataLoader, no copies."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle

    def __len__(self) -> int:
        return len(self.x) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.x), device=self.x.device) if self.shuffle else None
        for i in range(len(self)):
            rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield (self.x[order[rows]], self.y[order[rows]]) if self.shuffle else (self.x[rows], self.y[rows])


def gpu_mlp(hyperparameters: dict) -> TrainingSpec:
    """4 x Linear(width) with ReLUs between, on random data already on the device (a trainbus target)."""
    hp = dict(hyperparameters)
    device, width, batch_size = torch.device(hp["device"]), hp["width"], hp["batch_size"]
    with device:
        model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(width, width), nn.ReLU())][:-1])
        n_train, n_val = batch_size * hp["steps_per_epoch"], batch_size * GPU_VALIDATION_BATCHES
        x = torch.randn(n_train + n_val, width)
        y = torch.randint(0, width, (n_train + n_val,))
    return TrainingSpec(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        loss_fn=nn.functional.cross_entropy,
        train_loader=DeviceBatches(x[:n_train], y[:n_train], batch_size, shuffle=True),
        validation_loader=DeviceBatches(x[n_train:], y[n_train:], batch_size, shuffle=False),
        metrics={"accuracy": accuracy},
        hyperparameters=hp,
    )


# -- Lightning ------------------------------------------------------------------------------------

class SpecModule(L.LightningModule):
    """A TrainingSpec as a LightningModule doing the trainbus loop's work per step, stamping each step's end."""

    def __init__(self, spec: TrainingSpec, device: torch.device, log_each_step: bool):
        super().__init__()
        self.net, self.spec, self.log_each_step = spec.model, spec, log_each_step
        self.on_cuda = device.type == "cuda"
        self.scalar = (lambda t: t.detach()) if self.on_cuda else (lambda t: t.item())  # as Loop._scalar
        self.stamps: list[list[float]] = []

    def configure_optimizers(self):
        return self.spec.optimizer

    def on_train_epoch_start(self) -> None:
        self.stamps.append([])
        self.loss_total, self.metric_totals = 0.0, {name: 0.0 for name in self.spec.metrics}

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        outputs = self.net(inputs)
        loss = self.spec.loss_fn(outputs, targets)
        with torch.no_grad():
            self.step_values = [loss.detach()] + [fn(outputs, targets) for fn in self.spec.metrics.values()]
        if self.log_each_step:
            self.log("loss", loss)  # in training_step: on_step=True, on_epoch=False
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # after Lightning's optimizer step, as the trainbus loop reads them after its own
        loss, *metric_values = self.step_values
        self.loss_total = self.loss_total + self.scalar(loss)
        for name, value in zip(self.spec.metrics, metric_values):
            self.metric_totals[name] = self.metric_totals[name] + self.scalar(value)
        if self.on_cuda and batch_idx == self.trainer.num_training_batches - 1:
            torch.cuda.synchronize()  # the epoch's last stamp once the device has finished it
        self.stamps[-1].append(time.time())

    def validation_step(self, batch, batch_idx) -> None:
        inputs, targets = batch
        outputs = self.net(inputs)
        self.scalar(self.spec.loss_fn(outputs, targets))
        for fn in self.spec.metrics.values():
            self.scalar(fn(outputs, targets))

    def on_validation_epoch_end(self) -> None:
        if self.on_cuda:  # as the trainbus loop, which reads the validation totals: no work left for the next epoch
            torch.cuda.synchronize()


def lightning_run(case: Case, epochs: int, seed: int, device: str, log_each_step: bool, workdir: Path,
                  log: Path) -> list[list[float]]:
    """trainer.fit on the spec's model, optimizer and loaders; the per-epoch step stamps."""
    seed_everything(seed)
    spec = build_spec(case.target, case.hp)
    module = SpecModule(spec, torch.device(device), log_each_step)
    with output_to(log):  # its banner ("GPU available: ...") and warnings too
        trainer = L.Trainer(accelerator=device, devices=1, max_epochs=epochs, default_root_dir=workdir,
                            logger=CSVLogger(workdir / "lightning") if log_each_step else False, log_every_n_steps=1,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, check_val_every_n_epoch=1)
        with keep_freed_memory():
            trainer.fit(module, train_dataloaders=spec.train_loader, val_dataloaders=spec.validation_loader)
    return module.stamps


# -- the bench ------------------------------------------------------------------------------------

def runners(args, workdir: Path) -> dict:
    """Variant name -> run(case, epochs) -> per-epoch step stamps."""
    log = workdir / "output.log"
    defaults = load_config(None).plugins
    monitors = [resolve_plugin(name, {}) for name in MONITORS + (("gpu",) if args.device == "cuda" else ())]
    per_step_log = [resolve_plugin("console", {}), resolve_plugin("metrics_log", {"every_n_steps": 1})]

    def trainbus(plugins):
        def run(case, epochs):
            return trainbus_run(case.hp, epochs, args.seed, plugins, workdir / "runs", log, case.target, args.device)[0]
        return run

    def lightning(log_each_step):
        return lambda case, epochs: lightning_run(case, epochs, args.seed, args.device, log_each_step, workdir, log)

    return {
        BARE: lambda case, epochs: bare_run(case.hp, epochs, args.seed, target=case.target, device=args.device),
        TB_NONE: trainbus([]),
        TB_DEFAULT: trainbus(defaults),
        TB_MONITORS: trainbus(defaults + monitors),
        TB_LOG: trainbus(per_step_log),
        L_MINIMAL: lightning(False),
        L_LOG: lightning(True),
    }


def paired(per_rep: dict, variant: str, reference: str) -> float:
    """The median of each repetition's own ratio variant / reference."""
    return median([a / b for a, b in zip(per_rep[variant], per_rep[reference])])


def bench_case(case: Case, args, run: dict, measure: Measurer) -> tuple[dict, bool]:
    """The case's table; returns each variant's paired overhead over bare and whether the runs were noisy."""
    epochs = args.epochs or case.epochs
    per_rep: dict[str, list[float]] = {v: [] for v in VARIANTS}
    foreign_before = len(measure.foreign)
    for rep in range(args.reps):
        measure.settle()
        for variant in VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]:
            stamps = measure(functools.partial(run[variant], case, epochs))
            per_rep[variant].append(run_mean(stamps))
        print(f"  {case.name}, rep {rep + 1}/{args.reps}: "
              + ", ".join(f"{v} {per_rep[v][-1] * 1e6:.0f}" for v in VARIANTS) + " us/step", flush=True)
    steps = len(stamps[-1])
    over = {v: paired(per_rep, v, BARE) - 1 for v in VARIANTS}
    rows = [[v, f"{median(per_rep[v]) * 1e6:.0f}", f"{min(per_rep[v]) * 1e6:.0f}-{max(per_rep[v]) * 1e6:.0f}",
             "-" if v == BARE else f"{over[v] * 100:+.1f} %",
             "-" if v == L_MINIMAL else f"{paired(per_rep, v, L_MINIMAL):.2f}x"] for v in VARIANTS]
    foreign = measure.foreign[foreign_before:]
    spread = max(per_rep[BARE]) / min(per_rep[BARE]) - 1
    noisy = max(foreign) > args.quiet_cores or spread > 0.25
    print()
    print(table(["variant", "us/step", "rep range", "vs bare", "vs Lightning minimal"], rows,
                f"{case.name} on {args.device}, torch threads {torch.get_num_threads()} ({case.hp}, "
                f"{steps} steps/epoch x {epochs - 1} measured epochs x {args.reps} reps; "
                f"bare varied {spread * 100:.0f} % across reps)"))
    print("  " + quiet_note(foreign, args.quiet_cores), flush=True)
    print()
    return over, noisy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the tiny MLP and small CNN; cuda: the launch-bound and compute-bound GPU models")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions of every variant (default 5)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs per run, the first not measured (default 21 on CPU, 11 on CUDA)")
    p.add_argument("--quick", action="store_true",
                   help="by default 2 repetitions of 4 epochs, retries for 20 s at most: ~1-2 min on CPU")
    p.add_argument("--only", choices=[c.name.split()[-1].lower() for c in CPU_CASES + GPU_CASES], action="append",
                   help="just this model (repeatable; default: both of the device's), e.g. --only cnn")
    p.add_argument("--seed", type=int, default=0)
    add_rerun_options(p)
    args = p.parse_args()
    if args.epochs is not None and args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch is warm-up, not measured")
    if args.quick:
        args.reps, args.epochs, args.retry_budget_s = args.reps or 2, args.epochs or 4, min(args.retry_budget_s, 20.0)
    args.reps = args.reps or 5
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = REPO / "runs" / f"bench-vs-lightning-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True)
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    if args.only:
        cases = [c for c in cases if c.name.split()[-1].lower() in args.only]
        if not cases:
            p.error(f"--only {' '.join(args.only)}: not a model of --device {args.device} (cpu: mlp, cnn; "
                    f"cuda: launch-bound, compute-bound)")
    for case in cases:
        if case.target == GPU_TARGET:
            case.hp["device"] = args.device
    print(machine_line() + f", Lightning {L.__version__}"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(f"work dir {workdir} (console's and Lightning's output in output.log)", flush=True)
    measure = Measurer(args)
    verdicts = []
    try:
        run = runners(args, workdir)
        for variant in VARIANTS:  # warm-up: imports, page cache, the plugins' first start; nothing recorded
            run[variant](cases[0], 2)
        for case in cases:
            over, noisy = bench_case(case, args, run, measure)
            for check in CHECKS:
                if case.name in check.cases:
                    value, limit = over[check.variant], check.limit(over)
                    verdicts.append(f"{'PASS' if value <= limit else 'FAIL'}  {case.name}, {check.label}: "
                                    f"{value * 100:+.1f} % (limit {limit * 100:+.1f} %)"
                                    + ("  [noisy runs: not conclusive]" if noisy else ""))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("acceptance (issue #15), overheads over bare, paired:")
    print("\n".join(verdicts))
    print(measure.closing_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
