"""bz compatibility: plugins written for bz's API run out of process with only their import line changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainbus.kernel.config import parse_config
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training
from trainbus.proto import DURABLE
from trainbus.sdk import Harness
from trainbus.sdk.bz import NotInThisProcess, Plugin as BzPlugin
from trainbus.sdk.plugin import merge_settings

from conftest import TESTS_DIR

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"
BZ_IMPORT = "from bz.plugins import Plugin"
OUR_IMPORT = "from trainbus.sdk.bz import Plugin"

# Four plugins as their authors wrote them for bz (https://github.com/dbuzinski/bz-cli, bz.plugins.Plugin).
BZ_PLUGINS = {
    "bz_json_log": '''
        import json

        from bz.plugins import Plugin


        class JsonLogPlugin(Plugin):
            """Appends one JSON line per epoch: losses as bz computes them, from totals and counts."""

            def __init__(self, config=None):
                super().__init__(config=config)
                self.path = self.config["path"]

            def end_epoch(self, context):
                record = {
                    "epoch": context.epoch,
                    "training_loss": context.training_loss_total / context.training_batch_count,
                    "validation_loss": context.validation_loss_total / context.validation_batch_count,
                    "validation_metrics": context.validation_metrics,
                    "lr": context.hyperparameters.get("lr"),
                }
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\\n")
    ''',
    "bz_early_stop": '''
        from bz.plugins import Plugin


        class EarlyStoppingPlugin(Plugin):
            """Stops when the validation loss has not improved by min_delta for patience epochs."""

            def __init__(self, config=None):
                super().__init__(config=config)
                self.patience = self.config.get("patience", 3)
                self.min_delta = self.config.get("min_delta", 0.0)
                self.best = None
                self.bad_epochs = 0

            def end_epoch(self, context):
                loss = context.validation_loss_total / context.validation_batch_count
                if self.best is None or loss < self.best - self.min_delta:
                    self.best, self.bad_epochs = loss, 0
                else:
                    self.bad_epochs += 1
                if self.bad_epochs >= self.patience:
                    self.logger.info("early stopping at epoch %d", context.epoch)
                    context.should_stop_training = True
    ''',
    "bz_plotter": '''
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from bz.plugins import Plugin


        class LossPlotPlugin(Plugin):
            """Plots training and validation loss per epoch when training ends."""

            def __init__(self, config=None):
                super().__init__(config=config)
                self.training, self.validation = [], []

            def end_epoch(self, context):
                self.training.append(context.training_loss_total / context.training_batch_count)
                self.validation.append(context.validation_loss_total / context.validation_batch_count)

            def end_training_session(self, context):
                plt.figure(figsize=(4, 3), dpi=100)
                plt.plot(self.training, label="training")
                plt.plot(self.validation, label="validation")
                plt.legend()
                plt.savefig(self.config["path"])
                plt.close()
    ''',
    "bz_weights": '''
        from bz.plugins import Plugin


        class BestWeightsPlugin(Plugin):
            """Keeps the best model weights in memory, as in-process bz plugins could."""

            def end_epoch(self, context):
                self.best_weights = context.model.state_dict()
    ''',
}


@pytest.fixture
def bz_modules(tmp_path, monkeypatch) -> Path:
    """The bz plugins above, with only the import line changed, importable by plugin processes."""
    folder = tmp_path / "bz_plugins"
    folder.mkdir()
    for module, source in BZ_PLUGINS.items():
        source = textwrap.dedent(source)
        assert source.count(BZ_IMPORT) == 1
        (folder / f"{module}.py").write_text(source.replace(BZ_IMPORT, OUR_IMPORT))
    monkeypatch.setenv("PYTHONPATH", f"{folder}{os.pathsep}{TESTS_DIR}")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_bz_plugins_run_out_of_process_as_written(bz_modules, tmp_path):
    log_path, plot_path = tmp_path / "epochs.jsonl", tmp_path / "loss.png"
    # bz's configuration form: a plugins table of {name: {enabled, config}}
    cfg = parse_config({
        "run": {"target": TINY, "epochs": 6, "runs_dir": str(tmp_path / "runs")},
        "plugins": {
            "json_log": {"enabled": True, "target": "bz_json_log:JsonLogPlugin", "config": {"path": str(log_path)}},
            "early_stop": {"enabled": True, "target": "bz_early_stop:EarlyStoppingPlugin",
                           "config": {"patience": 1, "min_delta": 100.0}},
            "plotter": {"enabled": True, "target": "bz_plotter:LossPlotPlugin", "config": {"path": str(plot_path)}},
            "weights": {"enabled": True, "target": "bz_weights:BestWeightsPlugin", "config": {}},
            "disabled": {"enabled": False, "target": "bz_weights:BestWeightsPlugin", "config": {}},
        },
    })
    assert [p.name for p in cfg.plugins] == ["json_log", "early_stop", "plotter", "weights"]
    result = run_training(cfg)
    events = read_events(result.run_dir)
    epochs = [e for e in events if e.type == "end_epoch"]

    # early stopping: nothing improves by 100, so patience 1 runs out at the second epoch, and it lands there
    assert result.status == "stopped"
    assert result.outcome["epochs_completed"] == 2 and len(epochs) == 2
    assert any("early_stop" in r and "should_stop_training" in r for r in result.outcome["stop_reasons"])
    assert any(e.type == "log" and e.data["plugin"] == "early_stop" and "early stopping at epoch 1" in e.data["text"]
               for e in events)

    # JSON log: one line per epoch, bz's 0-based epochs, losses from totals and counts
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for record, event in zip(records, epochs):
        assert record["training_loss"] == pytest.approx(event.data["training_loss"])
        assert record["validation_loss"] == pytest.approx(event.data["validation_loss"])
        assert record["lr"] == 0.1

    # plotter: a PNG at the end
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # context.model: a clear error in the kernel's log, and training unaffected
    errors = [e.data["text"] for e in events if e.type == "log" and e.data["plugin"] == "weights"]
    assert errors and all("NotInThisProcess" in text for text in errors)
    assert "checkpoint" in errors[0] and "weights_only=True" in errors[0]
    assert {name: p["restarts"] for name, p in result.plugins.items()} == dict.fromkeys(
        ["json_log", "early_stop", "plotter", "weights"], 0)


# the adapter without sockets


class Recording(BzPlugin):
    """Records what the context held when each hook ran."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.seen = []

    def _record(self, hook, context):
        self.seen.append((hook, context.epoch, context.training_loss_total, context.training_batch_count,
                          context.validation_batch_count, dict(context.training_metrics)))

    def start_training_loop(self, context):
        self._record("start_training_loop", context)

    def end_training_batch(self, context):
        self._record("end_training_batch", context)

    def start_validation_loop(self, context):
        self._record("start_validation_loop", context)

    def end_epoch(self, context):
        self._record("end_epoch", context)

    def end_training_session(self, context):
        self._record("end_training_session", context)


def feed_epoch(h: Harness, epoch: int, batches: int = 2) -> None:
    h.feed("start_epoch", epoch=epoch)
    h.feed("start_training_loop")
    for index in range(batches):
        h.feed("start_training_batch", batch_index=index)
        h.feed("end_training_batch", batch_index=index, loss=0.5, training_loss_total=0.5 * (index + 1),
               training_batch_count=index + 1)
    train = {"training_loss_total": 0.5 * batches, "training_batch_count": batches, "training_loss": 0.5,
             "training_metrics": {"accuracy": 0.7}}
    h.feed("end_training_loop", **train)
    h.feed("start_validation_loop")
    validation = {"validation_loss_total": 0.8, "validation_batch_count": 2, "validation_loss": 0.4,
                  "validation_metrics": {"accuracy": 0.8}}
    h.feed("end_validation_loop", **validation)
    h.feed("end_epoch", **train, **validation, hyperparameters={"lr": 0.1}, lr=0.1)


def test_the_context_holds_what_bz_held_at_each_hook():
    plugin = Recording(config={"any": "thing"})
    h = Harness(plugin)
    h.feed("start_training_session", hyperparameters={"lr": 0.1}, epochs=2)
    feed_epoch(h, 1)
    feed_epoch(h, 2)
    h.feed("end_training_session", epochs_completed=2, steps=4, stopped_early=False, stop_reasons=[])
    assert plugin.seen == [
        ("start_training_loop", 0, 0.0, 0, 0, {}),
        ("end_training_batch", 0, 0.5, 1, 0, {}),
        ("end_training_batch", 0, 1.0, 2, 0, {}),
        ("start_validation_loop", 0, 1.0, 2, 0, {"accuracy": 0.7}),
        ("end_epoch", 0, 1.0, 2, 2, {"accuracy": 0.7}),
        ("start_training_loop", 1, 1.0, 2, 2, {"accuracy": 0.7}),  # bz resets after this hook
        ("end_training_batch", 1, 0.5, 1, 2, {"accuracy": 0.0}),
        ("end_training_batch", 1, 1.0, 2, 2, {"accuracy": 0.0}),
        ("start_validation_loop", 1, 1.0, 2, 0, {"accuracy": 0.7}),
        ("end_epoch", 1, 1.0, 2, 2, {"accuracy": 0.7}),
        ("end_training_session", 2, 1.0, 2, 2, {"accuracy": 0.7}),
    ]
    assert plugin.context.hyperparameters == {"lr": 0.1}
    assert plugin.config == {"any": "thing"} and plugin.context.extra["run_id"] == "test-run"
    assert not h.replies  # nothing asked of the kernel


def test_should_stop_training_sends_one_stop_and_end_epoch_hooks_vote():
    class Stopper(BzPlugin):
        def end_epoch(self, context):
            context.should_stop_training = True

    h = Harness(Stopper())
    feed_epoch(h, 1)
    feed_epoch(h, 2)
    [stop] = h.replies_of("stop")
    assert "should_stop_training" in stop["reason"] and "end_epoch" in stop["reason"]
    assert Stopper.votes == ("end_epoch",) and Recording.votes == ("end_epoch",)
    assert Stopper.delivery == DURABLE


def test_model_and_optimizer_are_not_in_this_process():
    context = BzPlugin().context
    assert not hasattr(context, "model")  # bz plugins that guard with hasattr just skip
    with pytest.raises(NotInThisProcess, match="checkpoint") as raised:
        context.optimizer.state_dict()
    assert isinstance(raised.value, AttributeError) and "final.pt" in str(raised.value)
    with pytest.raises(NotInThisProcess):
        context.model = object()


def test_bz_config_is_free_form_and_reaches_the_plugin(bz_modules):
    from bz_early_stop import EarlyStoppingPlugin

    assert merge_settings(EarlyStoppingPlugin, {"patience": 7, "anything": [1, 2]}) == {"patience": 7, "anything": [1, 2]}
    # what the supervisor's process does: cls(settings, run_id=..., run_dir=...) becomes bz's cls(config=...)
    plugin = EarlyStoppingPlugin({"patience": 7}, run_id="r", run_dir="/tmp/x")
    assert plugin.patience == 7 and plugin.config == {"patience": 7} and plugin.run_dir == "/tmp/x"

    class NoInit(BzPlugin):
        """A bz plugin with no __init__ at all."""

    bare = NoInit({"k": 1}, run_id="r", run_dir="/tmp/y")
    assert bare.config == {"k": 1} and bare.run_id == "r"


def test_plugins_list_describes_a_bz_plugin_and_accepts_its_config(bz_modules):
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe",
                           'bz_early_stop:EarlyStoppingPlugin={"patience": 2, "min_delta": 0.1}'],
                          capture_output=True, text=True, timeout=60)
    [info] = json.loads(proc.stdout)
    assert "error" not in info, info
    assert info["description"].startswith("Stops when the validation loss") and info["delivery"] == DURABLE
