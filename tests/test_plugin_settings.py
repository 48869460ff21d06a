"""Typed plugin settings: declared once (type, default, constraint, help), checked before anything starts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import registered_plugins
from trainbus.kernel.session import run_training
from trainbus.plugins.early_stopping import EarlyStoppingPlugin
from trainbus.sdk import HOST_PATH, METRIC, METRIC_FIELDS, PATH, Plugin, Setting, SettingsError
from trainbus.sdk.loader import describe
from trainbus.sdk.plugin import merge_settings

from conftest import TESTS_DIR, trainbus_cmd
from kernel_process import cli

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"  # reports training_loss and validation_loss, no other metric


class PlainSettings(Plugin):
    """A third-party plugin as they are written today: a dict of defaults."""

    settings = {"every": 5, "rate": 0.5, "label": "x", "on": True, "names": [], "anything": None}


class Declared(Plugin):
    settings = {
        "every": Setting(5, "steps between two things", min=0),
        "share": Setting(0.5, "a fraction", min=0, max=1),
        "mode": Setting("min", "direction", choices=("min", "max")),
        "out": Setting("out.txt", "what it writes", kind=PATH),
    }


class Typed(Plugin):
    settings = {"rate": Setting(1, "a rate", type=float)}


def trainbus(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return cli(*args, cwd=cwd, timeout=180)  # forked with torch loaded


# -- declarations and values, in the plugin's process ------------------------------------------------

def test_plain_defaults_are_settings_of_their_types_and_strings_from_the_command_line_are_read_as_them():
    merged = merge_settings(PlainSettings, {"every": "7", "rate": 1, "on": "false", "names": '["a", "b"]',
                                            "anything": "left as given"})
    assert merged == {"every": 7, "rate": 1.0, "label": "x", "on": False, "names": ["a", "b"],
                      "anything": "left as given"}
    assert type(merged["rate"]) is float
    # a true/false is spelt as a function's flags take it: true/yes/on/1, false/no/off/0 (`--set x.on=1` comes as 1)
    for word, value in (("yes", True), ("ON", True), (1, True), ("no", False), ("off", False), (0, False)):
        assert merge_settings(PlainSettings, {"on": word})["on"] is value, word


@pytest.mark.parametrize("given, message", [
    ({"every": "abc"}, "every = 'abc' is not allowed; it must be an integer"),
    ({"every": True}, "every = true is not allowed; it must be an integer"),
    ({"rate": "fast"}, "rate = 'fast' is not allowed; it must be a number"),
    ({"label": 3}, "label = 3 is not allowed; it must be a string; 3 was read as a number: quote it (\"3\" in a "
                   "config file, '\"3\"' after the = of a --set)"),
    ({"on": "maybe"}, "on = 'maybe' is not allowed; it must be true or false"),
    ({"on": 2}, "on = 2 is not allowed; it must be true or false"),
    ({"names": "a,b"}, "names = 'a,b' is not allowed; it must be a list; a list is written in JSON: [\"a\", \"b\"] "
                       "in a config file, '[\"a\", \"b\"]' after the = of a --set"),
    ({"evry": 1}, "no setting 'evry' (did you mean 'every'?) (known: anything, every, label, names, on, rate)"),
    ({"zzz": 1}, "no setting 'zzz' (known: anything, every, label, names, on, rate)"),
])
def test_a_value_of_the_wrong_type_is_one_line_naming_the_setting_the_value_and_what_is_allowed(given, message):
    with pytest.raises(SettingsError) as raised:
        PlainSettings(given)
    assert str(raised.value) == f"plugin plain_settings: {message}"


@pytest.mark.parametrize("given, allowed", [
    ({"every": -3}, "every = -3 is not allowed; it must be an integer >= 0"),
    ({"share": 1.5}, "share = 1.5 is not allowed; it must be a number between 0 and 1"),
    ({"share": "nan"}, "share = 'nan' is not allowed; it must be a finite number between 0 and 1"),
    ({"mode": "lowest"}, "mode = 'lowest' is not allowed; it must be one of 'min', 'max'"),
    ({"mode": "MAX"}, "mode = 'MAX' is not allowed (did you mean 'max'?); it must be one of 'min', 'max'"),
    # text already: "it must be a string: a path ..." read as if the text were not one
    ({"out": "/tmp/elsewhere.txt"}, "out = '/tmp/elsewhere.txt' is not allowed; it must be a path inside "
                                    "the run directory (relative, no '..', each name at most 255 bytes, no NUL, "
                                    "none of the kernel's own files: events, config.json, summary.json, "
                                    "plugins/, checkpoints/manifest.jsonl, ...)"),
    ({"out": 5}, "out = 5 is not allowed; it must be a string: a path inside the run directory"),
    ({"out": "logs/../../up.txt"}, "out = 'logs/../../up.txt' is not allowed"),
    ({"out": "~/home.txt"}, "out = '~/home.txt' is not allowed"),
    # the spawned plugins' logs (plugins/NAME.log), and the kernel's sockets
    ({"out": "plugins/console.log"}, "out = 'plugins/console.log' is not allowed"),
    ({"out": "events.sock"}, "out = 'events.sock' is not allowed"),
])
def test_a_value_outside_its_constraint_is_refused(given, allowed):
    with pytest.raises(SettingsError) as raised:
        Declared(given)
    assert str(raised.value).startswith(f"plugin declared: {allowed}"), str(raised.value)


def test_a_value_that_is_not_finite_is_refused_saying_finite():
    """`--set limit=1e400` (JSON's infinity) was refused with `it must be a number >= 0`, which infinity is."""
    for value, shown in ((float("inf"), "Infinity"), (float("nan"), "NaN"), ("nan", "'nan'")):
        with pytest.raises(SettingsError) as raised:
            Typed({"rate": value})
        assert str(raised.value) == f"plugin typed: rate = {shown} is not allowed; it must be a finite number"
    with pytest.raises(SettingsError, match=r"^plugin declared: share = Infinity is not allowed; it must be a finite "
                                            r"number between 0 and 1$"):
        Declared({"share": float("inf")})


def test_a_default_is_read_as_the_declared_type_and_one_that_is_not_allowed_is_refused():
    assert Typed().settings == {"rate": 1.0} and type(Typed().settings["rate"]) is float
    assert describe("test_plugin_settings:Typed")["settings"]["rate"]["default"] == 1.0
    for declaration, message in (
            (lambda: Setting("often", type=int), "Setting default 'often' is not allowed; it must be an integer"),
            (lambda: Setting(0, min=1), "Setting default 0 is not allowed; it must be an integer >= 1"),
            (lambda: Setting("up", choices=("min", "max")), "Setting default 'up' is not allowed; it must be one of "
                                                            "'min', 'max'"),
            (lambda: Setting("loss", kind="metrik"), "Setting kind='metrik': not a kind; one of METRIC, PATH, "
                                                     "METRIC_FIELDS, HOST_PATH"),
            (lambda: Setting("e{epoch", kind=METRIC_FIELDS), "Setting default 'e{epoch' is not allowed; it must be a "
                                                             "string: a template whose {fields} are epoch, step or "
                                                             "metrics the run produces")):
        with pytest.raises(SettingsError) as raised:
            declaration()
        assert str(raised.value) == message


class Lists(Plugin):
    settings = {"names": Setting(["loss"], "metrics to draw"), "rates": Setting([], "rates", items=float),
                "mixed": Setting([1, "a"], "anything goes"), "weights": Setting([1, 2.5], "numbers")}


def test_a_lists_elements_are_checked_against_its_element_type():
    assert Lists({"names": '["a", "b"]', "rates": [1, 0.5], "mixed": [True]}).settings == {
        "names": ["a", "b"], "rates": [1.0, 0.5], "mixed": [True], "weights": [1.0, 2.5]}
    assert type(Lists({"rates": [1]}).settings["rates"][0]) is float
    for given, message in (
            ({"names": [1, 2]}, "names = [1, 2] is not allowed; it must be a list of strings"),
            ({"names": '["a", 3]'}, "names = '[\"a\", 3]' is not allowed; it must be a list of strings"),
            ({"rates": [True]}, "rates = [true] is not allowed; it must be a list of numbers"),
            ({"rates": "0.5"}, "rates = '0.5' is not allowed; it must be a list of numbers; a list is written in "
                               "JSON: [0.5] in a config file, '[0.5]' after the = of a --set"),
            ({"weights": ["x"]}, 'weights = ["x"] is not allowed; it must be a list of numbers')):
        with pytest.raises(SettingsError) as raised:
            Lists(given)
        assert str(raised.value) == f"plugin lists: {message}"
    with pytest.raises(SettingsError, match="Setting default \\[1\\] is not allowed; it must be a list of strings"):
        Setting([1], items=str)
    with pytest.raises(SettingsError, match="only a list setting has items"):
        Setting(1, items=int)
    assert Lists({}).settings["weights"] == [1.0, 2.5]
    described = describe("test_plugin_settings:Lists")["settings"]
    assert [described[k]["type"] for k in ("names", "rates", "mixed")] == ["list[str]", "list[float]", "list"]


class Optional_(Plugin):
    settings = {"seed": Setting(None, "a seed, or none for a random one", type=int), "name": Setting("a", "a name")}


def test_a_setting_whose_default_is_none_takes_none_again():
    """`Setting(None, type=int)` refused `--set optional_.seed=null`, the default it declared: `seed = null is not
    allowed; it must be an integer` (a config written out with every value, a plugin attached with the default)."""
    assert Optional_({"seed": None}).settings == {"seed": None, "name": "a"}
    assert Optional_({"seed": "7"}).settings["seed"] == 7
    with pytest.raises(SettingsError, match=r"name = null is not allowed; it must be a string$"):
        Optional_({"name": None})
    with pytest.raises(SettingsError, match=r"seed = 'x' is not allowed; it must be an integer \(or null\)$"):
        Optional_({"seed": "x"})


class Tuples(Plugin):
    settings = {"sizes": Setting((1, 2), "sizes, as a tuple")}


def test_a_tuple_default_is_a_list_setting_that_a_list_can_set():
    """`Setting((1, 2))` refused every value a config or --set can give: `sizes = [3, 4] is not allowed; it must be
    tuple` (TOML, JSON and msgpack have lists, no tuples)."""
    assert Tuples({}).settings == {"sizes": [1, 2]}
    assert Tuples({"sizes": [3, 4]}).settings == {"sizes": [3, 4]}
    assert Tuples({"sizes": "[5]"}).settings == {"sizes": [5]}
    assert describe("test_plugin_settings:Tuples")["settings"]["sizes"]["type"] == "list[int]"


def test_a_default_no_config_can_give_fails_the_class_naming_the_setting_and_the_fix(tmp_path):
    """`Setting(Path("out.txt"))` or an Enum member made `trainbus run` say only `could not load plugins: TypeError:
    Object of type PosixPath is not JSON serializable`: no plugin, no setting, no fix."""
    with pytest.raises(SettingsError) as raised:
        Setting(Path("out.txt"), "where to write", kind=PATH)
    assert str(raised.value) == ("Setting default PosixPath('out.txt') is not allowed: a PosixPath cannot come from a "
                                 "config file or --set; give a str, int, float, bool, list or dict (a path as a str, "
                                 "kind=PATH or HOST_PATH; an Enum's member as its value, with choices=)")
    with pytest.raises(SettingsError, match=r"^Setting type=<class 'set'> is not allowed: a set cannot come from"):
        Setting(None, type=set)
    # a type named as text (Dioptra's parameter types are names: "float", "integer") raised AttributeError: 'str'
    # object has no attribute '__name__'
    with pytest.raises(SettingsError) as raised:
        Setting(0.5, "a rate", type="float")
    assert str(raised.value) == ("Setting type='float' is not allowed: type= takes the type itself, one of str, int, "
                                 "float, bool, list or dict (type=float), not its name")
    (tmp_path / "paths_plugin.py").write_text(
        "from pathlib import Path\n\nfrom trainbus.sdk import Plugin, Setting\n\n\n"
        "class Writer(Plugin):\n    settings = {\"out\": Setting(Path(\"out.txt\"), \"where to write\")}\n")
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", "paths_plugin:Writer={}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    [info] = json.loads(r.stdout)
    assert "paths_plugin.py, line 7" in info["error"] and "a PosixPath cannot come from a config" in info["error"], info


@pytest.mark.parametrize("bounds", [{"max": "10"}, {"min": True}, {"min": float("nan")}, {"min": 5, "max": 1}],
                         ids=["text", "bool", "nan", "crossed"])
def test_bounds_that_are_no_numbers_or_cross_fail_the_declaration_in_one_line(bounds):
    """`Setting(5.0, max="10")` failed its declaration with a bare TypeError ('<=' not supported between instances of
    'float' and 'str'), naming neither the setting's bound nor the fix; a NaN bound allowed every value."""
    with pytest.raises(SettingsError, match=r"^Setting (min|max)=.* is not allowed: min= and max= take numbers"):
        Setting(3.0, "a rate", **bounds)


def test_a_path_inside_the_run_directory_is_allowed():
    assert Declared({"out": "logs/out.txt"}).settings["out"] == "logs/out.txt"


@pytest.mark.parametrize("path", ["events", "events.00000001-00004096.gz", "config.json", "summary.json", "credential",
                                  "kernel.log", "final.pt", "checkpoints/manifest.jsonl",
                                  "checkpoints/./manifest.jsonl"])
def test_a_path_naming_one_of_the_kernels_own_files_is_refused(path):
    """metrics_log with filename = events cut the journal back to its last newline and wrote into it; with
    checkpoints/manifest.jsonl it overwrote the checkpoints' manifest, and `--resume` found none of them."""
    with pytest.raises(SettingsError, match=f"out = '{re.escape(path)}' is not allowed; .*none of the kernel's own"):
        Declared({"out": path})


@pytest.mark.parametrize("path", ["x" * 256, "logs/" + "é" * 128, "a\x00b"], ids=["256 bytes", "unicode", "nul"])
def test_a_path_no_file_system_takes_is_refused(path):
    """A 300-character metrics_log filename passed, then the plugin's setup failed on ENAMETOOLONG five times
    with a traceback and was given up (a NUL: ValueError); refused before the run, as a '..' is."""
    with pytest.raises(SettingsError, match=r"out = .* is not allowed; .*at most 255 bytes, no NUL"):
        Declared({"out": path})
    assert Declared({"out": "logs/" + "é" * 127}).settings["out"].endswith("é")  # 254 bytes: a name ext4 takes


def test_a_checkpoint_filename_too_long_for_a_file_name_is_refused():
    """The template passed, and every checkpoint of the run failed to be written (File name too long)."""
    from trainbus.plugins.checkpoint import CheckpointPlugin

    with pytest.raises(SettingsError, match=r"filename = 'yyy.* is not allowed; .*at most 200 bytes"):
        CheckpointPlugin({"filename": "y" * 250})
    with pytest.raises(SettingsError, match=r"filename = .* is not allowed; .*at most 200 bytes"):
        CheckpointPlugin({"filename": "e{epoch:0230d}"})
    with pytest.raises(SettingsError, match=r"filename = .* is not allowed; it must be a plain file name"):
        CheckpointPlugin({"filename": "e\x00{epoch}"})
    assert CheckpointPlugin({"filename": "y" * 190 + "{epoch}"}).settings["filename"].startswith("y")


def test_a_disk_path_that_does_not_exist_is_refused_before_the_run():
    from trainbus.plugins.disk_monitor import DiskMonitorPlugin

    with pytest.raises(SettingsError, match="path = '/no/such/dir' does not exist"):
        DiskMonitorPlugin({"path": "/no/such/dir"})


def test_an_infinite_or_huge_number_is_refused_where_a_wait_takes_it():
    """JSON reads 1e400 as infinity: it passed `>= 0.05`, then the monitor's join(timeout=inf) raised at teardown."""
    from trainbus.plugins.cpu_monitor import CpuMonitorPlugin
    from trainbus.plugins.email_alert import EmailAlertPlugin

    for plugin, key, value in ((CpuMonitorPlugin, "interval_s", float("inf")), (CpuMonitorPlugin, "interval_s", 1e10),
                               (EmailAlertPlugin, "timeout_s", 1e300), (EmailAlertPlugin, "retry_window_s", 0)):
        with pytest.raises(SettingsError, match=f"{key} = .* is not allowed"):
            plugin({key: value})


@pytest.mark.parametrize("name", ["", ".", "logs/"])
def test_metrics_log_takes_a_files_name_not_a_folders(name):
    from trainbus.plugins.metrics_log import MetricsLogPlugin

    with pytest.raises(SettingsError, match="names a folder: give a file's name"):
        MetricsLogPlugin({"filename": name})


def test_describe_gives_every_setting_with_type_default_constraint_and_help():
    info = describe("test_plugin_settings:Declared")
    assert info["settings"]["every"] == {"type": "int", "default": 5, "constraint": ">= 0",
                                         "help": "steps between two things", "kind": ""}
    assert info["settings"]["out"]["kind"] == PATH
    plain = describe("test_plugin_settings:PlainSettings")["settings"]
    assert plain["rate"] == {"type": "float", "default": 0.5, "constraint": "", "help": "", "kind": ""}
    assert plain["anything"]["type"] == "any"


def test_describe_into_a_pipe_its_reader_closed_is_no_traceback():
    """`python -m trainbus.sdk --describe X | head -c 100`: the reader gone first raised BrokenPipeError."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the first byte
    try:
        proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe",
                               "trainbus.plugins.console:ConsolePlugin"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


class ChecksWithABug(Plugin):
    settings = {"limit": Setting(1.0, "a limit")}

    @classmethod
    def check_settings(cls, settings):
        if settings["limt"] > 0:  # the bug
            raise SettingsError("never")


class SettingsNotADict(Plugin):
    settings = "limit=1"


@pytest.mark.parametrize("cls, error", [
    # both said "could not load plugins: KeyError: 'limt'" (or AttributeError: 'str' object has no attribute 'items')
    ("ChecksWithABug", f"checking its settings raised {__file__}, line "),
    ("SettingsNotADict", "settings = 'limit=1' is not allowed; the class's settings must be a dict of name -> "
                         "Setting(default, help) (or a plain default)"),
])
def test_a_plugin_class_whose_settings_cannot_be_checked_is_named_with_its_line(cls, error):
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", f"test_plugin_settings:{cls}={{}}"],
                       capture_output=True, text=True, cwd=TESTS_DIR, timeout=60)
    assert r.returncode == 0, r.stderr
    [info] = json.loads(r.stdout)
    assert info["error"].startswith(error), info
    if cls == "ChecksWithABug":
        assert info["error"].endswith(": KeyError: 'limt'"), info


def test_a_plugin_run_by_hand_whose_check_settings_raises_shows_its_frames_and_one_line(tmp_path):
    """Under `trainbus run` that is one line; run by hand (`python -m trainbus.sdk`) it was a traceback through the
    SDK's __main__, runner and plugin modules before the plugin's own frame."""
    from helpers import run_config

    ended = run_training(run_config(tmp_path / "runs", target=TINY))  # a run to point at: checked before its end
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "test_plugin_settings:ChecksWithABug"],
                       capture_output=True, text=True, cwd=TESTS_DIR, timeout=60,
                       env={**os.environ, "TRAINBUS_RUN_DIR": str(ended.run_dir)})
    line = ChecksWithABug.check_settings.__func__.__code__.co_firstlineno + 2
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("Traceback (most recent call last):\n" f'  File "{__file__}", line {line}, in '
                               "check_settings\n"), r.stderr
    assert r.stderr.endswith(f"error: plugin ChecksWithABug: checking its settings raised {__file__}, line {line}: "
                             "KeyError: 'limt'\n"), r.stderr


class WatchesAMetric(Plugin):
    settings = {"watch": Setting("training_loss", "a metric", kind=METRIC),
                "name": Setting("e{epoch}", "a file name", kind=METRIC_FIELDS)}


@pytest.mark.parametrize("given, said", [
    ("watch=validation_f1", "watch = 'validation_f1' is not a metric this run produces"),
    ("name=e{epoch}-{val_f1:.2f}", "name = 'e{epoch}-{val_f1:.2f}' names val_f1, which is not a metric this run "
                                   "produces"),
    ("watch=training_loss", None)])
def test_a_plugin_run_by_hand_has_its_metric_settings_checked_against_the_runs_metrics(tmp_path, given, said):
    """As `trainbus run` and `plugins attach` check them: by hand they were not, and each handler that looked the
    metric up failed (a KeyError per event)."""
    from helpers import run_config

    ended = run_training(run_config(tmp_path / "runs", target=TINY))  # checked before its end is said
    produced = json.loads((Path(ended.run_dir) / "config.json").read_text())["metrics"]
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "test_plugin_settings:WatchesAMetric", "--set", given],
                       capture_output=True, text=True, cwd=TESTS_DIR, timeout=60,
                       env={**os.environ, "TRAINBUS_RUN_DIR": str(ended.run_dir)})
    if said is None:  # a metric it has: on to the run, which has ended
        assert (r.returncode, r.stderr) == (0, f"run {ended.run_id} has ended (completed); there is nothing to attach "
                                               f"to\n"), r.stderr
    else:
        assert (r.returncode, r.stderr) == (2, f"error: plugin watches_a_metric: {said}; use one of: "
                                               f"{', '.join(produced)}\n"), r.stderr


def test_a_setting_given_twice_by_hand_with_two_values_is_refused(tmp_path):
    """`python -m trainbus.sdk ... --set watch=a --set watch=b` ran with b, unsaid, where `trainbus run --set` and
    `plugins attach` refuse a setting given twice with another value."""
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "test_plugin_settings:WatchesAMetric", "--set",
                        "watch=training_loss", "--set", "watch=validation_loss"], capture_output=True, text=True,
                       cwd=TESTS_DIR, timeout=60, env={**os.environ, "TRAINBUS_RUN_DIR": str(tmp_path)})
    assert (r.returncode, r.stderr) == (2, "error: --set watch given twice (watch=training_loss and "
                                           "watch=validation_loss): give it once\n"), r.stderr
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "test_plugin_settings:WatchesAMetric", "--name", "a",
                        "--name", "b"], capture_output=True, text=True, cwd=TESTS_DIR, timeout=60,
                       env={**os.environ, "TRAINBUS_RUN_DIR": str(tmp_path)})
    assert (r.returncode, r.stderr) == (2, "error: --name given twice ('a' and 'b'): give it once\n"), r.stderr


def test_a_mistyped_option_by_hand_names_the_one_it_is_close_to():
    """`--nme x` listed every option, where `trainbus run --epoch 3` names the one meant (--epochs)."""
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "test_plugin_settings:WatchesAMetric", "--nme", "a"],
                       capture_output=True, text=True, cwd=TESTS_DIR, timeout=60)
    assert (r.returncode, r.stderr) == (2, "error: unknown option '--nme' (did you mean '--name'?); the options are "
                                           "--name, --set, --connect, --key, --server-key (see --help)\n"), r.stderr


class TakesNoEvent(Plugin):
    def on_end_epoch(self):
        pass

    def on_start_epoch(self, event, *more):  # fine: it takes the event
        pass


def test_a_handler_that_cannot_take_the_event_is_said_before_the_run_with_its_line():
    """It used to fail at every call, retried three times each, with a traceback of the SDK's frames only."""
    line = TakesNoEvent.on_end_epoch.__code__.co_firstlineno
    assert describe("test_plugin_settings:TakesNoEvent")["warnings"] == [
        f"TakesNoEvent.on_end_epoch(self) cannot take the event, so every call of it fails; define it as "
        f"def on_end_epoch(self, event) (at test_plugin_settings.py:{line})"]
    assert all(describe(target)["warnings"] == [] for target in registered_plugins().values())


class AsyncHandler(Plugin):
    async def on_end_epoch(self, event):  # called, never awaited: its body would never run
        self.stop("never sent")


def test_an_async_handler_is_said_before_the_run_with_its_line():
    """Its call made a coroutine that nothing awaited: the stop was never sent, the run completed, and only a
    RuntimeWarning in the plugin's log, at the SDK's line, said anything."""
    line = AsyncHandler.on_end_epoch.__code__.co_firstlineno
    assert describe("test_plugin_settings:AsyncHandler")["warnings"] == [
        f"AsyncHandler.on_end_epoch is async def: handlers are called, not awaited, so its body would never run; "
        f"define it with def (at test_plugin_settings.py:{line})"]


class MisnamedHandlers(Plugin):
    def on_end_epochs(self, event):  # a typo
        pass

    def on_train_epoch_end(self, event):  # Lightning's name
        pass

    def on_end_training_session(self, event):  # fine
        pass


def test_a_handler_named_for_no_event_is_said_before_the_run_with_the_one_it_likely_means():
    """It was never called, without a word: the plugin ran and did nothing at epoch ends."""
    line = MisnamedHandlers.on_end_epochs.__code__.co_firstlineno
    assert describe("test_plugin_settings:MisnamedHandlers")["warnings"] == [
        f"MisnamedHandlers.on_end_epochs (at test_plugin_settings.py:{line}) handles no event, so it is never called; "
        f"did you mean on_end_epoch?",
        f"MisnamedHandlers.on_train_epoch_end (at test_plugin_settings.py:{line + 3}) handles no event, so it is never "
        f"called; did you mean on_end_epoch?"]


def test_every_builtin_setting_is_declared_with_help():
    for name, target in registered_plugins().items():
        for key, setting in describe(target)["settings"].items():
            assert setting["help"], f"{name}.{key} has no help"
            assert setting["type"] != "any", f"{name}.{key} has no type"


# -- `trainbus run`: one line, exit 2, nothing started ------------------------------------------------

BAD_SETTINGS = {
    "a negative step interval": (["--plugins", "metrics_log", "--set", "metrics_log.every_n_steps=-3"],
                                 "plugin metrics_log: every_n_steps = -3 is not allowed; it must be an integer >= 0"),
    "a word for an integer": (["--plugins", "early_stopping", "--set", "early_stopping.patience=abc"],
                              "plugin early_stopping: patience = 'abc' is not allowed; it must be an integer >= 1"),
    "a mode that is not one": (["--plugins", "early_stopping", "--set", "early_stopping.mode=lowest"],
                               "mode = 'lowest' is not allowed; it must be one of 'min', 'max'"),
    "a monitor the run never produces": (
        ["--plugins", "early_stopping", "--set", "early_stopping.monitor=validation_accuracy"],
        "plugin early_stopping: monitor = 'validation_accuracy' is not a metric this run produces; use one of: "
        "training_loss, validation_loss"),
    "a checkpoint monitor the run never produces": (
        ["--plugins", "checkpoint", "--set", "checkpoint.monitor=val_loss"],
        "plugin checkpoint: monitor = 'val_loss' is not a metric this run produces"),
    "a checkpoint file name with a metric the run never produces": (
        ["--plugins", "checkpoint", "--set", "checkpoint.filename=e{epoch}-{val_loss:.3f}"],
        "plugin checkpoint: filename = 'e{epoch}-{val_loss:.3f}' names val_loss, which is not a metric this run "
        "produces; use one of: training_loss, validation_loss"),
    "a checkpoint file name that is no template": (["--plugins", "checkpoint", "--set", "checkpoint.filename=e{epoch"],
                                                   "plugin checkpoint: filename = 'e{epoch' is not allowed"),
    "checkpoints outside the run directory": (["--plugins", "checkpoint", "--set", "checkpoint.dirpath=/tmp/ckpt"],
                                              "plugin checkpoint: dirpath = '/tmp/ckpt' is not allowed"),
    "checkpoints above the run directory": (["--plugins", "checkpoint", "--set", "checkpoint.dirpath=../ckpt"],
                                            "plugin checkpoint: dirpath = '../ckpt' is not allowed"),
    "a checkpoint name that is a path": (["--plugins", "checkpoint", "--set", "checkpoint.filename=../e{epoch}"],
                                         "plugin checkpoint: filename = '../e{epoch}' is not allowed; it must be a "
                                         "plain file name"),
    # its process is sent its settings in msgpack: a bare "cannot encode dict: cannot serialize int", naming no
    # setting, and said to use numbers
    "an integer past 64 bits": (["--plugins", "metrics_log", "--set", f"metrics_log.every_n_steps={10**20}"],
                                f"plugin 'metrics_log': every_n_steps = {10**20} does not fit in 64 bits (msgpack's "
                                f"integers, which its process is sent its settings in); give a smaller one"),
    # a file name of another encoding (Latin-1): "cannot encode dict: 'utf-8' codec can't encode character ... use
    # strings", and `plugins attach` said its check "raised UnicodeEncodeError"
    "a value that is not UTF-8": (["--plugins", "metrics_log", "--set", "metrics_log.filename=a\udcffb.jsonl"],
                                  "plugin 'metrics_log': filename = 'a\\udcffb.jsonl' is not UTF-8 text (a byte of "
                                  "another encoding: 0xff); give it in UTF-8"),
    # said what is allowed but not how a list is written: a user giving one address, or several with commas, was
    # left to guess
    "a list given as plain text": (
        ["--plugins", "email", "--set", "email.recipients=ops@example.com,me@example.com"],
        "plugin email: recipients = 'ops@example.com,me@example.com' is not allowed; it must be a list of strings: "
        "one or more e-mail addresses; a list is written in JSON: [\"ops@example.com\", \"me@example.com\"] in a "
        "config file, '[\"ops@example.com\", \"me@example.com\"]' after the = of a --set"),
    # said `no setting 'password' (known: ...)`, as if the user had mistyped a setting, not how secrets are given
    "a password given with --set": (
        ["--plugins", "email", "--set", 'email.recipients=["ops@example.com"]', "--set", "email.password=hunter2"],
        "plugin email: a password never goes in the config or on the command line (config.json and the process "
        "list would keep it); set password_env (the name of an environment variable holding it) or "
        "password_file (a file only you can read, mode 0600)"),
    # no username, no login: the file was never read, and a missing one went unsaid till a server refused the mail
    "a password file with no username": (
        ["--plugins", "email", "--set", 'email.recipients=["ops@example.com"]', "--set",
         "email.password_file=/nonexistent/smtp-password"],
        "plugin email: email password_file /nonexistent/smtp-password is set but username is not: no login is made, "
        "so no password is read; set username (the SMTP login), or drop password_file"),
    "a metrics log outside the run directory": (
        ["--plugins", "metrics_log", "--set", "metrics_log.filename=/tmp/metrics.jsonl"],
        "plugin metrics_log: filename = '/tmp/metrics.jsonl' is not allowed; it must be a path inside the run "
        "directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_a_bad_setting_is_one_line_exit_2_and_no_run_directory(case, tmp_path):
    args, expected = BAD_SETTINGS[case]
    runs = tmp_path / "runs"
    r = trainbus("run", TINY, "--epochs", "1", *args, "--runs-dir", str(runs), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert not runs.exists(), "nothing was started"


BAD_DECLARATIONS = {
    # crashed at every start with 'SettingsError: ... (at plugin.py:101 in __init__)', restarted until given up
    "delivery": ('    delivery = "DURABLE"\n',
                 "Declared.delivery = 'DURABLE' is not allowed; it must be DURABLE or BEST_EFFORT (from trainbus.sdk "
                 "import DURABLE), the strings 'durable' and 'best_effort'"),
    # a string, not a tuple: the hello voted at 'e', 'n', 'd', ..., the kernel waited at no end_epoch, and a stop
    # decided there landed epochs late, or never; said only in kernel.log
    "votes": ('    votes = ("end_epoch")\n',
              "Declared.votes = 'end_epoch' is not allowed; it must be a tuple of event types: votes = ('end_epoch',)"),
    # a string, not a tuple: the hello declared 'c', 'h', 'e', ..., so the plugin was never a persister, the
    # kernel took no snapshot for it, and nothing said why
    "capabilities": ('    capabilities = ("checkpoint")\n',
                     "Declared.capabilities = 'checkpoint' is not allowed; it must be a tuple of capabilities: "
                     "capabilities = ('checkpoint',)"),
    # a near miss: never a persister either
    "a capability misspelled": ('    capabilities = ("checkpoints",)\n',
                                "Declared.capabilities = ('checkpoints',) is not allowed: 'checkpoints' is no "
                                "capability (did you mean 'checkpoint'?); the kernel knows: checkpoint"),
    # a list where the SDK has a method: every start crashed in checked_subscriptions with "TypeError: 'list' object
    # is not callable (at plugin.py:285 ...)", in the SDK's frames, restarted until given up
    "subscriptions": ('    subscriptions = ["end_epoch"]\n',
                      "Declared.subscriptions = ['end_epoch'] is not allowed; a plugin is sent the events it has "
                      "handlers for (def on_end_epoch(self, event)), or those a method returns: "
                      "def subscriptions(self): return ['end_epoch']"),
    # no @classmethod: it is called on the class before the plugin is made, so every check said "checking its
    # settings raised TypeError: Declared.check_settings() missing 1 required positional argument: 'settings'"
    "check_settings": ('    def check_settings(self, settings):\n        pass\n',
                       "Declared.check_settings is not a classmethod; it is called on the class, before the plugin is "
                       "made: put @classmethod above it, def check_settings(cls, settings)"),
}


@pytest.mark.parametrize("case", sorted(BAD_DECLARATIONS))
def test_a_plugin_class_declaring_delivery_votes_capabilities_or_subscriptions_wrong_is_refused_before_the_run(
        case, tmp_path):
    declaration, expected = BAD_DECLARATIONS[case]
    (tmp_path / "declared.py").write_text("from trainbus.sdk import Plugin\n\n\nclass Declared(Plugin):\n"
                                          + declaration + "\n    def on_end_epoch(self, event):\n        pass\n")
    (tmp_path / "run.toml").write_text('[plugins.declared]\ntarget = "declared:Declared"\n'
                                       '[plugins.console]\nenabled = false\n')
    runs = tmp_path / "runs"
    r = trainbus("run", TINY, "--epochs", "1", "-c", "run.toml", "--runs-dir", str(runs), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: plugin declared: "), r.stderr
    assert "declared.py, line 4: " in lines[0] and lines[0].endswith(expected), r.stderr
    assert not runs.exists(), "nothing was started"


def test_a_default_naming_a_metric_the_run_lacks_says_it_is_the_default_and_which_setting_to_set(tmp_path):
    """early_stopping's default monitor (validation_loss) on a run without validation: a user who never wrote
    `monitor` (bz's early_stopping_patience turns the plugin on) was told monitor = 'validation_loss' is not a metric
    this run produces, as if they had set it, and not which setting to set."""
    r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny_unvalidated", "--epochs", "1", "--plugins", "early_stopping",
                 "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == (
        "error: plugin early_stopping: monitor = 'validation_loss' (its default: set early_stopping.monitor) is not a "
        "metric this run produces; use one of: training_loss, training_accuracy\n"), r.stderr


@pytest.mark.parametrize("detach", [False, True], ids=["here", "detached"])
def test_a_demo_run_naming_a_metric_it_never_produces_is_refused_before_torch_and_queues_nothing(tmp_path, detach):
    """The demo's metrics are known before it is built: a run queued for the daemon is refused now, not failed once
    the daemon starts it (a user's function is called only by its run; its queued run says why it failed)."""
    runs = tmp_path / "runs"
    r = trainbus("run", "--plugins", "checkpoint", "--set", "checkpoint.monitor=val_acc", "--runs-dir", str(runs),
                 *["--detach"] * detach, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == (
        "error: plugin checkpoint: monitor = 'val_acc' is not a metric this run produces; use one of: training_loss, "
        "training_accuracy, validation_loss, validation_accuracy\n"), r.stderr
    assert not runs.exists() or not any(runs.iterdir()), "a run was started or queued"


def test_the_demos_metrics_known_before_it_is_built_are_the_ones_it_reports():
    from trainbus.kernel.digits import build
    from trainbus.kernel.digits_hyperparameters import METRICS

    assert build({}).metric_names() == METRICS


def test_a_bad_setting_in_the_config_file_is_refused_the_same_way(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[plugins.visualization.settings]\nplot_dpi = 0\n")
    r = trainbus("run", TINY, "--config", str(config), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == ("error: plugin visualization: plot_dpi = 0 is not allowed; it must be "
                                              "an integer between 10 and 1000\n"), r.stderr
    assert not (tmp_path / "runs").exists()


def test_set_values_reach_the_plugin_as_their_declared_types(tmp_path):
    r = trainbus("run", TINY, "--epochs", "1", "--plugins", "early_stopping,metrics_log",
                 "--set", 'early_stopping.patience="1"', "--set", "early_stopping.min_delta=0",
                 "--set", "early_stopping.monitor=training_loss", "--set", "metrics_log.filename=logs/metrics.jsonl",
                 "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run_dir,) = (path.parent for path in (tmp_path / "runs").glob("*/config.json"))
    settings = {p["name"]: p["settings"] for p in json.loads((run_dir / "config.json").read_text())["plugins"]}
    assert settings["early_stopping"] == {"patience": 1, "min_delta": 0.0, "monitor": "training_loss"}
    assert (run_dir / "logs" / "metrics.jsonl").read_text().strip()
    assert json.loads((run_dir / "summary.json").read_text())["plugins"]["early_stopping"]["errors_logged"] == 0


def test_a_monitor_missing_at_run_time_fails_the_plugin_visibly_once(tmp_path):
    """Not through `trainbus run` (which refuses it first): the first end_epoch says it, as an error, once."""
    cfg = RunConfig(target=TINY, epochs=2, device="cpu", runs_dir=str(tmp_path),
                    plugins=[PluginConfig("early_stopping", registered_plugins()["early_stopping"],
                                          {"monitor": "validation_f1"})])
    result = run_training(cfg)
    assert result.status == "completed"
    assert result.plugins["early_stopping"]["errors_logged"] == 1
    log = (Path(result.run_dir) / "plugins" / "early_stopping.log").read_text()
    assert ("MonitorMissing: early_stopping monitor 'validation_f1' is not in this run's end_epoch; set monitor to "
            "one of: ") in log
    assert "validation_loss" in log


# -- `trainbus plugins list` ---------------------------------------------------------------------------

def test_plugins_list_json_has_every_setting_and_the_table_shows_them_uncut_on_a_narrow_terminal(tmp_path):
    r = trainbus("plugins", "list", "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert set(listed) == set(registered_plugins())
    assert listed["early_stopping"]["settings"]["patience"] == {
        "type": "int", "default": 3, "constraint": ">= 1", "kind": "",
        "help": EarlyStoppingPlugin.settings["patience"].help}
    # as on an 80-column terminal: long cells fold onto more lines, none is cut with an ellipsis
    narrow = subprocess.run(trainbus_cmd() + ["plugins", "list"], capture_output=True, text=True, timeout=180,
                            env=dict(os.environ, COLUMNS="80", TTY_COMPATIBLE="1", NO_COLOR="1"))
    assert narrow.returncode == 0, narrow.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", narrow.stdout)  # bold is a style, not a colour: NO_COLOR keeps it
    assert "…" not in text
    assert max(len(line) for line in text.splitlines() if "│" in line) <= 80  # headings are left to the terminal
    cells = [cell.strip() for line in text.splitlines() for cell in line.split("│")[1:-1]]
    for name, info in listed.items():
        assert f"{name} ({info['delivery']}): {info['description']}" in text
        assert set(info["settings"]) <= set(cells), name
    # a list's type, list[str], was read by rich as a markup tag, [str], and shown as "list"
    assert listed["email"]["settings"]["recipients"]["type"] == "list[str]" and "list[str]" in cells


def test_a_plugin_without_a_docstring_has_no_description_rather_than_the_sdks():
    from trainbus.sdk import Plugin, bz

    class Quiet(Plugin):
        pass

    class Said(Quiet):
        """Says what it does."""

    class Inherits(Said):
        pass

    class QuietBz(bz.Plugin):
        pass

    assert (Quiet.description(), Said.description(), Inherits.description(), QuietBz.description()) == \
        ("", "Says what it does.", "Says what it does.", "")


def test_a_description_is_the_docstrings_whole_first_paragraph_not_its_first_line():
    """`plugins list` showed the memory monitor as "... the training process's RSS (and USS), its cgroup's": its
    first sentence wraps, and the description stopped at the line's end, mid-phrase."""
    from trainbus.plugins.memory_monitor import MemoryMonitorPlugin
    from trainbus.sdk import Plugin

    class Wrapped(Plugin):
        """Says what it does, in a sentence too long
        for one line.

        More, which is not the description."""

    assert Wrapped.description() == "Says what it does, in a sentence too long for one line."
    assert MemoryMonitorPlugin.description().endswith("its cgroup's limit; warns near exhaustion.")


def test_a_host_path_is_made_absolute_from_the_directory_the_settings_are_checked_in(tmp_path, monkeypatch):
    """The plugin reads it in the kernel's working directory, which `plugins attach` from elsewhere does not share:
    relative and ~ are made absolute where the command runs; an absolute one and '' (none) stay as given."""
    class Reader(Plugin):
        settings = {"source": Setting("", "a file it reads", kind=HOST_PATH)}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert merge_settings(Reader, {"source": "secrets/pw"})["source"] == str(tmp_path / "secrets" / "pw")
    assert merge_settings(Reader, {"source": "~/pw"})["source"] == str(tmp_path / "home" / "pw")
    assert merge_settings(Reader, {"source": "/etc/../etc/pw"})["source"] == "/etc/pw"
    assert merge_settings(Reader, {"source": ""})["source"] == ""
    assert "from the directory the command runs in" in Reader.settings["source"].constraint()


def test_a_host_path_default_under_home_reaches_the_plugin_made_absolute_as_a_given_one_does(tmp_path, monkeypatch):
    """`Setting("~/.netrc", kind=HOST_PATH)`: a given `~/...` was made absolute, but the default reached the plugin
    as written, and `open("~/.netrc")` looks for a folder named `~` in the kernel's working directory. The default
    is read as a value like any given one (README), so its `~` is the plugin's user's home too."""
    class Reader(Plugin):
        settings = {"netrc": Setting("~/.netrc", "a file it reads", kind=HOST_PATH)}

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert merge_settings(Reader, {})["netrc"] == str(tmp_path / "home" / ".netrc")
    assert Reader().settings["netrc"] == str(tmp_path / "home" / ".netrc")


NOISY_PLUGIN = '''
import os
import sys
print("loading my plugin {")  # what a module says as it is imported: a banner, a library's notice
os.write(1, b"and from C, as a library's own print does\\n")
print("to stderr too", file=sys.stderr)
from trainbus.sdk import Plugin, Setting

class Noisy(Plugin):
    settings = {"limit": Setting(1.0, "a limit", min=0)}
'''


def test_a_plugin_module_that_prints_as_it_is_imported_is_checked_as_any_other(tmp_path):
    """`trainbus run` checks plugin settings in a `python -m trainbus.sdk --describe` process and reads its stdout
    as JSON: a plugin module that printed a line as it was imported made that a JSONDecodeError traceback through
    the CLI's frames, whatever its settings. What the plugin's code prints there goes to stderr; stdout is the
    JSON alone."""
    (tmp_path / "noisy.py").write_text(NOISY_PLUGIN)
    (tmp_path / "run.toml").write_text('[run]\nepochs = 1\n[plugins.noisy]\ntarget = "noisy:Noisy"\n'
                                       '[plugins.noisy.settings]\nlimit = -1\n')
    r = trainbus("run", "-c", "run.toml", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: plugin noisy: limit = -1 is not allowed; it must be a number >= 0"), r.stderr
    d = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", 'noisy:Noisy={"limit": 2}'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert d.returncode == 0 and json.loads(d.stdout)[0]["values"] == {"limit": 2.0}, d.stdout
    assert "loading my plugin {" in d.stderr and "and from C" in d.stderr, d.stderr


def test_a_setting_mistake_by_hand_is_said_before_the_missing_run(tmp_path):
    """`python -m trainbus.sdk PLUGIN --set nosuch=1` with no run to attach to said only that TRAINBUS_EVENTS and
    TRAINBUS_CONTROL were not set; with them set, it then said the setting was wrong: two tries for what one
    command line can say. The command line's own mistake comes first now, as `trainbus run` says its flags' before
    anything else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "trainbus.plugins.metrics_log:MetricsLogPlugin",
                        "--set", "every_n_step=5"], capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env)
    assert r.returncode == 2 and "every_n_step" in r.stderr and "not set" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "trainbus.sdk", "trainbus.plugins.metrics_log:MetricsLogPlugin",
                        "--set", "every_n_steps=5"], capture_output=True, text=True, cwd=tmp_path, timeout=60, env=env)
    assert (r.returncode, r.stderr.startswith("error: TRAINBUS_EVENTS, TRAINBUS_CONTROL not set")) == (2, True), \
        r.stderr
