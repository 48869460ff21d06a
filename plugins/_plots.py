"""PNG plots of a run's History with matplotlib's Agg canvas: losses, metrics, resource readings.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never pyplot, so no global
backend or figure registry is touched and a long run does not leak figures. Each plot has the exact
pixel size asked for (no tight bounding box, which would change it).
"""

from __future__ import annotations

import io
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ._history import EpochRecord, History

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# matplotlib is imported where a figure is made, not here: it takes about a second, and `trainbus run` loads the
# e-mail and visualization plugins' classes (their settings) before every run that has them.
PNG_METADATA = {"Software": None}  # no version string: the same run draws the same bytes on any machine
MAX_PANELS = 6
SPARSE_POINTS = 20  # a series with fewer readings is drawn with markers: a single reading is a dot, not nothing
PER_CORE = re.compile(r"/core\d+_")  # cpu/core3_percent: drawn thin and grey, one legend entry for them all


@dataclass(frozen=True)
class Axis:
    """One quantity on one axis: the readings whose tag matches `pattern`, scaled into `unit`."""

    pattern: str
    scale: float
    unit: str  # the y label; "{0}" is the pattern's first group
    title: str = ""


# A reading's name ends in its unit (names carry units), and a few names say more than their unit: a
# process's CPU % is of one core (up to 100 x cores), a core's is of that core; steps/s are not samples/s.
# The first rule that matches a tag (`<monitor>/<name>`) places it; readings with the same quantity share a
# panel, panels in this order.
AXES: tuple[Axis, ...] = (
    Axis(r"^cpu/process_percent$", 1.0, "% of one core", "training process and its children"),
    Axis(r"^cpu/\w+_percent$", 1.0, "% busy", "system and each core"),
    Axis(r"^(memory|disk)/(\w+_)?percent$", 1.0, "% used"),
    Axis(r"[/_]bytes_per_s$", 1024 ** -2, "MiB/s"),
    Axis(r"[/_]([a-z]+)_per_s$", 1.0, "{0}/s"),
    Axis(r"[/_]bytes$", 1024 ** -3, "GiB"),
    Axis(r"[/_]share$", 100.0, "% of step time"),
    Axis(r"[/_]percent$", 1.0, "%"),
    Axis(r"[/_]ms$", 1.0, "ms"),
    Axis(r"[/_]c$", 1.0, "°C"),
    Axis(r"[/_]w$", 1.0, "W"),
)


@dataclass(frozen=True)
class PlotSize:
    width_px: int = 960
    height_px: int = 600
    dpi: int = 100


def loss_figure(history: History, size: PlotSize) -> Figure | None:
    """Training and validation loss per epoch above, the per-step training loss below."""
    if not history.epochs and not history.step_losses:
        return None
    fig = _figure(size)
    epoch_axes, step_axes = fig.subplots(2, 1)
    _per_epoch(epoch_axes, history.epochs, lambda e: e.training_loss, "training")
    _per_epoch(epoch_axes, history.epochs, lambda e: e.validation_loss, "validation")
    best = history.best_validation()
    if best is not None:
        epoch_axes.axvline(best.epoch, color="grey", linestyle=":", label=f"best validation (epoch {best.epoch})")
    _finish(epoch_axes, "loss per epoch", "epoch", "loss", integer_x=True)
    if history.step_losses:
        step_axes.plot(*zip(*history.step_losses), linewidth=0.8, label="training (per step)")
    _finish(step_axes, "training loss per step", "step", "loss")
    return fig


def metrics_figure(history: History, size: PlotSize) -> Figure | None:
    """One panel per metric (training and validation per epoch), and one for the learning rate."""
    names = sorted({name for e in history.epochs for name in (*e.training_metrics, *e.validation_metrics)})
    has_lr = any(e.lr is not None for e in history.epochs)
    panels = names[: MAX_PANELS - 1] + (["lr"] if has_lr else [])
    if not panels:
        return None
    fig = _figure(size)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, panels):
        if name == "lr":
            points = [(e.epoch, e.lr) for e in history.epochs if e.lr is not None]
            ax.plot(*zip(*points), marker="o", label="learning rate")
        else:
            for group in ("training", "validation"):
                _per_epoch(ax, history.epochs, lambda e: getattr(e, f"{group}_metrics").get(name), group)
        _finish(ax, name, "epoch" if ax is axes[-1] else "", name, integer_x=True)
    return fig


def _per_epoch(ax, epochs: list[EpochRecord], value_of: Callable[[EpochRecord], float | None], label: str) -> None:
    """One per-epoch series: whole epochs joined by a line; an epoch a stop cut short as a hollow marker, said so."""
    whole = [(e.epoch, value_of(e)) for e in epochs if not e.partial and value_of(e) is not None]
    color = ax.plot(*zip(*whole), marker="o", label=label)[0].get_color() if whole else None
    for e in epochs:
        if e.partial and value_of(e) is not None:
            done = f"{e.batches if e.batches is not None else '?'}/{e.batches_planned or '?'} batches"
            ax.plot([e.epoch], [value_of(e)], marker="o", markerfacecolor="none", linestyle="none", color=color,
                    label=f"{label}, epoch {e.epoch} cut short ({done})")


def resource_figures(history: History, size: PlotSize) -> dict[str, Figure]:
    """One figure per monitor (`cpu`, `memory`, ...): its readings over time since the start, a panel per quantity."""
    by_source: dict[str, dict[tuple[int, str, str], list[str]]] = {}  # source -> (rank, unit, title) -> tags
    for tag in sorted(history.readings, key=_natural):
        placed = _axis(tag)
        if placed is not None:
            rank, axis, unit = placed
            by_source.setdefault(tag.split("/", 1)[0], {}).setdefault((rank, unit, axis.title), []).append(tag)
    figures = {}
    # readings from before the session started come out negative: monitors start first
    start = history.started_ts or 0.0
    for source, panels in by_source.items():
        keys = sorted(panels)[:MAX_PANELS]
        fig = _figure(size)
        axes = fig.subplots(len(keys), 1, squeeze=False, sharex=True)[:, 0]
        for ax, (rank, unit, title) in zip(axes, keys):
            cores_labelled = False
            for tag in panels[(rank, unit, title)]:
                points = history.readings[tag]
                style: dict = {"linewidth": 1.0, "label": tag.split("/", 1)[-1]}
                if len(points) < SPARSE_POINTS:
                    style.update(marker="o", markersize=3)
                if PER_CORE.search(tag):
                    style.update(color="grey", linewidth=0.6, alpha=0.6,
                                 label="_nolegend_" if cores_labelled else "each core")
                    cores_labelled = True
                ax.plot([ts - start for ts, _ in points], [v * AXES[rank].scale for _, v in points], **style)
            _finish(ax, title, "seconds since start" if ax is axes[-1] else "", unit)
        fig.suptitle(f"{source} readings")
        figures[f"resources-{_safe(source)}.png"] = fig
    return figures


def figures(history: History, size: PlotSize) -> dict[str, Figure]:
    """Every plot the history has data for, by file name: loss.png, metrics.png, resources-<monitor>.png."""
    out = {}
    for filename, draw in (("loss.png", loss_figure), ("metrics.png", metrics_figure)):
        fig = draw(history, size)
        if fig is not None:
            out[filename] = fig
    out.update(resource_figures(history, size))
    return out


def png_bytes(fig: Figure, size: PlotSize) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=size.dpi, metadata=PNG_METADATA)
    return buffer.getvalue()


def render_all(history: History, out_dir: str | Path, size: PlotSize,
               progress: Callable[[], None] = lambda: None) -> list[Path]:
    """Write every plot the history has data for into out_dir, atomically; return the files written.
    `progress` is called after each file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, fig in figures(history, size).items():
        path = out / filename
        # a name of this writer's own: `runs plot` draws into the directory the run's plugin draws into
        temporary = out / f".{filename}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            temporary.write_bytes(png_bytes(fig, size))
            os.replace(temporary, path)  # a reader (a browser, an e-mail) never sees half a PNG
        finally:
            temporary.unlink(missing_ok=True)  # left by a failed write (a full disk): gone, not left to pile up
        written.append(path)
        progress()
    return written


def _figure(size: PlotSize) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(size.width_px / size.dpi, size.height_px / size.dpi), dpi=size.dpi, layout="constrained")


def _finish(ax, title: str, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    if title:
        ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")


def _axis(tag: str) -> tuple[int, Axis, str] | None:
    """The rule that places a reading (its rank in AXES), and its unit; None: not plotted (no unit in its name)."""
    for rank, axis in enumerate(AXES):
        match = re.search(axis.pattern, tag)
        if match:
            return rank, axis, axis.unit.format(*match.groups())
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "plugin"


def _natural(tag: str) -> list:
    """cpu/core2 before cpu/core10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", tag)]
