"""A plugin process's start and end while training runs: kill -9 the checkpoint plugin (how long until its
replacement says hello and its first checkpoint lands, and the checkpoints skipped meanwhile, by reason), and a plugin
whose setup raises (how long from its last words to its exit).

    .venv/bin/python scripts/bench/plugin_restart.py [--kills 3] [--step-sleep-s 0]

`--step-sleep-s 0` trains flat out beside the plugins (both cores busy); 0.2 leaves the box nearly idle.
Figures: docs/benchmarks.md, "A plugin's restart while training runs".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, machine_line, median, table
from trainbus.kernel.journal import read_events

FIXTURES = REPO / "tests" / "fixture_targets.py"
CONFIG = """[run]
target = "{target}:paced_digits"
epochs = 200
checkpoint_every_n_epochs = 0
checkpoint_every_n_steps = 5
ready_timeout_s = 120
[hyperparameters]
step_sleep_s = {step_sleep_s}
[plugins.checkpoint]
[plugins.setup_fails]
target = "_failing_setup:FailingSetup"
"""


def events_of(run_dir: Path, type_: str, plugin: str | None = None) -> list:
    try:
        events = read_events(run_dir)
    except (OSError, ValueError):
        return []
    return [e for e in events if e.type == type_ and (plugin is None or e.data.get("plugin") == plugin)]


def wait_for(what, timeout_s: float = 300.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.05)
    raise TimeoutError("nothing came")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--step-sleep-s", type=float, default=0.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    (work / "run.toml").write_text(CONFIG.format(target=FIXTURES, step_sleep_s=args.step_sleep_s))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    kernel = subprocess.Popen([sys.executable, "-m", "trainbus.kernel.cli", "run", "-c", str(work / "run.toml"),
                               "--runs-dir", str(work / "runs")], cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(machine_line())
    try:
        run_dir = wait_for(lambda: next((d for d in (work / "runs").glob("*") if (d / "config.json").is_file()), None))
        hellos, first_saves, no_hello, buffers_busy = [], [], [], []
        for _ in range(args.kills):
            pid = wait_for(lambda: [e for e in events_of(run_dir, "plugin_ready", "checkpoint")])[-1].data["pid"]
            wait_for(lambda: events_of(run_dir, "checkpoint_saved", "checkpoint") and
                     events_of(run_dir, "checkpoint_saved")[-1].ts > time.time() - 30)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            started = wait_for(lambda: [e for e in events_of(run_dir, "plugin_restarted", "checkpoint")
                                        if e.ts >= killed_at])[0]
            ready = wait_for(lambda: [e for e in events_of(run_dir, "plugin_ready", "checkpoint")
                                      if e.data["pid"] == started.data["pid"]])[-1]
            saved = wait_for(lambda: [e for e in events_of(run_dir, "checkpoint_saved", "checkpoint")
                                      if e.ts > ready.ts])[0]
            hellos.append(ready.ts - started.ts)
            first_saves.append(saved.ts - started.ts)
            skipped = [e.data["reason"] for e in events_of(run_dir, "checkpoint_skipped")
                       if started.ts <= e.ts <= saved.ts]
            no_hello.append(sum(r.startswith("no checkpoint plugin has said hello") for r in skipped))
            buffers_busy.append(sum(r.startswith("both snapshot buffers") for r in skipped))
        # a plugin whose setup raises: from its "setup failed" log reply to the kernel seeing it exit
        said = [e for e in events_of(run_dir, "log", "setup_fails") if e.data["text"].startswith("setup failed")]
        crashes = [c.ts - s.ts for s, c in zip(said, events_of(run_dir, "plugin_crashed", "setup_fails"))]
    finally:
        kernel.send_signal(signal.SIGINT)
        kernel.wait(timeout=120)
    print(table(["", "median", "max", "each"], [
        ["checkpoint: restart -> hello (s)", f"{median(hellos):.2f}", f"{max(hellos):.2f}",
         " ".join(f"{h:.2f}" for h in hellos)],
        ["checkpoint: restart -> its first save landed (s)", f"{median(first_saves):.2f}", f"{max(first_saves):.2f}",
         " ".join(f"{h:.2f}" for h in first_saves)],
        ["  skipped meanwhile: no hello yet", median(no_hello), max(no_hello), " ".join(map(str, no_hello))],
        ["  skipped meanwhile: both buffers busy", median(buffers_busy), max(buffers_busy),
         " ".join(map(str, buffers_busy))],
        ["setup raised: its log line -> exit seen (s)", f"{median(crashes):.2f}" if crashes else "-",
         f"{max(crashes):.2f}" if crashes else "-", " ".join(f"{c:.2f}" for c in crashes)],
    ], title=f"step_sleep_s {args.step_sleep_s}, {args.kills} kills"))


if __name__ == "__main__":
    main()
