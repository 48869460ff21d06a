"""The `trainbus` command as a user meets it: version, plugin list, a real run, and bad input."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from conftest import TESTS_DIR, sigint_as_from_a_terminal, trainbus_cmd
from fixture_targets import open_gate
from helpers import PLUGIN_START_S, ctrl_c_once_it_says
from kernel_process import Command, cli
from trainbus.kernel.config import ConfigError, RunConfig
from trainbus.kernel.config_checks import SETTINGS_MAX_BYTES
from trainbus.kernel.config_file import load_config


def trainbus(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`trainbus ARGS` forked with torch loaded (kernel_process.cli; stdin /dev/null, not a terminal): a console
    script's start costs ~0.5 s of CPU, ~3 s more for a command that imports torch. The tests of the console
    script's own start (its sys.path, its closed or piped output), a terminal and signals start the script itself."""
    return cli(*args, cwd=cwd, timeout=timeout)


def test_version():  # the console script, as installed
    r = subprocess.run([*trainbus_cmd(), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("trainbus ") and "protocol v1" in r.stdout


def test_plugins_list_describes_every_builtin():
    r = trainbus("plugins", "list")
    assert r.returncode == 0, r.stderr
    for name in ("console", "metrics_log", "early_stopping"):
        assert name in r.stdout
    patience = next(line for line in r.stdout.splitlines() if "│ patience" in line)
    assert " 3 " in patience and ">= 1" in patience  # each setting with its default and what is allowed


@pytest.fixture(scope="module")
def one_demo_epoch(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`trainbus run --epochs 1 --plugins console,metrics_log` (the demo) and its run directory, trained once for the
    two tests below that read what it printed and wrote (each trained its own): not to be changed."""
    runs = tmp_path_factory.mktemp("one_demo_epoch")
    r = trainbus("run", "--epochs", "1", "--plugins", "console,metrics_log", "--runs-dir", str(runs))
    assert r.returncode == 0, r.stderr
    return r, next(p for p in runs.iterdir() if p.is_dir())  # beside registry.sqlite


def test_run_prints_id_outcome_and_results(one_demo_epoch):
    r, run_dir = one_demo_epoch
    assert f"run {run_dir.name}" in r.stdout and "completed" in r.stdout and str(run_dir) in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (run_dir / "metrics.jsonl").read_text().strip(), "metrics_log wrote its records"


def test_the_terminal_gets_what_the_console_draws_and_plugins_diagnostics_go_to_their_logs(one_demo_epoch):
    r, run_dir = one_demo_epoch
    assert "epoch 1/1" in r.stdout and "finished: 1 epoch," in r.stdout  # the console, on the kernel's stdout
    assert "run ended" not in r.stdout + r.stderr  # the SDK's counts, one line per plugin
    for name in ("console", "metrics_log"):
        assert f"[{name}] run ended. received " in (run_dir / "plugins" / f"{name}.log").read_text()


def test_the_summary_names_a_plugin_that_crashed_once_and_was_not_restarted_before_the_end(capsys):
    # summary.json's entry for a plugin that exited 3 at the last end_epoch of a 2-epoch run: the run ended inside
    # the restart backoff (0.25 s), so it crashed once and was never restarted. A run cannot be made to end inside
    # that window every time, so the summary is printed from its entry.
    from trainbus.kernel.cli_run_summary import print_summary
    from trainbus.kernel.run_end import RunResult

    outcome = {"epochs_completed": 2, "steps": 6, "stop_reasons": [], "validation_loss": None, "validation_metrics": {}}
    late = {"state": "exited", "restarts": 0, "crashes": ["exit code 3"], "errors_logged": 0}
    print_summary(RunResult(run_id="r", run_dir="/runs/r", status="completed", duration_s=2.3, outcome=outcome,
                            plugins={"late": late}))
    assert "  plugin late: exited, 1 crash, 0 restarts (exit code 3)" in capsys.readouterr().out.splitlines()


def test_the_summary_of_a_run_without_validation_gives_its_training_loss_and_metrics(capsys):
    from trainbus.kernel.cli_run_summary import print_summary
    from trainbus.kernel.run_end import RunResult

    outcome = {"epochs_completed": 2, "steps": 6, "stop_reasons": [], "validation_loss": None, "validation_metrics": {},
               "training_loss": 0.25, "training_metrics": {"accuracy": 0.875}}
    print_summary(RunResult(run_id="r", run_dir="/runs/r", status="completed", duration_s=2.3, outcome=outcome,
                            plugins={}))
    assert "  training loss 0.2500, accuracy 0.8750 (no validation)" in capsys.readouterr().out.splitlines()


def _write_bytes(tmp_path: Path, name: str, content: bytes) -> str:
    (tmp_path / name).write_bytes(content)
    return str(tmp_path / name)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SHELL_SCRIPT = "#!/bin/sh\n"
BAD_INPUT = {
    "missing target file": (lambda t: ["run", "no/such/file.py:build"], "does not exist"),
    # said "does not exist" of a folder that does (`runs:build` for `train.py:build`) or of /dev/null
    "a target file that is a folder": (lambda t: ["run", f"{t}:build"],
                                       "is a directory, not a Python file; check the path before ':build'"),
    "a target file that is a device": (lambda t: ["run", "/dev/null:build"],
                                       "error: target file /dev/null is not a regular file (a device, a pipe); check "
                                       "the path before ':build'"),
    "target not a function": (lambda t: ["run", f"{TESTS_DIR / 'specs.py'}:not_a_function"],
                              "is not a function (it is an int)"),
    "missing function": (lambda t: ["run", f"{TESTS_DIR / 'specs.py'}:nope"], "has no function 'nope'"),
    "unknown module": (lambda t: ["run", "no_such_pkg.mod:build"], "cannot import module"),
    "unknown plugin": (lambda t: ["run", "--plugins", "console,bogus"], "unknown plugin 'bogus'"),
    "a module:Class in --plugins": (lambda t: ["run", "--plugins", "console,mymodule:MyPlugin"],
                                    "--plugins: 'mymodule:MyPlugin' is a module:Class, not a plugin name; run your own "
                                    "class from a config file (trainbus run -c FILE) with [plugins.my_plugin] target = "
                                    "\"mymodule:MyPlugin\""),
    "a typo of a plugin in --plugins": (lambda t: ["run", "--plugins", "console,metric_log"],
                                        "--plugins: unknown plugin 'metric_log' (did you mean 'metrics_log'?); "
                                        "known: "),
    # what README calls them (TensorBoard files, the live dashboard) or their modules: no near name, only the list
    "tensorboard for visualization": (lambda t: ["run", "--plugins", "console,tensorboard"],
                                      "--plugins: unknown plugin 'tensorboard' (TensorBoard files and PNG plots are "
                                      "the visualization plugin's: name it visualization); known: "),
    "a monitor's module name": (lambda t: ["run", "--plugins", "gpu_monitor"],
                                "--plugins: unknown plugin 'gpu_monitor' (the built-in GPU monitor is named gpu); "
                                "known: "),
    "dashboard as a plugin": (lambda t: ["run", "--plugins", "console,dashboard"],
                              "--plugins: unknown plugin 'dashboard' (the live dashboard is a command, not a plugin: "
                              "trainbus attach RUN, while the run trains); known: "),
    # said the problem ("is configured twice") and not the fix
    "a plugin twice in --plugins": (lambda t: ["run", "--plugins", "console,cpu,console"],
                                    "command line: plugin 'console' is named twice; name each plugin once (a second "
                                    "one of the same class: a [plugins.OTHER_NAME] table in a config file with its "
                                    "target)"),
    "a typo of a plugin in a config": (lambda t: ["run", "--config", _write(t, "p.toml", "[plugins.consol]\n")],
                                       "p.toml: [plugins.consol]: unknown plugin 'consol' (did you mean 'console'?); "
                                       "known: "),
    "malformed toml": (lambda t: ["run", "--config", _write(t, "bad.toml", "[run\nepochs=")], "not valid TOML"),
    # Python's TOML and JSON readers recurse: a RecursionError's traceback, exit 1
    "toml nested too deeply": (lambda t: ["run", "--config", _write(
        t, "deep.toml", "[hyperparameters]\nx = " + "[" * 5000 + "]" * 5000 + "\n")],
        "deep.toml nests arrays or tables too deeply to be read (RecursionError); flatten it"),
    "a --set value nested too deeply for JSON": (lambda t: ["run", "--set", "lr=" + "[" * 50_000 + "]" * 50_000],
                                                 "the demo's lr must be a positive number, got '[[["),
    # one Python's JSON reader takes (under a thousand levels) recursed out later, copied and recorded
    "a --set value nested past 100 levels": (lambda t: ["run", f"{TESTS_DIR / 'specs.py'}:tiny", "--set",
                                                        "note=" + "[" * 900 + "]" * 900],
                                             "command line: hyperparameter 'note' nests lists or tables more than 100 "
                                             "levels deep; put such data in a file and give its path"),
    "json nested too deeply": (lambda t: ["run", "--config", _write(
        t, "deep.json", '{"training": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}")],
        "deep.json nests arrays or tables too deeply to be read (RecursionError); flatten it"),
    "bz json with a key twice": (lambda t: ["run", "--config", _write(
        t, "d.json", '{"training": {"epochs": 1}, "training": {"epochs": 2}}')],
        "key 'training' is given twice in one object; keep one"),
    "settings and config both": (lambda t: ["run", "--config", _write(
        t, "sc.toml", "[plugins.console]\nsettings = {}\nconfig = {}\n")],
        "plugins.console has both settings and config (bz's name for settings); keep one"),
    "target and command both": (lambda t: ["run", "--config", _write(
        t, "tc.toml", '[plugins.mine]\ntarget = "mine:Plugin"\ncommand = ["./mine"]\n')],
        "plugins.mine has both target (a Python plugin class) and command (a program speaking PROTOCOL.md); keep one"),
    "latin-1 toml": (lambda t: ["run", "--config", _write_bytes(t, "l.toml", b"[run]\nepochs = 1  # f\xfcr\n")],
                     "is not UTF-8 text (byte 0xfc at offset 21); save it as UTF-8"),
    "toml with a bom": (lambda t: ["run", "--config", _write_bytes(t, "b.toml", b"\xef\xbb\xbf[run]\nepochs = 1\n")],
                        "starts with a byte-order mark; save it as UTF-8 without BOM"),
    # [run] epochs won without a word, as a flag given twice would: the file says two counts
    "epochs twice in one config": (lambda t: ["run", "--config", _write(
        t, "e2.toml", "[run]\nepochs = 3\n[hyperparameters]\nepochs = 1\n")],
                                   "e2.toml: epochs given twice, as [run] epochs = 3 and [hyperparameters] epochs = 1: "
                                   "give it once"),
    "unknown config key": (lambda t: ["run", "--config", _write(t, "k.toml", "[run]\nepochz = 3\n")],
                           "unknown key 'epochz' (did you mean 'epochs'?)"),
    "a rendezvous endpoint with no port": (lambda t: ["run", "--nnodes", "2", "--rdzv-endpoint", "nodeA"],
                                           "--rdzv-endpoint 'nodeA' must be HOST:PORT (a port 1-65535)"),
    "a rendezvous port out of range": (lambda t: ["run", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:70000"],
                                       "--rdzv-endpoint '127.0.0.1:70000' must be HOST:PORT (a port 1-65535)"),
    "a negative timeout": (lambda t: ["run", "--config", _write(t, "n.toml", "[run]\ndrain_timeout_s = -1\n")],
                           "drain_timeout_s must be a number of seconds >= 0 (0: no waiting), got -1"),
    "a NaN timeout": (lambda t: ["run", "--config", _write(t, "nan.toml", "[run]\nvote_timeout_s = nan\n")],
                      "vote_timeout_s must be a number of seconds >= 0 (0: no waiting), got nan"),
    # int(inf * 2**20) as the journal was opened: an OverflowError's traceback, exit 1, and a run left `died`
    "an infinite journal_backlog_mb": (lambda t: ["run", "--config", _write(t, "jb.toml",
                                                                          "[run]\njournal_backlog_mb = inf\n")],
                                       "journal_backlog_mb must be a finite number > 0, got inf"),
    # inf: as journal_backlog_mb; 0.001: segments of ~7 events each, 14 gzip files for a 45-step demo epoch
    **{f"a journal_segment_mb of {mb}": (lambda t, mb=mb: ["run", "--config", _write(
        t, "js.toml", f"[run]\njournal_segment_mb = {mb}\n")], "journal_segment_mb must be a finite number >= 1 (MiB")
       for mb in ("inf", "0.001", "0")},
    "a hyperparameter in [run]": (lambda t: ["run", "--config", _write(t, "h.toml", "[run]\nlr = 0.1\n")],
                                  "[run]: unknown key 'lr' (a hyperparameter goes in [hyperparameters])"),
    # a Lightning user's Trainer arguments next to the precision [run] takes by Lightning's names were "a
    # hyperparameter" there
    "Lightning's max_epochs in [run]": (lambda t: ["run", "--config", _write(t, "l.toml", "[run]\nmax_epochs = 3\n")],
                                        "[run]: unknown key 'max_epochs' (Lightning's max_epochs is epochs here)"),
    "Lightning's devices in [run]": (lambda t: ["run", "--config", _write(t, "d.toml", "[run]\ndevices = 2\n")],
                                     "[run]: unknown key 'devices' (Lightning's devices is --nproc N here, processes "
                                     "on this machine, one GPU each on CUDA; or device = \"cuda:N\" for one GPU)"),
    "a run key at the top": (lambda t: ["run", "--config", _write(t, "e.toml", "epochs = 3\n")],
                             "unknown key 'epochs' (it belongs in [run])"),
    "a plugin table at the top": (lambda t: ["run", "--config", _write(t, "p.toml", "[checkpoint]\nmonitor = 'x'\n")],
                                  "unknown key 'checkpoint' (a plugin's table is [plugins.checkpoint])"),
    "wrong config type": (lambda t: ["run", "--config", _write(t, "t.toml", "[run]\nepochs = 'three'\n")],
                          "must be an integer"),
    "bad plugin setting": (lambda t: ["run", "--config", _write(
        t, "s.toml", "[plugins.early_stopping.settings]\npatiencee = 2\n")], "no setting 'patiencee'"),
    "flag of wrong type": (lambda t: ["run", "--epochs", "many"], "Invalid value for '--epochs'"),
    "unknown flag": (lambda t: ["run", "--epocks", "3"], "No such option"),
    "a value out of range": (lambda t: ["run", "--epochs", "0"], "(`trainbus run --help` shows what it takes)"),
    "a plugin name with a space": (lambda t: ["run", "--config", _write(
        t, "sp.toml", "[plugins.\"bad name\"]\ntarget = 'trainbus.plugins.console:ConsolePlugin'\n")],
        "plugin name 'bad name' is not one trainbus takes"),
    "a plugin name that climbs out of the run": (lambda t: ["run", "--config", _write(
        t, "up.toml", "[plugins.\"../../escaped\"]\ntarget = 'trainbus.plugins.console:ConsolePlugin'\n")],
        "plugin name '../../escaped' is not one trainbus takes"),
    "an empty plugin name": (lambda t: ["run", "--config", _write(t, "e.toml", "[plugins.\"\"]\n")],
                             "plugin name '' is not one trainbus takes"),
    "an IPv6 address without brackets": (lambda t: ["run", "--listen", "::1:5555"],
                                         "'::1:5555': an IPv6 address goes in brackets, [::1]:5555"),
    # it was bound as host "[::1" (or "[:" and port 1), said as "not an address of this machine"
    "an IPv6 address without its closing bracket": (
        lambda t: ["run", "--listen", "[::1:5555"],
        "'[::1:5555': an IPv6 address goes in brackets, then its port: [ADDRESS]:PORT, as [::1]:5555"),
    "an attach to an IPv6 address without its closing bracket": (
        lambda t: ["attach", "[::1", "--key", str(t / "alice.key_secret")],
        "'[::1': an IPv6 address goes in brackets, then its port: [ADDRESS]:PORT, as [::1]:5555"),
    "epochs past any run": (lambda t: ["run", "--epochs", str(2**63)], "epochs must be 1 to 1,000,000,000"),
    "epochs past 64 bits in a config": (
        lambda t: ["run", "--config", _write(t, "big.toml", f"[run]\nepochs = {10**21}\n")],
        "epochs must be 1 to 1,000,000,000"),
    "steps between checkpoints past any run": (
        lambda t: ["run", "--config", _write(t, "c.toml", f"[run]\ncheckpoint_every_n_steps = {2**64}\n")],
        "checkpoint_every_n_steps must be 0 to 1,000,000,000 (0 turns it off)"),
    "unknown command": (lambda t: ["runs", "lsit"], "No such command 'lsit'"),
    "a device as the config file": (lambda t: ["run", "--config", "/dev/null"],
                                    "config file /dev/null is not a regular file"),
    "Lightning's 64-true, float64": (lambda t: ["run", "--precision", "64-true"],
                                     "precision 64-true (float64 weights) is not a precision here: make the model and "
                                     "its batches float64 in the spec (model.double()) and give precision 32, which "
                                     "casts nothing"),
    "Lightning's 16-true, pure float16": (lambda t: ["run", "--precision", "16-true"],
                                          "precision 16-true (float16 weights) is not supported; use 16-mixed (CUDA) "
                                          "or bf16-true"),
    "a precision of no one's": (lambda t: ["run", "--precision", "fp8"],
                                "precision must be one of 32, bf16-mixed, 16-mixed, bf16-true (or Lightning's 32-true, "
                                "16, bf16), got 'fp8'"),
    "a NUL in a plugin's target": (  # TOML's \u0000: no argv or environment holds one (a ValueError's traceback)
        lambda t: ["run", "--config", _write(t, "c.toml", '[plugins.mine]\ntarget = "my\\u0000mod:P"\n')],
        "c.toml: plugins.mine.target holds a NUL character (\\u0000), which no path, target or name takes; remove it"),
    "a NUL in a config's runs_dir": (
        lambda t: ["run", "--config", _write(t, "c.toml", '[run]\nruns_dir = "r\\u0000s"\n')],
        "c.toml: run.runs_dir holds a NUL character (\\u0000), which no path, target or name takes; remove it"),
    "an empty --resume": (lambda t: ["run", "--resume", ""],
                          "--resume is empty: give it a value, or leave --resume out"),
    "an empty --listen": (lambda t: ["run", "--listen", ""],
                          "--listen is empty: give it a value, or leave --listen out"),
    "missing config file": (lambda t: ["run", "--config", str(t / "nope.toml")],
                            "nope.toml does not exist; check the path given to --config"),
    # it said "config file . is a directory": `--config "$UNSET"` read as the current directory
    # the name was printed as given: the terminal obeyed the escape, and a newline made the error two lines
    "a target whose name holds a terminal escape": (lambda t: ["run", "\x1b[2Jtrain.py"],
                                                    "target file \\x1b[2Jtrain.py does not exist"),
    "a target whose name holds a newline": (lambda t: ["run", "a\nb.py"], "target file a\\x0ab.py does not exist"),
    # it was said as "cannot import module 'train.py:build'; is it installed or on PYTHONPATH?"
    "a target with two colons": (lambda t: ["run", "train.py:build:extra"],
                                 "target 'train.py:build:extra' has more than one ':'; it must look like "
                                 "path/to/file.py:function or package.module:function"),
    "an empty --config": (lambda t: ["run", "--config", ""],
                          "'--config' / '-c': is empty: name a TOML file (or bz's .json one), or leave --config out"),
    "no gpu": (lambda t: ["run", "--device", "tpu"], "device must be one of auto, cpu, cuda or cuda:N"),
    "a GPU index torch does not parse": (lambda t: ["run", "--device", "cuda:01"], "or cuda:N (the GPU of index N), "
                                                                                   "got 'cuda:01'"),
    "one GPU for every rank": (lambda t: ["run", "--device", "cuda:1", "--nproc", "2"],
                               "--device cuda:1 picks one GPU, but each process of a distributed run trains on its "
                               "own"),
    "one GPU for a queued run": (lambda t: ["run", "--device", "cuda:1", "--detach"],
                                 "--device cuda:1 with --detach: the daemon gives each run its GPUs"),
    "not a boolean": (lambda t: ["run", "--config", _write(t, "b.toml", "[run]\nkeep_freed_memory = 'maybe'\n")],
                      "run.keep_freed_memory must be true or false (or yes/no, on/off, 1/0), got 'maybe'"),
    "missing snapshot dir": (lambda t: ["run", "--config", _write(t, "d.toml", f"[run]\nsnapshot_dir = '{t}/nope'\n")],
                             "does not exist; create it, or leave snapshot_dir empty for /dev/shm"),
    # it said "not a writable directory; create it": it exists, and is a file
    "snapshot dir a file": (lambda t: ["run", "--config", _write(t, "d.toml", f"[run]\nsnapshot_dir = '{t}/d.toml'\n")],
                            "d.toml is a file, not a directory; give a directory, or leave snapshot_dir empty for "
                            "/dev/shm"),
    "negative seed": (lambda t: ["run", "--seed", "-1"], "seed must be between 0 and 4294967295"),
    "seed over 32 bits": (lambda t: ["run", "--seed", str(2**32)], "seed must be between 0 and 4294967295"),
    "seed over 32 bits beside a flag": (lambda t: ["run", "lr=0.01", "--seed", str(2**32)],
                                        "seed must be between 0 and 4294967295"),
    "seed over 32 bits in a config": (lambda t: ["run", "--config", _write(t, "seed.toml", f"[run]\nseed = {2**40}\n")],
                                      "seed must be between 0 and 4294967295"),
    "plugin program not on PATH": (lambda t: ["run", "--config", _write(
        t, "p.toml", "[plugins.go_monitor]\ncommand = ['no-such-trainbus-monitor', '--fast']\n")],
        "plugin 'go_monitor': program 'no-such-trainbus-monitor' is not on PATH"),
    "plugin program path missing": (lambda t: ["run", "--config", _write(
        t, "q.toml", f"[plugins.go_monitor]\ncommand = ['{t}/monitor-bin']\n")], "monitor-bin' does not exist"),
    # both said "is not an executable file; fix the path in plugins.go_monitor.command": neither named the fix
    "plugin program without its x bit": (lambda t: ["run", "--config", _write(
        t, "q.toml", f"[plugins.go_monitor]\ncommand = ['{_write(t, 'monitor-bin', SHELL_SCRIPT)}']\n")],
        "/monitor-bin' is not executable; fix: chmod +x /"),
    "plugin program a directory": (lambda t: ["run", "--config", _write(
        t, "q.toml", f"[plugins.go_monitor]\ncommand = ['{t}']\n")],
        "is a directory; give the program's own path in plugins.go_monitor.command"),
    "plugin settings too big": (lambda t: ["run", "--config", _write(
        t, "big.toml", f"[plugins.early_stopping.settings]\nmonitor = '{'m' * (SETTINGS_MAX_BYTES + 1)}'\n")],
        "plugin 'early_stopping': its settings take"),
    "plugin settings too big via --set": (lambda t: ["run", "--plugins", "early_stopping", "--set",
                                                     f"early_stopping.monitor={'m' * (SETTINGS_MAX_BYTES + 1)}"],
                                          f"over the {SETTINGS_MAX_BYTES:,} that fit"),
    "--set for a plugin not in the run": (
        lambda t: ["run", "--set", "plugins.early_stopping.settings.patience=1"],
        "'early_stopping' is not a plugin of this run (its plugins: console, metrics_log)"),
    "--set for an unknown plugin": (lambda t: ["run", "--set", "early_stoping.patience=1"],
                                    "'early_stoping' is not a plugin of this run"),
    "--set plugins. without settings": (lambda t: ["run", "--set", "plugins.console.target=x"],
                                        "plugins.NAME.settings.SETTING=VALUE"),
    "--set an unknown plugin setting": (lambda t: ["run", "--plugins", "early_stopping", "--set",
                                                   "early_stopping.patiencee=2"], "no setting 'patiencee'"),
    "--set a plugin setting of the wrong type": (lambda t: ["run", "--plugins", "early_stopping", "--set",
                                                            "plugins.early_stopping.settings.patience=soon"],
                                                 "patience = 'soon' is not allowed; it must be an integer >= 1"),
    "--set a number for a text setting": (lambda t: ["run", "--plugins", "email", "--set", "email.username=1234"],
                                          "it must be a string; 1234 was read as a number: quote it (\"1234\" in "
                                          "a config file, '\"1234\"' after the = of a --set)"),
    "config is a directory": (lambda t: ["run", "--config", str(t)], "is a directory; give --config a TOML file"),
    "plugin class not in its module": (lambda t: ["run", "--config", _write(
        t, "c.toml", "[plugins.x]\ntarget = 'trainbus.plugins.console:Nope'\n")],
        "module 'trainbus.plugins.console' has no attribute 'Nope'; name one of its Plugin subclasses: ConsolePlugin"),
    # a class of its own, or a function making one: "... is not a trainbus.sdk.Plugin subclass", and no way on
    "plugin target not a Plugin": (lambda t: ["run", "--config", _write(
        t, "c.toml", "[plugins.x]\ntarget = 'trainbus.plugins.console:_fmt'\n")],
        "plugin x: trainbus.plugins.console:_fmt is a function, not a trainbus.sdk.Plugin subclass; "
        "name one of its module's Plugin subclasses: ConsolePlugin"),
    "plugin target given as a file": (lambda t: ["run", "--config", _write(
        t, "c.toml", "[plugins.x]\ntarget = 'hooks/train.py:Alarm'\n")],
        "plugin target 'hooks/train.py:Alarm' names a file: a plugin is module:Class, a module its Python imports "
        "(train:Alarm, run from train.py's folder or with it on PYTHONPATH)"),
    "--resume a file that is not a checkpoint": (lambda t: ["run", "--resume", str(TESTS_DIR / "specs.py")],
                                                 f"{TESTS_DIR / 'specs.py'} is neither a checkpoint (.pt) nor a run "
                                                 f"directory; --resume takes a run id"),
    # beside a manifest (a run's checkpoints/): said as what --resume takes, before any entry is looked at
    "--resume a file beside checkpoints that is not one": (
        lambda t: ["run", "--resume", (_write(t, "manifest.jsonl", ""), _write(t, "notes.txt", "x"))[1]],
        "notes.txt is neither a checkpoint (.pt) nor a run directory; --resume takes a run id"),
    "epochs as a flag and as --epochs": (lambda t: ["run", "epochs=2", "--epochs", "1"],
                                         "epochs given twice, as epochs=2 and as --epochs 1: give epochs once"),
    "epochs with --set and as --epochs": (lambda t: ["run", "--set", "epochs=3", "--epochs", "1"],
                                          "epochs given twice, as epochs=3 and as --epochs 1: give epochs once"),
    "a flag and --set of it": (lambda t: ["run", "lr=0.1", "--set", "lr=0.2"],
                               "lr given twice, as lr=0.1 and as --set lr=0.2: give it once"),
    # the later --set won silently, where a flag given twice is refused
    "--set twice": (lambda t: ["run", "--set", "lr=0.1", "--set", "hyperparameters.lr=0.2"],
                    "lr given twice, as --set lr=0.1 and as --set hyperparameters.lr=0.2: give it once"),
    "a plugin setting set twice": (lambda t: ["run", "--plugins", "early_stopping",
                                              "--set", "early_stopping.patience=1",
                                              "--set", "plugins.early_stopping.settings.patience=2"],
                                   "early_stopping.patience given twice, as --set early_stopping.patience=1 and as "
                                   "--set plugins.early_stopping.settings.patience=2: give it once"),
}


DEMO_BAD_SET = {
    "lr=abc": "the demo's lr must be a positive number, got 'abc' (e.g. --set lr=0.001)",
    'lr="0.01"': "the demo's lr must be a positive number, got the text '0.01': write it without quotes "
                 "(e.g. --set lr=0.001)",
    "hidden=-5": "the demo's hidden must be a whole number of at least 1, got -5 (e.g. --set hidden=128)",
    "batch_size=0": "the demo's batch_size must be a whole number of at least 1, got 0 (e.g. --set batch_size=32)",
    "model=cnn2": "the demo's model must be mlp or cnn, got 'cnn2' (e.g. --set model=cnn)",
    "epochs=0": "the demo's epochs must be a whole number of at least 1, got 0 (e.g. --set epochs=10)",
    # 0 and 1 themselves are refused (no validation split, or no training one): "between 0 and 1" read as allowing them
    "validation_fraction=0": "the demo's validation_fraction must be a number above 0 and below 1, got 0 (e.g. --set "
                             "validation_fraction=0.2)",
    "validation_fraction=1": "the demo's validation_fraction must be a number above 0 and below 1, got 1 (e.g. --set "
                             "validation_fraction=0.2)",
    # a typo is said as the one it is close to, as a function's flags say it (README: `lrr=0.1`)
    "lrr=0.1": "the demo has no hyperparameter 'lrr' (did you mean 'lr'?); it takes lr, batch_size, hidden, "
               "validation_fraction, model, epochs (e.g. --set lr=0.01)",
    "seed=3": "the demo has no hyperparameter 'seed' (seed is an option of trainbus run: --seed 3); it takes lr, "
              "batch_size, hidden, validation_fraction, model, epochs (e.g. --set lr=0.01)",
}


@pytest.mark.parametrize("word", sorted(DEMO_BAD_SET))
def test_a_bad_hyperparameter_for_the_demo_is_one_line_naming_it_and_a_value_that_works(word, tmp_path):
    r = trainbus("run", "--plugins", "", "--set", word, "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr == f"error: {DEMO_BAD_SET[word]}\n", r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "nothing half-started"


def test_a_config_files_booleans_take_the_words_a_flag_takes(tmp_path):
    """--flag=yes and a plugin's setting = "on" are taken (TRUE_WORDS, FALSE_WORDS), so [run] takes them too."""
    cfg = load_config(Path(_write(tmp_path, "words.toml", '[run]\ncompile = "yes"\nkeep_freed_memory = "Off"\n'
                                  'distributed_sampler = "0"\n[plugins.console]\nenabled = "no"\n'
                                  '[plugins.metrics_log]\nenabled = "on"\n')))
    assert (cfg.compile, cfg.keep_freed_memory, cfg.distributed_sampler) == (True, False, False)
    assert [p.name for p in cfg.plugins] == ["metrics_log"]
    # `compile = 1` was refused with "must be true or false (or yes/no, on/off, 1/0), got 1": TOML's integers too
    cfg = load_config(Path(_write(tmp_path, "ints.toml", '[run]\ncompile = 1\nkeep_freed_memory = 0\n'
                                  '[plugins.console]\nenabled = 0\n[plugins.metrics_log]\nenabled = 1\n')))
    assert (cfg.compile, cfg.keep_freed_memory) == (True, False)
    assert [p.name for p in cfg.plugins] == ["metrics_log"]
    with pytest.raises(ConfigError, match=r"run.compile must be true or false \(or yes/no, on/off, 1/0\), got 2$"):
        load_config(Path(_write(tmp_path, "two.toml", "[run]\ncompile = 2\n")))


@pytest.mark.parametrize("given, said", [
    ("train", "target 'train' must look like path/to/file.py:function or package.module:function (did you mean "
              "train.py?)"),
    ("./train:build", "target file train does not exist (did you mean ./train.py:build?); check the path before "
                      "':build'"),
])
def test_a_script_named_without_its_py_is_said_with_the_file_meant(given, said, tmp_path):
    """`trainbus run train` for train.py (Guild's `guild run train` finds it) said only what a target looks like, or
    that ./train does not exist, with train.py right there."""
    (tmp_path / "train.py").write_text("def build():\n    pass\n")
    r = trainbus("run", given, "--plugins", "", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == f"error: {said}\n", r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_one_clear_line_and_no_traceback(case, tmp_path):
    make_args, expected = BAD_INPUT[case]
    r = trainbus(*make_args(tmp_path), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    error_lines = [line for line in r.stderr.splitlines() if line.lower().startswith("error")]
    assert len(error_lines) == 1 and expected in error_lines[0], r.stderr
    assert r.stderr.count("\n") == 1, f"one line, not a usage block: {r.stderr}"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "nothing half-started"


def test_a_gpu_by_its_index_is_taken_and_where_none_is_visible_said_so(tmp_path):
    """cuda:N, as torch names one GPU, passes the checks (tests/test_cuda.py trains on it where a GPU is); it
    was refused as not one of auto, cpu, cuda."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here: tests/test_cuda.py trains on cuda:N")
    r = trainbus("run", "--device", "cuda:1", "--epochs", "1", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr == ("error: device cuda:1 requested but no CUDA GPU is visible; use "
                                              "--device cpu or auto\n"), r.stderr


@pytest.mark.parametrize("args, option, taken", [
    (["attach", "127.0.0.1:5", "--stop", "--key", "alice.key_secret"], "--stop", "--key"),
    (["attach", "x", "--checkpoint", "--json"], "--checkpoint", "--json"),
    (["runs", "stop", "x", "--reason", "--runs-dir", "runs"], "--reason", "--runs-dir"),
])
def test_a_reason_left_out_is_refused_not_the_next_option_taken_for_it(args, option, taken, tmp_path):
    """click takes the word after an option for its value: `--stop --key FILE` journaled "--key" as the reason,
    then refused FILE as an extra argument, naming neither mistake."""
    r = trainbus(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"'{option}': takes a REASON, and '{taken}' is an option: put the reason right after it" in r.stderr


@pytest.mark.parametrize("args, command", [
    (["run", "--epochs"], "trainbus run"),
    (["runs", "list", "--status"], "trainbus runs list"),
    (["daemon", "start", "--gpus"], "trainbus daemon start"),
])
def test_an_option_left_without_its_value_points_at_its_commands_help(args, command, tmp_path):
    """`trainbus runs list --status` said to see `trainbus --help`, which names no --status: click's error for an
    option given no value carries no context, and the line fell back to the top command."""
    r = trainbus(*args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == (f"error: Option '{args[-1]}' requires an argument. (`{command} --help` "
                                              f"shows what it takes)\n"), r.stderr


@pytest.fixture(scope="module")
def one_epoch_with_checkpoints(tmp_path_factory) -> Path:
    """The run directory of `trainbus run --epochs 1 --plugins checkpoint`, trained once for the tests below that
    continue such a run, or need one to resume (each trained its own: an epoch and a checkpoint plugin's torch
    import, ~3 s): not to be changed; `own_copy` gives a test a copy of its own."""
    runs = tmp_path_factory.mktemp("one_epoch_with_checkpoints") / "runs"
    # training waits for the checkpoint plugin's hello: beside other load it took past the default 15 s to import
    # torch, the epoch ended before it, and the run had no checkpoint to continue from
    config = runs.parent / "ready.toml"
    config.write_text(f"[run]\nready_timeout_s = {PLUGIN_START_S}\n")
    ran = trainbus("run", "--epochs", "1", "--plugins", "checkpoint", "--config", str(config), "--runs-dir", str(runs))
    assert ran.returncode == 0, ran.stderr
    return runs / ran.stdout.split()[1].rstrip(":")


def own_copy(run_dir: Path, runs: Path) -> str:
    """A copy of a run directory in `runs`, under its run id (a run moved, as a user may); that id."""
    runs.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(run_dir, runs / run_dir.name, symlinks=True)).name


def test_a_run_continued_in_place_keeps_the_flags_it_trained_with(tmp_path, one_epoch_with_checkpoints):
    """`runs resume RUN lr=0.1` trained on at the checkpoint's lr (its optimizer state) while config.json, the
    registry and `runs compare` said lr=0.1 for the whole run. Now a flag or --set hyperparameter that is not what
    the run trained with is refused in one line, nothing trained; the same value, and more epochs, are taken."""
    runs = tmp_path / "runs"
    run_id = own_copy(one_epoch_with_checkpoints, runs)  # of `trainbus run --epochs 1 --plugins checkpoint`
    for words, said in [
            (["lr=0.1"], 'with lr=0.001: lr=0.1 would change it midway'),
            (["--set", "model=cnn"], 'with model="mlp": model="cnn" would change it midway')]:
        refused = trainbus("runs", "resume", run_id, *words, "--epochs", "2", "--runs-dir", str(runs))
        assert refused.returncode == 2 and refused.stderr == (
            f"error: --resume {run_id} continues that run as it trained, {said}, while its record would say that "
            f"for all of it; leave {words[-1].partition('=')[0]} out to continue it, or start a new run with it\n"), \
            refused.stderr
    summary = json.loads((runs / run_id / "summary.json").read_text())
    assert summary["outcome"]["epochs_completed"] == 1, "nothing trained"
    # without the run's checkpoint plugin (~1.2 s of CPU to import torch): what is taken is the point here
    again = trainbus("runs", "resume", run_id, "lr=0.001", "--epochs", "2", "--plugins", "", "--runs-dir", str(runs))
    assert again.returncode == 0 and f"run {run_id}: completed after 2 epochs" in again.stdout, again.stderr


def test_a_run_continued_in_place_keeps_the_seed_it_trained_with(tmp_path, one_epoch_with_checkpoints):
    """`runs resume RUN --seed 5` of a run trained with seed 0 was taken: config.json then said seed 5 for the whole
    run, and the build that resume runs again drew from seed 5 (a `random_split` of the user's data: another
    validation set), while the checkpoint put back the RNG streams of seed 0. Refused in one line, as a flag is; the
    seed it trained with is taken."""
    runs = tmp_path / "runs"
    run_id = own_copy(one_epoch_with_checkpoints, runs)  # of `trainbus run --epochs 1 --plugins checkpoint`
    refused = trainbus("runs", "resume", run_id, "--seed", "5", "--epochs", "2", "--runs-dir", str(runs))
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --resume {run_id} continues that run as it trained, with seed 0: --seed 5 would change it midway, "
        f"while its record would say that for all of it; leave --seed out to continue it, or start a new run with "
        f"it\n"), refused.stderr
    assert json.loads((runs / run_id / "config.json").read_text())["seed"] == 0
    again = trainbus("runs", "resume", run_id, "--seed", "0", "--epochs", "2", "--plugins", "", "--runs-dir",
                     str(runs))  # without the run's checkpoint plugin, as above
    assert again.returncode == 0 and f"run {run_id}: completed after 2 epochs" in again.stdout, again.stderr


def test_a_run_continued_in_place_keeps_the_target_it_trained(tmp_path, one_epoch_with_checkpoints):
    """`trainbus run other.py --resume RUN` continued RUN in place with other.py's build, and its config.json, `runs
    list` and `runs compare` then said other.py:build for the whole run. Refused in one line, as a flag is; the
    target it trained, given again (the same file from elsewhere too), is taken."""
    runs = tmp_path / "runs"
    run_id = own_copy(one_epoch_with_checkpoints, runs)  # of `trainbus run --epochs 1 --plugins checkpoint`
    (tmp_path / "other.py").write_text("from trainbus.kernel.digits import build as digits\n\n\n"
                                       "def build(hyperparameters):\n    return digits(hyperparameters)\n")
    other = f"{tmp_path / 'other.py'}:build"  # a model the checkpoint fits: one that does not is refused as it loads
    refused = trainbus("run", other, "--resume", run_id, "--epochs", "2", "--runs-dir", str(runs))
    assert refused.returncode == 2 and refused.stderr == (
        f"error: --resume {run_id} continues that run as it trained, with trainbus.kernel.digits:build: {other} would "
        f"change it midway, while its record would say that for all of it; leave the target out to continue it, or "
        f"start a new run from one of its checkpoints: trainbus run {other} --resume "
        f"{runs / run_id / 'checkpoints' / 'last.pt'}\n"), refused.stderr
    assert json.loads((runs / run_id / "config.json").read_text())["target"] == "trainbus.kernel.digits:build"
    again = trainbus("run", "trainbus.kernel.digits:build", "--resume", run_id, "--epochs", "2", "--plugins", "",
                     "--runs-dir", str(runs))  # without the run's checkpoint plugin, as above
    assert again.returncode == 0 and f"run {run_id}: completed after 2 epochs" in again.stdout, again.stderr


def test_a_mistyped_option_of_runs_resume_points_at_a_command_there_is(tmp_path, one_epoch_with_checkpoints):
    """`runs resume RUN --epoch 20` becomes `python -m trainbus.kernel.cli run --resume RUN --epoch 20`, and its usage
    error said to see `python -m trainbus.kernel.cli run --help`."""
    run_id = own_copy(one_epoch_with_checkpoints, tmp_path / "runs")  # a run to resume; none trained for it
    r = subprocess.run([*trainbus_cmd(), "runs", "resume", run_id, "--epoch", "20"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr == ("error: No such option: --epoch (did you mean --epochs?) (`trainbus run "
                                              "--help` shows what it takes)\n"), r.stderr


@pytest.mark.parametrize("args, said", [
    (["run", "--epoch", "2"], "No such option: --epoch (did you mean --epochs?)"),
    (["run", "--max-resume", "2"], "No such option: --max-resume (did you mean --max-resumes?)"),
    (["run", "--plugin", "x"], "No such option: --plugin (did you mean --plugins?)"),
    (["run", "--compiled"], "No such option: --compiled (did you mean --compile?)"),
    (["daemon", "start", "--gpu", "1"], "No such option: --gpu (did you mean --gpus?)"),
    (["daemon", "start", "--runsdir", "x"], "No such option: --runsdir (did you mean --runs-dir?)"),
    (["run", "--lr", "0.1"], "No such option: --lr"),
    # another tool's option that no near miss names: Lightning's --devices is no typo of --device
    (["run", "--devices", "2"], "No such option: --devices (Lightning's --devices is --nproc N here: processes on this "
                                "machine, one GPU each on CUDA; or --device cuda:N for one GPU)"),
    (["run", "--nproc_per_node=2"], "No such option: --nproc_per_node (torchrun's --nproc-per-node is --nproc N "
                                    "here)"),
    (["run", "--accelerator", "gpu"], "No such option: --accelerator (Lightning's --accelerator is --device here: "
                                      "auto, cpu or cuda)"),
])
def test_a_mistyped_option_is_said_with_the_options_it_is_close_to(args, said, tmp_path):
    """click compared an unknown option with each option, dashes and all, and listed every one over its cutoff as
    `(Possible options: ...)`: `--epoch` got `--detach, --epochs, --nproc`, `--plugin` got `--listen`, and one
    close option still read as a list (`(Possible options: --gpus)`). Now the closest option or two are named as
    a question, none when none is close."""
    r = trainbus(*args, cwd=tmp_path)
    command = "trainbus " + " ".join(args[:2] if args[0] == "daemon" else args[:1])
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {said} (`{command} --help` shows what it takes)\n")


@pytest.mark.parametrize("args, said", [
    (["run", "--accumulate-grad-batches", "0"],
     "Invalid value for '--accumulate-grad-batches': must be a whole number, 1 or more, got 0"),
    (["run", "--epochs", "x"], "Invalid value for '--epochs': must be a whole number, 1 or more, got 'x'"),
    (["run", "--seed", "1.5"], "Invalid value for '--seed': must be a whole number, got '1.5'"),
    (["run", "--gradient-clip-val", "abc"], "Invalid value for '--gradient-clip-val': must be a number, got 'abc'"),
    (["runs", "list", "--last", "0"], "Invalid value for '--last': must be a whole number, 1 or more, got 0"),
    (["daemon", "submit", "--max-resumes", "1001"],
     "Invalid value for '--max-resumes': must be a whole number from 0 to 1000, got 1001"),
])
def test_an_option_value_out_of_range_or_of_the_wrong_type_names_what_the_option_takes(args, said, tmp_path):
    """typer validates an option's value with pydantic, whose words were the line: `Invalid value for
    '--accumulate-grad-batches': Input should be greater than or equal to 1`, the value given unsaid, and `Input should
    be a valid integer, unable to parse string as an integer`. Now what the option takes and what it got, as a
    config file's `[run]` value is said."""
    r = trainbus(*args, cwd=tmp_path)
    command = "trainbus " + " ".join(args[:2] if args[0] in ("daemon", "runs") else args[:1])
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {said} (`{command} --help` shows what it takes)\n")


@pytest.mark.parametrize("args", [["run"], ["runs", "delete", "x", "--yes"], ["daemon", "start"]])
def test_an_empty_runs_dir_is_refused_not_taken_for_the_current_directory(args, tmp_path):
    """`--runs-dir "$UNSET"` was the current directory: runs made, or looked for and deleted, there."""
    r = trainbus(*args, "--runs-dir", "", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and \
        "'--runs-dir': is empty: name a directory, or leave --runs-dir out for ./runs" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ['""', '" "'])
def test_an_empty_runs_dir_in_a_config_file_is_refused_too(value, tmp_path):
    """`[run] runs_dir = ""` (a template's blank, `runs_dir = "${RUNS}"` written out unset) was the current directory:
    the run's directory and registry.sqlite made there, where `--runs-dir ""` is refused."""
    (tmp_path / "run.toml").write_text(f"[run]\nruns_dir = {value}\nepochs = 1\n")
    r = trainbus("run", "-c", "run.toml", "--plugins", "", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == ("error: run.toml: runs_dir is empty: name a directory, or leave runs_dir "
                                              "out for ./runs\n"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_a_config_files_paths_take_the_tilde_for_home_as_a_shell_does(tmp_path):
    """`runs_dir = "~/runs"` in a config made a folder named `~` in the current directory (the one `rm -rf ~` then
    empties the home of), where `--runs-dir ~/runs` is the home's: the shell expands it, TOML does not."""
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    (here / "run.toml").write_text(f'[run]\ntarget = "{TESTS_DIR / "specs.py"}:tiny"\nruns_dir = "~/runs"\n'
                                   f'epochs = 1\n[plugins.console]\n')
    command = Command("run", "-c", "run.toml", cwd=here, env={"HOME": str(home)})
    try:
        out, err = command.communicate(120)
    finally:
        command.kill()
    assert command.returncode == 0, err
    assert sorted(p.name for p in here.iterdir()) == ["run.toml"], "no folder named ~ here"
    assert [p for p in (home / "runs").iterdir() if p.is_dir()] and str(home / "runs") in out


@pytest.mark.parametrize("kind", ["missing", "file"])
@pytest.mark.parametrize("args, code", [(["daemon", "status"], 3), (["daemon", "stop"], 2),
                                        (["daemon", "cancel", "x"], 2)])
def test_daemon_commands_say_a_runs_dir_that_is_missing_or_a_file(args, code, kind, tmp_path):
    """A typo in --runs-dir: `daemon status` and `stop` said only `no daemon serves DIR`, as if the daemon of the
    runs there had gone, and `daemon cancel` called a file there missing. Each says what the path is, as `runs list`
    does. status exits 3 (no daemon serves it); stop exits 2, an error as cancel's: exit 0 let a mistyped
    `ExecStop=` or script go on as if the daemon it meant had stopped."""
    given = tmp_path / "runz"
    if kind == "file":
        given.write_text("")
    r = trainbus(*args, "--runs-dir", str(given), cwd=tmp_path)
    said = (f"the runs directory {given} is a file, not a directory (is --runs-dir right?)" if kind == "file" else
            f"the runs directory {given} does not exist (is --runs-dir right?)")
    assert r.returncode == code and said in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)
    assert (r.stdout + r.stderr).count("\n") == 1, r.stdout + r.stderr
    if code == 2:
        assert r.stderr.startswith("error: ") and not r.stdout, (r.stdout, r.stderr)


def test_daemon_stop_with_no_daemon_in_a_runs_dir_is_done(tmp_path):
    """An existing runs directory that no daemon serves: nothing to stop, exit 0 (as `systemctl stop` of a unit
    already stopped), unlike a --runs-dir that does not exist."""
    r = trainbus("daemon", "stop", "--runs-dir", str(tmp_path), cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"no daemon serves {tmp_path}\n", ""), r


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_daemon_status_json_says_a_runs_dir_that_is_missing_or_a_file(kind, tmp_path):
    """`daemon status --json` of a mistyped --runs-dir printed what it prints for an empty runs directory that no
    daemon serves (`{"serving": false, "queued": [], ...}`): a script could not tell a typo from an idle queue."""
    given = tmp_path / "runz"
    if kind == "file":
        given.write_text("")
    r = trainbus("daemon", "status", "--json", "--runs-dir", str(given), cwd=tmp_path)
    said = (f"the runs directory {given} is a file, not a directory (is --runs-dir right?)" if kind == "file" else
            f"the runs directory {given} does not exist (is --runs-dir right?)")
    status = json.loads(r.stdout)
    assert r.returncode == 3 and (status["serving"], status["runs_dir"], status["runs_dir_error"]) == (
        False, str(given), said), status
    (tmp_path / "runs").mkdir()
    idle = json.loads(trainbus("daemon", "status", "--json", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path).stdout)
    assert idle["runs_dir"] == str(tmp_path / "runs") and "runs_dir_error" not in idle, idle


@pytest.mark.parametrize("args, said", [
    (["run", "--epochs", "3", "--epochs", "4"], "--epochs given twice (--epochs 3 and --epochs 4): give it once"),
    (["run", "--device=cpu", "--device", "cuda"],
     "--device given twice (--device=cpu and --device cuda): give it once"),
    (["run", "--compile", "--no-compile"], "--compile given twice (--compile and --no-compile): give it once"),
    (["runs", "list", "--status", "failed", "--status", "died"], "--status given twice (--status failed and --status "
                                                                  "died): give it once")])
def test_an_option_given_twice_with_two_values_is_refused_not_the_later_taken(args, said, tmp_path):
    """`trainbus run --epochs 3 --epochs 4` trained 4 epochs unsaid (click keeps the later value), where a flag or a
    --set given twice with another value is refused: which one was meant is not said. The same value twice is
    harmless, and taken."""
    r = trainbus(*args, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    command = " ".join(["trainbus", *args[:2]] if args[0] == "runs" else ["trainbus", "run"])
    assert (r.returncode, r.stderr) == (2, f"error: {said} (`{command} --help` shows what it takes)\n"), r.stderr
    assert not (tmp_path / "runs").exists()
    if args[0] == "run":
        same = trainbus("run", "--epochs", "1", "--epochs", "1", "--help-flags", cwd=tmp_path)
        assert same.returncode == 0, same.stderr


def test_a_run_whose_standard_streams_are_closed_trains_and_no_file_takes_their_place(tmp_path):
    """`trainbus run ... >&- 2>&-` (a job started with its output closed, not redirected): Python had no sys.stdout,
    so the first line the kernel printed raised AttributeError inside the training loop, and the run failed naming
    trainbus's own proto/output.py as "your code"; exit 120. With descriptors 1 and 2 free, the next files and pipes
    the kernel opened took them, so a write meant for the terminal would have gone into them. Now a closed standard
    stream is /dev/null: the run completes, exit 0; so does a listing. The plugins inherit it: /dev/null made on the
    lowest free descriptor was close-on-exec, so the console's process had no stdout and every line it drew failed
    (errors logged, plugin trouble in `runs list`)."""
    closed = lambda: (os.close(1), os.close(2))  # noqa: E731
    runs_dir = tmp_path / "runs"
    r = subprocess.run([*trainbus_cmd(), "run", "--epochs", "1", "--plugins", "console", "--runs-dir", str(runs_dir)],
                       timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL, preexec_fn=closed)
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (r.returncode, summary["status"], summary.get("error")) == (0, "completed", None), summary
    assert summary["plugins"]["console"]["errors_logged"] == 0, (run_dir / "plugins" / "console.log").read_text()
    listed = subprocess.run([*trainbus_cmd(), "runs", "list", "--runs-dir", str(runs_dir)], timeout=60, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, preexec_fn=closed)
    assert listed.returncode == 0


def test_a_run_in_a_runs_dir_whose_path_is_not_utf_8_trains(tmp_path):
    """--runs-dir with a byte that is not UTF-8 (a folder named on a system of another encoding): the run's
    directory was made, then binding its sockets there died with a traceback (UnicodeEncodeError: surrogates not
    allowed, in zmq, which takes UTF-8 addresses), leaving a run that `runs list` shows as died (found by a bad-input
    audit). Its sockets go where a run directory's too long a path sends them, and it trains. A short path: a
    long one went there already."""
    short = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    try:
        odd = short / os.fsdecode(b"runs-\xff")
        # forked (kernel_process.Command), its output in a file read as bytes: what it prints holds the path's byte
        output = tmp_path / "output"
        command = Command("run", "--plugins", "metrics_log", "--epochs", "1", "--runs-dir", str(odd), cwd=tmp_path,
                          output=output)
        try:
            command.wait(120)
        finally:
            command.kill()
        said = output.read_bytes().decode(errors="surrogateescape")  # its stdout and stderr, as written
        assert command.returncode == 0 and "Traceback" not in said, said
        [run_dir] = [p for p in odd.iterdir() if p.is_dir()]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert (run_dir / "metrics.jsonl").stat().st_size > 0  # the plugin reached it too
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_a_run_in_a_runs_dir_whose_path_is_short_in_characters_but_long_in_bytes_trains(tmp_path):
    """A socket path's limit is in bytes (sockaddr_un: 108 on Linux), and the check counted characters: under a
    runs directory named in a script of two bytes a character, 89 characters were 129 bytes, and binding the
    run's sockets there failed."""
    short = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    try:
        runs = short / ("é" * 40)
        assert len(str(runs / "20261206-000000-abcdef" / "control.sock")) < 100 < 108 < len(os.fsencode(runs)) + 36
        r = trainbus("run", "--plugins", "metrics_log", "--epochs", "1", "--runs-dir", str(runs), cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        [run_dir] = [p for p in runs.iterdir() if p.is_dir()]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_the_console_draws_on_a_terminal_with_tostop(tmp_path):
    """On a real terminal whose line discipline stops background writers (`stty tostop`), the console
    plugin (a background process group in the kernel's session) still draws and the run completes."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader on the pty, in the foreground, like a shell's job
        try:
            attrs = termios.tcgetattr(0)
            attrs[3] |= termios.TOSTOP
            termios.tcsetattr(0, termios.TCSANOW, attrs)
            os.execv(trainbus_cmd()[0], [*trainbus_cmd(), "run", "--plugins", "console", "--epochs", "1",
                                         "--runs-dir", str(tmp_path / "runs")])
        finally:
            os._exit(127)
    output, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert "finished: 1 epoch," in text  # the console's own last line: it ran, it was not stopped
    hung = [line for line in text.splitlines() if "hung" in line or "crashed" in line]
    assert not hung, hung


def _one_line(r: subprocess.CompletedProcess, expected: str) -> str:
    """Exit 2 and exactly one `error:` line holding `expected`; returns that line."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    error_lines = [line for line in r.stderr.splitlines() if line.lower().startswith("error")]
    assert len(error_lines) == 1 and expected in error_lines[0], r.stderr
    return error_lines[0]


@pytest.mark.parametrize("how", ["under a file", "read-only mount", "mode 0555"])
def test_an_unwritable_runs_dir_gets_one_line_before_anything_starts(how, tmp_path, mount_tmpfs):
    """Tried for real, not judged from mode bits: root (as the tests run) writes through 0555, not through a
    read-only mount or a file in the path."""
    if how == "under a file":
        (tmp_path / "a-file").write_text("")
        parent = tmp_path / "a-file"
    elif how == "read-only mount":
        parent = mount_tmpfs("ro", 1 << 20)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(parent)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through mode bits")
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o555)
    runs = parent / "runs"
    try:
        r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--plugins", "", "--runs-dir", str(runs), timeout=60)
    finally:
        if how == "mode 0555":
            parent.chmod(0o755)
    assert "Traceback" not in r.stderr + r.stdout
    line = _one_line(r, f"runs_dir {runs}")
    assert "--runs-dir" in line  # the fix
    assert not os.path.exists(runs)


def test_run_training_turns_a_run_directory_it_cannot_make_into_a_config_error(tmp_path):
    """The kernel's own mkdir (a runs dir that went away after the CLI's check, or run_training called directly)."""
    from trainbus.kernel.session import run_training

    (tmp_path / "a-file").write_text("")
    cfg = RunConfig(target=f"{TESTS_DIR / 'specs.py'}:tiny", runs_dir=str(tmp_path / "a-file" / "runs"), plugins=[])
    with pytest.raises(ConfigError, match="runs_dir .*a-file/runs: cannot create"):
        run_training(cfg)


USER_CODE = {
    "build raises": ("def helper(lr):\n    raise ValueError('lr must be positive')\n\n"
                     "def build(hyperparameters):\n    helper(-1)\n",
                     "raised ValueError: lr must be positive", ["line 5, in build", "line 2, in helper"]),
    "import raises": ("import json\njson.loads('{')\n\ndef build(hyperparameters):\n    pass\n",
                      "raised JSONDecodeError: Expecting property name", ["line 2, in <module>"]),
    "syntax error": ("def build(hyperparameters)\n    pass\n", "raised SyntaxError", []),
    # sys.exit() used to end the CLI with no word (or argparse's usage line, naming trainbus), exit 0 for sys.exit(0)
    "import parses the command line": ("import argparse\nargparse.ArgumentParser().parse_args()\n\n"
                                       "def build(hyperparameters):\n    pass\n",
                                       "sys.exit(2) would end the process; argparse read trainbus's own command line",
                                       ["line 2, in <module>"]),
    "build exits": ("import sys\n\ndef build(hyperparameters):\n    sys.exit(0)\n",
                    ":build: sys.exit(0) would end the process", ["line 4, in build"]),
    # not a Ctrl-C (it was said as "Ctrl-C twice before the run began", exit 130, with no word of where)
    "build raises KeyboardInterrupt": ("def build(hyperparameters):\n    raise KeyboardInterrupt('no data yet')\n",
                                       ":build raised KeyboardInterrupt: no data yet", ["line 2, in build"]),
    # a BaseException that is not Exception (a library's own timeout, GeneratorExit): our whole traceback, exit 1
    "build raises a BaseException of its own": ("class Timeout(BaseException):\n    pass\n\n"
                                                "def build(hyperparameters):\n    raise Timeout('no data yet')\n",
                                                ":build raised Timeout: no data yet", ["line 5, in build"]),
    "import raises a BaseException of its own": ("class Stop(BaseException):\n    pass\n\nraise Stop('at import')\n\n\n"
                                                 "def build(hyperparameters):\n    pass\n",
                                                 "raised Stop: at import", ["line 4, in <module>"]),
}


SHAPES = """import torch
from trainbus.kernel.spec import TrainingSpec

def build(hyperparameters):
    data = torch.utils.data.TensorDataset(torch.randn(64, 5), torch.randint(0, 3, (64,)))
    model = torch.nn.Linear(IN, 3)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=LOSS,
                        train_loader=torch.utils.data.DataLoader(data, batch_size=16), epochs=1)
"""


@pytest.mark.parametrize("in_features, loss, said", [
    (8, "torch.nn.CrossEntropyLoss()", "RuntimeError: mat1 and mat2 shapes cannot be multiplied (16x5 and 8x3) (in the "
                                       "model's forward, given inputs a float32 tensor of shape (16, 5))"),
    (5, "torch.nn.MSELoss()", "(in loss_fn, given outputs a float32 tensor of shape (16, 3) and targets an int64 "
                              "tensor of shape (16,))"),
    # torch's autograd raises it from loss.backward(), the loop's call: the lambda had returned, no frame of theirs
    (5, "lambda out, y: torch.nn.functional.cross_entropy(out.sigmoid().add_(1), y)",
     "(in the backward pass of loss_fn's loss)"),
])
def test_an_error_in_torchs_own_modules_says_where_in_the_step_and_the_shapes(in_features, loss, said, tmp_path):
    """A model and loss of torch's modules alone run none of the user's code: the error was torch's message with no
    word of where it came from, or of the batch's shapes."""
    target = tmp_path / "train.py"
    target.write_text(SHAPES.replace("IN", str(in_features)).replace("LOSS", loss))
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert r.returncode == 1 and said in r.stdout + r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("interval, total, said", [
    ("step", 5, "after step 6 (scheduler_interval 'step')"),
    ("epoch", 1, "after epoch 2 (scheduler_interval 'epoch')")])
def test_an_error_torch_raises_in_the_schedulers_step_says_so(interval, total, said, tmp_path):
    """OneCycleLR's total_steps shorter than the run: torch's 'Tried to step 6 times' said nothing of where (the
    loop steps the scheduler: no frame of the user's), as an error of the forward or the loss does."""
    target = tmp_path / "train.py"
    target.write_text(SHAPES.replace("IN", "5").replace("LOSS", "torch.nn.CrossEntropyLoss()").replace(
        "epochs=1)", f"epochs=2,\n        scheduler_interval={interval!r}, scheduler=torch.optim.lr_scheduler."
                     f"OneCycleLR(optimizer, max_lr=0.1, total_steps={total}))").replace(
        "optimizer=torch.optim.SGD(model.parameters(), lr=0.1)", "optimizer=optimizer").replace(
        "    return", "    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n    return"))
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert r.returncode == 1 and f"(in the scheduler's step, OneCycleLR, {said})" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("case", sorted(USER_CODE))
def test_an_exception_in_the_users_code_shows_their_frames_then_one_line(case, tmp_path):
    source, expected, frames = USER_CODE[case]
    target = tmp_path / "train.py"
    target.write_text(source)
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=60)
    _one_line(r, expected)
    lines = r.stderr.rstrip("\n").splitlines()
    assert lines[-1].startswith("error: ") and str(target) in lines[-1], r.stderr  # the one line comes last
    for frame in frames:
        assert f'File "{target}", {frame}' in r.stderr, r.stderr
    # Only their frames (a SyntaxError names its file too): not the CLI's, kernel's, typer's, click's, importlib's.
    files = [line.split('"')[1] for line in lines if line.startswith('  File "')]
    assert files and set(files) == {str(target)}, r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_compiled_librarys_cython_frame_is_not_the_users(tmp_path):
    """A Cython extension's frame names its source relative, `msgpack/_unpacker.pyx` (pandas' `parsers.pyx`), which
    was taken for a file of the user's in the working directory: `(in your code: msgpack/_unpacker.pyx, line 209)`,
    and shown among their frames."""
    target = tmp_path / "train.py"
    target.write_text("import msgpack\n\n\ndef build(lr=0.1):\n    msgpack.unpackb(b'\\xc1')\n")
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(f"(in your code: {target}, line 5)"), r.stderr
    assert _trace_files(r.stderr) == [str(target)], r.stderr


def test_trainbus_own_proto_frames_are_not_the_users_where_trainbus_is_installed_editable(tmp_path):
    """With trainbus installed editable (./scripts/setup: proto/ in the clone, not in site-packages), an exception
    raised inside trainbus.proto was named as the user's: `(in your code: .../proto/codec.py, line 79)`, its frames
    shown as theirs. Only the user's file is named and shown."""
    target = tmp_path / "train.py"
    target.write_text("from trainbus.proto.codec import unpack\n\n\ndef build(lr=0.1):\n    unpack(b'\\xc1')\n")
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(f"(in your code: {target}, line 5)"), r.stderr
    files = [line.split('"')[1] for line in r.stderr.splitlines() if line.startswith('  File "')]
    assert files == [str(target)], r.stderr


def test_a_build_that_changes_directory_trains_in_the_runs_dir_given_and_resumes(tmp_path):
    """A build() that does os.chdir (to its data, as research scripts do): the run failed with `runs_dir runs: cannot
    create .../runs/ID (No such file or directory); pick a writable place`, having made a `runs` folder in the
    directory it changed to; and config.json recorded that directory as the one a relative target is read from, so a
    resume looked for train.py there. The command's own directory stays where the run's paths, its plugins and a
    resume start from."""
    (tmp_path / "data").mkdir()
    (tmp_path / "train.py").write_text(
        "import os\nfrom trainbus.kernel.digits import build as digits\n\n\n"
        "def build(lr: float = 0.001, epochs: int = 1):\n"
        "    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data'))\n"
        "    return digits({'lr': lr, 'epochs': epochs})\n")
    r = cli("run", "train.py", "--plugins", "checkpoint,metrics_log", "--runs-dir", "runs", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert (run_dir / "metrics.jsonl").is_file() and list((run_dir / "checkpoints").glob("*.pt"))
    assert not list((tmp_path / "data").iterdir())
    # without its plugins (the checkpoint plugin's torch import, ~1.2 s of CPU): the resume finding train.py is
    # what is checked of it
    resumed = cli("runs", "resume", run_dir.name, "--epochs", "2", "--plugins", "", "--runs-dir", "runs", cwd=tmp_path)
    assert resumed.returncode == 0 and "completed after 2 epochs" in resumed.stdout, resumed.stdout + resumed.stderr


def test_a_keyboardinterrupt_as_the_target_is_imported_for_its_flags_is_one_line(tmp_path):
    """Before the run sets its signal handlers, a Ctrl-C and the module's own raise look alike: one line, exit 130
    (it was exit 130 with no word at all)."""
    target = tmp_path / "train.py"
    target.write_text("raise KeyboardInterrupt('no data')\n\ndef build(lr=0.1):\n    pass\n")
    r = trainbus("run", f"{target}:build", "lr=0.2", "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert (r.returncode, r.stderr) == (130, f"trainbus: KeyboardInterrupt while {target}:build was imported to read "
                                             f"its flags; nothing was made\n"), r.stderr
    assert not (tmp_path / "runs").exists()


# The command line as the console script starts it, with the import of one module held until the test has sent
# its Ctrl-C: that moment, every time, not a race with seconds of imports.
_HELD_IMPORT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (a background job's is ignored)
held, sys.argv = sys.argv[1], ["trainbus", *sys.argv[2:]]
class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == held:
            print("importing", flush=True)
            time.sleep(60)
sys.meta_path.insert(0, Hold())
from trainbus.kernel.cli import main
main()
"""


def _ctrl_c_as_it_imports(module: str, *args: str, cwd: Path, env: dict | None = None) -> tuple[int, str]:
    code, _, err = ctrl_c_once_it_says(_HELD_IMPORT, [module, *args], "importing", cwd=cwd, env=env)
    return code, err


@pytest.mark.parametrize("rank", [False, True])
def test_a_ctrl_c_while_the_command_line_imports_is_one_line_not_a_traceback(rank, tmp_path):
    """Held a third of the way in, at the daemon group's module. It was Python's traceback of whichever import it
    cut (35 lines), and exit -2; under `run --nproc` every rank printed one beside the launcher's line."""
    env = {**os.environ, "TRAINBUS_LAUNCH": "{}"} if rank else None
    said = _ctrl_c_as_it_imports("trainbus.kernel.cli_daemon", "runs", "list", cwd=tmp_path, env=env)
    # a rank's launcher says it, and exits 130; the rank's own 130 would have torchrun restart the group
    assert said == ((0, "") if rank else (130, "trainbus: Ctrl-C as it started; nothing was done\n"))


def test_a_ctrl_c_while_torch_imports_for_a_run_stops_it_before_anything_is_made(tmp_path):
    """The KeyboardInterrupt it was is now and then lost in torch's import (of eight Ctrl-C's 0.9-1.05 s into
    `trainbus run`, seven let the run train to its end, exit 0; one aborted it in a C++ callback): one line, 130."""
    said = _ctrl_c_as_it_imports("torch", "run", "--plugins", "", "--runs-dir", "runs", cwd=tmp_path)
    assert said == (130, "trainbus: Ctrl-C before the run began; nothing was made\n")
    assert not (tmp_path / "runs").exists()


def _trace_files(stderr: str) -> list[str]:
    """The files of the traceback frames printed on stderr."""
    return [line.split('"')[1] for line in stderr.splitlines() if line.startswith('  File "')]


def test_an_exception_in_the_users_code_while_training_shows_their_frames_and_where(tmp_path):
    target = tmp_path / "train.py"
    target.write_text("from trainbus.kernel.digits import build as digits\n\n"
                      "def check(outputs):\n    raise ValueError('boom in user helper')\n\n"
                      "def loss(outputs, targets):\n    check(outputs)\n\n"
                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n    spec.loss_fn = loss\n"
                      "    return spec\n")
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    for frame in ("line 7, in loss", "line 4, in check"):
        assert f'File "{target}", {frame}' in r.stderr, r.stderr
    # their frames only: not the loop's, torch's or the CLI's (the whole traceback is in the run's kernel.log)
    files = _trace_files(r.stderr)
    assert files and set(files) == {str(target)}, r.stderr
    assert f"error: ValueError: boom in user helper (in your code: {target}, line 4)" in r.stdout, r.stdout


@pytest.mark.parametrize("raised, said", [
    ("raise RuntimeError('cannot load the data') from e",
     "\nThe above exception was the direct cause of the following exception:\n\n"),
    ("raise RuntimeError('cannot load the data')",
     "\nDuring handling of the above exception, another exception occurred:\n\n"),
    ("raise RuntimeError('cannot load the data') from None", None),
])
def test_the_users_trimmed_traceback_keeps_the_exception_their_code_raised_from(raised, said, tmp_path):
    """`raise RuntimeError(...) from e` in their code showed the RuntimeError alone: the cause, the file that was
    not found, was nowhere (a build's error leaves no kernel.log). It is shown trimmed to their frames too, as
    Python shows a chain; `from None` still hides it."""
    target = tmp_path / "train.py"
    target.write_text("def load(path):\n    return open(path).read()\n\n"
                      "def build(hyperparameters):\n    try:\n        load('/nonexistent/data.csv')\n"
                      f"    except FileNotFoundError as e:\n        {raised}\n")
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=60)
    _one_line(r, "raised RuntimeError: cannot load the data")
    files = _trace_files(r.stderr)
    assert files and set(files) == {str(target)}, r.stderr
    if said is None:
        assert "FileNotFoundError" not in r.stderr, r.stderr
        return
    cause, _, effect = r.stderr.partition(said)
    assert f'File "{target}", line 2, in load' in cause and "FileNotFoundError: [Errno 2]" in cause, r.stderr
    assert cause.startswith("Traceback (most recent call last; your code only):\n"), r.stderr
    assert f'File "{target}", line 8, in build' in effect, r.stderr


def test_sys_exit_in_the_users_training_code_fails_the_run_naming_it(tmp_path):
    target = tmp_path / "train.py"
    target.write_text("import sys\nfrom trainbus.kernel.digits import build as digits\n\n"
                      "def loss(outputs, targets):\n    sys.exit(0)\n\n"
                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n    spec.loss_fn = loss\n"
                      "    return spec\n")
    runs = tmp_path / "runs"
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(runs), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)  # it was 0, with nothing said and no summary
    assert (f"error: SystemExit: sys.exit(0) would end the process; a training function returns, or raises an "
            f"exception, to end (in your code: {target}, line 5)") in r.stdout, r.stdout
    summary = json.loads(next(runs.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and "sys.exit(0)" in summary["error"]


def test_a_base_exception_of_the_users_own_in_training_fails_the_run_naming_it(tmp_path):
    """A BaseException that is not an Exception (a library's own timeout class, GeneratorExit) raised by the user's
    loss went past the run's handler: our whole traceback, no summary.json, the run listed died (found by a
    bad-input audit). It fails the run as any exception of theirs does."""
    target = tmp_path / "train.py"
    target.write_text("from trainbus.kernel.digits import build as digits\n\n"
                      "class Timeout(BaseException):\n    pass\n\n"
                      "def loss(outputs, targets):\n    raise Timeout('the data server went away')\n\n"
                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n    spec.loss_fn = loss\n"
                      "    return spec\n")
    runs = tmp_path / "runs"
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(runs), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"error: Timeout: the data server went away (in your code: {target}, line 7)" in r.stdout, r.stdout
    files = _trace_files(r.stderr)
    assert files and set(files) == {str(target)}, r.stderr
    summary = json.loads(next(runs.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and "the data server went away" in summary["error"]


def test_an_exception_in_a_dataloader_worker_shows_the_users_frames_from_the_worker_and_one_line(tmp_path):
    """torch re-raises a worker's exception with the worker's traceback as text in a message of many lines."""
    target = tmp_path / "train.py"
    target.write_text("import torch\nfrom torch.utils.data import DataLoader, Dataset\n"
                      "from trainbus.kernel.digits import build as digits\n\n"
                      "class Broken(Dataset):\n    def __len__(self):\n        return 64\n\n"
                      "    def __getitem__(self, i):\n        raise KeyError(f'no sample {i}')\n\n"
                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n"
                      "    spec.train_loader = DataLoader(Broken(), batch_size=16, num_workers=1)\n    return spec\n")
    r = trainbus("run", f"{target}:build", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f'File "{target}", line 10, in __getitem__' in r.stderr, r.stderr
    files = _trace_files(r.stderr)
    assert set(files) == {str(target)}, r.stderr
    errors = [line.strip() for line in r.stdout.splitlines() if line.strip().startswith("error:")]
    assert errors == [f"error: KeyError: 'no sample 0' (in DataLoader worker process 0) (in your code: {target}, "
                      f"line 10)"], r.stdout
    assert "Original Traceback" not in r.stdout


@pytest.mark.parametrize("message, shown", [
    # a file name from os.listdir that is not UTF-8 (a lone surrogate): it used to fail the registry's write, and
    # every `runs list` after it, with a traceback
    ("'no label for data/caf' + bytes([0xe9]).decode('utf-8', 'surrogateescape') + '.png'",
     "RuntimeError: no label for data/caf\\udce9.png"),
    ("'\\x1b[2J\\x1b[31mred'", "RuntimeError: \\x1b[2J\\x1b[31mred"),  # shown, not obeyed by the terminal
    ("'x' * 2_000_000", "RuntimeError: " + "x" * 500 + "... (1,999,500 more characters)"),
    ("''", "RuntimeError"),
])
def test_an_error_message_is_shown_and_stored_printable_and_bounded(message, shown, tmp_path):
    target = tmp_path / "train.py"
    target.write_text("from trainbus.kernel.digits import build as digits\n\n"
                      f"def loss(outputs, targets):\n    raise RuntimeError({message})\n\n"
                      "def build(hyperparameters):\n    spec = digits(hyperparameters)\n    spec.loss_fn = loss\n"
                      "    return spec\n")
    runs = tmp_path / "runs"
    r = trainbus("run", f"{target}:build", "--plugins", "console", "--runs-dir", str(runs), timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "\x1b" not in r.stdout + r.stderr
    assert len(r.stdout + r.stderr) < 20_000, len(r.stdout + r.stderr)
    error = f"{shown} (in your code: {target}, line 4)"
    assert f"error: {error}" in r.stdout, r.stdout
    listed = trainbus("runs", "list", "--runs-dir", str(runs), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [run["error"] for run in json.loads(listed.stdout)] == [error]


def test_set_reaches_a_plugins_settings_and_leaves_hyperparameters_alone(tmp_path):
    """--set on top of the config's [plugins.NAME] table, which --plugins picking that name keeps (it used to run
    the name with no settings at all)."""
    config_file = tmp_path / "run.toml"
    config_file.write_text('[plugins.early_stopping.settings]\nmonitor = "training_loss"\nmode = "max"\n'
                           '[plugins.metrics_log]\n')
    runs = tmp_path / "runs"
    r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--epochs", "1", "-c", str(config_file),
                 "--plugins", "early_stopping",
                 "--set", "plugins.early_stopping.settings.patience=1", "--set", "early_stopping.min_delta=0.5",
                 "--set", "hyperparameters.optimizer.lr=0.01", "--set", "lr=0.2", "--runs-dir", str(runs))
    assert r.returncode == 0, r.stderr
    config = json.loads((next(p for p in runs.iterdir() if p.is_dir()) / "config.json").read_text())
    assert [p["name"] for p in config["plugins"]] == ["early_stopping"]
    assert config["plugins"][0]["settings"] == {"monitor": "training_loss", "mode": "max", "patience": 1,
                                                "min_delta": 0.5}
    # what trained: specs.py:tiny declares lr 0.1 whatever it is given, and config.json records the spec's word
    assert config["hyperparameters"] == {"optimizer.lr": 0.01, "lr": 0.1}


@pytest.mark.parametrize("table, noted", [
    ("[plugins.checkpoint.settings]\nsave_top_k = 1\n", True),  # README's checkpoint example, as it stands
    ("[plugins.checkpoint]\n[plugins.console]\nenabled = false\n", False),  # naming a default says it was meant
    ("[plugins.checkpoint]\n[plugins.metrics_log]\n", False),
])
def test_a_config_plugins_table_that_drops_the_default_plugins_says_so(tmp_path, table, noted):
    """A [plugins] table is the run's whole list: one written for the checkpoint plugin alone used to run without
    console and metrics_log, with not a word (no progress, no metrics.jsonl)."""
    config_file = tmp_path / "run.toml"
    config_file.write_text(table)
    runs = tmp_path / "runs"
    r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--epochs", "1", "-c", str(config_file), "--runs-dir",
                 str(runs), "--detach")  # queued: checked as a run is, nothing trained
    assert r.returncode == 0, r.stderr
    note = (f"trainbus: note: {config_file}'s [plugins] table is the run's whole plugin list, so the default plugins "
            f"(console, metrics_log) are off; add [plugins.console] and [plugins.metrics_log] to keep them, or give "
            f"one `enabled = false` to say you meant it\n")
    assert (note in r.stderr) is noted, r.stderr
    again = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "-c", str(config_file), "--runs-dir", str(runs),
                     "--plugins", "checkpoint", "--detach")  # --plugins is the list: nothing to say
    assert again.returncode == 0 and "note:" not in again.stderr, again.stderr


def test_plugins_turns_on_a_config_table_that_is_off_with_its_target_and_settings(tmp_path):
    """`--plugins NAME` keeps the target and settings of the config's [plugins.NAME] table (its --help says so), but
    not of one with `enabled = false`, the way to keep a configured plugin off until asked for: its settings were
    dropped without a word (metrics_log wrote metrics.jsonl, not the file named), and a plugin of one's own,
    `target = "module:Class"`, was an unknown plugin."""
    config_file = tmp_path / "run.toml"
    config_file.write_text('[plugins.metrics_log]\nenabled = false\nsettings = { filename = "kept.jsonl" }\n'
                           '[plugins.mylog]\nenabled = false\n'
                           'target = "trainbus.plugins.metrics_log:MetricsLogPlugin"\n'
                           'settings = { filename = "mine.jsonl" }\n[plugins.console]\n')
    r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--epochs", "1", "-c", str(config_file), "--plugins",
                 "metrics_log,mylog", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    plugins = json.loads((run_dir / "config.json").read_text())["plugins"]
    assert [(p["name"], p["target"], p["settings"]) for p in plugins] == [
        ("metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin", {"filename": "kept.jsonl"}),
        ("mylog", "trainbus.plugins.metrics_log:MetricsLogPlugin", {"filename": "mine.jsonl"})]
    assert (run_dir / "kept.jsonl").is_file() and (run_dir / "mine.jsonl").is_file()
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAX_ARG_STRLEN is Linux's")
def test_settings_at_the_cap_fit_in_one_environment_string_and_one_argument():
    """SETTINGS_MAX_BYTES is below what Linux takes in one string (MAX_ARG_STRLEN, 128 KiB): settings at the cap
    reach a process as TRAINBUS_PLUGIN_SETTINGS (hex) and as `trainbus.sdk --describe TARGET=JSON`."""
    target = "trainbus.plugins.early_stopping:EarlyStoppingPlugin="
    env = dict(os.environ, TRAINBUS_PLUGIN_SETTINGS="ab" * SETTINGS_MAX_BYTES)
    subprocess.run([sys.executable, "-c", "pass", target + "x" * SETTINGS_MAX_BYTES], env=env, check=True, timeout=60)
    with pytest.raises(OSError) as raised:  # the limit is real: twice the cap in hex does not fit
        subprocess.run([sys.executable, "-c", "pass"], timeout=60,
                       env=dict(env, TRAINBUS_PLUGIN_SETTINGS="ab" * 2 * SETTINGS_MAX_BYTES))
    assert raised.value.errno == 7  # E2BIG


def test_a_ctrl_c_while_the_model_is_built_stops_before_the_run_begins_in_one_line(tmp_path):
    """It raised KeyboardInterrupt wherever build() was (a numpy import cut halfway failed the build with a
    RecursionError), and typer exited 130 saying nothing. Now the build finishes, nothing is made, one line."""
    gate, runs = tmp_path / "build_gate", tmp_path / "runs"
    proc = subprocess.Popen([*trainbus_cmd(), "run", f"{TESTS_DIR / 'fixture_targets.py'}:slow_build", "--set",
                             f"build_gate={gate}", "--plugins", "", "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not gate.with_name("build_gate.waiting").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # the handler runs at the build's next bytecode (it polls its gate every 10 ms) and says so: the gate opens
        # once it has
        said, deadline = "", time.monotonic() + 60
        while "stopping once" not in said and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1.0)[0]:
                chunk = os.read(proc.stderr.fileno(), 65536).decode()
                if not chunk:
                    break
                said += chunk
        open_gate(gate, 1)
        out, err = proc.communicate(timeout=120)
        err = said + err
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err == ("\ntrainbus: Ctrl-C: stopping once the model and data are built, before the run begins (Ctrl-C "
                   "again to stop now)\ntrainbus: Ctrl-C before the run began; nothing was made\n"), err
    assert not runs.exists() or not any(runs.iterdir())


def test_a_reader_that_goes_away_costs_the_output_not_the_exit_code(tmp_path):
    """`trainbus run | head -c 1`: rich exits 1 on a broken pipe; a completed run exits 0 all the same."""
    proc = subprocess.Popen([*trainbus_cmd(), "run", f"{TESTS_DIR / 'specs.py'}:tiny", "--epochs", "1", "--plugins",
                             "", "--runs-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.read(1) == b"\n"  # the summary's first byte; the reader leaves before the rest
        proc.stdout.close()
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["status"] == "completed"


def test_a_target_file_without_py_loads_as_python_source_as_python_runs_such_a_script(tmp_path):
    """`trainbus run /path/trainscript:build` (a script with no .py, as `python trainscript` runs) died in importlib:
    AttributeError: 'NoneType' object has no attribute 'loader'."""
    script = tmp_path / "trainscript"
    script.write_text("def build(lr: float = 0.5):\n    \"\"\"A target.\n\n    Args:\n        lr: the step size\n    \"\"\"\n")
    done = trainbus("run", f"{script}:build", "--help-flags")
    assert done.returncode == 0 and "the step size" in done.stdout, done.stderr
    # with no / and no .py it names a module; a file of that name here is said to be one, with how to name it
    (tmp_path / "run.toml").write_text("[run]\nepochs = 1\n")
    r = trainbus("run", "run.toml:build", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    _one_line(r, "cannot import module 'run.toml'; run.toml is a file here: name it ./run.toml:build to load it as "
                 "Python source")


def test_a_module_target_in_the_current_directory_imports_as_the_plugins_beside_it_do(tmp_path):
    """`trainbus run mypkg.train:build` from the directory holding mypkg/ (the README's form): the console script
    had no current directory on sys.path, so it said "cannot import module" while `python -m` would have found it."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "train.py").write_text(
        "def build(lr: float = 0.5):\n    \"\"\"A target.\n\n    Args:\n        lr: the step size\n    \"\"\"\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([*trainbus_cmd(), "run", "mypkg.train:build", "--help-flags"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "lr" in done.stdout and "the step size" in done.stdout, done.stderr


# The command line as the console script starts it, with one function the command calls held until the test has
# sent its Ctrl-C: the command is then in its body, past every import, every time.
_HELD_CALL = """
import importlib, sys, time
where, sys.argv = sys.argv[1], ["trainbus", *sys.argv[2:]]
from trainbus.kernel.cli import main
module, _, name = where.partition(":")
owner, _, attr = name.rpartition(".")
holder = importlib.import_module(module)
holder = getattr(holder, owner) if owner else holder
def held(*args, **kwargs):
    print("holding", flush=True)
    time.sleep(60)
setattr(holder, attr, held)
main()
"""


def _interrupted_while_held(tmp_path, held: str, args: list[str]) -> tuple[int, str, str]:
    """`trainbus ARGS` in tmp_path, held inside `held` (_HELD_CALL) and sent Ctrl-C there: its exit code, stdout,
    stderr."""
    from conftest import sigint_as_from_a_terminal

    proc = subprocess.Popen([sys.executable, "-c", _HELD_CALL, held, *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=sigint_as_from_a_terminal)
    try:
        assert proc.stdout.readline() == "holding\n", proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, out, err


@pytest.mark.parametrize("held, args, said", [
    ("trainbus.kernel.registry:list_runs", ["runs", "list"], "the listing stopped; nothing was changed"),
    ("trainbus.kernel.run_details:run_details", ["runs", "show", "r1"], "stopped; nothing was changed"),
    ("trainbus.kernel.daemon_client:request", ["daemon", "status"], "stopped asking; nothing was changed"),
    ("trainbus.kernel.keys:KeyStore.generate_client", ["keys", "generate", "client", "bob", "--keys-dir", "keys"],
     "stopped; `trainbus keys list` shows whether the pair was made"),
    ("trainbus.kernel.runs:resolve_run", ["attach", "r1"], "Ctrl-C before attaching; nothing was sent, and the run "
                                                           "goes on"),
    ("trainbus.kernel.cli_runs:journal_progress", ["runs", "plot", "r1"],
     "plotting stopped; each plot is whole, drawn or as it was"),
])
def test_a_ctrl_c_in_a_command_other_than_run_says_what_it_left_in_one_line(tmp_path, held, args, said):
    """Ctrl-C in `runs list` (a big registry), `runs show` (a long journal), `daemon status` (a daemon slow to
    answer), `keys generate`, `attach` exited 130 without a word. Now one line says what was and was not done, as
    `run` says it."""
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "config.json").write_text("{}")  # enough to be found; never read past that
    (tmp_path / "runs" / "r1" / "events").write_bytes(b"")  # a journal to plot
    code, out, err = _interrupted_while_held(tmp_path, held, args)
    prefix = "trainbus: " if said.startswith("Ctrl-C") else "trainbus: Ctrl-C: "
    assert (code, out, err) == (130, "", f"{prefix}{said}\n"), (code, out, err)


@pytest.mark.parametrize("held, args, said", [
    ("trainbus.kernel.daemon_client:start_background", ["daemon", "start"],
     "Ctrl-C as the daemon started: `trainbus daemon status` shows whether it serves"),
    ("trainbus.kernel.daemon_client:stop", ["daemon", "stop"],
     "Ctrl-C: stopped waiting; `trainbus daemon status` shows whether the daemon still serves (its runs train on)"),
    ("trainbus.kernel.daemon_queue:cancel", ["daemon", "cancel", "r1"],
     "Ctrl-C: stopped; `trainbus daemon status` shows whether the run is still queued"),
    ("trainbus.kernel.daemon_client:request", ["daemon", "cancel", "r1", "--remote", "127.0.0.1:1", "--key",
                                               "c.key_secret", "--server-key", "s.key"],
     "Ctrl-C: stopped waiting for the daemon; `trainbus daemon status` (with the same --remote, --key and "
     "--server-key) shows whether the run is still queued"),
    ("trainbus.kernel.daemon_client:request", ["daemon", "submit", "--remote", "127.0.0.1:1", "--key", "c.key_secret",
                                               "--server-key", "s.key", "--", "train.py:build"],
     "Ctrl-C: stopped waiting for the daemon; `trainbus daemon status` (with the same --remote, --key and "
     "--server-key) shows whether the run was queued"),
])
def test_a_ctrl_c_in_a_daemon_command_says_what_may_have_taken(tmp_path, held, args, said):
    """`daemon start` cut while the daemon it spawned (in a session of its own) was coming up left it serving, and
    `daemon submit` cut after its request went out may have queued the run: each exited 130 without a word, as did
    `daemon stop` and `daemon cancel`. One line now says so and how to see what was done."""
    import zmq.auth

    (tmp_path / "runs").mkdir()
    zmq.auth.create_certificates(tmp_path, "c")
    zmq.auth.create_certificates(tmp_path, "s")
    (tmp_path / "c.key_secret").chmod(0o600)
    code, out, err = _interrupted_while_held(tmp_path, held, args)
    assert (code, out, err) == (130, "", f"trainbus: {said}\n"), (code, out, err)


WORKERS_TARGET = """
import pathlib, time
import torch
from torch.utils.data import DataLoader, Dataset
from trainbus.kernel import TrainingSpec

class Slow(Dataset):
    def __len__(self):
        return 4000

    def __getitem__(self, i):
        time.sleep(0.002)
        return torch.ones(4), i % 2

def loss(outputs, targets):
    pathlib.Path(__file__).with_name("training").touch()
    return torch.nn.functional.cross_entropy(outputs, targets)

def build():
    model = torch.nn.Linear(4, 2)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss,
                        train_loader=DataLoader(Slow(), batch_size=8, num_workers=2), epochs=2)
"""


def test_ctrl_c_at_a_terminal_says_it_stops_once_though_dataloader_workers_get_it_too(tmp_path):
    """A terminal's Ctrl-C reaches its whole process group, the DataLoader's worker processes with the kernel: each
    forked worker ran the kernel's handler it inherited and wrote the line too, three times with two workers."""
    (tmp_path / "train.py").write_text(WORKERS_TARGET)
    proc = subprocess.Popen([*trainbus_cmd(), "run", str(tmp_path / "train.py"), "--plugins", "", "--runs-dir",
                             str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "training").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # the workers are well into the epoch
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the kernel and its workers
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err.count("stopping at the next batch boundary") == 1, err
    assert "interrupted after 0 epochs" in out, out


def test_logging_configured_by_the_users_code_shows_none_of_the_kernels_own_lines(tmp_path):
    """logging.basicConfig(level=INFO) in build(), as many scripts do: the kernel's records (kernel.log's) reached the
    root handler too, and `INFO:trainbus.kernel:sockets: events ipc:///...` and the snapshot buffers' lines came out
    on the terminal between the run's own lines (a plugin's logs and errors would have too)."""
    target = tmp_path / "train.py"
    target.write_text("import logging\nfrom trainbus.kernel.digits import build as digits\n\n"
                      "def build(hyperparameters):\n    logging.basicConfig(level=logging.INFO)\n"
                      "    logging.getLogger('mine').info('data ready')\n    return digits(hyperparameters)\n")
    runs = tmp_path / "runs"
    r = trainbus("run", str(target), "--epochs", "1", "--plugins", "", "--runs-dir", str(runs), timeout=120)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "INFO:mine:data ready" in r.stderr, r.stderr  # the user's own logging is theirs, as they set it up
    assert "trainbus." not in r.stdout + r.stderr, r.stdout + r.stderr
    assert " INFO trainbus.kernel: sockets: " in next(runs.glob("*/kernel.log")).read_text()


@pytest.mark.parametrize("how", ["read-only mount", "full disk"])
def test_keys_generate_where_it_cannot_write_is_one_line_and_leaves_no_half_pair(how, mount_tmpfs):
    """An OSError of the key pair's mkdir or write went out as a traceback; on a full disk the public half was
    left, a key with no secret anywhere, in a role directory the kernel lets its holder in from."""
    if how == "read-only mount":
        disk = mount_tmpfs("ro", 1 << 20)
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        args = ["server"]
    else:
        disk = mount_tmpfs("full", 4096)  # one page: the public key's file fills it, the secret's is refused
        args = ["client", "alice", "--role", "control"]
    keys = disk / "keys"
    r = trainbus("keys", "generate", *args, "--keys-dir", str(keys))
    assert "Traceback" not in r.stderr + r.stdout
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: cannot write the key pair in {keys}"), r.stderr
    assert "--keys-dir" in r.stderr  # the fix
    assert not [path for path in disk.rglob("*") if path.is_file()]


def test_keys_revoke_on_a_read_only_mount_is_one_line_saying_the_key_still_lets_in(mount_tmpfs):
    """The OSError of revoked/'s mkdir went out as a traceback, which left unsaid whether the key was revoked."""
    from trainbus.kernel.keys import KeyStore

    disk = mount_tmpfs("keys", 1 << 20)
    store = KeyStore(disk / "keys")
    store.generate_server()
    public, _ = store.generate_client("alice", "control")
    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if remount.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
    r = trainbus("keys", "revoke", "alice", "--keys-dir", str(store.directory))
    assert "Traceback" not in r.stderr + r.stdout
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(
        "error: cannot revoke control key alice: Read-only file system"), r.stderr
    assert "it still lets its holder in" in r.stderr and public.exists()


@pytest.mark.parametrize("args", [["run", "--plugins", ""], ["runs", "list"],
                                  ["run", "-c", "loop.toml", "--plugins", ""]])
def test_a_runs_dir_that_is_a_loop_of_symbolic_links_is_one_line(args, tmp_path):
    """ELOOP went out as a traceback: from the stat of the runs dir's privacy check (`run`), or as pathlib's
    RuntimeError from resolve() while `runs list` said that the directory does not exist."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "loop.toml").write_text("[run]\nruns_dir = 'a'\n")
    r = trainbus(*args, *([] if "-c" in args else ["--runs-dir", "a"]), cwd=tmp_path)
    assert "Traceback" not in r.stderr + r.stdout
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a is a loop of symbolic links" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "loop.toml"]


@pytest.mark.parametrize("run_id", ["../escape", "a/b", ".."])
def test_a_launch_run_id_that_is_not_one_name_is_refused_not_made_a_directory_outside_the_runs(run_id, tmp_path):
    """$TRAINBUS_LAUNCH_RUN_ID, the run id `run --nproc` and the daemon give the processes they start, was taken as
    it came: a stale or hand-set `../escape` made the run directory beside the runs directory, not in it."""
    env = {**os.environ, "TRAINBUS_LAUNCH_RUN_ID": run_id}
    r = subprocess.run([*trainbus_cmd(), "run", "--epochs", "1", "--plugins", "", "--runs-dir", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stderr) == (2, (
        f"error: $TRAINBUS_LAUNCH_RUN_ID {run_id!r} is not a run id (one name: no '/', not . or ..); `trainbus run "
        f"--nproc` and the daemon set it for the processes they start: unset it\n")), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
