"""The garbage collector's pauses in a `trainbus run` kernel: each generation's collections, their total and longest
time, and where the full ones fell (before training, during it, at exit), measured with gc.callbacks in the kernel
process itself.

    .venv/bin/python scripts/bench/gc_pauses.py [--epochs 5] [--plugins console,metrics_log]

Figures: docs/benchmarks.md, "The garbage collector's pauses".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, machine_line

# Runs as the kernel's __main__: a gc.callbacks probe, then the CLI as `trainbus run` runs it. Its report is
# written by an exit handler, which the kernel's exit runs (proto.process.exit_without_teardown).
PROBE = """
import atexit, gc, json, runpy, sys, time
seen, started = [], {}
def probe(phase, info):
    if phase == "start":
        started["t"] = time.perf_counter()
    else:
        seen.append((info["generation"], time.time(), (time.perf_counter() - started["t"]) * 1000))
gc.callbacks.append(probe)
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps(seen)))
sys.argv = ["trainbus"] + sys.argv[2:]
runpy.run_module("trainbus.kernel.cli", run_name="__main__")
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--plugins", default="console,metrics_log")
    args = p.parse_args()
    from trainbus.kernel.journal import read_events

    with tempfile.TemporaryDirectory() as tmp:
        report, runs = Path(tmp) / "gc.json", Path(tmp) / "runs"
        subprocess.run([sys.executable, "-c", PROBE, str(report), "run", "--epochs", str(args.epochs), "--plugins",
                        args.plugins, "--runs-dir", str(runs)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        seen = json.loads(report.read_text())
        events = list(read_events(next(d for d in runs.iterdir() if d.is_dir())))
    start = next(e.ts for e in events if e.type == "start_training_session")
    end = next(e.ts for e in events if e.type == "end_training_session")
    print(machine_line())
    print(f"digits demo, {args.epochs} epochs, plugins {args.plugins}: training {end - start:.1f} s")
    for generation in (0, 1, 2):
        times = [ms for g, _, ms in seen if g == generation]
        print(f"gen{generation}: {len(times):4d} collections, {sum(times):6.0f} ms in all, "
              f"longest {max(times, default=0):5.1f} ms")
    for _, ts, ms in (s for s in seen if s[0] == 2):
        when = "before training" if ts < start else "during training" if ts <= end else "after training (exit)"
        print(f"  full collection {ms:6.1f} ms, {when}")


if __name__ == "__main__":
    main()
