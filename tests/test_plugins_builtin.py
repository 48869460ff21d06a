"""The built-in plugins, driven without sockets: feed events through the Harness, check replies and files."""

from __future__ import annotations

import json
import math
import time

from pathlib import Path

import pytest
from rich.console import Console

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.plugins.console import ConsolePlugin
from trainbus.plugins.early_stopping import EarlyStoppingPlugin, MonitorMissing
from trainbus.plugins.metrics_log import MetricsLogPlugin
from trainbus.sdk import Harness, SettingsError
from trainbus.proto import JOURNAL_NAME
from trainbus.proto import events as ev
from trainbus.sdk.runner import NotRetryable, Runner

from conftest import TESTS_DIR
from helpers import PLUGIN_START_S


def feed_run(h: Harness, losses: list[float | None], batches: int = 4, stop_reasons: list[str] | None = None,
             cut_at: int | None = None) -> None:
    """The loop's event sequence (kernel/loop.py) for one epoch per validation loss in `losses`.

    cut_at: a stop ends the last epoch's training after this many batches (a partial epoch)."""
    step = 0
    h.feed("start_training_session", hyperparameters={"lr": 0.1}, epochs=len(losses), device="cpu",
           model="Net", parameters=1234)
    for epoch, validation_loss in enumerate(losses, start=1):
        h.feed("start_epoch", epoch=epoch, batches_planned=batches)
        h.feed("start_training_loop")
        trained = cut_at if cut_at is not None and epoch == len(losses) else batches
        total = 0.0
        for index in range(trained):
            h.feed("start_training_batch", batch_index=index)
            step += 1
            total += 1.0 / epoch
            h.feed("end_training_batch", step=step, batch_index=index, loss=1.0 / epoch,
                   training_loss_total=total, training_batch_count=index + 1)
        train = {"training_loss_total": total, "training_batch_count": trained, "training_loss": total / trained,
                 "training_metrics": {"accuracy": 0.5}, "batches_planned": batches, "partial": trained < batches}
        h.feed("end_training_loop", **train)
        h.feed("start_validation_loop")
        validation = {"validation_loss_total": None, "validation_batch_count": 0, "validation_loss": validation_loss,
                      "validation_metrics": {"accuracy": None if validation_loss is None else 0.9}}
        h.feed("end_validation_loop", **validation)
        h.feed("end_epoch", **train, **validation, hyperparameters={"lr": 0.1}, lr=0.1)
    h.feed("end_training_session", epochs_completed=len(losses) - (cut_at is not None), steps=step,
           stopped_early=bool(stop_reasons), stop_reasons=stop_reasons or [], training_loss=None,
           validation_loss=losses[-1], validation_metrics={"accuracy": 0.9})


class Recorder:
    """Stands in for a Harness to capture a run's events, so two plugin instances can be fed the same ones."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def feed(self, type_: str, **kwargs) -> list:
        self.events.append((type_, kwargs))
        return []


def epochs_fed(h: Harness, values: list[float], key: str = "validation_loss", first_epoch: int = 1) -> list[int]:
    """Feed one end_epoch per value, numbered from first_epoch; return the epochs after which a stop was replied."""
    stopped_at = []
    for epoch, value in enumerate(values, start=first_epoch):
        data = {key: value} if key.endswith("loss") else {"validation_metrics": {key.split("_", 1)[1]: value}}
        if any(r["type"] == "stop" for r in h.feed("end_epoch", epoch=epoch, **data)):
            stopped_at.append(epoch)
    return stopped_at


# early stopping


@pytest.mark.parametrize("mode, values", [
    ("min", [1.0, 0.8, 0.9, 0.85, 0.81, 0.95]),  # best 0.8 at epoch 2; 3 bad epochs end at epoch 5
    ("max", [0.1, 0.5, 0.4, 0.45, 0.49, 0.3]),
])
def test_early_stopping_stops_after_exactly_patience_bad_epochs(tmp_path, mode, values):
    h = Harness(EarlyStoppingPlugin({"mode": mode, "patience": 3}, run_dir=str(tmp_path)))
    stopped_at = epochs_fed(h, values)
    assert stopped_at[0] == 5
    reason = h.replies_of("stop")[0]["reason"]
    assert "validation_loss" in reason and "3 epochs" in reason and "epoch 2" in reason


def test_early_stopping_an_improvement_resets_patience(tmp_path):
    h = Harness(EarlyStoppingPlugin({"patience": 2}, run_dir=str(tmp_path)))
    assert epochs_fed(h, [1.0, 1.1, 0.9, 1.0]) == []


def test_early_stopping_min_delta_counts_small_improvements_as_none(tmp_path):
    values = [1.0, 0.95, 0.85, 0.80, 0.76]  # only 0.85 beats the best by more than 0.1
    strict = Harness(EarlyStoppingPlugin({"patience": 2, "min_delta": 0.1}, run_dir=str(tmp_path / "a")))
    assert epochs_fed(strict, values) == [5]
    lenient = Harness(EarlyStoppingPlugin({"patience": 2}, run_dir=str(tmp_path / "b")))
    assert epochs_fed(lenient, values) == []


def test_early_stopping_resolves_validation_accuracy_from_the_metrics_dict(tmp_path):
    h = Harness(EarlyStoppingPlugin({"monitor": "validation_accuracy", "mode": "max", "patience": 1},
                                    run_dir=str(tmp_path)))
    assert epochs_fed(h, [0.5, 0.6, 0.6], key="validation_accuracy") == [3]
    assert "best 0.6 at epoch 2" in h.replies_of("stop")[0]["reason"]
    assert not h.replies_of("log")


def test_early_stopping_nan_never_improves(tmp_path):
    h = Harness(EarlyStoppingPlugin({"patience": 2, "check_finite": False}, run_dir=str(tmp_path)))
    assert epochs_fed(h, [1.0, math.nan, math.nan]) == [3]


@pytest.mark.parametrize("diverged", [math.nan, math.inf])
def test_early_stopping_stops_at_once_when_the_monitor_is_not_finite(tmp_path, diverged):
    """Lightning's check_finite: a diverged run is not trained on for `patience` more epochs."""
    h = Harness(EarlyStoppingPlugin({"patience": 5}, run_dir=str(tmp_path)))
    assert epochs_fed(h, [1.0, 0.8, diverged]) == [3]
    assert h.replies_of("stop")[0]["reason"] == (f"validation_loss is {diverged} at epoch 3: training diverged "
                                                 f"(best 0.8 at epoch 2)")


def test_early_stopping_fails_its_handler_when_the_monitored_key_is_missing(tmp_path):
    """Not retried and reported once, as an error naming what the run does produce, not cut short."""
    h = Harness(EarlyStoppingPlugin({"monitor": "validation_f1", "patience": 1}, run_dir=str(tmp_path)))
    with pytest.raises(MonitorMissing) as raised:
        h.feed("end_epoch", epoch=1, validation_loss=1.0, validation_metrics={"accuracy": 0.5})
    assert isinstance(raised.value, NotRetryable)
    assert str(raised.value) == ("early_stopping monitor 'validation_f1' is not in this run's end_epoch; set monitor "
                                 "to one of: validation_accuracy, validation_loss")
    assert not h.replies_of("stop")


@pytest.mark.parametrize("settings", [{"mode": "minimum"}, {"patience": 0}, {"min_delta": -0.1}])
def test_early_stopping_rejects_bad_settings_in_setup(tmp_path, settings):
    with pytest.raises(SettingsError, match="early_stopping"):
        Harness(EarlyStoppingPlugin(settings, run_dir=str(tmp_path)))


def test_early_stopping_resumes_its_counts_after_a_restart(tmp_path):
    first = Harness(EarlyStoppingPlugin({"patience": 3}, run_dir=str(tmp_path)))
    assert epochs_fed(first, [1.0, 1.1]) == []  # best at epoch 1, one bad epoch, then a crash
    restarted = Harness(EarlyStoppingPlugin({"patience": 3}, run_dir=str(tmp_path)))
    # The replay brings seqs 1-2 again (skipped, already counted), then two more bad epochs.
    assert epochs_fed(restarted, [1.0, 1.1, 1.2, 1.3]) == [4]


def test_early_stopping_in_a_run_continued_from_an_earlier_checkpoint_counts_each_epoch_once(tmp_path):
    """A run killed in epoch 5, its checkpoint of epoch 2 the newest, continued with `runs resume`: epochs 3 and 4 train
    again. Its saved counts already held them, so they counted twice: patience 3 stopped the continued run at its
    first epoch, `no improvement ... for 3 epochs`, after one epoch without improvement."""
    from trainbus.proto import JOURNAL_NAME, Event, event_to_map, pack

    first_session = [("start_training_session", None, {}), ("end_epoch", 1, {"validation_loss": 1.0}),
                     ("end_epoch", 2, {"validation_loss": 0.9}), ("end_epoch", 3, {"validation_loss": 1.1}),
                     ("end_epoch", 4, {"validation_loss": 1.2})]
    continued = [("start_training_session", None, {}), ("load_checkpoint", 3, {"batches_done": 0}),
                 ("end_epoch", 3, {"validation_loss": 1.1}), ("end_epoch", 4, {"validation_loss": 1.2}),
                 ("end_epoch", 5, {"validation_loss": 1.3})]
    journal = [Event(seq=seq, run="r", type=type_, ts=1000.0 + seq, step=0, epoch=epoch or 0, data=data)
               for seq, (type_, epoch, data) in enumerate(first_session + continued, start=1)]
    (tmp_path / JOURNAL_NAME).write_bytes(b"".join(pack(event_to_map(e)) for e in journal))

    def feed(h: Harness, events) -> list[int]:
        return [epoch for type_, epoch, data in events
                if any(r["type"] == "stop" for r in h.feed(type_, epoch=epoch, **data))]

    first = Harness(EarlyStoppingPlugin({"patience": 3}, run_dir=str(tmp_path)), run_id="r")
    assert feed(first, first_session) == []  # best at epoch 2, two bad epochs; then the kernel is killed
    again = Harness(EarlyStoppingPlugin({"patience": 3}, run_dir=str(tmp_path)), run_id="r",
                    session_seq=len(first_session) + 1)
    assert feed(again, continued) == [5]
    assert "for 3 epochs (best 0.9 at epoch 2)" in again.replies_of("stop")[0]["reason"]


def test_early_stopping_replayed_many_epochs_past_patience_asks_to_stop_once(tmp_path):
    """Attached with --from-start (patience 1) to a run four epochs past its best, it replied a stop for each
    replayed epoch, and the run ended 'stopped by: early_stopping: stop: no improvement ... for 1 epoch ...;
    ... for 2 epochs ...; ... for 3 epochs ...; ... for 4 epochs ...'. One process asks once; a restarted one
    (a crash may have eaten the first) asks again."""
    h = Harness(EarlyStoppingPlugin({"patience": 1}, run_dir=str(tmp_path)))
    assert epochs_fed(h, [1.0, 1.1, 1.2, 1.3, 1.4]) == [2]
    restarted = Harness(EarlyStoppingPlugin({"patience": 1}, run_dir=str(tmp_path)))
    restarted.seq = h.seq
    assert epochs_fed(restarted, [1.5, 1.6], first_epoch=6) == [6]  # the run's next epochs


def test_early_stopping_attached_again_watching_another_metric_starts_its_counts_over(tmp_path):
    """Detached, then attached again with monitor = validation_accuracy, mode = max: it took the saved best of
    validation_loss (1.0) for the best accuracy, and stopped a run whose accuracy rose every epoch ('no improvement
    in validation_accuracy for 2 epochs (best 1 at epoch 2)')."""
    first = Harness(EarlyStoppingPlugin({"patience": 10}, run_dir=str(tmp_path)))
    assert epochs_fed(first, [1.2, 1.0, 1.1]) == []
    first.close()
    again = Harness(EarlyStoppingPlugin({"monitor": "validation_accuracy", "mode": "max", "patience": 2},
                                        run_dir=str(tmp_path)))
    again.seq = first.seq  # the run's seqs go on
    assert epochs_fed(again, [0.7, 0.8, 0.9, 0.85, 0.84], key="validation_accuracy") == [5]
    assert "(best 0.9 at epoch 3)" in again.replies_of("stop")[0]["reason"]
    assert any("validation_loss" in r["text"] for r in again.replies_of("log")), "the fresh start is said"


# metrics log


def read_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_log_writes_flat_step_epoch_metric_and_session_records(tmp_path):
    h = Harness(MetricsLogPlugin({"every_n_steps": 2}, run_dir=str(tmp_path)))
    feed_run(h, [0.5, math.nan], batches=4)
    h.feed("metric", plugin="gpu_monitor", name="gpu_util", value=0.75, step=8)
    h.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["step", "step", "epoch", "step", "step", "epoch", "session_end", "metric"]
    step = records[0]
    assert step == {"kind": "step", "seq": step["seq"], "step": 2, "epoch": 1, "time": step["time"], "loss": 1.0,
                    "batch_index": 1, "training_loss_mean": 1.0}
    epoch = records[2]
    assert {"seq", "step", "epoch", "time", "training_loss", "validation_loss", "lr", "training_accuracy",
            "validation_accuracy"} <= set(epoch)
    assert epoch["epoch"] == 1 and epoch["step"] == 4 and epoch["validation_loss"] == 0.5
    assert records[5]["validation_loss"] is None  # NaN is not JSON; null reads as NaN in pandas
    assert {k: records[7][k] for k in ("name", "value", "step", "plugin")} == \
        {"name": "gpu_util", "value": 0.75, "step": 8, "plugin": "gpu_monitor"}
    assert all(not isinstance(v, (dict, list)) for r in records for v in r.values())  # flat columns
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


def test_metrics_log_fsyncs_an_epoch_at_most_once_a_second_and_at_the_end(tmp_path, monkeypatch):
    """Every record is written as it comes (a crash of the plugin loses none); fsync, against a crash of the
    machine, follows an epoch at most every FSYNC_INTERVAL_S: a tiny model's 20 epochs a second are not 20
    fsyncs. The last records are fsynced at exit whatever the time."""
    import trainbus.plugins.metrics_log as metrics_log

    synced: list[int] = []
    real_fsync = metrics_log.os.fsync
    monkeypatch.setattr(metrics_log.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    h = Harness(MetricsLogPlugin({"every_n_steps": 0}, run_dir=str(tmp_path)))
    for epoch in range(1, 11):  # well within a second, even on a busy machine
        h.feed("end_epoch", epoch=epoch, training_loss=1.0 / epoch, validation_loss=1.0)
    assert len(synced) == 1, synced
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10  # written, all of them
    h.plugin._next_fsync = 0.0  # as if a second went by
    h.feed("end_epoch", epoch=11, training_loss=0.1, validation_loss=1.0)
    assert len(synced) == 2
    h.plugin.teardown()
    assert len(synced) == 3


def test_the_harness_returns_what_a_teardown_says():
    """As the SDK sends a teardown's last metric and log line to the kernel, Harness.close returns them."""
    from fixture_plugins import SaysGoodbye

    h = Harness(SaysGoodbye())
    assert h.feed("end_epoch", epoch=1) == []
    said = h.close()
    assert [(r["type"], r.get("name"), r.get("text")) for r in said] == [
        ("metric", "goodbye/events", None), ("log", None, "goodbye from teardown")]
    assert h.replies[-2:] == said


def test_what_a_setup_says_is_in_the_harness_replies_and_not_the_first_feeds():
    """A plugin that logs from setup() (`self.log("ready")`) had that line returned by the first `feed`, as if the
    handler of that event had said it: a test asserting `h.feed(...) == []` of an epoch that replies nothing failed.
    Now the Harness takes setup's replies as it is made (in `h.replies`), and `feed` returns the handler's only."""
    from trainbus.sdk import Plugin

    class LogsAtSetup(Plugin):
        def setup(self):
            self.log("ready")

        def on_end_epoch(self, event):
            if event.data["validation_loss"] > 1:
                self.stop("too high")

    h = Harness(LogsAtSetup())
    assert [(r["type"], r["text"]) for r in h.replies] == [("log", "ready")]
    assert h.feed("end_epoch", epoch=1, validation_loss=0.5) == []
    assert [r["type"] for r in h.feed("end_epoch", epoch=2, validation_loss=1.5)] == ["stop"]
    assert [r["type"] for r in h.replies] == ["log", "stop"]


def test_what_a_handler_replied_before_it_raised_is_in_the_harness_replies_not_the_next_feeds():
    """In a run the replies of a handler's last failed try go out (README). Under the Harness they stayed in the
    plugin's outbox as feed raised: `h.replies` lacked the stop, and the next feed returned it as its own handler's."""
    from trainbus.sdk import Plugin

    class StopsThenRaises(Plugin):
        def on_end_epoch(self, event):
            self.stop("diverged")
            raise ValueError("and then failed")

        def on_start_epoch(self, event):
            pass

    h = Harness(StopsThenRaises())
    with pytest.raises(ValueError, match="and then failed"):
        h.feed("end_epoch", epoch=1)
    assert [(r["type"], r["reason"]) for r in h.replies] == [("stop", "diverged")]
    assert h.feed("start_epoch", epoch=2) == []
    assert len(h.replies) == 1


def test_an_event_type_the_harness_does_not_know_is_said_with_the_one_meant():
    """`h.feed("epoch_end", ...)` (Lightning's word order) said only "unknown event type 'epoch_end'": which is
    right was left to the author to find. Now the error names the near type and where the types are listed."""
    from trainbus.sdk import Plugin

    h = Harness(Plugin())
    with pytest.raises(ValueError) as raised:
        h.feed("epoch_end", epoch=1)
    assert str(raised.value).startswith("unknown event type 'epoch_end' (did you mean 'end_epoch'?); the types are "
                                        "proto/PROTOCOL.md §6's: start_training_session, "), str(raised.value)
    with pytest.raises(ValueError, match=r"^unknown event type 'end_training_step' .*; the types are "):
        h.feed("end_training_step")


def test_a_key_an_events_data_does_not_have_is_said_with_the_keys_it_has():
    """`event.data["validation_accuracy"]` in an on_end_epoch (the accuracy is in `validation_metrics`) failed in a
    run with a bare `KeyError: 'validation_accuracy'` after three tries, every epoch; the author had to look up
    PROTOCOL.md §6 to see what end_epoch carries. Now the KeyError names the event type and the keys it has."""
    from trainbus.sdk import Plugin

    class ReadsAccuracy(Plugin):
        def on_end_epoch(self, event):
            self.metric("acc", event.data["validation_accuracy"])

    h = Harness(ReadsAccuracy())
    with pytest.raises(KeyError) as raised:
        h.feed("end_epoch", epoch=1, validation_loss=0.5, validation_metrics={"accuracy": 0.9})
    assert raised.value.args[0] == ("'validation_accuracy': end_epoch's data has no such key; it has: validation_loss, "
                                    "validation_metrics (proto/PROTOCOL.md §6)"), raised.value.args
    assert h.feed("end_epoch", epoch=2, validation_accuracy=0.9)[0]["value"] == 0.9  # a present key reads as before


def test_metrics_log_session_end_record(tmp_path):
    h = Harness(MetricsLogPlugin(run_dir=str(tmp_path)))
    feed_run(h, [0.5], stop_reasons=["early_stopping: stop: patience"])
    h.close()
    end = read_records(tmp_path / "metrics.jsonl")[-1]
    assert end["kind"] == "session_end" and end["stopped_early"] is True
    assert end["stop_reasons"] == "early_stopping: stop: patience" and end["validation_accuracy"] == 0.9


def test_metrics_log_writes_an_epoch_a_stop_cut_short_as_a_partial_epoch(tmp_path):
    h = Harness(MetricsLogPlugin({"every_n_steps": 0}, run_dir=str(tmp_path)))
    feed_run(h, [0.5, 0.4], batches=75, cut_at=8, stop_reasons=["kernel: stop: interrupted (Ctrl-C)"])
    h.close()
    records = read_records(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["epoch", "partial_epoch", "session_end"]
    whole, partial, end = records
    assert (whole["training_batch_count"], whole["batches_planned"]) == (75, 75)
    assert (partial["epoch"], partial["training_batch_count"], partial["batches_planned"]) == (2, 8, 75)
    assert end["epochs_completed"] == 1


def test_metrics_log_restart_does_not_duplicate_replayed_records(tmp_path):
    run = Recorder()
    feed_run(run, [0.5, 0.4, 0.3])
    crash_at = len(run.events) // 2

    def feed(harness, events):
        for type_, kwargs in events:
            harness.feed(type_, **kwargs)

    first = Harness(MetricsLogPlugin({"every_n_steps": 1}, run_dir=str(tmp_path / "crashed")))
    feed(first, run.events[:crash_at])  # then it crashes, before acking all it wrote: no teardown
    path = tmp_path / "crashed" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"kind": "step", "seq": 99')  # and it died mid-write
    restarted = Harness(MetricsLogPlugin({"every_n_steps": 1}, run_dir=str(tmp_path / "crashed")))
    feed(restarted, run.events)  # the replay starts from seq 1 here, the worst case
    restarted.close()
    clean = Harness(MetricsLogPlugin({"every_n_steps": 1}, run_dir=str(tmp_path / "clean")))
    feed(clean, run.events)
    clean.close()

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert without_time(read_records(path)) == without_time(read_records(tmp_path / "clean" / "metrics.jsonl"))


def test_metrics_log_writes_a_continued_runs_events_whose_seqs_a_power_loss_gave_back(tmp_path):
    """PROTOCOL.md §12: a power loss took the journal's last seqs (3, 4) but not metrics.jsonl's records of them;
    the continued run's kernel (session_seq 3) numbers new events 3, 4, 5. Each is written, and a restart of the
    plugin within that kernel, replayed from seq 1, writes none twice."""
    first = Harness(MetricsLogPlugin({"every_n_steps": 0}, run_dir=str(tmp_path)))
    for epoch in (1, 2, 3, 4):
        first.feed("end_epoch", epoch=epoch, training_loss=1.0)
    first.close()
    continued = Harness(MetricsLogPlugin({"every_n_steps": 0}, run_dir=str(tmp_path)), session_seq=3)
    for epoch in (3, 4, 5):
        continued.feed("end_epoch", epoch=epoch, training_loss=0.5)  # seqs 3, 4, 5
    # killed before acking: restarted in the same kernel, it is replayed from 1 (the old seqs 1-2, then 3-5)
    restarted = Harness(MetricsLogPlugin({"every_n_steps": 0}, run_dir=str(tmp_path)), session_seq=3)
    restarted.seq = 0
    for epoch in (1, 2, 3, 4, 5):
        restarted.feed("end_epoch", epoch=epoch, training_loss=1.0 if epoch < 3 else 0.5)
    restarted.close()
    records = read_records(tmp_path / "metrics.jsonl")
    epochs = [(r["seq"], r["epoch"], r["training_loss"]) for r in records if r["kind"] == "epoch"]
    assert epochs == [(1, 1, 1.0), (2, 2, 1.0), (3, 3, 1.0), (4, 4, 1.0), (3, 3, 0.5), (4, 4, 0.5), (5, 5, 0.5)]
    assert [r for r in records if r["kind"] == "session"] == [
        {"kind": "session", "session_seq": 3, "after_seq": 2, "time": records[4]["time"]}]


def test_metrics_log_restarted_in_a_continued_run_far_past_its_session_record_writes_nothing_twice(tmp_path):
    """The `session` record is looked for back past the 1 MiB tail that gives the last seq."""
    continued = Harness(MetricsLogPlugin({"every_n_steps": 1}, run_dir=str(tmp_path)), session_seq=5)
    for step in range(1, 16_001):  # over 2 MiB of step records
        continued.feed("end_training_batch", step=step, loss=0.5, batch_index=step)
    size = (tmp_path / "metrics.jsonl").stat().st_size
    assert size > 2 * (1 << 20)
    restarted = Harness(MetricsLogPlugin({"every_n_steps": 1}, run_dir=str(tmp_path)), session_seq=5)
    restarted.seq = 15_000  # replayed from its last ack
    for step in range(15_000, 16_001):
        restarted.feed("end_training_batch", step=step, loss=0.5, batch_index=step)
    restarted.close()
    assert (tmp_path / "metrics.jsonl").stat().st_size == size


# console


def test_console_without_a_tty_prints_plain_epoch_lines_and_warnings(tmp_path, capsys):
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    feed_run(h, [0.5, None])
    h.feed("start_epoch", epoch=3)
    h.feed("end_training_batch", batch_index=None, loss=None, training_loss_total=None, training_batch_count=None)
    h.feed("end_epoch", training_loss=None, validation_loss=None, validation_metrics=None, lr=None)
    h.feed("plugin_crashed", plugin="gpu_monitor", exit_code=-9, cause="signal SIGKILL", hung=False)
    h.feed("plugin_hung", plugin="slow", pid=12, reason="silent for 3.2 s")
    h.feed("vote_missed", plugins=["early_stopping"], at="end_epoch", seq=40, timeout_s=5.0)
    h.feed("plugin_failed", plugin="gpu_monitor", reason="6 failures within 60 s", log="runs/x/plugins/gpu.log")
    h.feed("log", plugin="metrics_log", level="error", text="handler failed:\nTraceback ...\nKeyError: 'x'")
    h.feed("log", plugin="metrics_log", level="info", text="all good")
    h.feed("end_training_session", epochs_completed=None, steps=None, stopped_early=True, stop_reasons=None)
    h.close()
    out = capsys.readouterr().out
    assert "\x1b" not in out
    lines = out.splitlines()
    assert any(line.startswith("epoch 1/2  train loss 1  train accuracy 0.5  val loss 0.5  val accuracy 0.9  lr 0.1  ")
               for line in lines)
    assert any(line.startswith("epoch 2/2  train loss 0.5  train accuracy 0.5  val loss ?  val accuracy ?")
               for line in lines)
    assert any(line.startswith("epoch 3/2  train loss ?  val loss ?") for line in lines)
    assert "warning: plugin gpu_monitor crashed (signal SIGKILL)" in lines
    assert "warning: plugin slow hung (silent for 3.2 s)" in lines
    assert ("warning: no vote from early_stopping at end_epoch of epoch 3 within 5 s: training went on (a stop it "
            "decided there lands at a later boundary)") in lines
    assert any(line.startswith("error: plugin gpu_monitor given up: 6 failures") for line in lines)
    assert "error: metrics_log: handler failed: ... KeyError: 'x'" in lines
    assert "all good" not in out
    assert lines[-1] == "finished: ? epochs, ? steps; stopped early: no reason given"


def test_a_restarted_console_says_the_epochs_the_run_plans_from_its_config(tmp_path, capsys):
    """kill -9 of the console after epoch 1: its successor, which never sees start_training_session (best effort:
    no replay), printed `epoch 4/?` to the run's end. The run's config.json says how many epochs it plans."""
    (tmp_path / "config.json").write_text(json.dumps({"target": "t.py:build", "epochs": 6}))
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    h.seq = 200  # mid-run: what it missed is not replayed
    h.feed("end_epoch", epoch=4, training_loss=0.5, validation_loss=0.4, validation_metrics={}, lr=0.1)
    h.close()
    assert capsys.readouterr().out.startswith("epoch 4/6  train loss 0.5  val loss 0.4")


def test_console_without_validation_says_the_training_metrics_and_no_val_loss(tmp_path, capsys):
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    h.feed("start_training_session", epochs=1, model="Net", parameters=10, device="cpu")
    h.feed("start_epoch", epoch=1)
    h.feed("end_epoch", training_loss=0.25, training_metrics={"top2": 0.75}, training_batch_count=3, lr=0.1)
    h.close()
    lines = capsys.readouterr().out.splitlines()
    assert "training Net (10 parameters) on cpu for 1 epoch" in lines
    assert any(line.startswith("epoch 1/1  train loss 0.25  train top2 0.75  lr 0.1  ") for line in lines), lines


def test_console_says_an_epoch_a_stop_cut_short_is_partial(tmp_path, capsys):
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    feed_run(h, [0.5, 0.4], batches=75, cut_at=8, stop_reasons=["kernel: stop: interrupted (Ctrl-C)"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("epoch 1/2  train loss 1  train accuracy 0.5  val loss 0.5") for line in lines), lines
    assert any(line.startswith("epoch 2/2 partial (8/75 batches)  train loss 0.5  train accuracy 0.5  val loss 0.4")
               for line in lines)
    assert lines[-1] == ("finished: 1 epoch and 8/75 batches of epoch 2, 83 steps; "
                         "stopped early: kernel: stop: interrupted (Ctrl-C)")


def test_console_shows_the_first_epochs_batch_total_and_an_eta(tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat the captured stdout as a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    plugin = ConsolePlugin({"refresh_per_second": 20.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    h.feed("start_training_session", hyperparameters={}, epochs=4, device="cpu", model="Net", parameters=1)
    h.feed("start_epoch", epoch=1, batches_planned=75)
    for index in range(3):
        h.feed("end_training_batch", epoch=1, step=index + 1, batch_index=index, loss=1.0, training_loss_total=1.0,
               training_batch_count=index + 1)
        time.sleep(0.02)  # rich's speed estimate needs time to pass between updates
    epochs, batches = (plugin.progress.tasks[task] for task in (plugin.epoch_task, plugin.batch_task))
    assert (batches.total, batches.completed) == (75, 3)  # not "3/?"
    assert epochs.completed == pytest.approx(3 / 75)  # the run's bar moves within its first epoch ...
    assert epochs.time_remaining is not None and batches.time_remaining is not None  # ... so both have an ETA
    h.close()


def test_console_counts_validation_batches_and_their_loss_on_its_batch_bar(tmp_path, monkeypatch):
    """The batch bar said "epoch N validation" over the training's 75/75 and training loss for the whole of
    validation; it now counts validation's batches (of the last validation's total: unknown at the first) and
    shows their running loss."""
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    plugin = ConsolePlugin({"refresh_per_second": 20.0}, run_dir=str(tmp_path))
    assert "end_validation_batch" in plugin.subscriptions()
    h = Harness(plugin)
    h.feed("start_training_session", hyperparameters={}, epochs=2, device="cpu", model="Net", parameters=1)
    for epoch in (1, 2):
        h.feed("start_epoch", epoch=epoch, batches_planned=75)
        h.feed("end_training_batch", epoch=epoch, step=75 * epoch, batch_index=74, loss=2.0, training_loss_total=150.0,
               training_batch_count=75)
        h.feed("end_training_loop", epoch=epoch, training_batch_count=75, batches_planned=75)
        h.feed("start_validation_loop", epoch=epoch)
        batches = plugin.progress.tasks[plugin.batch_task]
        assert (batches.total, batches.completed) == ((None, 0) if epoch == 1 else (4, 0))
        h.feed("end_validation_batch", epoch=epoch, batch_index=0, loss=0.5, validation_loss_total=0.5,
               validation_batch_count=1)
        h.feed("end_validation_batch", epoch=epoch, batch_index=1, loss=0.25, validation_loss_total=0.75,
               validation_batch_count=2)
        batches = plugin.progress.tasks[plugin.batch_task]
        assert batches.completed == 2 and batches.fields["loss"] == "val loss 0.375", batches.fields
        assert batches.description == f"epoch {epoch} validation"
        h.feed("end_validation_loop", epoch=epoch, validation_batch_count=4, validation_loss_total=1.0)
        assert (plugin.progress.tasks[plugin.batch_task].total, plugin.progress.tasks[plugin.batch_task].completed) \
            == (4, 4)
    h.close()


def test_console_warns_of_failed_checkpoints_and_of_each_reason_for_skipping_once(tmp_path, capsys):
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    h.feed("save_checkpoint", step=30, reason="epoch", metrics={}, slot=0, snapshot_id=1, buffer="b", tensors=[],
           state={})  # seq 1: the failure below names its step, not the step the failure was heard at
    h.feed("checkpoint_failed", step=40, plugin="checkpoint", seq=1, reason="No space left on device (errno 28)")
    h.feed("checkpoint_failed", step=40, plugin="checkpoint", seq=7, reason="No space left on device (errno 28)")
    for step in (60, 80):
        h.feed("checkpoint_skipped", step=step, reason="both snapshot buffers are still being persisted")
    h.feed("checkpoint_skipped", step=100, reason="no room for a 805 MB snapshot buffer (/dev/shm: No space left on device)")
    assert capsys.readouterr().out.splitlines() == [
        "warning: checkpoint at step 30 failed: No space left on device (errno 28)",
        "warning: checkpoint at step 40 failed: No space left on device (errno 28)",  # one it was not sent
        "warning: checkpoint at step 60 skipped: both snapshot buffers are still being persisted (shown once)",
        "warning: checkpoint at step 100 skipped: no room for a 805 MB snapshot buffer (/dev/shm: No space left on "
        "device) (shown once)"]


def test_console_trims_a_long_warning_to_one_terminal_line_and_keeps_it_whole_in_a_file(tmp_path, capsys):
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    h.feed("log", plugin="p", level="warning", text="x" * 1000 + " (the fix)\nmore")
    (line,) = capsys.readouterr().out.splitlines()  # not a terminal: a log or CI keeps the fix at the line's end
    assert line == "warning: p: " + "x" * 1000 + " (the fix) ... more", line
    h.plugin.console = Console(force_terminal=True, color_system=None)
    h.feed("log", plugin="p", level="warning", text="x" * 1000)
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) <= 160 and line.endswith("...")


def test_console_names_where_a_traceback_ends_in_the_authors_code(tmp_path, capsys):
    """The first and last lines of a traceback leave out the frame that matters: the line says it, the author's
    innermost frame (a library's frames below it are skipped), and stays one line however long the message."""
    traceback_text = ("handler for end_epoch (seq 9) failed after 3 attempts:\nTraceback (most recent call last):\n"
                      '  File "/home/ann/hooks.py", line 12, in on_end_epoch\n    helper()\n'
                      '  File "/home/ann/hooks.py", line 5, in helper\n    json.loads("")\n'
                      '  File "/usr/lib/python3.11/json/__init__.py", line 346, in loads\n    return ...\n'
                      "json.decoder.JSONDecodeError: Expecting value: " + "x" * 300)
    h = Harness(ConsolePlugin(run_dir=str(tmp_path)))
    h.plugin.console = Console(force_terminal=True, color_system=None)  # a terminal's line is cut to fit
    h.feed("log", plugin="hooks", level="error", text=traceback_text)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("error: hooks: handler for end_epoch (seq 9) failed after 3 attempts: ... json.decoder.")
    assert line.endswith("... (at hooks.py:5 in helper)") and len(line) <= 160, line
    # the SDK's frames are skipped too, wherever it is installed (editable: not under site-packages)
    import trainbus.sdk.bz

    h.feed("log", plugin="hooks", level="error", text=(
        'Traceback (most recent call last):\n  File "/home/ann/bzhooks.py", line 48, in end_epoch\n    context.model\n'
        f'  File "{trainbus.sdk.bz.__file__}", line 74, in model\n    raise NotInThisProcess(...)\n'
        "trainbus.sdk.bz.NotInThisProcess: the model is in the kernel's process"))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(" (at bzhooks.py:48 in end_epoch)"), line
    import trainbus.proto.codec  # and the protocol's: a metric that is not finite is refused there

    h.feed("log", plugin="hooks", level="error", text=(
        'Traceback (most recent call last):\n  File "/home/ann/ratio.py", line 7, in on_end_epoch\n'
        '    self.metric(...)\n'
        f'  File "{trainbus.proto.codec.__file__}", line 281, in _check_metric\n    raise ProtocolError(...)\n'
        "trainbus.proto.codec.ProtocolError: metric.value must be finite, got nan"))
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(" (at ratio.py:7 in on_end_epoch)"), line
    # a first line that already ends in the exception is not followed by it again
    h.feed("log", plugin="db", level="error", text=(
        'setup failed: RuntimeError: cannot open my database\nTraceback (most recent call last):\n'
        '  File "/home/ann/db.py", line 9, in setup\n    connect()\nRuntimeError: cannot open my database'))
    (line,) = capsys.readouterr().out.splitlines()
    assert line == "error: db: setup failed: RuntimeError: cannot open my database (at db.py:9 in setup)", line
    # ... nor when the traceback names the exception by its module: a bz hook's context.model said its long
    # message twice, "NotInThisProcess: MSG ... trainbus.sdk.bz.NotInThisProcess: MSG"
    h.feed("log", plugin="touch", level="error", text=(
        "NotInThisProcess: the model is in the kernel's process\n(handler for end_epoch, seq 44; not retried)\n"
        'Traceback (most recent call last):\n  File "/home/ann/bzhooks.py", line 23, in end_epoch\n    context.model\n'
        "trainbus.sdk.bz.NotInThisProcess: the model is in the kernel's process"))
    (line,) = capsys.readouterr().out.splitlines()
    assert line == ("error: touch: NotInThisProcess: the model is in the kernel's process (at bzhooks.py:23 in "
                    "end_epoch)"), line


def test_console_draws_bars_on_a_terminal_and_stops_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat the captured stdout as a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    plugin = ConsolePlugin({"refresh_per_second": 20.0}, run_dir=str(tmp_path))
    h = Harness(plugin)
    feed_run(h, [0.5, None, 0.3])
    assert plugin.batches_per_epoch == 4 and plugin.progress is None  # stopped at the session's end
    h.close()
    assert "epoch 3/3" in capsys.readouterr().out


def test_console_asks_for_per_step_events_only_when_it_draws_a_batch_bar(tmp_path, monkeypatch):
    def subscribed(**settings) -> set[str]:
        return set(ConsolePlugin(settings, run_dir=str(tmp_path)).subscriptions())

    assert not {"end_training_batch", "end_validation_batch"} & subscribed()  # no terminal: epoch lines only
    assert "end_epoch" in subscribed()
    runner = Runner(ConsolePlugin(run_dir=str(tmp_path)), f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    try:  # what the SDK says in its hello, and so what the kernel's PUB socket sends it
        assert "end_epoch" in runner.io.hello["subscriptions"]
        assert "end_training_batch" not in runner.io.hello["subscriptions"]
    finally:
        runner.io.ctx.destroy(linger=0)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert {"end_training_batch", "end_validation_batch"} <= subscribed()
    assert not {"end_training_batch", "end_validation_batch"} & subscribed(show_batches=False)


def test_console_rejects_a_non_positive_refresh_rate(tmp_path):
    with pytest.raises(SettingsError):
        Harness(ConsolePlugin({"refresh_per_second": 0.0}, run_dir=str(tmp_path)))


def test_console_rejects_a_refresh_rate_no_terminal_shows():
    """refresh_per_second = 1e9 passed: rich's refresh thread then redrew without pause, a fifth of a core taken
    from a 2-core run (60 ticks in 3 s, against 5 at the default 4)."""
    with pytest.raises(SettingsError, match="refresh_per_second = 1000000000.0 is not allowed; it must be a number "
                                            "between 0.1 and 60"):
        ConsolePlugin({"refresh_per_second": 1e9})
    assert ConsolePlugin({"refresh_per_second": 60}).settings["refresh_per_second"] == 60.0


def test_a_metric_about_an_epoch_that_arrives_in_the_next_is_that_epochs_in_the_journal_and_metrics_log(runs_dir):
    """A plugin's end_epoch handler reports a metric half a second late, the kernel two seconds into the next epoch:
    the metric event says the handled epoch (data `epoch`, with data `step`), and metrics.jsonl files it there. It
    was filed under the epoch the kernel was in as it arrived, beside the step of the epoch before."""
    plugins = [resolve_plugin("metrics_log", {"every_n_steps": 0}),
               PluginConfig("late", "fixture_plugins:LateEpochMetric", {"lag_s": 0.5})]
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'fixture_targets.py'}:digits_slowly", epochs=2,
                                    runs_dir=str(runs_dir), plugins=plugins, hyperparameters={"batch_s": 0.05},
                                    ready_timeout_s=PLUGIN_START_S))
    assert result.status == "completed", result
    events = read_events(Path(result.run_dir) / JOURNAL_NAME)
    end_epoch_1 = next(e for e in events if e.type == ev.END_EPOCH and e.epoch == 1)
    (late,) = [e for e in events if e.type == ev.METRIC and e.data["name"] == "late/epoch_seen"
               and e.data["value"] == 1]
    assert late.epoch == 2, f"arrived in epoch {late.epoch}: the test proves nothing unless it came late"
    assert (late.data["epoch"], late.data["step"]) == (1, end_epoch_1.step), late
    (record,) = [r for r in read_records(Path(result.run_dir) / "metrics.jsonl")
                 if r["kind"] == "metric" and r["name"] == "late/epoch_seen" and r["value"] == 1]
    assert (record["epoch"], record["step"]) == (1, end_epoch_1.step), record


# a real run, stopped in the middle of an epoch


def test_a_run_stopped_mid_epoch_is_reported_partial_and_config_json_has_its_hyperparameters(runs_dir, capfd):
    """Digits with 45 slowed batches an epoch; a plugin's stop at step 8 lands a few batches later, within epoch 1."""
    plugins = [resolve_plugin("console", {}), resolve_plugin("metrics_log", {"every_n_steps": 0}),
               PluginConfig("stopper", "fixture_plugins:StopAtStep", {"step": 8})]
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'fixture_targets.py'}:digits_slowly", epochs=2,
                                    runs_dir=str(runs_dir), plugins=plugins, hyperparameters={"batch_s": 0.03}))
    assert result.status == "stopped" and result.outcome["epochs_completed"] == 0, result
    trained = result.outcome["steps"]
    assert 8 <= trained < 45  # cut short

    out = capfd.readouterr().out  # the console plugin draws on the kernel's stdout
    assert f"epoch 1/2 partial ({trained}/45 batches)" in out, out
    assert f"finished: 0 epochs and {trained}/45 batches of epoch 1, {trained} steps; stopped early: " \
           f"stopper: stop: enough at step 8" in out, out

    records = read_records(Path(result.run_dir) / "metrics.jsonl")
    (partial,) = [r for r in records if r["kind"] in ("epoch", "partial_epoch")]
    assert (partial["kind"], partial["training_batch_count"], partial["batches_planned"]) == \
        ("partial_epoch", trained, 45)

    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert config["hyperparameters"] == {"lr": 1e-3, "batch_size": 32, "hidden": 128, "validation_fraction": 0.2,
                                         "model": "mlp", "batch_s": 0.03}  # the build's defaults, and what was given
    assert config["epochs"] == 2
