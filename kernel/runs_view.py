"""How `trainbus runs list` and `trainbus runs show` print what kernel/run_overview.py and run_details.py found:
tables, lines, or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainbus.proto.journal_format import COMPACTION_KEEP_EVERY_STEPS
from trainbus.proto.strict_json import strict_dumps
from trainbus.proto.text import duration_text, printable

from .run_overview import votes_missed

STATUS_STYLE = {"completed": "green", "stopped": "yellow", "running": "cyan", "interrupted": "magenta",
                "failed": "red", "died": "red", "unreadable": "red", "queued": "blue", "cancelled": "yellow"}


def _status(status: str) -> str:
    """A status as rich markup, in its colour."""
    style = STATUS_STYLE.get(status)
    return f"[{style}]{status}[/{style}]" if style else status


def _when(iso: str | None) -> str:
    return "-" if not iso else iso[:19].replace("T", " ")


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _short_target(target: str | None) -> str:
    """/long/path/to/train.py:build -> train.py:build; a module target as it is."""
    if not target:
        return "-"
    module, sep, function = target.rpartition(":")
    return (Path(module).name + sep + function) if "/" in module else target


def _epochs(run: dict[str, Any]) -> str:
    """Epochs done of planned, and the one a stop cut short, whose metrics are the run's last: `3/8 + partial 4`."""
    done, planned = run.get("epochs_completed"), run.get("epochs")
    if done is None:
        return "-"
    cut = f" + partial {done + 1}" if run.get("last_epoch_partial") else ""
    return (f"{done}/{planned}" if planned else str(done)) + cut


def _last_epoch(run: dict[str, Any], kind: str) -> str:
    """The last epoch's `kind` ("training", "validation") loss and metrics, or "-"."""
    parts = [f"loss {_num(run[f'{kind}_loss'])}"] if run.get(f"{kind}_loss") is not None else []
    parts += [f"{k} {_num(v)}" for k, v in (run.get(f"{kind}_metrics") or {}).items()]
    return ", ".join(parts) or "-"


def _list_metrics(run: dict[str, Any]) -> str:
    """The validation metrics; a run that validates nothing shows its training metrics, marked."""
    shown = [f"{k} {_num(v)}" for k, v in (run.get("validation_metrics") or {}).items()]
    if not shown and run.get("validation_loss") is None:
        shown = [f"train {k} {_num(v)}" for k, v in (run.get("training_metrics") or {}).items()]
    return ", ".join(shown)


def _print_table(console, table) -> None:
    """A table; to a file or a pipe without the padding rich gives each row's last cell."""
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    console.out("\n".join(line.rstrip() for line in captured.get().splitlines()), highlight=False)


def print_list(console, runs: list[dict[str, Any]], runs_dir: Path) -> None:
    """One row per run (runs.list_runs's dicts)."""
    from rich.markup import escape
    from rich.table import Table

    if not runs:
        console.print(f"no runs in {escape(str(Path(runs_dir).resolve()))}")
        return
    from rich.table import Column

    fixed = dict(no_wrap=True)
    table = Table(Column("run", **fixed), Column("status", **fixed), Column("target", overflow="fold"),
                  Column("flags", overflow="fold"), Column("started", **fixed), Column("duration", **fixed),
                  Column("epochs", **fixed), Column("val loss", **fixed), Column("metrics"), Column("plugin trouble"),
                  Column("error", overflow="fold"), box=None, pad_edge=False)
    for run in runs:
        metrics = _list_metrics(run)
        table.add_row(escape(printable(run["id"])), _status(run["status"]),
                      escape(_short_target(run.get("target"))), escape(flags_text(run.get("flags"))),
                      _when(run.get("started_at"))[:16],
                      duration_text(run.get("duration_s")), _epochs(run), _num(run.get("validation_loss")),
                      escape(metrics) or "-", escape("; ".join(run.get("plugin_trouble") or [])) or "-",
                      escape(_first_line(run.get("error") or _status_detail(run) or _stalled(run))))
    _print_table(console, table)


def _stalled(run: dict[str, Any]) -> str | None:
    """A running run whose training stands still (training_stalled): for how long, in the error column."""
    stalled = run.get("stalled")
    if not isinstance(stalled, dict):
        return None
    return f"training stalled {duration_text(stalled.get('stalled_s'))} at step {stalled.get('step')}"


def _status_detail(run: dict[str, Any]) -> str | None:
    """What the daemon's queue says of a run, in the error column (its status cell says only queued or cancelled):
    a queued resume's "queued to be resumed by ann; last died (...)", a cancelled run's who took it off; and why a
    run is died (its kernel gone, or its summary.json torn) or unreadable (its directory refused, or its registry row
    damaged, with the `runs delete` that removes it), which its status cell cannot say either."""
    if run["status"] in ("cancelled", "died", "unreadable"):
        return run.get("detail")
    return run.get("detail") if run["status"] == "queued" and run.get("dir") else None


def _first_line(text: str | None) -> str:
    """A row's cell of a text that may run to many lines (an exception's message); `runs show` has it whole."""
    return (text or "").strip().split("\n", 1)[0] or "-"


def flags_text(flags: dict[str, Any] | None) -> str:
    """lr=0.01 epochs=5; "-" for none."""
    return " ".join(f"{k}={_value(v)}" for k, v in (flags or {}).items()) or "-"


def _value(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)  # tag="" shown so, not as `tag=`


def comparison(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `runs compare` shows of each run (run_overview's dicts): its flags and its final metrics.

    A flag another run was given and this one was not is this run's hyperparameter of that name when its spec
    has one (a function taking the hyperparameters dict fills in its own defaults), or for `epochs` the epochs it
    planned, so a column compares what trained rather than what was typed."""
    names = list(dict.fromkeys(k for run in runs for k in run.get("flags") or {}))
    rows = []
    for run in runs:
        given, trained = run.get("flags") or {}, run.get("hyperparameters") or {}
        if run.get("epochs") is not None:  # what it planned, whether a flag, the spec or --epochs set it
            trained = {"epochs": run["epochs"], **trained}
        flags = {k: given[k] if k in given else trained[k] for k in names if k in given or k in trained}
        best = run.get("best") or {}
        metrics = {"training_loss": run.get("training_loss"),
                   **{f"training_{k}": v for k, v in (run.get("training_metrics") or {}).items()},
                   "validation_loss": run.get("validation_loss"),
                   **{f"validation_{k}": v for k, v in (run.get("validation_metrics") or {}).items()},
                   "best_validation_loss": best.get("validation_loss"), "best_epoch": best.get("epoch")}
        rows.append({"id": run["id"], "status": run["status"], "target": run.get("target"),
                     "flags": flags, "metrics": metrics,
                     "epochs_completed": run.get("epochs_completed"), "steps": run.get("steps"),
                     "last_epoch_partial": bool(run.get("last_epoch_partial")), "duration_s": run.get("duration_s")})
    return rows


def _metric_group(name: str) -> int:
    """Where a comparison's metric column goes: training loss, training metrics, validation loss, validation
    metrics, the best validation loss and its epoch (sorted() is stable: within a group, first seen first)."""
    order = ("training_loss", "training_", "validation_loss", "validation_", "best_validation_loss", "best_epoch")
    return next((i for i, start in enumerate(order) if name == start or (start.endswith("_") and
                                                                           name.startswith(start))), len(order))


def print_comparison(console, rows: list[dict[str, Any]], runs_dir: Path) -> None:
    """One row per run: run, status, target, a column per flag, a column per metric (comparison's dicts)."""
    from rich.markup import escape
    from rich.table import Table

    if not rows:
        console.print(f"no runs in {escape(str(Path(runs_dir).resolve()))}")
        return
    flag_names = list(dict.fromkeys(k for row in rows for k in row["flags"]))
    # training's, validation's, then the best, whichever run first has each (one without validation, named first,
    # would put another's validation metrics after the best)
    metric_names = sorted(dict.fromkeys(k for row in rows for k in row["metrics"]), key=_metric_group)
    headers = [m.replace("validation_", "val ").replace("training_", "train ").replace("_", " ") for m in metric_names]
    table = Table("run", "status", "target", *flag_names, *headers, "epochs done", "steps", "time", box=None,
                  pad_edge=False)
    for row in rows:
        table.add_row(escape(printable(row["id"])), _status(row["status"]),
                      escape(_short_target(row["target"])),
                      *[escape(_value(row["flags"][k])) if k in row["flags"] else "-" for k in flag_names],
                      *[_num(row["metrics"].get(m)) if m != "best_epoch" else str(row["metrics"].get(m) or "-")
                        for m in metric_names],
                      _epochs(row),  # done (its planned is among the flags), and a partial one
                      str(row["steps"] if row["steps"] is not None else "-"), duration_text(row["duration_s"]))
    _print_table(console, table)


def _loop_text(session: dict[str, Any]) -> str:
    """How a session's loop trained where it was not the default (start_training_session's precision, compile,
    accumulation and clipping): "bf16-mixed, compiled, an optimizer step every 4 batches, ..."; "" for the default."""
    said = []
    if session.get("precision") not in (None, "32"):
        said.append(str(session["precision"]))
    if session.get("compile"):
        said.append("compiled")
    accumulate, clip = session.get("accumulate_grad_batches"), session.get("gradient_clip_val")
    if isinstance(accumulate, int) and accumulate > 1:
        said.append(f"an optimizer step every {accumulate} batches")
    if isinstance(clip, (int, float)) and clip > 0:
        said.append(f"gradients clipped to norm {clip:g}")
    return ", ".join(said)


def print_show(console, run: dict[str, Any]) -> None:
    """One run (run_details's dict): its lines, then its epochs, plugins, checkpoints and files."""
    from rich.markup import escape

    def line(label: str, text: str) -> None:
        console.print(f"  {label:<12}{text}")

    console.print(f"[bold]run {escape(printable(run['id']))}[/bold]: {_status(run['status'])}"
                  + (f" ({escape(run['detail'])})" if run.get("detail") else ""))
    line("directory", escape(printable(run["dir"])))
    line("target", escape(run.get("target") or "-"))
    if run.get("device") or run.get("model"):
        line("model", escape(f"{run.get('model') or '?'}, {run.get('parameters') or '?'} parameters, "
                             f"on {run.get('device') or '?'}"))
    cluster = run.get("cluster")
    if isinstance(cluster, dict) and (cluster.get("world_size") or 1) > 1:
        restarts = cluster.get("restart_count") or 0
        line("processes", escape(f"{cluster['world_size']} ({cluster.get('kind', '?')})"
                                 + (f", restarted {restarts} time{'s' * (restarts != 1)}" if restarts else "")))
    if run.get("flags"):
        line("flags", escape(flags_text(run["flags"])))
    if run.get("hyperparameters"):
        line("hyperparams", escape(", ".join(f"{k}={json.dumps(v)}" for k, v in run["hyperparameters"].items())))
    sessions = run.get("sessions") or []
    # a continued run: its first start, then when its latest session began, which the duration is of
    latest = (f" (the first of {len(sessions)} sessions); the latest {_when(sessions[-1].get('started_at'))}"
              if len(sessions) > 1 else "")
    how_long = "running for" if run["status"] == "running" else "lasted"
    line("started", f"{_when(run.get('started_at'))}{latest}, {how_long} {duration_text(run.get('duration_s'))}")
    resumed = [s for s in run.get("sessions") or [] if s.get("resumed_from")]
    if len(run.get("sessions") or []) > 1 or resumed:
        line("sessions", escape(f"{len(run['sessions'])}; latest resumed from {resumed[-1]['resumed_from']}"
                                if resumed else str(len(run["sessions"]))))
    trained_with = [(s.get("device") or "?", str(s.get("precision") or "?"), bool(s.get("compile")))
                    for s in run.get("sessions") or []]
    if len(set(trained_with)) > 1:  # a resume changed them: config.json has the latest session's alone
        line("trained on", escape("; ".join(f"session {i}: {device}, {precision}" + (", compiled" if compiled else "")
                                              for i, (device, precision, compiled) in enumerate(trained_with, 1))))
    elif sessions and (loop := _loop_text(sessions[-1])):  # one way throughout: said when not the default loop
        line("loop", escape(loop))
    line("epochs", f"{_epochs(run)}, {run.get('steps') if run.get('steps') is not None else '-'} steps")
    if run.get("last_event"):
        e = run["last_event"]
        line("last event", escape(f"{e['type']} (seq {e['seq']}, epoch {e['epoch']}, step {e['step']}) "
                                  f"{duration_text(e['age_s'])} ago"))
    compacted = run.get("journal_compacted") or {}
    if compacted.get("compacted"):  # PROTOCOL.md §13: what the journal no longer holds, and why
        line("journal", f"{compacted['compacted']} of {compacted['segments']} closed segments compacted: up to seq "
                        f"{compacted['through_seq']:,} it keeps no per-batch events but every "
                        f"{COMPACTION_KEEP_EVERY_STEPS}th step's end_training_batch, and no heartbeats")
    if run.get("stop_reasons"):
        line("stopped by", escape("; ".join(run["stop_reasons"])))
    if run.get("error"):
        line("error", f"[red]{escape(run['error'])}[/red]")
    # the run's last metrics are its last end_epoch's: after a stop mid-epoch, that cut epoch's, over part of it
    rows = run.get("epoch_table") or []
    which = f" (epoch {rows[-1]['epoch']}, partial)" if rows and rows[-1].get("partial") else " (last epoch)"
    if run.get("training_loss") is not None or run.get("training_metrics"):
        line("training", escape(_last_epoch(run, "training") + which))
    validation = _last_epoch(run, "validation")
    line("validation", escape(validation + which if validation != "-" else "-"))
    if run.get("best"):
        line("best", f"validation loss {_num(run['best']['validation_loss'])} at epoch {run['best']['epoch']}")
    _print_epochs(console, run)
    _print_plugins(console, run)
    _print_checkpoints_and_files(console, run)


def _print_epochs(console, run: dict[str, Any]) -> None:
    """The table of epochs, the best one starred."""
    from rich.table import Table

    rows = run.get("epoch_table") or []
    if rows:
        trained = list(dict.fromkeys(k for row in rows for k in row.get("training_metrics") or {}))
        validated = list(dict.fromkeys(k for row in rows for k in row["validation_metrics"]))
        table = Table("epoch", "steps", "train loss", *[f"train {m}" for m in trained], "val loss",
                      *[f"val {m}" for m in validated], "lr", "time", box=None, pad_edge=False, title="epochs",
                      title_justify="left")
        best_epoch = run["best"]["epoch"] if run.get("best") else None
        for row in rows:
            mark = "*" if row["epoch"] == best_epoch else " (partial)" if row.get("partial") else ""
            table.add_row(f"{row['epoch']}{mark}", str(row["step"]), _num(row["training_loss"]),
                          *[_num((row.get("training_metrics") or {}).get(m)) for m in trained],
                          _num(row["validation_loss"]), *[_num(row["validation_metrics"].get(m)) for m in validated],
                          f"{row['lr']:.3g}" if isinstance(row.get("lr"), (int, float)) else "-",
                          duration_text(row.get("duration_s")))
        console.print()
        _print_table(console, table)


def _print_plugins(console, run: dict[str, Any]) -> None:
    """The table of plugins with their trouble, then the clients attached to the run."""
    from rich.markup import escape
    from rich.table import Table

    plugins = run.get("plugins") or {}
    if plugins:
        table = Table("plugin", "state", "restarts", "trouble", "log", box=None, pad_edge=False, title="plugins",
                      title_justify="left")
        for name, p in plugins.items():
            trouble = _trouble(p)
            state = p.get("state") or "-"
            # a peer attached by hand names itself: its name's newlines and escapes shown, not acted on
            table.add_row(escape(printable(name)), f"[red]{state}[/red]" if state == "failed" else escape(state),
                          str(p.get("restarts", 0)), escape("; ".join(trouble)) or "-", escape(p.get("log") or "-"))
        console.print()
        _print_table(console, table)
    attached = run.get("attached") or []
    if attached:  # the views of it people opened (`trainbus attach`), not plugins of the run
        console.print(f"attached: {len(attached)} client{'s' * (len(attached) != 1)} "
                      f"({escape(printable(', '.join(attached[:5])))}"
                      f"{', ...' if len(attached) > 5 else ''})", highlight=False)


def _trouble(p: dict[str, Any]) -> list[str]:
    """What went wrong with a plugin, for the plugins table: its latest crashes, why it failed, what it dropped."""
    trouble = list(p.get("crashes") or [])[-3:]
    if p.get("reason"):
        trouble.append(p["reason"])
    if p.get("left_early"):
        trouble.append("left before the run ended")
    if p.get("greeted") is False and not p.get("detached"):  # it took no event of the run (as runs list says)
        trouble.append(f"never said a hello the kernel took: {p['hello_trouble']}"
                       if isinstance(p.get("hello_trouble"), str)
                       else "never said hello")
    dropped = [f"{p[f'{kind}_dropped']:,} {kind}{'s' * (p[f'{kind}_dropped'] != 1)}"
               for kind in ("metric", "log") if isinstance(p.get(f"{kind}_dropped"), int)
               and p[f"{kind}_dropped"] > 0]
    if dropped:  # past its [limits]: what it reported is not all in the journal
        trouble.append(" and ".join(dropped) + " dropped past its [limits] (kernel.log)")
    if p.get("errors_logged"):
        trouble.append(f"{p['errors_logged']} error{'s' * (p['errors_logged'] != 1)} logged (kernel.log)")
    if p.get("checkpoints_failed"):
        trouble.append(f"{p['checkpoints_failed']} checkpoint{'s' * (p['checkpoints_failed'] != 1)} failed")
    if p.get("votes_missed"):
        trouble.append(f"missed {votes_missed(p['votes_missed'])}")
    if "undrained_acked_seq" in p:
        trouble.append(f"did not catch up (acked to seq {p['undrained_acked_seq']})")
    return trouble


def _print_checkpoints_and_files(console, run: dict[str, Any]) -> None:
    """How many checkpoints were saved (the newest on disk listed), and what the run directory holds."""
    from rich.markup import escape

    checkpoints = run.get("checkpoints") or {}
    unwritten = checkpoints.get("unwritten") or 0
    if checkpoints.get("saved") or checkpoints.get("failed") or checkpoints.get("skipped") or unwritten:
        console.print()
        kept = [c for c in checkpoints["saved"] if c.get("present")]
        # a snapshot no persister answered: one behind (replaying a long journal) or gone when its session ended
        not_written = ((f", {unwritten} not written yet" if run.get("status") == "running" else
                        f", {unwritten} never written (no persister answered before its session ended)")
                       if unwritten else "")
        console.print(f"checkpoints: {len(checkpoints['saved'])} saved ({len(kept)} still on disk"
                      f"{', the newest 3 below' if len(kept) > 3 else ''}), {checkpoints['failed']} failed, "
                      f"{checkpoints['skipped']} skipped{not_written}")
        for c in kept[-3:]:
            console.print(escape(f"  {c['path']} (epoch {c['epoch']}, step {c['step']})"))

    files = run.get("files") or []
    if files:
        console.print()
        console.print("files")
        for f in files:
            size = (f"{f['files']} file{'' if f['files'] == 1 else 's'}, {_bytes(f['bytes'])}" if f["kind"] == "folder"
                    else _bytes(f["bytes"]))
            console.print(escape(f"  {f['path']}{'/' if f['kind'] == 'folder' else ''}  ({size})"))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def as_json(value: Any, indent: int | None = 2) -> str:
    """What --json prints: strict JSON, a number that is not finite (a diverged run's NaN loss) as null
    (proto/strict_json.py)."""
    return strict_dumps(value, indent=indent)
