"""The README's examples run as printed: its training function (its flags from the docstring), and its plugin
(## Writing a plugin), whose stop lands at the epoch's end it was decided at, because it votes there (a stop sent
without a vote lands a few batches later, or never)."""

from __future__ import annotations

import re
from pathlib import Path

from trainbus.kernel.config import PluginConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import run_training

from conftest import TESTS_DIR
from helpers import run_config
from kernel_process import cli, of

PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"


def test_the_readmes_training_function_trains_as_printed_with_its_flags(tmp_path):
    readme = (TESTS_DIR.parent / "README.md").read_text(encoding="utf-8")
    [function] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "TrainingSpec(" in block]
    (tmp_path / "train.py").write_text(function)
    helped = cli("run", f"{tmp_path / 'train.py'}:build", "--help-flags")
    assert helped.returncode == 0 and "Adam's learning rate" in helped.stdout, helped.stdout + helped.stderr
    done = cli("run", f"{tmp_path / 'train.py'}:build", "epochs=1", "hidden=16", "--plugins", "", "--runs-dir",
               str(tmp_path / "runs"))
    assert done.returncode == 0 and "completed" in done.stdout, done.stdout + done.stderr


def test_the_readme_plugin_stops_the_run_at_the_end_of_the_epoch_it_decided_at(tmp_path, monkeypatch):
    readme = (TESTS_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Writing a plugin"):]
    (tmp_path / "mymodule.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the plugin's process imports mymodule
    plugin = PluginConfig("loss_alarm", "mymodule:LossAlarm", {"limit": 0})
    # paced: a stop that missed the boundary would land a few batches into epoch 2
    result = run_training(run_config(tmp_path / "runs", [plugin], epochs=4, target=PACED, batch_size=64,
                                     step_sleep_s=0.02, ready_timeout_s=120))
    assert result.status == "stopped", result
    assert result.outcome["epochs_completed"] == 1, result.outcome
    [reason] = result.outcome["stop_reasons"]
    assert re.fullmatch(r"loss_alarm: stop: validation loss \d\.\d{3} over the limit", reason), reason
    events = read_events(Path(result.run_dir))
    assert [e.epoch for e in of(events, "end_epoch")] == [1] and not of(events, "start_epoch")[1:]


def test_the_readmes_harness_test_of_that_plugin_passes_as_printed(tmp_path):
    readme = (TESTS_DIR.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Writing a plugin"):]
    plugin, test = (block for block in re.findall(r"```python\n(.*?)```", section, re.S)
                    if "class LossAlarm" in block or "Harness(LossAlarm" in block)
    namespace: dict = {}
    exec(compile(plugin + "\n" + test, "readme", "exec"), namespace)  # noqa: S102 - the README's own code
    namespace["test_loss_alarm_stops_over_the_limit"]()
