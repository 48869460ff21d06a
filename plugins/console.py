"""Progress bars in the kernel's terminal: epoch and batch, loss, metrics, ETA."""

from __future__ import annotations

import collections
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.text import Text

import trainbus.proto
import trainbus.sdk
from trainbus.proto import BEST_EFFORT, Event, events as ev
from trainbus.proto.output import RefusalGuard
from trainbus.proto.text import duration_text, printable
from trainbus.sdk import Plugin, Setting

MAX_LINE_CHARS = 160  # a warning is one terminal line; the full text is in the run's logs
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')  # a line of a Python traceback or stack
# a traceback's last line names the exception by its module ("trainbus.sdk.bz.NotInThisProcess: ..."), a first line
# by its class alone
_MODULE_OF_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*:)")
# and the SDK's and the protocol's own directories, which an editable install leaves outside site-packages (a bz hook
# touching context.model raises in sdk/bz.py, a metric that is not finite in proto/codec.py: the line to name is the
# author's)
_LIBRARY_PATHS = ("/site-packages/", "/dist-packages/", "/lib/python3", "<frozen ",
                  *(os.path.dirname(os.path.abspath(package.__file__)) + os.sep
                    for package in (trainbus.sdk, trainbus.proto)))
WARNING_LEVELS = ("warning", "error")
SNAPSHOTS_REMEMBERED = 64  # save_checkpoint steps kept for the checkpoint_failed that may follow each
# rich estimates speed from the last 30 s of updates by default, which never holds two epoch ends;
# a day's window makes the epoch ETA the run's mean pace (the batch bar is reset every epoch anyway).
SPEED_WINDOW_S = 24 * 3600.0
MAX_REFRESH_PER_SECOND = 60.0  # a terminal's frame rate: faster redraws are never seen
PER_BATCH = (ev.END_TRAINING_BATCH, ev.END_VALIDATION_BATCH)  # what only the batch bar needs


class ConsolePlugin(Plugin):
    """Progress bars in the kernel's terminal: epoch and batch, loss, metrics, ETA."""

    delivery = BEST_EFFORT  # a missed frame only delays a redraw
    settings = {
        # rich redraws every 1/refresh_per_second s on a thread of its own: past what a terminal shows it only
        # takes CPU from training (1e9: a fifth of a core on 2 cores)
        "refresh_per_second": Setting(4.0, "how often the bars are redrawn on a terminal", min=0.1,
                                      max=MAX_REFRESH_PER_SECOND),
        "show_batches": Setting(True, "draw a batch bar under the epoch bar (on a terminal)"),
    }

    def subscriptions(self) -> list[str]:
        # Without a batch bar to advance (not a terminal, or show_batches off) there is nothing to do
        # per step: leave those events out, and with them a wake-up per burst of steps.
        events = super().subscriptions()
        if self.settings["show_batches"] and Console().is_interactive:
            return events
        return [e for e in events if e not in PER_BATCH]

    def setup(self) -> None:
        # rich detects the terminal: on a pipe or a file it writes plain text with no escape codes,
        # and we draw no bars at all, just one line per epoch.
        # Its output is the kernel's stdout, often a file (`trainbus run > train.log`): when that disk fills, the
        # first refused line is said once, as a warning naming the file, and the rest dropped; every handler failed
        # on it, each a traceback and an error logged.
        self.console = Console(file=RefusalGuard(sys.stdout, lambda line: self.log(line, "warning")))
        self.draws_bars = self.console.is_interactive
        self.progress: Progress | None = None
        self.epoch_task: TaskID | None = None
        self.batch_task: TaskID | None = None
        # start_training_session says it; a console restarted mid-run (best effort: nothing is replayed) never sees
        # it, and printed `epoch 4/?` to the run's end: the run's config.json holds the epochs it plans
        self.epochs_total: int | None = _planned_epochs(Path(self.run_dir))
        # The kernel's batches_planned (len of the loader) at start_epoch; without one, unknown (an indeterminate
        # bar) until a whole epoch ends.
        self.batches_per_epoch: int | None = None
        self.validation_batches: int | None = None  # the last validation's batch count: the next one's bar total
        self.cut_short: str | None = None  # "8/75 batches of epoch 5": the last epoch, when a stop cut it short
        self.epoch_started_at: float | None = None
        self.skip_reasons: set[str] = set()  # each reason for skipping a checkpoint is shown once
        # the step of each recent save_checkpoint by its seq: a checkpoint_failed comes later, at another step
        self.snapshot_steps: collections.OrderedDict[int, int] = collections.OrderedDict()

    def teardown(self) -> None:
        self._stop_bars()

    # lifecycle

    def on_start_training_session(self, event: Event) -> None:
        data = event.data
        self.epochs_total = _int(data.get("epochs"))
        epochs = f"{_fmt(self.epochs_total)} epoch{'' if self.epochs_total == 1 else 's'}"
        self._say(f"training {data.get('model') or 'a model'} ({_fmt(data.get('parameters'))} parameters) "
                  f"on {data.get('device') or '?'} for {epochs}")
        if self.progress is not None and self.epoch_task is not None:
            self.progress.update(self.epoch_task, total=self.epochs_total)

    def on_start_epoch(self, event: Event) -> None:
        self.epoch_started_at = event.ts  # the kernel's clock: events may reach us in bursts
        self.batches_per_epoch = _int(event.data.get("batches_planned")) or self.batches_per_epoch
        self._start_bars()  # here, not in setup: a plugin restarted mid-run never sees the session start
        if self.progress is not None and self.batch_task is not None:
            self.progress.reset(self.batch_task, total=self.batches_per_epoch,
                                description=f"epoch {event.epoch} train", loss="")

    def on_end_training_batch(self, event: Event) -> None:
        if self.progress is None or self.batch_task is None:
            return
        data = event.data
        running = _mean(data.get("training_loss_total"), data.get("training_batch_count"))
        loss = data.get("loss") if running is None else running
        self.progress.update(self.batch_task, loss=f"loss {_fmt(loss)}")
        index = _int(data.get("batch_index"))
        if index is not None:  # the index, not a count of events: a best-effort plugin may miss some
            self.progress.update(self.batch_task, completed=index + 1)
            if self.batches_per_epoch and self.epoch_task is not None:  # the run's ETA from its first epoch on
                self.progress.update(self.epoch_task, completed=event.epoch - 1 + (index + 1) / self.batches_per_epoch)
        else:
            self.progress.advance(self.batch_task)

    def on_end_training_loop(self, event: Event) -> None:
        count = _int(event.data.get("training_batch_count"))
        planned = _int(event.data.get("batches_planned"))
        if planned:
            self.batches_per_epoch = planned
        elif count:  # the largest epoch seen: a stop can cut one short
            self.batches_per_epoch = max(self.batches_per_epoch or 0, count)
        if self.progress is not None and self.batch_task is not None:
            self.progress.update(self.batch_task, total=self.batches_per_epoch, completed=count or 0)

    def on_start_validation_loop(self, event: Event) -> None:
        # the batch bar counts validation's own batches and loss now (it showed training's total and loss)
        if self.progress is not None and self.batch_task is not None:
            self.progress.reset(self.batch_task, description=f"epoch {event.epoch} validation", loss="")
            # reset() keeps the training's total for None: the first validation's is unknown (an indeterminate bar)
            next(t for t in self.progress.tasks if t.id == self.batch_task).total = self.validation_batches

    def on_end_validation_batch(self, event: Event) -> None:
        if self.progress is None or self.batch_task is None:
            return
        data = event.data
        loss = _mean(data.get("validation_loss_total"), data.get("validation_batch_count"))
        self.progress.update(self.batch_task, loss=f"val loss {_fmt(data.get('loss') if loss is None else loss)}")
        index = _int(data.get("batch_index"))
        if index is not None:
            self.progress.update(self.batch_task, completed=index + 1)
        else:
            self.progress.advance(self.batch_task)

    def on_end_validation_loop(self, event: Event) -> None:
        count = _int(event.data.get("validation_batch_count"))
        if count:  # the largest seen: a stop can cut one short
            self.validation_batches = max(self.validation_batches or 0, count)
        if self.progress is not None and self.batch_task is not None:
            self.progress.update(self.batch_task, total=self.validation_batches, completed=count or 0)

    def on_end_epoch(self, event: Event) -> None:
        data = event.data
        self.cut_short = f"{_batches(data)} of epoch {event.epoch}" if data.get("partial") is True else None
        if self.progress is not None and self.epoch_task is not None and self.cut_short is None:
            self.progress.update(self.epoch_task, completed=event.epoch,
                                 loss=f"val loss {_fmt(data.get('validation_loss'))}")
        elapsed_s = event.ts - self.epoch_started_at if self.epoch_started_at is not None else None
        self._say(_epoch_summary(event.epoch, self.epochs_total, data, elapsed_s))

    def on_end_training_session(self, event: Event) -> None:
        data = event.data
        self._stop_bars()  # the last line goes below the bars, not above them
        line = f"finished: {_fmt(data.get('epochs_completed'))} epoch{'s' * (data.get('epochs_completed') != 1)}"
        if self.cut_short:
            line += f" and {self.cut_short}"
        line += f", {_fmt(data.get('steps'))} step{'s' * (data.get('steps') != 1)}"
        if data.get("stopped_early"):
            reasons = "; ".join(str(r) for r in data.get("stop_reasons") or [])
            line += f"; stopped early: {reasons or 'no reason given'}"
        self._say(line)

    # kernel warnings

    def on_plugin_crashed(self, event: Event) -> None:
        data = event.data
        after = " after hanging" if data.get("hung") else ""
        self._warn(f"plugin {data.get('plugin')} crashed{after} ({data.get('cause') or 'unknown cause'})")

    def on_plugin_hung(self, event: Event) -> None:
        self._warn(f"plugin {event.data.get('plugin')} hung ({event.data.get('reason') or 'no reason given'})")

    def on_plugin_failed(self, event: Event) -> None:
        data = event.data
        self._warn(f"plugin {data.get('plugin')} given up: {data.get('reason')}; see {data.get('log')}", "error")

    def on_training_stalled(self, event: Event) -> None:
        data = event.data
        where = f" in your code at {data['where']}" if data.get("where") else ""
        ranks = [r for r in data.get("ranks") or [] if isinstance(r, dict)]  # under torchrun: this machine's others
        waits = "".join(f"; rank {r.get('rank')} " + (f"in your code at {r['where']}" if r.get("where") else
                                                      str(r.get("error") or "in none of your code")) for r in ranks)
        self._warn(f"training has stood still for {_fmt(data.get('stalled_s'))} s after {data.get('after')} at step "
                   f"{event.step}{where}{waits}; {'their stacks' if ranks else 'its stack'}: "
                   f"{os.path.join(self.run_dir, 'kernel.log')}", "error")

    def on_vote_missed(self, event: Event) -> None:
        data = event.data
        who = ", ".join(str(p) for p in data.get("plugins") or []) or "?"
        waited = _fmt(data.get("timeout_s"))
        self._warn(f"no vote from {who} at {data.get('at')} of epoch {event.epoch} within {waited} s: training went "
                   f"on (a stop it decided there lands at a later boundary)")

    def on_training_resumed(self, event: Event) -> None:
        self._say(f"training moved again after standing still for {_fmt(event.data.get('stalled_s'))} s")

    def on_save_checkpoint(self, event: Event) -> None:
        self.snapshot_steps[event.seq] = event.step
        if len(self.snapshot_steps) > SNAPSHOTS_REMEMBERED:
            self.snapshot_steps.popitem(last=False)

    def on_checkpoint_failed(self, event: Event) -> None:
        step = self.snapshot_steps.get(event.data.get("seq"), event.step)  # else: where the failure was heard
        self._warn(f"checkpoint at step {step} failed: {event.data.get('reason')}")

    def on_checkpoint_skipped(self, event: Event) -> None:
        reason = str(event.data.get("reason"))
        if reason not in self.skip_reasons:
            self.skip_reasons.add(reason)
            self._warn(f"checkpoint at step {event.step} skipped: {reason} (shown once)")

    def on_log(self, event: Event) -> None:
        level = event.data.get("level")
        if level in WARNING_LEVELS:
            self._warn(f"{event.data.get('plugin')}: {event.data.get('text')}", level)

    # drawing

    def _start_bars(self) -> None:
        if not self.draws_bars or self.progress is not None:
            return
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TimeRemainingColumn(),
            console=self.console, refresh_per_second=self.settings["refresh_per_second"],
            speed_estimate_period=SPEED_WINDOW_S, transient=True,  # the epoch lines stay; the bars go
        )
        self.epoch_task = self.progress.add_task("epochs", total=self.epochs_total, loss="")
        if self.settings["show_batches"]:
            self.batch_task = self.progress.add_task("batches", total=self.batches_per_epoch, loss="")
        self.progress.start()

    def _stop_bars(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress = self.epoch_task = self.batch_task = None

    def _say(self, line: str, style: str = "") -> None:
        # Text, not a str: a "[...]" in a loss name or a log line is printed, not read as markup; printable: an
        # escape sequence in it is shown, not obeyed. While the bars are live, rich prints above them.
        self.console.print(Text(printable(line, lines=True), style=style), soft_wrap=True)

    def _warn(self, text: str, level: str = "warning") -> None:
        # a terminal line is cut to fit; a file or pipe (a log, CI) keeps the whole first line, fix included
        width = MAX_LINE_CHARS if self.console.is_terminal else None
        self._say(_one_line(f"{level}: {text}", width), "bold red" if level == "error" else "yellow")


def _planned_epochs(run_dir: Path) -> int | None:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):  # not there (a plugin on another machine), or torn
        return None
    return _int(config.get("epochs")) if isinstance(config, dict) else None


def _epoch_summary(epoch: int, epochs_total: int | None, data: dict[str, Any], elapsed_s: float | None) -> str:
    head = f"epoch {epoch}/{_fmt(epochs_total)}"
    if data.get("partial") is True:  # its losses and metrics are over these batches only
        head += f" partial ({_batches(data)})"
    parts = [head, f"train loss {_fmt(data.get('training_loss'))}"]
    parts += [f"train {name} {_fmt(value)}" for name, value in (data.get("training_metrics") or {}).items()]
    if "validation_loss" in data:  # absent: the run has no validation loader
        parts.append(f"val loss {_fmt(data.get('validation_loss'))}")
    parts += [f"val {name} {_fmt(value)}" for name, value in (data.get("validation_metrics") or {}).items()]
    if data.get("lr") is not None:
        parts.append(f"lr {_fmt(data['lr'])}")
    if elapsed_s is not None:
        parts.append(duration_text(elapsed_s))
    return "  ".join(parts)


def _batches(data: dict[str, Any]) -> str:
    """"8/75 batches" of an epoch: trained of planned (planned unknown: "8 batches")."""
    count, planned = _fmt(_int(data.get("training_batch_count"))), _int(data.get("batches_planned"))
    return f"{count}/{_fmt(planned)} batches" if planned else f"{count} batches"


def _one_line(text: str, width: int | None = MAX_LINE_CHARS) -> str:
    """First line, plus the last for a multi-line text (a traceback's last line is the exception), plus where a
    traceback or stack in it ends in the author's code: "(at train_hooks.py:12 in on_end_epoch)"."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    # the last line (a traceback's exception) unless the first already says it ("setup failed: E: msg")
    said = len(lines) == 1 or lines[0].endswith((lines[-1], _MODULE_OF_EXCEPTION.sub("", lines[-1])))
    line = lines[0] if said else f"{lines[0]} ... {lines[-1]}"
    where = _where(text)
    room = width - len(where) if width else len(line)
    return (line if len(line) <= room else line[:room - 3] + "...") + where


def _where(text: str) -> str:
    """The innermost frame of a traceback in `text` that is the author's (not the standard library's nor an
    installed package's, when there is one of theirs), as " (at file.py:LINE in function)"; else ""."""
    frames = _FRAME.findall(text)
    theirs = [f for f in frames if not any(part in f[0] for part in _LIBRARY_PATHS)] or frames
    if not theirs:
        return ""
    path, line, function = theirs[-1]
    return f" (at {os.path.basename(path)}:{line} in {function})"


def _fmt(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _mean(total: Any, count: Any) -> float | None:
    if not isinstance(total, (int, float)) or not isinstance(count, int) or count <= 0:
        return None
    return float(total) / count
