"""What a key flooding a run's TCP control socket (or a plugin its ipc one) costs its training, beside no flood.

    .venv/bin/python scripts/bench/control_flood.py                # ~3 min on 2 cores
    .venv/bin/python scripts/bench/control_flood.py --repeats 1    # a smoke run, ~1 min
    .venv/bin/python scripts/bench/control_flood.py --from plugin  # a plugin of the run's, on its ipc socket

The run is what `trainbus run` trains with no config (the digits MLP, batch 32, the default plugins console and
metrics_log, torch's default thread count), plus `[run] listen` on 127.0.0.1 with CURVE keys made for the bench.
Three variants, interleaved over --repeats:

- calm: the run alone;
- flood: the same run while another process, holding a monitor-role key, sends `heartbeat` messages on
  --connections CURVE connections as fast as the kernel takes them. It never said hello, so each one is decoded
  and refused (`unknown_peer`): the cheapest message to send and one the kernel must read to know it is nothing;
- flood, unpaced: the same with kernel/control_reading.py's REMOTE_CONTROL_SHARE set past 100 % for that run (what the
  kernel did before it paced its TCP control reading).

With --from plugin the flood is a plugin of the run (scripts/bench/_spammer.py: a thread reporting a metric in a
loop, at nice 10 as the kernel starts its plugins), read on the run's ipc control socket and dropped past [limits]
metrics_per_s; "unpaced" sets LOCAL_CONTROL_SHARE instead; "spin only" is the same plugin's thread spinning
without sending: its own CPU's share of the cost, apart from what the kernel reads.

A remote attacker's CPU is not the kernel's machine's: on 4 or more cores the flood runs on the second half of
them and the run on the first; on fewer it shares the cores at nice 19, and the figure is then an upper bound
(its encryption competes with training).

Reported per variant: us/step (_runs.run_mean after --warmup-epochs, median over the repetitions) and the paired
ratio; the kernel's bus thread and libzmq I/O threads' CPU per second of the run (attach_monitors.EventPathCPU);
the flood's messages the kernel read (`refused_unknown_peer`) and the times its TCP control reading used up its
share (`remote_control_paced`, kernel/control_reading.py REMOTE_CONTROL_SHARE).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import trainbus.kernel.control_reading as control_reading

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import REPO, add_rerun_options, machine_line, median, quiet_note, table
from _runs import Measurer, batch_stamps, output_to, run_mean
from attach_monitors import HOST, EventPathCPU, free_ports
from trainbus.kernel.config_file import load_config
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.keys import KeyStore
from trainbus.kernel.session import run_training

# The flooding process: raw pyzmq + msgpack, as any client may be (PROTOCOL.md §15).
FLOOD = r"""
import sys, zmq
from pathlib import Path
from trainbus.proto import pack
from trainbus.proto.remote import secure_client
endpoint, key, server_key, connections = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ctx = zmq.Context()
sockets = []
for _ in range(connections):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.HEARTBEAT_IVL, 0)  # never reads what it is answered: no pings it cannot hear answered
    secure_client(s, key, server_key)
    s.connect(endpoint)
    sockets.append(s)
beat = pack({"v": 1, "type": "heartbeat"})
poller = zmq.Poller()
for s in sockets:
    poller.register(s, zmq.POLLOUT)
while True:
    for s, _ in poller.poll(1000):
        for _ in range(64):
            try:
                s.send(beat, zmq.NOBLOCK)
            except zmq.Again:
                break
"""


VARIANTS = ("calm", "flood", "flood, unpaced")
PLUGIN_VARIANTS = (*VARIANTS, "spin only")


def one_run(args, variant: str, workdir: Path, keys: KeyStore, key_file: Path, kernel_cpus: set[int],
            flood_cpus: set[int]) -> dict:
    """One run of `variant`: its step stamps by epoch, the event path's CPU per second, the bus counters."""
    port = free_ports()
    cfg = load_config(None)  # `trainbus run`'s defaults: the digits MLP and the default plugins
    cfg.epochs, cfg.runs_dir, cfg.device, cfg.seed = args.epochs, str(workdir / "runs"), "cpu", args.seed
    cfg.listen, cfg.keys_dir = f"{HOST}:{port}", str(keys.directory)
    attacker, shares = None, (control_reading.LOCAL_CONTROL_SHARE, control_reading.REMOTE_CONTROL_SHARE)
    plugin = args.source == "plugin"
    if plugin and variant != "calm":
        cfg.plugins = [*cfg.plugins, resolve_plugin("spammer", {"send": variant != "spin only"}, "_spammer:Spammer")]
    if variant != "calm" and not plugin:  # connects before the kernel listens (libzmq retries): from the first step
        with open(workdir / "flood.err", "ab") as err:
            attacker = subprocess.Popen(
                [sys.executable, "-c", FLOOD, f"tcp://{HOST}:{port}", str(key_file),
                 str(keys.server_secret.with_suffix(".key")), str(args.connections)],
                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                preexec_fn=(lambda: os.nice(19)) if flood_cpus & kernel_cpus else None)
        os.sched_setaffinity(attacker.pid, flood_cpus)
    if variant == "flood, unpaced" and plugin:
        control_reading.LOCAL_CONTROL_SHARE = 1e9
    elif variant == "flood, unpaced":
        control_reading.REMOTE_CONTROL_SHARE = 1e9
    try:
        event_path = EventPathCPU()
        event_path.start()
        began = time.monotonic()
        with output_to(workdir / "output.log"):
            result = run_training(cfg)
        seconds = time.monotonic() - began
        bus_s, io_s = event_path.total()
    finally:
        control_reading.LOCAL_CONTROL_SHARE, control_reading.REMOTE_CONTROL_SHARE = shares
        if attacker is not None:
            attacker.kill()
            attacker.wait()
    if result.status != "completed":
        raise RuntimeError(f"run {result.run_dir} ended {result.status}: {result.error}; see {workdir / 'output.log'}")
    stamps = batch_stamps(read_events(result.run_dir))
    if not args.keep:
        shutil.rmtree(result.run_dir, ignore_errors=True)
    read, paced = ("metric_dropped", "local_control_paced") if plugin else ("refused_unknown_peer",
                                                                            "remote_control_paced")
    return {"stamps": stamps, "bus_cpu": bus_s / seconds, "io_cpu": io_s / seconds,
            "read": result.bus.get(read, 0), "paced": result.bus.get(paced, 0), "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="source", choices=("key", "plugin"), default="key",
                   help="who floods: a monitor key over TCP (default), or a plugin of the run on its ipc socket")
    p.add_argument("--connections", type=int, default=4, help="the flood's CURVE connections (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every variant (default 3)")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (the digits MLP: ~25 ms each)")
    p.add_argument("--warmup-epochs", type=int, default=5, help="first epochs not measured")
    p.add_argument("--seed", type=int, default=0)
    add_rerun_options(p)
    args = p.parse_args()
    if not 1 <= args.warmup_epochs < args.epochs:
        p.error("--warmup-epochs must be at least 1 and fewer than --epochs")
    if args.source == "plugin":  # the plugin process imports _spammer from here
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                                 os.environ.get("PYTHONPATH")]))
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2 if len(cores) >= 4 else len(cores)
    kernel_cpus, flood_cpus = set(cores[:half]), set(cores[-half:])
    os.sched_setaffinity(0, kernel_cpus)  # the kernel runs here; its plugins inherit it
    torch.set_num_threads(len(kernel_cpus))

    workdir = REPO / "runs" / f"bench-control-flood-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    workdir.mkdir(parents=True)
    keys = KeyStore(workdir / "keys")
    keys.generate_server()
    key_file = keys.generate_client("bench-flood", "monitor")[1]
    print(machine_line())
    where = (f"kernel on cores {sorted(kernel_cpus)}, flood on {sorted(flood_cpus)}"
             + (" (shared: the flood at nice 19; its own CPU competes with training)" if kernel_cpus & flood_cpus
                else ""))
    print(("the flood: a plugin of the run, on the kernel's cores at nice 10" if args.source == "plugin" else where)
          + f"; work dir {workdir}", flush=True)
    measure = Measurer(args)
    variants = PLUGIN_VARIANTS if args.source == "plugin" else VARIANTS
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for rep in range(args.repeats):
            measure.settle()
            for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                runs[variant].append(measure(lambda: one_run(args, variant, workdir, keys, key_file, kernel_cpus,
                                                             flood_cpus)))
            print(f"  rep {rep + 1}/{args.repeats}: " + ", ".join(
                f"{v} {run_mean(runs[v][-1]['stamps'], args.warmup_epochs) * 1e6:.0f}" for v in variants)
                + " us/step", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    per_rep = {v: [run_mean(r["stamps"], args.warmup_epochs) * 1e6 for r in runs[v]] for v in variants}
    rows = []
    for v in variants:
        ratio = median([a / b for a, b in zip(per_rep[v], per_rep["calm"])])
        rows.append([v, f"{median(per_rep[v]):.0f}", f"{min(per_rep[v]):.0f}-{max(per_rep[v]):.0f}",
                     f"{(ratio - 1) * 100:+.1f} %" if v != "calm" else "-",
                     f"{median([r['bus_cpu'] for r in runs[v]]):.3f}", f"{median([r['io_cpu'] for r in runs[v]]):.3f}",
                     f"{median([r['read'] / r['seconds'] for r in runs[v]]):,.0f}" if v != "calm" else "-",
                     f"{median([r['paced'] for r in runs[v]]):.0f}" if v != "calm" else "-"])
    print()
    print(table(["variant", "us/step", "rep range", "paired vs calm", "bus thread CPU (cores)", "libzmq I/O CPU",
                 "flood messages read /s", "times paced"], rows,
                f"digits MLP, default plugins, torch threads {torch.get_num_threads()}, "
                + ("a plugin flooding its ipc socket " if args.source == "plugin" else
                   f"{args.connections} flooding connections ")
                + f"({args.epochs - args.warmup_epochs} measured epochs x {args.repeats} reps)"))
    print("  " + quiet_note(measure.foreign, args.quiet_cores))
    print(measure.closing_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
