"""What a plugin process costs while a run trains: its CPU and wake-ups per second, per thread.

On a 2-core box that torch's OpenMP threads fill, every millisecond a plugin runs is taken from training
(docs/benchmarks.md, "Side by side with PyTorch Lightning"), so this is the figure to keep down. It is read
from the kernel's own accounting (/proc/PID/task/TID/schedstat: nanoseconds on a CPU; voluntary context
switches: sleeps, i.e. wake-ups), so it holds on a noisy host where wall-clock step times do not.

For each plugin: one run of the digits demo's small CNN (or the tiny MLP) with that plugin alone, long enough
to sample a steady window after start-up; the plugin's process is found among our children, each of its
threads sampled at the start and the end of the window. Per step = per second / the run's steps per second
in that window (from the journal).

    .venv/bin/python scripts/bench/plugin_cost.py                      # console, metrics_log; small CNN
    .venv/bin/python scripts/bench/plugin_cost.py --model mlp --plugins console,metrics_log,cpu_monitor
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import machine_line, table  # noqa: E402
from _runs import trainbus_run  # noqa: E402

from trainbus.kernel.plugin_names import resolve_plugin  # noqa: E402


def plugin_pid(target: str, timeout_s: float = 60.0) -> int:
    """The pid of our child process running `target` (python -m trainbus.sdk TARGET)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid() and target in Path(stat).with_name("cmdline").read_text():
                    return int(Path(stat).parent.name)
            except (OSError, ValueError, IndexError):
                continue
        time.sleep(0.2)
    raise RuntimeError(f"no child process runs {target} after {timeout_s:.0f} s")


def thread_sample(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, ns on a CPU, voluntary context switches) for each thread of pid."""
    out = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            ns = int(Path(task, "schedstat").read_text().split()[0])
            status = Path(task, "status").read_text()
            sleeps = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
            out[int(Path(task).name)] = (Path(task, "comm").read_text().strip(), ns, sleeps)
        except (OSError, IndexError, ValueError):
            continue
    return out


def measure(name: str, model: str, epochs: int, warm_s: float, window_s: float, work: Path) -> dict:
    plugin = resolve_plugin(name, {})
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        stamps=trainbus_run({"model": model}, epochs, 0, [plugin], work / "runs", work / f"{name}.log")[0]))
    runner.start()
    pid = plugin_pid(plugin.target)
    time.sleep(warm_s)
    t0, before = time.time(), thread_sample(pid)
    time.sleep(window_s)
    t1, after = time.time(), thread_sample(pid)
    runner.join()
    if not after or result["stamps"][-1][-1] < t1:
        raise RuntimeError(f"{name}: the run ended before the window closed; raise --epochs")
    stamps = [ts for epoch in result["stamps"] for ts in epoch]
    steps_per_s = sum(1 for ts in stamps if t0 <= ts <= t1) / (t1 - t0)
    threads = []
    for tid, (comm, ns, sleeps) in sorted(after.items()):
        if tid in before:
            cpu_ms_s = (ns - before[tid][1]) / 1e6 / (t1 - t0)
            threads.append((comm, cpu_ms_s, (sleeps - before[tid][2]) / (t1 - t0)))
    return {"name": name, "threads": threads, "steps_per_s": steps_per_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plugins", default="console,metrics_log", help="comma-separated plugin names, each run alone")
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--epochs", type=int, help="per run, enough to outlast start-up and the window (cnn 150, mlp 400)")
    p.add_argument("--warm-s", type=float, default=3.0, help="after the plugin starts, before the window")
    p.add_argument("--window-s", type=float, default=8.0)
    args = p.parse_args()
    args.epochs = args.epochs or (150 if args.model == "cnn" else 400)
    work = Path("runs") / f"bench-plugin-cost-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    rows = []
    for name in args.plugins.split(","):
        m = measure(name, args.model, args.epochs, args.warm_s, args.window_s, work)
        total = sum(cpu for _, cpu, _ in m["threads"])
        for comm, cpu, wakes in m["threads"]:
            if cpu or wakes:
                rows.append((f"{name}: {comm}", f"{cpu:.2f}", f"{wakes:.1f}", ""))
        rows.append((f"{name}: all threads", f"{total:.2f}", f"{sum(w for *_, w in m['threads']):.1f}",
                     f"{total * 1000 / m['steps_per_s']:.1f}"))
        print(f"{name}: {m['steps_per_s']:.0f} steps/s in the window", flush=True)
    print(table(["plugin process, thread", "CPU ms/s", "wake-ups/s", "CPU us/step"], rows,
                title=f"\n{args.model}: each plugin alone, {args.window_s:.0f} s window after {args.warm_s:.0f} s"))


if __name__ == "__main__":
    main()
