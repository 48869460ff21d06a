"""TensorBoard event files and PNG plots of a run, live; `python -m trainbus.plugins.visualization --plot RUN_DIR` redraws the plots from a journal.

Live, the plugin writes `<run_dir>/tensorboard/` with torch's SummaryWriter and redraws
`<run_dir>/plots/*.png` every N epochs and at the end. Afterwards, `--plot` rebuilds the same
History from `<run_dir>/events` alone and draws the same plots (what `trainbus runs plot` runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from trainbus.proto import DURABLE, Event, events as ev
from trainbus.sdk import Plugin, SettingsError

from trainbus.proto import JOURNAL_NAME
from trainbus.proto.journal_format import read_journal

from ._history import FINAL_EVENTS, History, metric_tag
from ._plots import PlotSize, render_all

TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
FLUSH_INTERVAL_S = 5  # SummaryWriter's flush_secs: how stale a live TensorBoard may be


class VisualizationPlugin(Plugin):
    """TensorBoard event files (losses, metrics, lr, monitor readings) and PNG plots in the run directory.

    TensorBoard scalars, all against the global step: loss/train_step (every_n_steps), loss/training and
    loss/validation (per epoch), metrics/training_<name>, metrics/validation_<name>, lr, and every metric
    event under its own name (cpu/process_percent, ...). PNGs in plots/: loss.png, metrics.png and one
    resources-<monitor>.png per monitor, redrawn every plot_every_n_epochs epochs and at the end.
    """

    delivery = DURABLE  # a plot with a missing epoch is wrong, not late
    settings = {"tensorboard": True, "plots": True, "plot_every_n_epochs": 1, "every_n_steps": 10,
                "plot_width_px": 960, "plot_height_px": 600, "plot_dpi": 100}

    def setup(self) -> None:
        s = self.settings
        for key in ("plot_every_n_epochs", "every_n_steps", "plot_width_px", "plot_height_px", "plot_dpi"):
            if s[key] < (0 if key in ("plot_every_n_epochs", "every_n_steps") else 1):
                raise SettingsError(f"visualization {key} must be positive, got {s[key]}")
        self.size = plot_size(s)
        self.history = History(every_n_steps=s["every_n_steps"])
        self.writer = None
        self.started = False

    def teardown(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_event(self, event: Event) -> None:
        if not self.started:
            self._start(event)
        self.history.update(event)
        if self.writer is not None:
            self._write_scalars(event)
        if event.type == ev.END_EPOCH:
            every = self.settings["plot_every_n_epochs"]
            if every and event.epoch % every == 0:
                self._plot()
            if self.writer is not None:
                self.writer.flush()
        elif event.type in FINAL_EVENTS:
            self._plot()
            if self.writer is not None:
                self.writer.flush()

    def _start(self, event: Event) -> None:
        """At the first event: open the writer, and after a restart redo what the previous instance saw.

        A restarted plugin is replayed from its last ack, so the events before it come from the journal
        (when it is readable here): they go into the History again, and into a TensorBoard file that starts
        by purging everything the old writer wrote (purge_step 0), so nothing is lost and nothing doubled.
        """
        self.started = True
        journal = Path(self.run_dir) / JOURNAL_NAME
        rebuild = event.seq > 1 and journal.is_file()
        if self.settings["tensorboard"]:
            # Imported here: torch costs seconds to import, and `trainbus plugins list` imports this module
            # only to describe it.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(self.run_dir) / TENSORBOARD_DIR), flush_secs=FLUSH_INTERVAL_S,
                                        purge_step=0 if rebuild else None)
        if rebuild:
            for past in itertools.takewhile(lambda e: e.seq < event.seq, read_journal(journal)):
                self.history.update(past)
                if self.writer is not None:
                    self._write_scalars(past)

    def _write_scalars(self, event: Event) -> None:
        data, step, add = event.data, event.step, self.writer.add_scalar
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
        elif event.type == ev.START_TRAINING_SESSION and data.get("hyperparameters"):
            rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in sorted(data["hyperparameters"].items()))
            self.writer.add_text("hyperparameters", "| name | value |\n|---|---|\n" + rows, step)

    def _plot(self) -> None:
        if self.settings["plots"]:
            render_all(self.history, Path(self.run_dir) / PLOTS_DIR, self.size)


def plot_size(settings: dict[str, Any]) -> PlotSize:
    return PlotSize(settings["plot_width_px"], settings["plot_height_px"], settings["plot_dpi"])


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw a finished (or running) run's plots from its journal alone, with the run's own plot settings."""
    run_dir = Path(run_dir)
    settings = {**VisualizationPlugin.settings, **_configured_settings(run_dir)}
    history = History.from_journal(run_dir, every_n_steps=settings["every_n_steps"])
    return render_all(history, Path(out_dir) if out_dir else run_dir / PLOTS_DIR, plot_size(settings))


def _configured_settings(run_dir: Path) -> dict[str, Any]:
    """The visualization settings in the run's config.json, if it had the plugin; else none."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    for plugin in config.get("plugins") or []:
        if isinstance(plugin, dict) and (plugin.get("name") == "visualization"
                                         or str(plugin.get("target", "")).endswith(":VisualizationPlugin")):
            settings = plugin.get("settings") or {}
            return {k: v for k, v in settings.items() if k in VisualizationPlugin.settings}
    return {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainbus.plugins.visualization",
                                     description="Draw a run's PNG plots from its journal alone.")
    parser.add_argument("--plot", metavar="RUN_DIR", required=True, help="the run directory (holds `events`)")
    parser.add_argument("--out", metavar="DIR", help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dir = Path(args.plot)
    if not (run_dir / JOURNAL_NAME).is_file():
        print(f"error: {run_dir} has no journal (events); is it a run directory?", file=sys.stderr)
        return 2
    written = plot_run(run_dir, args.out)
    if not written:
        print(f"error: the journal of {run_dir} holds nothing to plot (no epoch, step or metric)", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
