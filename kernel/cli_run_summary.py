"""What `trainbus run` prints at its end: the run's summary, or one line from another machine of --nnodes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.markup import escape

from .cli_common import out
from .cli_launch import restart_goes_on
from .cluster import LAUNCH_RUN_ID, restarts_left
from .run_overview import votes_missed


def _of_processes(cluster: dict) -> str:
    """Across ranks a step is each rank's batch, all stepping together: half a one-process run's steps on 2."""
    world = cluster.get("world_size", 1) if isinstance(cluster, dict) else 1
    return f" of {world} processes (a batch each)" if isinstance(world, int) and world > 1 else ""


def _dropped(entry: dict) -> str:
    """`1,234 metrics and 56 logs dropped`: what a plugin reported past its [limits] (summary.json's plugins)."""
    counts = [f"{entry[f'{kind}_dropped']:,} {kind}{'s' * (entry[f'{kind}_dropped'] != 1)}"
              for kind in ("metric", "log") if entry.get(f"{kind}_dropped")]
    return " and ".join(counts) + " dropped"


def print_node_done(result, runs_dir: str) -> None:
    """Another machine's end of a --nnodes run, said by its first rank: its ranks' outcome, and that rank 0's machine
    keeps the run (its directory, journal and summary, printed there): the one line its user sees at the end."""
    cluster, outcome = result.cluster, result.outcome
    first, last = cluster["rank"], cluster["rank"] + cluster["local_world_size"] - 1
    epochs, steps = outcome["epochs_completed"], outcome["steps"]
    ranks = f"rank {first}" if first == last else f"ranks {first}-{last}"
    print(f"run {result.run_id}: node {cluster['node_rank']}'s {ranks} trained {epochs} epoch{'s' * (epochs != 1)}, "
          f"{steps} step{'s' * (steps != 1)} ({result.status}); rank 0's machine ({cluster['main_address']}) keeps "
          f"the run, its journal and summary: {Path(runs_dir) / result.run_id} there", flush=True)


def print_summary(result) -> None:
    o = result.outcome
    colour = {"completed": "green", "stopped": "yellow"}.get(result.status, "red")
    out.print(f"\n[bold]run {result.run_id}[/bold]: [{colour}]{result.status}[/{colour}] "
              f"after {o['epochs_completed']} epoch{'s' * (o['epochs_completed'] != 1)}, {o['steps']} "
              f"step{'s' * (o['steps'] != 1)}{_of_processes(result.cluster)}, {result.duration_s:.1f} s")
    # The kernel's own stop for an error (the journal's disk) is said once, as the error (which may go on: where
    # the weights went); texts are not markup (a reason naming "[run] runs_dir" would lose its brackets).
    own = "kernel: stop: "
    reasons = [r for r in o["stop_reasons"]
               if not (result.error and r.startswith(own) and result.error.startswith(r.removeprefix(own)))]
    if reasons:
        out.print("  stopped by: " + escape("; ".join(reasons)))
    if result.error:
        if result.trace:  # the user's code raised: their frames first, on stderr (the whole one is in kernel.log)
            out.file.flush()
            print(result.trace, end="", file=sys.stderr, flush=True)
        out.print(f"  error: {escape(result.error)}")
    # the last metrics are the last end_epoch's: after a stop mid-epoch, that cut epoch's, over part of it
    cut = f" (epoch {o['epochs_completed'] + 1}, partial)" if o.get("last_epoch_partial") else ""
    if o["validation_loss"] is not None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in o["validation_metrics"].items())
        out.print(f"  validation loss {o['validation_loss']:.4f}" + (f", {metrics}" if metrics else "") + cut)
    elif o.get("training_loss") is not None:  # nothing validated: what training saw is all there is to say
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in (o.get("training_metrics") or {}).items())
        out.print(f"  training loss {o['training_loss']:.4f}" + (f", {metrics}" if metrics else "")
                  + " (no validation)" + cut)
    for name, p in result.plugins.items():
        if p["crashes"] or p["restarts"] or p["state"] == "failed":  # a crash late in a run is not restarted
            crashes = p.get("crash_count", len(p["crashes"]))  # the summary keeps the newest causes only
            out.print(f"  plugin {name}: {p['state']}, {crashes} crash{'es' * (crashes != 1)}, {p['restarts']} "
                      f"restarts ({escape('; '.join(p['crashes'][-3:]))})")
        if p.get("left_early"):
            out.print(f"  plugin {name}: left before the run ended (exit code 0 or bye), so it saw nothing after (what "
                      f"it printed: {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("greeted") is False and not p.get("detached"):
            printed = Path(result.run_dir) / "plugins" / f"{name}.log"
            if p.get("hello_trouble"):  # it said one the kernel did not take: why (the field, or the refusal)
                out.print(f"  plugin {name}: never said a hello the kernel took, so it took no event: "
                          f"{escape(p['hello_trouble'])} (what it printed: {printed}; a command plugin speaks "
                          f"proto/PROTOCOL.md)")
            elif p["crashes"]:  # a class whose constructor or import raised: the crash line above says why
                out.print(f"  plugin {name}: never said hello, so it took no event: it crashed before it could (why: "
                          f"above; what it printed: {printed})")
            else:
                out.print(f"  plugin {name}: never said hello, so it took no event (what it printed: {printed}; a "
                          f"command plugin speaks proto/PROTOCOL.md)")
        if p.get("checkpoints_failed"):
            out.print(f"  plugin {name}: {p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} "
                      f"could not be written (see {Path(result.run_dir) / 'plugins' / f'{name}.log'})")
        if p.get("metric_dropped") or p.get("log_dropped"):
            out.print(f"  plugin {name}: {_dropped(p)}, past its \\[limits] (metrics_per_s, logs_per_s, "
                      f"bytes_per_s; see kernel.log)")
        if p.get("votes_missed"):
            out.print(f"  plugin {name}: missed {votes_missed(p['votes_missed'])}: it did not answer within "
                      f"vote_timeout_s")
        if p.get("errors_logged"):
            out.print(f"  plugin {name}: {p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged "
                      f"(see {Path(result.run_dir) / 'kernel.log'}; what it printed: plugins/{name}.log)")
    for name, acked in result.undrained.items():
        out.print(f"  plugin {name}: did not catch up (acked up to seq {acked})")
    out.print(f"  results: {result.run_dir}")
    left = restarts_left() if result.status == "failed" else 0
    if left and os.environ.get(LAUNCH_RUN_ID):  # --max-restarts: this failure is not the run's end
        out.print(f"  torchrun restarts the group ({left} restart{'s' * (left != 1)} left): "
                  f"{restart_goes_on(Path(result.run_dir))}")
    elif left:  # the user's own torchrun: its restarted group names no run to go on with, so makes a new one
        out.print(f"  torchrun restarts the group ({left} restart{'s' * (left != 1)} left) as a new run, from the "
                  f"start: a restart continues the run in place only under `trainbus run --nproc N --max-restarts M`")
