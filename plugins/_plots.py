"""PNG plots of a run's History with matplotlib's Agg canvas: losses, metrics, resource readings.

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never pyplot, so no global
backend or figure registry is touched and a long run does not leak figures. Each plot has the exact
pixel size asked for (no tight bounding box, which would change it).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ._history import History

PNG_METADATA = {"Software": None}  # no version string: the same run draws the same bytes on any machine
MAX_PANELS = 6
# A reading's unit is the end of its name (names carry units): how to scale it and what to call the axis.
UNITS: tuple[tuple[str, float, str], ...] = (
    ("_bytes_per_s", 1024 ** -2, "MiB/s"),
    ("_bytes", 1024 ** -3, "GiB"),
    ("_percent", 1.0, "%"),
    ("_share", 100.0, "% of step time"),
    ("_per_s", 1.0, "per second"),
    ("_ms", 1.0, "ms"),
    ("_c", 1.0, "°C"),
    ("_w", 1.0, "W"),
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
    epochs = [e.epoch for e in history.epochs]
    for label, values in (("training", [e.training_loss for e in history.epochs]),
                          ("validation", [e.validation_loss for e in history.epochs])):
        points = [(x, y) for x, y in zip(epochs, values) if y is not None]
        if points:
            epoch_axes.plot(*zip(*points), marker="o", label=label)
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
                points = [(e.epoch, getattr(e, f"{group}_metrics")[name]) for e in history.epochs
                          if name in getattr(e, f"{group}_metrics")]
                if points:
                    ax.plot(*zip(*points), marker="o", label=group)
        _finish(ax, name, "epoch" if ax is axes[-1] else "", name, integer_x=True)
    return fig


def resource_figures(history: History, size: PlotSize) -> dict[str, Figure]:
    """One figure per monitor (`cpu`, `memory`, ...): its readings against time since the run started, a panel per unit."""
    by_source: dict[str, dict[str, list[str]]] = {}  # source -> unit label -> tags
    for tag in sorted(history.readings, key=_natural):
        unit = _unit(tag)
        if unit is not None:
            source = tag.split("/", 1)[0]
            by_source.setdefault(source, {}).setdefault(unit[2], []).append(tag)
    figures = {}
    start = history.started_ts or 0.0  # readings from before the session started come out negative: monitors start first
    for source, units in by_source.items():
        labels = list(units)[:MAX_PANELS]
        fig = _figure(size)
        axes = fig.subplots(len(labels), 1, squeeze=False, sharex=True)[:, 0]
        for ax, label in zip(axes, labels):
            for tag in units[label]:
                scale = _unit(tag)[1]
                points = history.readings[tag]
                ax.plot([ts - start for ts, _ in points], [v * scale for _, v in points], linewidth=1.0,
                        label=tag.split("/", 1)[-1])
            _finish(ax, "", "seconds since start" if ax is axes[-1] else "", label)
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
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=size.dpi, metadata=PNG_METADATA)
    return buffer.getvalue()


def render_all(history: History, out_dir: str | Path, size: PlotSize) -> list[Path]:
    """Write every plot the history has data for into out_dir, atomically; return the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, fig in figures(history, size).items():
        path = out / filename
        temporary = path.with_suffix(".png.tmp")
        temporary.write_bytes(png_bytes(fig, size))
        os.replace(temporary, path)  # a reader (a browser, an e-mail) never sees half a PNG
        written.append(path)
    return written


def _figure(size: PlotSize) -> Figure:
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


def _unit(tag: str) -> tuple[str, float, str] | None:
    name = "_" + tag.rsplit("/", 1)[-1]  # memory/percent reads as _percent, disk/free_bytes as _free_bytes
    for unit in UNITS:
        if name.endswith(unit[0]):
            return unit
    return None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "plugin"


def _natural(tag: str) -> list:
    """cpu/core2 before cpu/core10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", tag)]
