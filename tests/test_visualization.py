"""Visualization: TensorBoard files read back with TensorBoard's own EventAccumulator, PNGs, and plots from a journal."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainbus.kernel.config import RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.plugins._history import History
from trainbus.proto.journal_format import read_journal
from trainbus.plugins.visualization import VisualizationPlugin, plot_run
from trainbus.sdk import Harness

from conftest import TESTS_DIR
from fixture_targets import open_gate
from kernel_process import KernelProcess, cli, wait_until

WIDTH_PX, HEIGHT_PX = 800, 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMED = f"{TESTS_DIR / 'fixture_targets.py'}:digits_for_seconds"
DRAIN_TIMEOUT_S = 300  # only a broken plugin takes this long to reach the final event
PACED = "fixture_targets:paced_digits"  # the digits demo, held by the test where it must act (its `gate`)
STEPS_PER_EPOCH = 45  # kernel/digits.py: 1,437 training images in batches of 32
STARTUP_S = 180  # kernel/supervisor.py STARTUP_TIMEOUT_S: a restarted plugin imports torch, starved on a busy box
# A hang guard, not a pace: these runs wait on plugins that a busy machine starves (the drain, two restarts).
pytestmark = pytest.mark.timeout(DRAIN_TIMEOUT_S + 3 * STARTUP_S)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, which always comes first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def visualized_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    plugins = [resolve_plugin("visualization", {"plot_width_px": WIDTH_PX, "plot_height_px": HEIGHT_PX,
                                                "every_n_steps": 5}),
               resolve_plugin("cpu", {"interval_s": 0.3})]
    # The plugin's last plots follow the final event, which a starved plugin reaches long after training ends:
    # the run waits for its ack of that event (the drain), not for a time that fits an idle machine.
    result = run_training(RunConfig(target=TIMED, epochs=3, runs_dir=str(runs_dir), plugins=plugins,
                                    hyperparameters={"epoch_s": 0.4}, drain_timeout_s=DRAIN_TIMEOUT_S))
    assert result.status == "completed" and not result.undrained, result
    return result, read_events(result.run_dir)


def test_tensorboard_files_hold_losses_metrics_lr_and_readings(visualized_run):
    result, events = visualized_run
    accumulator = EventAccumulator(str(Path(result.run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/train_step", "loss/training", "loss/validation", "metrics/training_accuracy",
            "metrics/validation_accuracy", "lr", "cpu/process_percent"} <= tags, tags

    epochs = [e for e in events if e.type == "end_epoch"]
    for tag, key in (("loss/training", "training_loss"), ("loss/validation", "validation_loss"), ("lr", "lr")):
        scalars = accumulator.Scalars(tag)
        assert [s.step for s in scalars] == [e.step for e in epochs]
        assert [s.value for s in scalars] == pytest.approx([e.data[key] for e in epochs], rel=1e-6)
    accuracy = accumulator.Scalars("metrics/validation_accuracy")
    assert [s.value for s in accuracy] == pytest.approx([e.data["validation_metrics"]["accuracy"] for e in epochs],
                                                        rel=1e-6)
    steps = accumulator.Scalars("loss/train_step")
    batches = {e.step: e.data["loss"] for e in events if e.type == "end_training_batch"}
    assert steps and all(s.step % 5 == 0 for s in steps)
    assert [s.value for s in steps] == pytest.approx([batches[s.step] for s in steps], rel=1e-6)
    final = next(e.seq for e in events if e.type == "end_training_session")  # the plugin's last event
    cpu = [e for e in events if e.type == "metric" and e.data["name"] == "cpu/process_percent" and e.seq < final]
    assert [s.value for s in accumulator.Scalars("cpu/process_percent")] == pytest.approx([e.data["value"] for e in cpu])


def test_pngs_exist_with_the_configured_size(visualized_run):
    result, _ = visualized_run
    plots = Path(result.run_dir) / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    assert {"loss.png", "metrics.png", "resources-cpu.png"} <= set(names), names
    for path in plots.glob("*.png"):
        assert path.stat().st_size > 5_000  # drawn, not blank
        assert png_size(path) == (WIDTH_PX, HEIGHT_PX)
    assert not list(plots.glob("*.tmp"))


def test_plots_from_the_journal_alone_match_the_live_ones(visualized_run, tmp_path):
    result, _ = visualized_run
    out = tmp_path / "replotted"
    proc = subprocess.run([sys.executable, "-m", "trainbus.plugins.visualization", "--plot", result.run_dir,
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    live = {p.name: p.read_bytes() for p in (Path(result.run_dir) / "plots").glob("*.png")}
    again = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert set(again) == set(live)
    for name in live:
        assert png_size(out / name) == (WIDTH_PX, HEIGHT_PX)
        assert again[name] == live[name], f"{name} drawn from the journal differs from the live one"


def test_plots_drawn_into_a_directory_another_writer_draws_into_leave_its_files_alone(visualized_run, tmp_path):
    """`trainbus runs plot RUN` draws into RUN_DIR/plots, where the run's visualization plugin draws too: both wrote
    each PNG through one temporary name, `loss.png.tmp`, so one could truncate the other's half-written file, move
    it into place half-written, and then fail to find its own. Each writer now has temporary names of its own."""
    result, _ = visualized_run
    out = tmp_path / "plots"
    out.mkdir()
    theirs = out / "loss.png.tmp"
    theirs.write_bytes(b"another writer's PNG, half written")
    written = plot_run(Path(result.run_dir), out)
    assert theirs.read_bytes() == b"another writer's PNG, half written"
    assert {Path(p).name for p in written} >= {"loss.png"} and not [p for p in out.iterdir() if p != theirs
                                                                     and p.suffix != ".png"]


def test_plot_command_says_what_is_wrong_with_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainbus.plugins.visualization", "--plot", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no journal" in proc.stderr


def test_runs_plot_of_a_run_whose_losses_are_all_nan_names_the_curves_it_left_empty(tmp_path):
    """matplotlib draws no NaN: a diverged run's loss plot was empty axes, and nothing said why."""
    # 4 epochs of 3 steps: step 10 is on the per-step curve (visualization's every_n_steps)
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:diverged", epochs=4, runs_dir=str(tmp_path),
                                    plugins=[]))
    proc = cli("runs", "plot", result.run_id, "--runs-dir", str(tmp_path), timeout=120)  # forked, torch loaded
    assert proc.returncode == 0 and (Path(result.run_dir) / "plots" / "loss.png").is_file(), proc.stderr
    said = ("no finite value to draw for training loss per epoch, validation loss per epoch, training loss per step "
            "(each is NaN or infinite: did the run diverge?); their axes are empty")
    assert proc.stderr == f"trainbus: warning: {said}\n", proc.stderr
    # the plugin drawing them live says it too, once, as the run ends (it drew the blank plots in silence)
    live = Harness(VisualizationPlugin({}), run_dir=str(tmp_path / "live"))
    for event in read_events(result.run_dir):
        live.feed(event.type, step=event.step, epoch=event.epoch, **event.data)
    assert [(r["level"], r["text"]) for r in live.replies_of("log")] == [("warning", said)], live.replies


def test_a_torn_journal_tail_is_left_out(visualized_run, tmp_path):
    result, events = visualized_run
    torn = tmp_path / "run"
    torn.mkdir()
    whole = (Path(result.run_dir) / "events").read_bytes()
    (torn / "events").write_bytes(whole + whole[:37])  # a crash in the middle of the next record
    assert [e.seq for e in read_journal(torn / "events")][: len(events)] == [e.seq for e in events]
    assert {p.name for p in plot_run(torn)} >= {"loss.png", "metrics.png"}


def test_history_stops_at_the_final_event_and_keeps_the_best_epoch(visualized_run):
    result, events = visualized_run
    history = History.from_journal(result.run_dir)
    epochs = [e for e in events if e.type == "end_epoch"]
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    best = min(epochs, key=lambda e: e.data["validation_loss"])
    assert history.best_validation().epoch == best.epoch
    final = next(e for e in events if e.type == "end_training_session")
    assert history.last_seq == final.seq  # readings published after the end are not part of the record
    assert history.duration_s() > 0


def test_a_restarted_plugin_backfills_from_the_journal_and_writes_nothing_twice(visualized_run, tmp_path):
    """As after a crash: a new instance is replayed from its last ack (here: the second epoch's start) onward."""
    import shutil

    from trainbus.plugins.visualization import VisualizationPlugin

    result, events = visualized_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(Path(result.run_dir) / "events", run_dir / "events")
    shutil.copytree(Path(result.run_dir) / "tensorboard", run_dir / "tensorboard")  # what the first instance wrote
    settings = {"plot_width_px": WIDTH_PX, "plot_height_px": HEIGHT_PX, "every_n_steps": 5}
    plugin = VisualizationPlugin(settings, run_id=result.run_id, run_dir=str(run_dir))
    plugin.setup()
    resume = next(e.seq for e in events if e.type == "start_epoch" and e.epoch == 2)
    for event in events:
        if event.seq >= resume:
            plugin.handle(event)
            if event.type == "end_training_session":
                break
    plugin.teardown()
    for name in ("loss.png", "metrics.png"):
        assert (run_dir / "plots" / name).read_bytes() == (Path(result.run_dir) / "plots" / name).read_bytes()
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [s.step for s in accumulator.Scalars("loss/training")] == [e.step for e in events if e.type == "end_epoch"]
    steps = [s.step for s in accumulator.Scalars("loss/train_step")]
    assert steps == sorted(set(steps))  # no step written twice


def test_epoch_redraws_come_at_most_every_plot_min_interval_and_the_end_always_draws(visualized_run, tmp_path):
    """A run of 0.05 s epochs redrew every figure (~1.5 s) each epoch, fell behind and held its end past the drain."""
    from trainbus.plugins.visualization import VisualizationPlugin

    result, events = visualized_run
    plugin = VisualizationPlugin({"plot_width_px": WIDTH_PX, "plot_height_px": HEIGHT_PX, "every_n_steps": 5},
                                 run_id=result.run_id, run_dir=str(tmp_path))
    plugin.setup()
    loss_png = tmp_path / "plots" / "loss.png"
    drawn_at: list[int] = []  # loss.png's mtime after each end_epoch
    for event in events:
        plugin.handle(event)
        if event.type == "end_epoch":
            drawn_at.append(loss_png.stat().st_mtime_ns)
        if event.type == "end_training_session":
            break
    plugin.teardown()
    assert len(drawn_at) >= 2 and len(set(drawn_at)) == 1, drawn_at  # the first epoch drew; the next, within 10 s, not
    assert loss_png.stat().st_mtime_ns > drawn_at[-1]  # the end drew the whole run
    assert loss_png.read_bytes() == (Path(result.run_dir) / "plots" / "loss.png").read_bytes()


def test_an_epoch_a_stop_cut_short_is_drawn_apart_and_is_never_the_best():
    from trainbus.plugins._plots import PlotSize, loss_figure, metrics_figure
    from trainbus.proto import Event

    def epoch(seq: int, number: int, validation_loss: float, batches: int) -> Event:
        data = {"training_loss": 1.0 / number, "validation_loss": validation_loss, "training_batch_count": batches,
                "batches_planned": 75, "partial": batches < 75, "validation_metrics": {"accuracy": 0.9}}
        return Event(seq=seq, run="r", type="end_epoch", ts=float(seq), step=75 * (number - 1) + batches,
                     epoch=number, data=data)

    history = History()
    for event in (Event(seq=1, run="r", type="start_training_session", ts=0.0, step=0, epoch=0, data={"epochs": 3}),
                  epoch(2, 1, 0.5, 75), epoch(3, 2, 0.4, 75), epoch(4, 3, 0.3, 8)):
        history.update(event)
    assert [(e.epoch, e.partial, e.batches) for e in history.epochs] == [(1, False, 75), (2, False, 75), (3, True, 8)]
    assert history.best_validation().epoch == 2  # epoch 3's lower loss is over 8 of its 75 batches

    for axes in (loss_figure(history, PlotSize()).axes[0], metrics_figure(history, PlotSize()).axes[0]):
        lines = {line.get_label(): list(line.get_xdata()) for line in axes.get_lines()}
        assert lines["validation"] == [1, 2]  # the whole epochs' line stops before the cut one
        assert lines["validation, epoch 3 cut short (8/75 batches)"] == [3]


def test_a_plugin_killed_twice_mid_run_leaves_every_scalar_once_and_nothing_for_tensorboard_to_purge(
        tmp_path, kernels, caplog):
    """kill -9 of the visualization plugin after it drew epoch 1, and again after its successor drew again: TensorBoard's
    own reader finds every scalar of the run exactly once, purges nothing, and the PNGs are the journal's."""
    gate = tmp_path / "gate"
    plugins = [resolve_plugin("visualization", {"every_n_steps": 5}), resolve_plugin("cpu", {"interval_s": 0.3})]
    cfg = RunConfig(target=PACED, epochs=3, device="cpu", runs_dir=str(tmp_path / "runs"), plugins=plugins,
                    hyperparameters={"step_sleep_s": 0.005, "gate": str(gate)}, drain_timeout_s=DRAIN_TIMEOUT_S)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    loss_png = kernel.run_dir / "plots" / "loss.png"
    drawn = lambda: loss_png.stat().st_mtime_ns if loss_png.exists() else 0  # noqa: E731
    killed: list[int] = []
    for held_at in (STEPS_PER_EPOCH + 5, 2 * STEPS_PER_EPOCH + 5):  # in epoch 2, then in epoch 3
        before = drawn()
        open_gate(gate, held_at)
        pid = kernel.wait_ready("visualization", timeout_s=STARTUP_S, not_in=killed)
        # this process drew the plots of an end_epoch (epoch 1, then epoch 2 or its replayed 1) and flushed
        # TensorBoard after it: mid-run, with files of its own to lose
        wait_until(lambda: drawn() > before, STARTUP_S, f"plots drawn by plugin pid {pid}")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    open_gate(gate, 3 * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=DRAIN_TIMEOUT_S + 2 * STARTUP_S)
    assert result["status"] == "completed" and not result["undrained"], result
    summary = result["plugins"]["visualization"]
    assert (summary["restarts"], summary["crashes"]) == (2, ["signal SIGKILL"] * 2), summary

    run_dir = Path(result["run_dir"])
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3  # a file per process
    with caplog.at_level(logging.INFO, logger="tensorboard"):
        accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
    assert not [r.getMessage() for r in caplog.records if "purg" in r.getMessage().lower()]
    want = scalars_from_the_journal(read_events(run_dir), every_n_steps=5)
    assert set(accumulator.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(s.step, s.value) for s in accumulator.Scalars(tag)]
        assert [step for step, _ in got] == [step for step, _ in points], tag
        assert [value for _, value in got] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert len(want["loss/train_step"]) == 3 * STEPS_PER_EPOCH // 5 and len(want["loss/validation"]) == 3
    assert len(accumulator.Tensors("hyperparameters")) == 1

    live = {p.name: p.read_bytes() for p in (run_dir / "plots").glob("*.png")}
    again = {p.name: p.read_bytes() for p in map(Path, plot_run(run_dir, tmp_path / "replotted"))}
    assert {"loss.png", "metrics.png", "resources-cpu.png"} <= set(live) and live == again


def scalars_from_the_journal(events, every_n_steps: int) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the plugin's docstring promises, from the run's events up to the final one: {tag: [(step, value)]}."""
    want: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        if e.type == "end_training_session":
            break
        if e.type == "end_training_batch" and e.step % every_n_steps == 0:
            want.setdefault("loss/train_step", []).append((e.step, e.data["loss"]))
        elif e.type == "end_epoch":
            for key, tag in (("training_loss", "loss/training"), ("validation_loss", "loss/validation"), ("lr", "lr")):
                want.setdefault(tag, []).append((e.step, e.data[key]))
            for group in ("training", "validation"):
                for name, value in e.data[f"{group}_metrics"].items():
                    want.setdefault(f"metrics/{group}_{name}", []).append((e.step, value))
        elif e.type == "metric":
            want.setdefault(e.data["name"], []).append((e.step, e.data["value"]))
    return want


def test_a_continued_run_shows_each_step_once_with_the_values_it_trained_again(tmp_path):
    """A run killed at step 10 and continued from its checkpoint at step 6: steps 7-10 train again. TensorBoard's
    reader shows each step once, with the continued session's value, however the plugin was restarted."""
    from trainbus.plugins.visualization import VisualizationPlugin
    from trainbus.proto import JOURNAL_NAME, Event, event_to_map, pack

    events, seq = [], 0

    def add(type_, step, **data):
        nonlocal seq
        seq += 1
        events.append(Event(seq=seq, run="r", type=type_, ts=1000.0 + seq, step=step, epoch=1, data=data))

    add("start_training_session", 0, hyperparameters={"lr": 0.1})
    for step in range(1, 11):
        add("end_training_batch", step, loss=1.0)
    killed_at = seq
    add("start_training_session", 6, hyperparameters={"lr": 0.1})  # continued from step 6's checkpoint
    for step in range(7, 13):
        add("end_training_batch", step, loss=2.0)
    add("end_training_session", 12)
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(pack(event_to_map(e)) for e in events))

    def instance(first_seq: int, last_seq: int) -> None:
        plugin = VisualizationPlugin({"every_n_steps": 1, "plots": False}, run_id="r", run_dir=str(tmp_path))
        plugin.setup()
        for event in events[first_seq - 1:last_seq]:
            plugin.handle(event)
        plugin.teardown()

    instance(1, killed_at - 3)  # the first kernel's plugin, behind when the kernel was killed
    instance(killed_at + 1, killed_at + 3)  # the continued run's, then killed itself
    instance(killed_at + 4, seq)  # and restarted (replayed from its last ack)

    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    points = [(s.step, s.value) for s in accumulator.Scalars("loss/train_step")]
    assert points == [(step, 1.0) for step in range(1, 7)] + [(step, 2.0) for step in range(7, 13)]


def test_a_run_interrupted_then_continued_is_drawn_whole_from_its_journal(tmp_path):
    """A run Ctrl-C ended (its session's end_training_session journaled) and continued with `runs resume`: reading
    its journal stopped at the first session's end, so `runs plot` drew that session alone, and a plugin restarted in
    the second session (which backfills from the journal) took none of that session's events."""
    from trainbus.proto import JOURNAL_NAME, Event, event_to_map, pack

    events, seq = [], 0

    def add(type_, step, at_epoch, **data):
        nonlocal seq
        seq += 1
        events.append(Event(seq=seq, run="r", type=type_, ts=1000.0 + seq, step=step, epoch=at_epoch, data=data))

    def epoch_end(epoch, loss, partial=False):
        add("end_epoch", 10 * epoch, epoch, training_loss=loss, validation_loss=loss, training_metrics={},
            validation_metrics={}, lr=0.1, partial=partial)

    add("start_training_session", 0, 0, epochs=3)
    epoch_end(1, 1.0)
    epoch_end(2, 0.9, partial=True)  # Ctrl-C in epoch 2
    add("end_training_session", 15, 2, epochs_completed=1, stopped_early=True,
        stop_reasons=["kernel: stop: interrupted (SIGINT)"])
    continued = seq + 1
    add("start_training_session", 10, 1, epochs=3)
    add("load_checkpoint", 10, 0, epoch=2, batches_done=0)  # the epoch it trains next
    epoch_end(2, 0.5)
    restarted = seq + 1
    epoch_end(3, 0.25)
    add("end_training_session", 30, 3, epochs_completed=3, stopped_early=False, stop_reasons=[])
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(pack(event_to_map(e)) for e in events))

    history = History.from_journal(tmp_path)
    assert [(e.epoch, e.training_loss) for e in history.epochs] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert history.end == events[-1].data
    restarted_plugin = History()  # a plugin restarted in the second session: backfill, then its replay
    restarted_plugin.backfill(tmp_path, before_seq=restarted)
    for event in events[restarted - 1:]:
        restarted_plugin.update(event)
    assert [e.epoch for e in restarted_plugin.epochs] == [1, 2, 3] and restarted_plugin.end == events[-1].data
    assert continued < restarted
