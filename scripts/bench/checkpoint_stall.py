"""What a checkpoint costs the training loop: the snapshot copy, vs. saving inline, vs. a bare copy.

    .venv/bin/python scripts/bench/checkpoint_stall.py          # ~5 min on 2 cores, ~5 GB of RAM
    .venv/bin/python scripts/bench/checkpoint_stall.py --dir /other/disk --steps 60 --every 3
    python scripts/bench/checkpoint_stall.py --device cuda --batch 64 --steps 1200 --every 300   # a GPU's state

The model: --layers Linear(--width, --width) layers with ReLU between (6 x 4096^2 = 100.7 M float32
parameters), SGD with momentum, so the optimizer state is one more copy of the parameters: ~805 MB
of state per checkpoint. The target is `build` in this file, run by the real kernel.

(d) Throughput. Pairs of real runs (run_training, in this process; the plugin is its own process),
    --pairs of them interleaved (A B, B A, ...): one without checkpoints (no plugin), one with the
    built-in checkpoint plugin attached and a snapshot due every --every steps; each pair's ratio,
    and their median, which the target is checked against. Steps/s come from the journal's
    end_training_batch timestamps (the first --warmup steps left out); "during a persist" counts the
    steps that ran entirely between a save_checkpoint and its checkpoint_saved, i.e. while the
    plugin was writing in the background. Then one run with a snapshot due every --overload-every
    steps, more often than the plugin can write: snapshots are skipped, never waited for.
(a) The stall. In the runs with checkpoints, Loop._checkpoint (training_state() + the copy into a snapshot buffer
    + publishing) is timed as the loop experiences it: each call's wall time. A run's first snapshot
    uses buffers a preparer process made after the first step (it waits for that process if a
    snapshot comes sooner: the every-3-steps run). Shown apart: that first one, the first use of the
    other buffer, and the steady state (a reused buffer), which is what every later checkpoint costs.
    (a') The same Checkpointer.take on a real SnapshotBuffers with nothing else running, as a control.
(b) Inline: torch.save of the same state to a file in the run directory's file system, flush, fsync:
    what a training loop that saves for itself stalls for.
(c) A bare copy of the same tensors into preallocated buffers (torch.empty_like, then copy_): the
    floor for any snapshot. With --device cuda: into pinned host memory (torch.empty(pin_memory=True)), every
    copy queued, then one synchronize; (c') the same into pageable memory, each copy waited for.
(e) One level down, where throughput goes while a persist runs: the same training step timed alone,
    and next to a process running the checkpoint plugin's own persist path in a loop (read_snapshot +
    write_atomically of the same snapshot, to the same disk), once at training's priority and torch's
    default threads, then as each of the plugin's `priority` settings sets its writing thread
    (plugins/checkpoint.py yield_to_training): nice 10 ("low"), nice 19 ("background", the default),
    SCHED_IDLE ("idle"). Started as the supervisor starts plugins: a process group of its own in the
    bench's session. Interleaved rounds (alone, each variant; --ab-rounds), medians per variant.
Training runs as the kernel runs it: with [run] keep_freed_memory (kernel/memory.py); --release-memory
runs everything with glibc's defaults instead, where every step page-faults its gradients in afresh.
Targets: stall <= 1.5x the bare copy; inline save + fsync >= 5x the stall; throughput while the
plugin persists >= 0.9x the run without checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, CpuWatch, filesystem_of, machine_line, table, wait_quiet  # noqa: E402
from trainbus.kernel import TrainingSpec  # noqa: E402
from trainbus.kernel.checkpointing import Checkpointer  # noqa: E402
from trainbus.kernel.config import RunConfig  # noqa: E402
from trainbus.kernel.plugin_names import resolve_plugin  # noqa: E402
from trainbus.kernel.journal import read_events  # noqa: E402
from trainbus.kernel.loop import Loop  # noqa: E402
from trainbus.kernel.memory import keep_freed_memory  # noqa: E402
from trainbus.kernel.session import run_training  # noqa: E402
from trainbus.kernel.buffer_files import snapshot_directories  # noqa: E402
from trainbus.kernel.snapshot import SnapshotBuffers  # noqa: E402

TARGET = f"{Path(__file__).resolve()}:build"
MB = 1e6


# -- the model ------------------------------------------------------------------------------------

def build(hyperparameters: dict) -> TrainingSpec:
    """layers x Linear(width, width), SGD with momentum, `steps` batches of random data, one epoch."""
    width, layers = int(hyperparameters["width"]), int(hyperparameters["layers"])
    batch, steps = int(hyperparameters["batch_size"]), int(hyperparameters["steps"])
    modules: list[nn.Module] = []
    for i in range(layers):
        modules += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
    model = nn.Sequential(*modules)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * batch, width, generator=g),
                         torch.randint(0, width, (steps * batch,), generator=g))
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9),
                        loss_fn=nn.functional.cross_entropy, train_loader=DataLoader(data, batch_size=batch),
                        epochs=1, hyperparameters=dict(hyperparameters))


def hyperparameters(args) -> dict:
    return {"width": args.width, "layers": args.layers, "batch_size": args.batch, "steps": args.steps}


# -- timing the loop's checkpoints in a real run ----------------------------------------------------

class StallClock:
    """Wraps Loop._checkpoint and SnapshotBuffers.take in this process: each call's wall time, and
    which buffer its snapshot went into: "first" (the run's first snapshot, into buffers a preparer
    process made beforehand, or allocated by this take when none did), "fresh" (a later take that
    allocated: a state that grew), "prepared" (first use of the other buffer), "reused", or
    "skipped" (both busy); the run's last checkpoint apart, as "last": training is over by then, so
    it waits for a buffer to be freed (Loop._checkpoint's `last`), which stalls no step."""

    def __init__(self):
        self.calls: list[dict] = []  # {"s": seconds, "kind": ...}
        self._kind: str | None = None
        self._used: set[int] = set()
        self._real_checkpoint, self._real_take = Loop._checkpoint, SnapshotBuffers.take

    def __enter__(self):
        clock = self

        def take(buffers, state, is_free):
            before = list(buffers._buffers)
            snapshot = clock._real_take(buffers, state, is_free)
            if snapshot is not None:
                buffer = buffers._buffers[snapshot.slot]
                clock._kind = ("first" if not clock._used else "fresh" if buffer is not before[snapshot.slot]
                               else "reused" if id(buffer) in clock._used else "prepared")
                clock._used.add(id(buffer))
            return snapshot

        def checkpoint(loop, *args, **kwargs):  # Loop._checkpoint's own arguments, whatever they become
            clock._kind = None  # stays None when no snapshot is taken: both buffers busy
            started = time.perf_counter()
            clock._real_checkpoint(loop, *args, **kwargs)
            kind = clock._kind or "skipped"
            clock.calls.append({"s": time.perf_counter() - started, "kind": "last" if kwargs.get("last") else kind})

        SnapshotBuffers.take, Loop._checkpoint = take, checkpoint
        return self

    def __exit__(self, *exc):
        Loop._checkpoint, SnapshotBuffers.take = self._real_checkpoint, self._real_take


def run(args, workdir: Path, steps: int, every: int) -> dict:
    """One real run (every=0: no checkpoint plugin); its journal read back into step times, persists, stalls."""
    plugins = [resolve_plugin("checkpoint", {"save_top_k": 1, "save_last": False})] if every else []
    cfg = RunConfig(target=TARGET, epochs=1, seed=0, device=args.device, runs_dir=str(workdir / "runs"),
                    plugins=plugins,
                    hyperparameters={**hyperparameters(args), "steps": steps}, checkpoint_every_n_epochs=0,
                    checkpoint_every_n_steps=every, drain_timeout_s=300, keep_freed_memory=not args.release_memory)
    wait_quiet(args.quiet_cores, args.quiet_wait_s)
    watch, children0 = CpuWatch(), _children_cpu_s()
    with StallClock() as clock:
        result = run_training(cfg)
    foreign = watch.stop()
    if result.status != "completed":
        raise RuntimeError(f"run failed: {result.error}")
    events = read_events(result.run_dir)
    ends = [e.ts for e in events if e.type == "end_training_batch"]
    steps = [(a, b) for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:])]  # (start, end) of each step
    saves = {e.seq: e for e in events if e.type == "save_checkpoint"}
    persists = [(saves[e.data["seq"]].ts, e.ts) for e in events if e.type == "checkpoint_saved"]
    during = [(a, b) for a, b in steps if any(s <= a and b <= t for s, t in persists)]
    outside = [(a, b) for a, b in steps if not any(a < t and s < b for s, t in persists)]
    out = {
        "run_dir": result.run_dir, "foreign_cores": foreign, "steps": steps, "during": during, "outside": outside,
        "saved": len(persists), "skipped": sum(1 for e in events if e.type == "checkpoint_skipped"),
        "failed": [e.data.get("reason") for e in events if e.type == "checkpoint_failed"],
        "persist_s": [t - s for s, t in persists], "stalls": clock.calls,
        "plugin_cpu_s": _children_cpu_s() - children0,  # the plugin process, reaped by the run
        "sizes": [e.data["size"] for e in events if e.type == "checkpoint_saved"],
        "plugin": result.plugins.get("checkpoint"), "every": every,
    }
    return out


def _children_cpu_s() -> float:
    t = os.times()
    return t.children_user + t.children_system


def rate(steps: list[tuple[float, float]]) -> float | None:
    """Steps per second over these steps."""
    total = sum(b - a for a, b in steps)
    return len(steps) / total if steps and total > 0 else None


# -- the same state, alone: copy, take, inline save --------------------------------------------------

def trained_state(args) -> tuple[Loop, list[torch.Tensor]]:
    """A model after one SGD step (momentum buffers exist), the loop holding it, and every tensor of its state."""
    torch.manual_seed(0)
    spec = build(hyperparameters(args))
    device = torch.device(args.device)
    spec.model.to(device)  # in place: the optimizer's parameters are the moved ones
    inputs, targets = (t.to(device) for t in next(iter(spec.train_loader)))
    spec.loss_fn(spec.model(inputs), targets).backward()
    spec.optimizer.step()
    spec.optimizer.zero_grad(set_to_none=True)
    loop = Loop(spec, bus=None, device=device)
    tensors: list[torch.Tensor] = []
    _collect(loop.training_state(epoch_complete=False), tensors)
    return loop, tensors


def _collect(obj, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect(v, out)


def bare_copy(tensors: list[torch.Tensor], reps: int, pinned: bool = False) -> list[float]:
    """Each rep's time to copy the tensors into host buffers made and touched beforehand; pinned (GPU tensors): the
    copies queued without waiting, then one synchronize, the fastest a GPU's state reaches host memory."""
    destination = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in tensors]
    times = []
    for rep in range(reps + 1):  # the first: the pages faulted in, not counted (preallocated means touched before)
        started = time.perf_counter()
        for d, t in zip(destination, tensors):
            d.copy_(t, non_blocking=pinned)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - started)
    return times


class _AlwaysFree(Checkpointer):
    """Checkpointer with no plugin and no bus: every slot free, always a persister."""

    def __init__(self, buffers: SnapshotBuffers):
        super().__init__(buffers, peers=None, every_n_epochs=0, every_n_steps=1, directories=[])

    def has_persister(self) -> bool:
        return True

    def slot_free(self, slot: int) -> bool:
        return True


def checkpointer_take(loop: Loop, workdir: Path, reps: int) -> tuple[list[float], list[float]]:
    """(first takes into fresh buffers, later takes into reused ones): Checkpointer.take of training_state()."""
    buffers = SnapshotBuffers(f"bench-{os.getpid()}", snapshot_directories(workdir))
    checkpointer = _AlwaysFree(buffers)
    fresh, reused = [], []
    try:
        for i in range(reps + 1):
            started = time.perf_counter()
            snapshot = checkpointer.take(loop.training_state(epoch_complete=False))
            (fresh if i == 0 else reused).append(time.perf_counter() - started)
            assert snapshot is not None
    finally:
        buffers.close()
    return fresh, reused


def inline_save(loop: Loop, directory: Path, reps: int) -> list[float]:
    """torch.save of training_state() to a file, flush and fsync: what a loop saving for itself waits for."""
    path = directory / "inline.pt"
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(loop.training_state(epoch_complete=False), f)
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - started)
        path.unlink()
    return times


# -- one level down: a persister next to training -----------------------------------------------------

PERSIST_VARIANTS = {
    "plain": "persister at training's priority, torch's default threads",
    "low": "persister at nice 10, 1 thread (priority = \"low\")",
    "background": "persister at nice 19, 1 thread (priority = \"background\", the default)",
    "idle": "persister at SCHED_IDLE, 1 thread (priority = \"idle\")",
}


def persist_loop(snapshot_file: Path, variant: str, directory: Path) -> None:
    """The checkpoint plugin's persist path, over and over, until killed (a child process of the bench)."""
    from trainbus.plugins._durable_files import write_atomically
    from trainbus.plugins._snapshot_reader import read_snapshot
    from trainbus.plugins.checkpoint import yield_to_training
    from trainbus.proto import unpack

    data = unpack(snapshot_file.read_bytes())
    if variant != "plain":
        os.nice(10)  # what the supervisor gives every plugin
        yield_to_training(variant)
    while True:
        snapshot = read_snapshot(data)
        write_atomically(snapshot.state, directory / "persist-loop.pt", before_replace=snapshot.check)
        del snapshot


def persister_ab(loop: Loop, workdir: Path, steps: int, rounds: int,
                 keep_memory: bool) -> list[tuple[str, float, float, float]]:
    """(variant, steps/s of the training step, persister cores, other processes' cores): rounds of alone, each
    variant; each variant's medians over the rounds."""
    from trainbus.proto import pack

    buffers = SnapshotBuffers(f"bench-ab-{os.getpid()}", snapshot_directories(workdir))
    snapshot = _AlwaysFree(buffers).take(loop.training_state(epoch_complete=False))
    snapshot_file = workdir / "snapshot.msgpack"
    snapshot_file.write_bytes(pack({**snapshot.event_data(), "reason": "step", "metrics": {}}))
    spec = loop.spec
    inputs, targets = next(iter(spec.train_loader))

    def step_rate(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            spec.optimizer.zero_grad(set_to_none=True)
            spec.loss_fn(spec.model(inputs), targets).backward()
            spec.optimizer.step()
        return n / (time.perf_counter() - started)

    measured: dict[str, list[tuple[float, float, float]]] = {}
    with keep_freed_memory(keep_memory), contextlib.closing(buffers):  # training as the kernel runs it
        step_rate(10)  # warm: the allocator has settled (kernel/memory.py)
        for _ in range(rounds):
            for variant in ["alone", *PERSIST_VARIANTS]:
                proc = None
                if variant != "alone":
                    proc = subprocess.Popen([sys.executable, __file__, "--persist-loop", str(snapshot_file), variant,
                                             str(workdir)], process_group=0)  # as the supervisor starts plugins
                    time.sleep(3.0)  # past its imports, into the loop
                    cpu0, t0 = _cpu_of(proc.pid), time.monotonic()
                watch = CpuWatch([proc.pid] if proc else [])
                value = step_rate(steps)
                foreign = watch.stop()
                share = (_cpu_of(proc.pid) - cpu0) / (time.monotonic() - t0) if proc else 0.0
                if proc:
                    proc.kill()
                    proc.wait()
                measured.setdefault(variant, []).append((value, share, foreign))
    return [(variant, *(statistics.median(m[i] for m in ms) for i in range(3))) for variant, ms in measured.items()]


def _cpu_of(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


# -- report -----------------------------------------------------------------------------------------

STALL_KINDS = {"reused": "reused buffer", "first": "the run's first snapshot",
               "prepared": "first use of the other buffer", "fresh": "a grown state: buffers allocated",
               "skipped": "skipped: both buffers busy", "last": "the run's last, after training: waits for a buffer"}


def _throughput_rows(r: dict, base_rate: float, indent: str) -> list[list]:
    rows = []
    for label, steps in [(f"snapshot due every {r['every']} steps: all steps", r["steps"]),
                         ("... steps entirely during a background persist", r["during"]),
                         ("... steps with no persist in flight", r["outside"])]:
        value = rate(steps)
        rows.append([indent + label, len(steps), f"{value:.3f}" if value else "-",
                     f"{value / base_rate:.3f}x" if value and base_rate else "-", f"{r['foreign_cores']:.2f}"])
    return rows


def ms(xs: list[float]) -> tuple[str, str, str]:
    if not xs:
        return "-", "-", "-"
    return f"{statistics.median(xs) * 1e3:.1f}", f"{min(xs) * 1e3:.1f}", f"{max(xs) * 1e3:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=REPO / "runs", help="where run dirs and the inline file go (its disk)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model trains (cuda: (e) skipped)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--baseline-steps", type=int, default=40, help="steps of the run without checkpoints")
    p.add_argument("--steps", type=int, default=160, help="steps of the run with checkpoints")
    p.add_argument("--pairs", type=int, default=3,
                   help="(d): runs without and with checkpoints, interleaved, this many of each")
    p.add_argument("--every", type=int, default=40, help="a snapshot due every N steps in that run")
    p.add_argument("--overload-steps", type=int, default=30,
                   help="steps of a run whose persister never idles (0: skip)")
    p.add_argument("--overload-every", type=int, default=3, help="a snapshot due every N steps in that run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    p.add_argument("--reps", type=int, default=9, help="repetitions of the bare copy and of Checkpointer.take")
    p.add_argument("--inline-reps", type=int, default=2, help="repetitions of the inline torch.save + fsync")
    p.add_argument("--quiet-cores", type=float, default=0.3, help="before each run, wait until others use <= this")
    p.add_argument("--quiet-wait-s", type=float, default=20.0)
    p.add_argument("--ab-steps", type=int, default=10, help="steps per measurement in (e); 0: skip (e)")
    p.add_argument("--ab-rounds", type=int, default=3, help="rounds of (e): alone and every variant, interleaved")
    p.add_argument("--keep", action="store_true", help="keep the bench's run directories")
    p.add_argument("--release-memory", action="store_true",
                   help="train with [run] keep_freed_memory = false (glibc's defaults: every large tensor page-faults)")
    p.add_argument("--persist-loop", nargs=3, help=argparse.SUPPRESS)  # (e)'s child: snapshot file, variant, dir
    args = p.parse_args()
    if args.persist_loop:
        persist_loop(Path(args.persist_loop[0]), args.persist_loop[1], Path(args.persist_loop[2]))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda: no CUDA device is visible to torch {torch.__version__}; run it on a machine "
              f"with one, or use --device cpu", file=sys.stderr)
        return 2
    workdir = args.dir.resolve() / f"bench-checkpoint-stall-{os.getpid()}"
    workdir.mkdir(parents=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(machine_line())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"memory: {mem:.1f} GiB; run dirs and inline file on {filesystem_of(workdir)}; "
          f"snapshot buffers in /dev/shm ({filesystem_of(Path('/dev/shm'))}); "
          f"training on {args.device} with keep_freed_memory = {str(not args.release_memory).lower()}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    started = time.monotonic()
    try:
        baselines, mains = [], []
        for i in range(args.pairs):  # A B, B A, A B, ...: drift of the machine's speed hits both alike
            for every in ([0, args.every] if i % 2 == 0 else [args.every, 0]):
                r = run(args, workdir, args.steps if every else args.baseline_steps, every)
                (mains if every else baselines).append(r)
        runs = list(mains)
        if args.overload_steps:
            runs.append(run(args, workdir, args.overload_steps, args.overload_every))
        wait_quiet(args.quiet_cores, args.quiet_wait_s)
        watch = CpuWatch()
        loop, tensors = trained_state(args)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        params = sum(p.numel() for p in loop.spec.model.parameters())
        cuda = args.device == "cuda"
        copy_s = bare_copy(tensors, args.reps, pinned=cuda)
        pageable_s = bare_copy(tensors, args.reps) if cuda else []
        take_fresh, take_reused = checkpointer_take(loop, workdir, args.reps)
        inline_s = inline_save(loop, workdir, args.inline_reps)
        standalone_foreign = watch.stop()
        del tensors
        ab = persister_ab(loop, workdir, args.ab_steps, args.ab_rounds, not args.release_memory) \
            if args.ab_steps and not cuda else []  # (e) is about CPU training and a persister sharing cores
        del loop
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    noise = [("a run without checkpoints", r["foreign_cores"]) for r in baselines]
    noise += [(f"a run with a snapshot every {r['every']} steps", r["foreign_cores"]) for r in runs]
    noise += [("(c), (a'), (b)", standalone_foreign)]
    steady = [c["s"] for r in mains for c in r["stalls"] if c["kind"] == "reused"]
    firsts = [c["s"] for r in mains for c in r["stalls"] if c["kind"] == "first"]
    copy_med, inline_med = statistics.median(copy_s), statistics.median(inline_s)
    stall_med = statistics.median(steady) if steady else None

    def vs(xs, ref):
        return f"{statistics.median(xs) / ref:.2f}x" if xs and ref else "-"

    print()
    sizes = [x for r in runs for x in r["sizes"]]
    print(f"state per checkpoint: {state_bytes / MB:.1f} MB ({params / 1e6:.1f} M float32 parameters + SGD momentum)"
          + (f"; checkpoint file {statistics.median(sizes) / MB:.1f} MB" if sizes else ""))
    rows = [[f"(c) bare copy into preallocated{' pinned' if cuda else ''} buffers", len(copy_s), *ms(copy_s), "1.00x",
             vs(copy_s, stall_med), f"{state_bytes / copy_med / 1e9:.1f} GB/s"]]
    if pageable_s:
        rows.append(["(c') the same into pageable buffers", len(pageable_s), *ms(pageable_s), vs(pageable_s, copy_med),
                     vs(pageable_s, stall_med), f"{state_bytes / statistics.median(pageable_s) / 1e9:.1f} GB/s"])
    for every in sorted({r["every"] for r in runs}, reverse=True):
        stalls = [c for r in runs if r["every"] == every for c in r["stalls"]]
        groups = [(label, [c["s"] for c in stalls if c["kind"] == kind]) for kind, label in STALL_KINDS.items()]
        for label, xs in groups:
            rows.append([f"(a) loop stall, every {every} steps: {label}", len(xs), *ms(xs), vs(xs, copy_med),
                         vs(xs, stall_med), f"{state_bytes / statistics.median(xs) / 1e9:.1f} GB/s"
                         if xs and label == "reused buffer" else ""])
    rows += [["(a') Checkpointer.take alone: reused buffer", len(take_reused), *ms(take_reused),
              vs(take_reused, copy_med), vs(take_reused, stall_med), ""],
             ["(a') Checkpointer.take alone: fresh buffer", len(take_fresh), *ms(take_fresh),
              vs(take_fresh, copy_med), vs(take_fresh, stall_med), ""],
             ["(b) inline torch.save + fsync, same disk", len(inline_s), *ms(inline_s), vs(inline_s, copy_med),
              vs(inline_s, stall_med), f"{state_bytes / inline_med / 1e9:.2f} GB/s"]]
    print(table(["what the training loop waits for", "n", "median ms", "min ms", "max ms", "x copy", "x stall",
                 "rate"], rows,
                f"Per checkpoint (x stall: vs. the median reused-buffer stall, every {args.every} steps)"))
    print()
    rows, ratios = [], []
    for i, (base, r) in enumerate(zip(baselines, mains), 1):
        base_rate = rate(base["steps"])
        rows.append([f"pair {i}: no checkpoints (no plugin)", len(base["steps"]), f"{base_rate:.3f}", "1.000x",
                     f"{base['foreign_cores']:.2f}"])
        rows += _throughput_rows(r, base_rate, "   ")
        during = rate(r["during"])
        if during and base_rate:
            ratios.append(during / base_rate)
    base_rate = statistics.median(rate(b["steps"]) for b in baselines)
    for r in runs[len(mains):]:
        rows.append([f"no checkpoints: median of the {len(baselines)} runs above", "", f"{base_rate:.3f}",
                     "1.000x", ""])
        rows += _throughput_rows(r, base_rate, "")
    print(table(["run", "steps", "steps/s", "x no checkpoints", "other procs' cores"], rows,
                f"Training throughput ({args.layers} x Linear({args.width}, {args.width}), batch {args.batch}, "
                f"first {args.warmup} steps of a run not counted; pairs interleaved A B, B A, ...)"))
    during_ratio = statistics.median(ratios) if ratios else None
    if ratios:
        print(f"steps entirely during a persist, x the same pair's run without checkpoints: "
              f"{', '.join(f'{x:.3f}' for x in ratios)}; median {during_ratio:.3f}x")
    for r in runs:
        persist, plugin = r["persist_s"], r["plugin"] or {}
        print(f"every {r['every']} steps: {r['saved']} saved, {r['skipped']} skipped (both buffers busy), "
              f"{len(r['failed'])} failed, plugin restarts {plugin.get('restarts')}"
              + (f"; save_checkpoint -> checkpoint_saved median {statistics.median(persist):.2f} s "
                 f"(min {min(persist):.2f}, max {max(persist):.2f}); plugin process CPU {r['plugin_cpu_s']:.1f} s, "
                 f"{r['plugin_cpu_s'] / max(1, r['saved']):.2f} s per checkpoint" if persist else ""))

    if ab:
        alone = next(v for name, v, _, _ in ab if name == "alone")
        rows = [[name if name == "alone" else PERSIST_VARIANTS[name], f"{v:.3f}", f"{v / alone:.3f}x",
                 f"{share:.2f}" if name != "alone" else "-", f"{foreign:.2f}"] for name, v, share, foreign in ab]
        noise += [(f"(e) {name}", foreign) for name, _, _, foreign in ab]
        print()
        print(table(["the training step ...", "steps/s", "x alone", "persister cores", "other procs' cores"], rows,
                    f"(e) One level down: the same step, {args.ab_steps} steps a measurement, next to the plugin's "
                    f"persist path running in a loop; medians of {args.ab_rounds} interleaved rounds"))

    checks = [
        ("stall <= 1.5x the bare copy", stall_med is not None and stall_med <= 1.5 * copy_med,
         f"{stall_med / copy_med:.2f}x" if stall_med else "no reused-buffer stall measured"),
        ("inline torch.save + fsync >= 5x the stall", stall_med is not None and inline_med >= 5 * stall_med,
         f"{inline_med / stall_med:.1f}x" if stall_med else "-"),
        ("the run's first snapshot <= 2x a later one (median reused-buffer stall; worst first)",
         bool(firsts) and stall_med is not None and max(firsts) <= 2 * stall_med,
         f"{max(firsts) / stall_med:.2f}x" if firsts and stall_med else "not measured"),
        ("throughput during a persist >= 0.9x no checkpoints (median of the pairs)",
         during_ratio is not None and during_ratio >= 0.9,
         f"{during_ratio:.3f}x" if during_ratio is not None else "no step ran entirely during a persist"),
    ]
    print()
    for name, met, value in checks:
        print(f"target (every {args.every} steps): {name}: {value} -> {'met' if met else 'MISSED'}")
    noisy = [f"{what} ({cores:.2f} cores)" for what, cores in noise if cores > args.quiet_cores]
    if noisy:
        print(f"NOISY: other processes used more than {args.quiet_cores} cores during: {', '.join(noisy)}; "
              f"ratios involving those are not trustworthy: rerun on a quiet machine")
    print(f"\nbench wall time {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
