"""TensorBoard event files and PNG plots of a run, live; `--plot RUN_DIR` redraws the plots from a journal.

Live, the plugin writes `<run_dir>/tensorboard/` (TensorBoard's records, _event_file: held on a full disk) and redraws
`<run_dir>/plots/*.png` every N epochs and at the end. Afterwards, `python -m trainbus.plugins.visualization --plot
RUN_DIR` rebuilds the same History from `<run_dir>/events` alone and draws the same plots (what `trainbus runs plot`
runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

# TensorBoard's writer, not torch's SummaryWriter: importing torch holds the GIL for seconds (tens on a busy
# machine), and a plugin that imports it after its hello stops heartbeating meanwhile and is taken for hung.
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event as TensorBoardEvent
from tensorboard.compat.proto.event_pb2 import SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb

from trainbus.proto import DURABLE, Event, events as ev
from trainbus.sdk import Plugin, Setting
from trainbus.sdk.plugin import merge_settings
from trainbus.sdk.settings import SettingsError

from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import READ_PROGRESS, read_journal

from ._event_file import EventFile
from ._history import FINAL_EVENTS, PROGRESS_EVERY_EVENTS, History, metric_tag
from ._plots import PlotSize, render_all

TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
# Drawing every figure costs ~1.5 s of CPU (6 figures): a run whose epochs take 0.05 s redrew every epoch, fell
# behind by minutes and held the run's end past its drain. Epoch redraws come at most this often; the end's always.
PLOT_MIN_INTERVAL_S = 10.0


class VisualizationPlugin(Plugin):
    """TensorBoard event files (losses, metrics, lr, monitor readings) and PNG plots in the run directory.

    TensorBoard scalars, all against the global step: loss/train_step (every_n_steps), loss/training and
    loss/validation (per epoch), metrics/training_<name>, metrics/validation_<name>, lr, and every metric
    event under its own name when it has a '/' (cpu/process_percent, ...), else under its plugin's
    (`self.metric("probe_value", ...)` of plugin probe: probe/probe_value). PNGs in plots/: loss.png, metrics.png
    and one resources-<monitor>.png per monitor, redrawn every plot_every_n_epochs epochs (at most every
    PLOT_MIN_INTERVAL_S, 10 s) and at the end.
    """

    delivery = DURABLE  # a plot with a missing epoch is wrong, not late
    settings = {
        "tensorboard": Setting(True, f"write TensorBoard event files to <run_dir>/{TENSORBOARD_DIR}/"),
        "plots": Setting(True, f"draw PNG plots in <run_dir>/{PLOTS_DIR}/"),
        "plot_every_n_epochs": Setting(1, "redraw the plots every this many epochs (at most every 10 s), and at the "
                                          "end (0: at the end only)", min=0),
        "every_n_steps": Setting(10, "a per-step loss point every this many steps (0: none); the plots thin "
                                    "a curve past 4,096 points", min=0),
        "plot_width_px": Setting(960, "plot width in pixels", min=100, max=10_000),
        "plot_height_px": Setting(600, "plot height in pixels", min=100, max=10_000),
        # matplotlib cannot size its fonts below ~5 dpi (FT_Set_Char_Size: invalid ppem): every figure failed
        "plot_dpi": Setting(100, "plot resolution, dots per inch", min=10, max=1000),
    }

    def setup(self) -> None:
        s = self.settings
        self.size = plot_size(s)
        self.history = History(every_n_steps=s["every_n_steps"])
        self.writer = None
        self.started = False
        self.ended = False
        self.already_written = 0  # records of earlier instances, on disk: the first this many writes are skipped
        self.last_step = 0  # the highest step a summary was written (or skipped) at
        self.plotted_at: float | None = None  # monotonic time the last epoch redraw ended

    def teardown(self) -> None:
        if self.writer is not None:
            lost = self.writer.close()
            if lost:  # the disk is still full: the journal has them (`trainbus runs plot` draws from it)
                self.log(f"{lost} TensorBoard records could not be written to {self.writer.path}: the disk refused "
                         f"them to the end", level="warning")
            self.writer = None

    def on_event(self, event: Event) -> None:
        if self.ended:  # a monitor's last reading numbered after the final event: the run's record is closed
            return
        if not self.started:
            self._start(event)
        self.history.update(event)
        if self.writer is not None:
            self._write_scalars(event)
        if event.type == ev.END_EPOCH:
            every, last = self.settings["plot_every_n_epochs"], self.plotted_at
            if every and event.epoch % every == 0 and (last is None or time.monotonic() - last >= PLOT_MIN_INTERVAL_S):
                self._plot()
                self.plotted_at = time.monotonic()
            if self.writer is not None:
                self.writer.write_held()
        elif event.type in FINAL_EVENTS:
            self.ended = True
            self._plot()
            empty = self.history.curves_with_no_finite_value()
            if empty and self.settings["plots"]:  # said once, at the end: the plots of a run that diverged are blank
                self.log(no_finite_value(empty), level="warning")
            if self.writer is not None:
                self.writer.write_held()

    def _start(self, event: Event) -> None:
        """At the first event: open the writer, and after a restart redo what the previous instance saw.

        A restarted plugin is replayed from its last ack, so the events before it come from the journal
        (when it is readable here): they go into the History again, and their summaries into a new
        TensorBoard file, all but those the earlier instances' files already hold. Every instance writes the
        same summaries in the same order (the run's events from seq 1), and a kill -9 leaves a file holding a
        prefix of them, so the files hold the first `already_written` of them: those are skipped. Nothing is
        written twice and a restart purges nothing: TensorBoard purges what it read when a file starts a new
        session (SessionLog.START, the writer's purge_step), and the live TensorBoard would show a run that
        empties and fills again. The one purge is a continued run's (_purge_after), a record like the others.
        """
        self.started = True
        journal = Path(self.run_dir) / JOURNAL_NAME
        rebuild = event.seq > 1 and journal.is_file()
        if self.settings["tensorboard"]:
            log_dir = Path(self.run_dir) / TENSORBOARD_DIR
            if event.seq == 1 or rebuild:  # the run's summaries from the first on, as the earlier instances wrote them
                self.already_written = summaries_in(log_dir, progress=self.still_working)
            self.writer = EventFile(log_dir, on_refused=self._refused)
        if rebuild:  # a run of days is millions of events: each PROGRESS_EVERY_EVENTS says we are getting somewhere
            past_events = itertools.takewhile(lambda e: e.seq < event.seq, read_journal(journal))
            for read, past in enumerate(past_events, start=1):
                if read % PROGRESS_EVERY_EVENTS == 0:
                    self.still_working()
                self.history.update(past)
                if self.writer is not None:
                    self._write_scalars(past)

    def _write_scalars(self, event: Event) -> None:
        data, step, add = event.data, event.step, self._add_scalar
        if event.type == ev.END_TRAINING_BATCH:
            every = self.settings["every_n_steps"]
            if every and step % every == 0 and _is_number(data.get("loss")):
                add("loss/train_step", data["loss"], step, walltime=event.ts)
        elif event.type == ev.END_EPOCH:
            for key, tag in (("training_loss", "loss/training"), ("validation_loss", "loss/validation"), ("lr", "lr")):
                if _is_number(data.get(key)):
                    add(tag, data[key], step, walltime=event.ts)
            for group in ("training", "validation"):
                for name, value in (data.get(f"{group}_metrics") or {}).items():
                    if _is_number(value):
                        add(f"metrics/{group}_{name}", value, step, walltime=event.ts)
        elif event.type == ev.METRIC and _is_number(data.get("value")):
            metric_step = data["step"] if isinstance(data.get("step"), int) else step
            add(metric_tag(str(data.get("plugin")), str(data.get("name"))), data["value"], metric_step,
                walltime=event.ts)
        elif event.type == ev.START_TRAINING_SESSION:
            if step < self.last_step:  # a run continued from a checkpoint: its steps after `step` train again
                self._purge_after(step, event.ts)
            if data.get("hyperparameters"):
                rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(data["hyperparameters"].items()))
                self._write(text_pb("hyperparameters", "| name | value |\n|---|---|\n" + rows), step, event.ts)

    def _add_scalar(self, tag: str, value: float, step: int, walltime: float) -> None:
        self._write(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step, walltime)

    def _purge_after(self, step: int, walltime: float) -> None:
        """TensorBoard's own way to drop the points a continued run trains again (what torch's SummaryWriter
        does with purge_step): a SessionLog START at step + 1 makes its reader forget every point at that step
        or later read before it, so a killed session's last steps are not drawn beside the new ones."""
        self.last_step = step
        self._record(TensorBoardEvent(wall_time=walltime, step=step + 1,
                                      session_log=SessionLog(status=SessionLog.START)))

    def _write(self, summary: Summary, step: int, walltime: float) -> None:
        self.last_step = max(self.last_step, step)
        self._record(TensorBoardEvent(wall_time=walltime, step=step, summary=summary))

    def _record(self, record: TensorBoardEvent) -> None:
        """One record into the event file, unless an earlier instance's files already hold it (see _start)."""
        if self.already_written:
            self.already_written -= 1
            return
        self.writer.add(record)

    def _refused(self, path: Path, exc: OSError) -> None:
        self.log(f"cannot write {path} ({exc.strerror or exc}); holding TensorBoard records until there is room",
                 level="warning")

    def _plot(self) -> None:
        if self.settings["plots"]:
            # A figure costs up to a second of CPU, many on a busy machine: each one counts as progress, so a
            # plugin drawing several is never taken for hung (handler_timeout_s).
            render_all(self.history, Path(self.run_dir) / PLOTS_DIR, self.size, progress=self.still_working)


def summaries_in(log_dir: Path, progress: Callable[[], None] = lambda: None) -> int:
    """How many records this plugin wrote (summaries: scalars, texts; session starts: _purge_after) the
    TensorBoard event files in log_dir hold; a torn last record (a writer killed mid-write) is not counted, as
    TensorBoard does not read it. `progress` is called every PROGRESS_EVERY_EVENTS records read."""
    files = sorted(log_dir.glob("events.out.tfevents.*")) if log_dir.is_dir() else []
    records = (record for path in files for record in LegacyEventFileLoader(str(path)).Load())
    counted = 0
    for read, record in enumerate(records, start=1):
        if read % PROGRESS_EVERY_EVENTS == 0:
            progress()
        counted += record.HasField("summary") or record.HasField("session_log")
    return counted


def plot_size(settings: dict[str, Any]) -> PlotSize:
    return PlotSize(settings["plot_width_px"], settings["plot_height_px"], settings["plot_dpi"])


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, damage: list[str] | None = None,
             progress: Callable[[int], None] | None = None, empty: list[str] | None = None) -> list[Path]:
    """Draw a finished (or running) run's plots from its journal alone, with the run's own plot settings.
    `damage`: a line for each stretch of the journal that could not be read (its events are not drawn); `progress`:
    History.backfill's; `empty`: the curves drawn with no point, every value NaN or infinite, are added to it."""
    run_dir = Path(run_dir)
    settings = merge_settings(VisualizationPlugin, _configured_settings(run_dir))
    history = History.from_journal(run_dir, every_n_steps=settings["every_n_steps"], damage=damage, progress=progress)
    if empty is not None:
        empty.extend(history.curves_with_no_finite_value())
    return render_all(history, Path(out_dir) if out_dir else run_dir / PLOTS_DIR, plot_size(settings))


def _allowed(key: str, value: Any) -> bool:
    """Whether the plugin takes `value` for its setting `key` (as the run it configured did)."""
    try:
        merge_settings(VisualizationPlugin, {key: value})
    except SettingsError:
        return False
    return True


def _configured_settings(run_dir: Path) -> dict[str, Any]:
    """The visualization settings in the run's config.json, if it had the plugin; else none."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    plugins = config.get("plugins") if isinstance(config, dict) else None  # an edit by hand: a list, plugins of text
    for plugin in plugins if isinstance(plugins, list) else []:
        if isinstance(plugin, dict) and (plugin.get("name") == "visualization"
                                         or str(plugin.get("target", "")).endswith(":VisualizationPlugin")):
            settings = plugin.get("settings")
            known = {k: v for k, v in settings.items() if k in VisualizationPlugin.settings} \
                if isinstance(settings, dict) else {}
            return {k: v for k, v in known.items() if _allowed(k, v)}  # an edit by hand: its default instead
    return {}


def no_finite_value(curves: list[str]) -> str:
    return (f"no finite value to draw for {', '.join(curves)} (each is NaN or infinite: did the run diverge?); their "
            f"axes are empty")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainbus.plugins.visualization",
                                     description="Draw a run's PNG plots from its journal alone.")
    parser.add_argument("--plot", metavar="RUN_DIR", required=True, help="the run directory (holds `events`)")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    parser.add_argument("--progress", action="store_true",
                        help=f"say how far the journal's read got: '{READ_PROGRESS}SEQ' lines on stderr")
    args = parser.parse_args(argv)
    run_dir = Path(args.plot)
    if not (run_dir / JOURNAL_NAME).is_file():
        print(f"error: {run_dir} has no journal (events); is it a run directory?", file=sys.stderr)
        return 2
    damage: list[str] = []
    empty: list[str] = []
    try:
        written = plot_run(run_dir, args.out, damage, progress=(
            lambda seq: print(f"{READ_PROGRESS}{seq}", file=sys.stderr, flush=True)) if args.progress else None,
            empty=empty)
    except OSError as exc:  # a read-only run directory, a full disk
        where = args.out or run_dir / PLOTS_DIR
        print(f"error: cannot write the plots to {where} ({exc.strerror or exc}); give --out a directory you can "
              f"write", file=sys.stderr)
        return 2
    for line in damage:
        print(f"warning: {line}; the plots leave those events out", file=sys.stderr)
    if written and empty:
        print(f"warning: {no_finite_value(empty)}", file=sys.stderr)
    if not written:
        print(f"error: the journal of {run_dir} holds nothing to plot (no epoch, step or metric)", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
