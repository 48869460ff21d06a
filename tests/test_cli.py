"""The `trainbus` command as a user meets it: version, plugin list, a real run, and bad input."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import termios
import time

import pytest

from conftest import TESTS_DIR, trainbus_cmd


def trainbus(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(trainbus_cmd() + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_version():
    r = trainbus("--version")
    assert r.returncode == 0 and r.stdout.startswith("trainbus ") and "protocol v1" in r.stdout


def test_plugins_list_describes_every_builtin():
    r = trainbus("plugins", "list")
    assert r.returncode == 0, r.stderr
    for name in ("console", "metrics_log", "early_stopping"):
        assert name in r.stdout
    assert "patience=3" in r.stdout  # settings with their defaults


def test_run_prints_id_outcome_and_results(tmp_path):
    r = trainbus("run", "--epochs", "1", "--plugins", "metrics_log", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run_dir = next(tmp_path.iterdir())
    assert f"run {run_dir.name}" in r.stdout and "completed" in r.stdout and str(run_dir) in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (run_dir / "metrics.jsonl").read_text().strip(), "metrics_log wrote its records"


def test_the_terminal_gets_what_the_console_draws_and_plugins_diagnostics_go_to_their_logs(tmp_path):
    r = trainbus("run", "--epochs", "1", "--plugins", "console,metrics_log", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run_dir = next(tmp_path.iterdir())
    assert "epoch 1/1" in r.stdout and "finished: 1 epochs" in r.stdout  # the console, on the kernel's stdout
    assert "run ended" not in r.stdout + r.stderr  # the SDK's counts, one line per plugin
    for name in ("console", "metrics_log"):
        assert f"[{name}] run ended. processed " in (run_dir / "plugins" / f"{name}.log").read_text()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUT = {
    "missing target file": (lambda t: ["run", "no/such/file.py:build"], "does not exist"),
    "target not a function": (lambda t: ["run", f"{TESTS_DIR / 'specs.py'}:not_a_function"], "is not a function"),
    "missing function": (lambda t: ["run", f"{TESTS_DIR / 'specs.py'}:nope"], "has no attribute 'nope'"),
    "unknown module": (lambda t: ["run", "no_such_pkg.mod:build"], "cannot import module"),
    "unknown plugin": (lambda t: ["run", "--plugins", "console,bogus"], "unknown plugin 'bogus'"),
    "malformed toml": (lambda t: ["run", "--config", _write(t, "bad.toml", "[run\nepochs=")], "not valid TOML"),
    "unknown config key": (lambda t: ["run", "--config", _write(t, "k.toml", "[run]\nepochz = 3\n")],
                           "unknown key 'epochz'"),
    "wrong config type": (lambda t: ["run", "--config", _write(t, "t.toml", "[run]\nepochs = 'three'\n")],
                          "must be an integer"),
    "bad plugin setting": (lambda t: ["run", "--config", _write(
        t, "s.toml", "[plugins.early_stopping.settings]\npatiencee = 2\n")], "no setting 'patiencee'"),
    "flag of wrong type": (lambda t: ["run", "--epochs", "many"], "Invalid value for '--epochs'"),
    "unknown flag": (lambda t: ["run", "--epocks", "3"], "No such option"),
    "missing config file": (lambda t: ["run", "--config", str(t / "nope.toml")], "does not exist"),
    "no gpu": (lambda t: ["run", "--device", "tpu"], "device must be one of"),
    "not a boolean": (lambda t: ["run", "--config", _write(t, "b.toml", "[run]\nkeep_freed_memory = 'yes'\n")],
                      "run.keep_freed_memory must be true or false"),
    "missing snapshot dir": (lambda t: ["run", "--config", _write(t, "d.toml", f"[run]\nsnapshot_dir = '{t}/nope'\n")],
                             "not a writable directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_one_clear_line_and_no_traceback(case, tmp_path):
    make_args, expected = BAD_INPUT[case]
    r = trainbus(*make_args(tmp_path), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    error_lines = [line for line in r.stderr.splitlines() if line.lower().startswith("error")]
    assert len(error_lines) == 1 and expected in error_lines[0], r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "nothing half-started"


def test_the_console_draws_on_a_terminal_with_tostop(tmp_path):
    """On a real terminal whose line discipline stops background writers (`stty tostop`), the console
    plugin (a background process group in the kernel's session) still draws and the run completes."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader on the pty, in the foreground, like a shell's job
        try:
            attrs = termios.tcgetattr(0)
            attrs[3] |= termios.TOSTOP
            termios.tcsetattr(0, termios.TCSANOW, attrs)
            os.execv(trainbus_cmd()[0], [*trainbus_cmd(), "run", "--plugins", "console", "--epochs", "2",
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
    assert "finished: 2 epochs" in text  # the console's own last line: it ran, it was not stopped
    hung = [line for line in text.splitlines() if "hung" in line or "crashed" in line]
    assert not hung, hung
