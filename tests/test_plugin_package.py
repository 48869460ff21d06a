"""A plugin in a package of its own, found by its entry point: built and pip-installed here (offline, no index),
listed by `trainbus plugins list`, run by name with `trainbus run --plugins`. An entry point whose module raises
on import is one line, and a name a package takes from a built-in, or two packages share, is said clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainbus.kernel.config import ConfigError
from trainbus.kernel.plugin_names import plugin_name_clashes, registered_plugins, resolve_plugin

from conftest import TESTS_DIR
from kernel_process import Command

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyplug"
version = "0.1.0"

[project.entry-points."trainbus.plugins"]
tinyplug = "tinyplug:TinyPlugin"
tinybroken = "tinyplug_broken:BrokenPlugin"
console = "tinyplug:TinyPlugin"

[tool.setuptools]
py-modules = ["tinyplug", "tinyplug_broken"]
"""

PLUGIN = '''\
"""A plugin from a package of its own."""
import os
from pathlib import Path

from trainbus.sdk import DURABLE, Plugin, Setting


class TinyPlugin(Plugin):
    """Writes a line per epoch into its run's directory."""

    delivery = DURABLE  # the run waits for it to catch up before it ends: its last line is written
    settings = {"word": Setting("epoch", "what each line starts with")}

    def on_end_epoch(self, event):
        with open(Path(os.environ["RUN_DIR"]) / "tinyplug.txt", "a") as f:
            f.write(f"{self.settings['word']} {event.epoch}\\n")
'''

BROKEN = '''\
"""A plugin whose module raises as it is imported."""
raise RuntimeError("tinybroken needs a licence server")
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a `trainbus` command that has the tinyplug package: built and installed with pip,
    offline, into a folder of its own, which PYTHONPATH names (the tests folder too, for specs.py)."""
    tmp = tmp_path_factory.mktemp("plugin_package")
    package, site = tmp / "tinyplug", tmp / "site"
    package.mkdir()
    for name, text in (("pyproject.toml", PYPROJECT), ("tinyplug.py", PLUGIN), ("tinyplug_broken.py", BROKEN)):
        (package / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
                           str(package)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pip could not build and install the package offline:\n{proc.stderr}"
    assert (site / "tinyplug-0.1.0.dist-info" / "entry_points.txt").is_file()
    return {**os.environ, "PYTHONPATH": os.pathsep.join((str(site), str(TESTS_DIR)))}


def trainbus(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainbus.kernel.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_the_package_plugin_is_listed_with_its_settings(plugin_env):
    proc = trainbus(plugin_env, "plugins", "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "tinyplug (durable): Writes a line per epoch into its run's directory." in lines
    row = next(line for line in lines if "what each line starts with" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == ["word", "str", '"epoch"', "-",
                                                                     "what each line starts with"]
    # its broken entry point: one line where its description would be; the other plugins are listed all the same
    broken = [line for line in lines if line.startswith("tinybroken")]
    assert broken == [f"tinybroken: cannot load: cannot import plugin module 'tinyplug_broken': "
                      f"{Path(plugin_env['PYTHONPATH'].split(os.pathsep)[0]) / 'tinyplug_broken.py'}, line 2: "
                      f"RuntimeError: tinybroken needs a licence server"]
    assert any(line.startswith("console (best_effort): ") for line in lines) and "Traceback" not in proc.stderr
    # the package's `console` is not the built-in's: said once, on stderr
    assert proc.stderr.splitlines() == [
        "trainbus: warning: plugin name 'console' is registered by trainbus "
        "(trainbus.plugins.console:ConsolePlugin) and tinyplug (tinyplug:TinyPlugin): the built-in one runs; "
        "rename the entry point in tinyplug's [project.entry-points.\"trainbus.plugins\"]"]


def test_the_package_plugin_runs_by_name(plugin_env, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = trainbus(plugin_env, "run", TINY, "--plugins", "tinyplug,console", "--epochs", "2", "--device", "cpu",
                    "--runs-dir", str(runs_dir), "--set", "tinyplug.word=done")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    # its process found the package and read its setting; the built-in console ran as `console` (the package's
    # class under that name would have written here too)
    assert (run_dir / "tinyplug.txt").read_text() == "done 1\ndone 2\n"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["plugins"]["tinyplug"]["state"] == "exited" and summary["plugins"]["tinyplug"]["restarts"] == 0
    assert "warning: plugin name 'console' is registered by trainbus" in proc.stderr


def test_a_broken_entry_point_is_one_line_and_no_run(plugin_env, tmp_path):
    runs_dir = tmp_path / "runs"
    proc = trainbus(plugin_env, "run", TINY, "--plugins", "tinybroken", "--runs-dir", str(runs_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: plugin tinybroken: cannot import plugin module 'tinyplug_broken': ")
    assert proc.stderr.strip().endswith("tinyplug_broken.py, line 2: RuntimeError: tinybroken needs a licence server")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_an_import_that_fails_inside_a_plugin_module_names_the_file_and_line(tmp_path):
    """What `plugins list` and `trainbus run` ask (`--describe`): a module the plugin imports that is not installed,
    and a Setting declared wrong, name the plugin's own line; a plugin module that is not there says how to fix it."""
    (tmp_path / "needs_missing.py").write_text('"""Imports what is not installed."""\nimport nonexistent_mod_xyz\n')
    (tmp_path / "bad_default.py").write_text("from trainbus.sdk import Plugin, Setting\n\n\nclass Bad(Plugin):\n"
                                             "    settings = {'every': Setting('often', type=int)}\n")
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", "needs_missing:P", "bad_default:Bad",
                           "not_there.at_all:P"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), str(TESTS_DIR)))})
    assert proc.returncode == 0, proc.stderr
    assert [info["error"] for info in json.loads(proc.stdout)] == [
        f"cannot import plugin module 'needs_missing': {tmp_path / 'needs_missing.py'}, line 2: ModuleNotFoundError: "
        f"No module named 'nonexistent_mod_xyz'",
        f"cannot import plugin module 'bad_default': {tmp_path / 'bad_default.py'}, line 5: SettingsError: Setting "
        f"default 'often' is not allowed; it must be an integer",
        "cannot import plugin module 'not_there.at_all': No module named 'not_there'; install the package that has it "
        "into this Python's environment, or put its folder on PYTHONPATH"]


def _dist_info(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """An installed distribution's metadata, as pip writes it: what entry points are read from."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[trainbus.plugins]\n{lines}")


def test_a_name_two_packages_register_names_neither(tmp_path, monkeypatch):
    _dist_info(tmp_path / "site", "alpha_plugins", {"shared": "alpha:Shared", "metrics_log": "alpha:Log"})
    _dist_info(tmp_path / "site", "beta_plugins", {"shared": "beta:Shared"})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    known = registered_plugins()
    assert "shared" not in known and known["metrics_log"] == "trainbus.plugins.metrics_log:MetricsLogPlugin"
    with pytest.raises(ConfigError) as raised:
        resolve_plugin("shared", {})
    message = str(raised.value)
    assert "alpha_plugins (alpha:Shared) and beta_plugins (beta:Shared)" in message
    assert 'target = "alpha:Shared"' in message, "names the way to pick one"
    assert resolve_plugin("metrics_log", {}).target == known["metrics_log"], "a built-in's name stays the built-in's"
    assert set(plugin_name_clashes()) == {"shared", "metrics_log"}


def test_a_plugin_module_that_exits_as_it_is_imported_is_one_line_naming_its_line_and_the_fix(tmp_path):
    """A plugin module that parsed its own arguments at import (argparse, which then read `--describe ...` and
    exited 2), or called sys.exit() there, ended the describing process: `trainbus run` and `plugins list` said
    `could not load plugins: __main__.py: error: unrecognized arguments: --describe ...`, naming no plugin, file or
    fix, and one such installed package took `plugins list` down for all. It is that module's load error now, as any
    exception at import is: its file and line, and for argparse the fix."""
    (tmp_path / "parses_args.py").write_text("import argparse\n\nparser = argparse.ArgumentParser()\n"
                                             "parser.add_argument('--lr', type=float)\nARGS = parser.parse_args()\n")
    (tmp_path / "exits.py").write_text('import sys\n\nsys.exit("no GPU here")\n')
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", "parses_args:P", "exits:P",
                           "trainbus.plugins.console:ConsolePlugin"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    infos = json.loads(proc.stdout)
    assert infos[0]["error"] == (
        f"cannot import plugin module 'parses_args': {tmp_path / 'parses_args.py'}, line 5: sys.exit(2) as it is "
        f"imported would end the process; argparse read the plugin process's command line: parse arguments under "
        f"`if __name__ == \"__main__\":`, and take what a plugin needs as its settings"), infos[0]
    assert infos[1]["error"] == (
        f"cannot import plugin module 'exits': {tmp_path / 'exits.py'}, line 3: sys.exit('no GPU here') as it is "
        f"imported would end the process; a plugin module raises an exception instead"), infos[1]
    assert "error" not in infos[2] and infos[2]["target"] == "trainbus.plugins.console:ConsolePlugin"


def test_a_plugin_module_whose_import_fails_inside_the_standard_library_names_the_authors_line(tmp_path):
    """`CONFIG = json.loads(TEXT)` at a plugin module's top, given bad text, was said at json/decoder.py's line 353,
    where the standard library raised, not at the author's line that called it (a handler's error names the
    innermost line of the author's code, as the console says it)."""
    (tmp_path / "reads_config.py").write_text('import json\n\nCONFIG = json.loads("{not json")\n')
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", "reads_config:P"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["error"].startswith(
        f"cannot import plugin module 'reads_config': {tmp_path / 'reads_config.py'}, line 3: JSONDecodeError: "), \
        proc.stdout


def test_a_plugin_module_that_waits_as_it_is_imported_is_one_line_and_starts_no_run(tmp_path):
    """The check of a run's plugin settings asks a process of their own to import and describe them; one that did not
    answer in time (a module waiting at import for a device or a lock; on a box with a load of 200, the built-ins
    too) ended `trainbus run` with subprocess.TimeoutExpired's traceback. One line now, naming the plugins and the
    fix, and no run is made."""
    (tmp_path / "waits.py").write_text("import time\n\ntime.sleep(600)\n")
    (tmp_path / "run.toml").write_text('[plugins.waiter]\ntarget = "waits:P"\n')
    command = Command("run", "--config", str(tmp_path / "run.toml"), "--runs-dir", str(tmp_path / "runs"),
                      cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                      constants={"trainbus.kernel.cli_common.DESCRIBE_TIMEOUT_S": 2.0})
    try:
        out, err = command.communicate(120)
    finally:
        command.kill()
    assert command.returncode == 2, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: could not load plugins: "
                                                   "describing them took over 2 s (waits:P"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run was made"


@pytest.mark.parametrize("module, how", [("os._exit(3)", "exit code 3"),
                                         ("os.kill(os.getpid(), signal.SIGKILL)", "signal SIGKILL")])
def test_a_plugin_module_that_ends_its_process_as_it_is_imported_is_that_plugins_one_line(tmp_path, module, how):
    """os._exit at a plugin module's import, or a crash in a C extension it imports, ends the describing process before
    it can say anything: `trainbus run` said `could not load plugins: 3` (or `-9`), naming no plugin and no fix, and
    one such installed package took `plugins list` down for all. It is that plugin's load error now."""
    (tmp_path / "ends.py").write_text(f"import os\nimport signal\n\n{module}\n")
    (tmp_path / "run.toml").write_text('[plugins.ender]\ntarget = "ends:P"\n[plugins.console]\n')
    command = Command("run", "--config", str(tmp_path / "run.toml"), "--runs-dir", str(tmp_path / "runs"),
                      cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    try:
        _, err = command.communicate(120)
    finally:
        command.kill()
    assert command.returncode == 2, err
    assert err.strip().splitlines() == [
        f"error: plugin ender: cannot import plugin module 'ends': it ended the process as it was imported ({how}), as "
        f"os._exit or a crash in a C extension it imports does; see where with python -c 'import ends'"], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run was made"


def test_an_installed_plugin_module_that_exits_or_fails_in_the_standard_library_names_its_own_line(tmp_path):
    """A plugin package pip installed lives in site-packages, so none of its frames is the author's by the console's
    measure: argparse at its import was said at argparse.py's line (the standard library's), and json.loads's bad
    text at json/decoder.py's, not at the package's own line that called them."""
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "parses_args_pkg.py").write_text("import argparse\n\nparser = argparse.ArgumentParser()\n"
                                             "parser.add_argument('--lr', type=float)\nARGS = parser.parse_args()\n")
    (site / "reads_config_pkg.py").write_text('import json\n\nCONFIG = json.loads("{not json")\n')
    proc = subprocess.run([sys.executable, "-m", "trainbus.sdk", "--describe", "parses_args_pkg:P",
                           "reads_config_pkg:P"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    errors = [info["error"] for info in json.loads(proc.stdout)]
    assert errors[0].startswith(f"cannot import plugin module 'parses_args_pkg': {site / 'parses_args_pkg.py'}, "
                                f"line 5: sys.exit(2) as it is imported would end the process; argparse "), errors[0]
    assert errors[1].startswith(f"cannot import plugin module 'reads_config_pkg': {site / 'reads_config_pkg.py'}, "
                                f"line 3: JSONDecodeError: "), errors[1]
