"""PROTOCOL.md §14's complete plugin, run as printed: spawned by the kernel from a `command`, and attached by hand
to a live run with only TRAINBUS_RUN_DIR set. Either way it prints end_epoch and its stop ends the run after
exactly two epochs (it votes at end_epoch, so the stop lands at that boundary)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from trainbus.kernel.config import PluginConfig
from trainbus.kernel.credentials import socket_dir
from trainbus.kernel.journal import read_events
from trainbus.kernel.private_dirs import remove_scratch_dir
from trainbus.kernel.session import run_training
from trainbus.sdk.attach import SOCKETS_LINE

from conftest import TESTS_DIR
from fixture_targets import open_gate
from helpers import run_config
from kernel_process import KernelProcess, cli, of, wait_until
from test_trust import Intruder, attach_credential, short_runs, wait_sockets  # noqa: F401

PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"
STOP = "raw_example: stop: two epochs are enough"


def example(tmp_path: Path) -> Path:
    spec = (TESTS_DIR.parent / "proto" / "PROTOCOL.md").read_text(encoding="utf-8")
    section = spec[spec.index("## 14."):spec.index("## 15.")]
    script = tmp_path / "raw_example.py"
    script.write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    return script


def assert_stopped_after_two_epochs(run_dir: Path, printed: str) -> None:
    events = read_events(run_dir)
    final = of(events, "end_training_session")[0].data
    assert final["epochs_completed"] == 2 and final["stopped_early"] and final["stop_reasons"] == [STOP], final
    assert [e.epoch for e in of(events, "end_epoch")] == [1, 2]
    assert re.search(r"epoch 1: validation_loss=\d", printed) and "epoch 2: validation_loss=" in printed, printed


def test_the_example_spawned_by_the_kernel_stops_the_run_after_two_epochs(short_runs, tmp_path):  # noqa: F811
    plugin = PluginConfig("raw_example", "", {}, [sys.executable, str(example(tmp_path))])
    result = run_training(run_config(short_runs, [plugin], epochs=4, target=PACED, batch_size=256,
                                     step_sleep_s=0.0, ready_timeout_s=120))
    assert result.status == "stopped", result
    run_dir = Path(result.run_dir)
    assert_stopped_after_two_epochs(run_dir, (run_dir / "plugins" / "raw_example.log").read_text())


@pytest.mark.parametrize("runs", ["short", "too long for a socket path", "with a space"])
def test_the_example_attached_by_hand_stops_the_run_after_two_epochs(short_runs, tmp_path, kernels, runs):  # noqa: F811
    """Attached by hand it reads the sockets from kernel.log's line (§2's pattern, `\\S+` an endpoint). A run
    directory holding a space (`~/My Drive/runs`) had its sockets there, and that line named them with the space:
    no line matched, and the example died of an IndexError before its hello."""
    gate = tmp_path / "gate"
    runs_dir = {"short": short_runs, "too long for a socket path": tmp_path / ("d" * 60) / ("e" * 60),  # temp dir
                "with a space": short_runs / "my runs"}[runs]
    kernel = KernelProcess(run_config(runs_dir, epochs=4, target=PACED, batch_size=256, step_sleep_s=0.0,
                                      gate=str(gate)), tmp_path)
    kernels.append(kernel)
    open_gate(gate, 1)
    kernel.wait_step(1, timeout_s=120)  # held in epoch 1 until the example is in
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    plugin = subprocess.Popen([sys.executable, str(example(tmp_path))], env={**env, "TRAINBUS_RUN_DIR": str(kernel.run_dir)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kernel.wait_event("plugin_ready", lambda e: e.data["plugin"] == "raw_example", timeout_s=90)
        open_gate(gate, 10**6)
        assert kernel.result(timeout_s=180)["status"] == "stopped"
        printed, _ = plugin.communicate(timeout=60)
    finally:
        if plugin.poll() is None:
            plugin.kill()
            print(plugin.communicate()[0])  # what it said, for a failure
    assert plugin.returncode == 0, printed
    assert_stopped_after_two_epochs(kernel.run_dir, printed)


def test_a_peers_name_and_log_text_cannot_pass_for_the_kernels_sockets_line(
        short_runs, tmp_path, kernels):  # noqa: F811
    """kernel.log names the sockets for a client attached by hand (§2) and holds every peer's log replies: a peer
    whose name or text says "sockets: ..." on a line of its own would send that client, and the run's credential in
    its hello, to sockets of the peer's choosing. The §14 example's pattern and the SDK's find the kernel's own, and
    so does a client that splits kernel.log into lines as Python's splitlines() and JavaScript's /^...$/m do, at
    U+2028 and U+2029 too: a peer's text holding those began a line there that matched §2's pattern."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(run_config(short_runs, epochs=1, target=PACED, batch_size=256, step_sleep_s=0.0,
                                      gate=str(gate)), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    forged = "2026-01-01 00:00:00,000 INFO trainbus.kernel: "
    evil = "sockets: events ipc:///evil/events.sock control ipc:///evil/control.sock bursts ipc:///evil/bursts.sock"
    log_path = kernel.run_dir / "kernel.log"
    peer = Intruder(kernel.run_dir, "forger", subscribe=True)
    try:
        wait_until(lambda: peer.next_event(0.1), 60, "a first event")  # our subscription is live: say hello
        peer.hello(f"forger\n{forged}x", attach_credential(kernel.run_dir), replies=["log"])
        peer.wait_reply("welcome")
        peer.send("log", level="warning", text=evil)
        peer.send("log", level="info", text=f"ok\n{forged}{evil}\x1b[2J")
        peer.send("log", level="info", text=f"ok\u2028{forged}{evil}\u2029{forged}{evil}\x85{forged}{evil}")
        wait_until(lambda: log_path.read_text().count("/evil/control.sock") == 5, 60, "the peer's lines in kernel.log")
    finally:
        peer.close()
    text = log_path.read_text()
    real = (f"ipc://{kernel.run_dir / 'events.sock'}", f"ipc://{kernel.run_dir / 'control.sock'}")
    printed = re.search(r'findall\(r"([^"]+)"', example(tmp_path).read_text()).group(1)  # §14's, as printed
    assert re.findall(printed, text)[-1] == real and SOCKETS_LINE.findall(text)[-1][:2] == real, text
    section_2 = re.compile(r"^\S+ \S+ INFO trainbus\.kernel: sockets: events (\S+) control (\S+) bursts (\S+)$")
    assert [match.groups()[:2] for line in text.splitlines() if (match := section_2.match(line))] == [real], text
    record_start = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ trainbus")
    assert "\x1b" not in text and all(record_start.match(line) or line.startswith("    ") for line in text.splitlines())
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=180)["status"] == "completed"


# A plugin in another language, as README's `[plugins.go_monitor] command = ["./monitor-bin", "--fast"]` and §14's
# `command = ["python", "raw_example.py"]` give one: paths relative to the directory the run is started in.
HELLO_AND_BYE = '''
import os, msgpack, zmq
ctx = zmq.Context()
sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(os.environ["TRAINBUS_EVENTS"])
dealer.setsockopt(zmq.ROUTING_ID, os.urandom(8))
dealer.connect(os.environ["TRAINBUS_CONTROL"])
sub.recv_multipart()
dealer.send(msgpack.packb({"v": 1, "type": "hello", "name": os.environ["TRAINBUS_PLUGIN_NAME"], "pid": os.getpid(),
                           "subscriptions": [""], "replies": [], "delivery": "best_effort",
                           "secret": os.environ["TRAINBUS_SECRET"]}))
print(msgpack.unpackb(dealer.recv())["type"], flush=True)
dealer.send(msgpack.packb({"v": 1, "type": "bye", "reason": "said hello"}))
ctx.destroy(linger=1000)
'''


def test_command_plugins_relative_to_where_the_run_started_start_in_a_run_continued_from_elsewhere(tmp_path):
    """`trainbus runs resume RUN` continues a run with its config, a relative target file made absolute from the
    directory the run was started in; a command plugin's relative program (`./monitor-bin`) or argument
    (`python raw_example.py`) was not: resumed from another directory it was `error: ... program './monitor' does not
    exist` and no run, or a plugin crashing at every restart until plugin_failed. Its process starts in the directory
    the run was started in, as the first session's did."""
    project, elsewhere, runs = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "runs"
    project.mkdir()
    elsewhere.mkdir()
    (project / "monitor").write_text(f"#!{sys.executable}\n{HELLO_AND_BYE}")
    (project / "monitor").chmod(0o755)
    (project / "raw_example.py").write_text(HELLO_AND_BYE)
    (project / "run.toml").write_text(f'[plugins.program]\ncommand = ["./monitor"]\n[plugins.argument]\n'
                                      f'command = ["{sys.executable}", "raw_example.py"]\n[plugins.checkpoint]\n')
    first = cli("run", "-c", "run.toml", "--epochs", "1", "--runs-dir", str(runs), cwd=project, timeout=300)
    assert first.returncode == 0, first.stderr
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]
    # what `trainbus runs resume RUN --epochs 2` execs, run here forked with torch loaded (the exec's fresh
    # interpreter imports torch again: ~3 s; `runs resume` itself is test_cli's and test_checkpoint_e2e's)
    again = cli("run", "--resume", str(run_dir), "--epochs", "2", cwd=elsewhere, timeout=300)
    assert again.returncode == 0, again.stderr
    events = read_events(run_dir)
    first_end = of(events, "end_training_session")[0].seq  # the first session's: what follows is the second's
    ready = sorted(e.data["plugin"] for e in of(events, "plugin_ready") if e.seq > first_end)
    assert ready == ["argument", "checkpoint", "program"], (again.stderr, ready)
    assert not [e for e in events if e.type in ("plugin_crashed", "plugin_failed")], again.stderr


@pytest.mark.parametrize("mistake, edit, said", [
    ("a reply type misspelt", ('replies=["stop"]', 'replies=["stop", "checkpoint"]'),
     "its hello was dropped as malformed: hello.replies may hold only"),
    ("a wrong secret", ("secret=secret)", 'secret="0" * 64)'), "its hello was refused: wrong secret"),
])
def test_a_spawned_plugin_whose_hello_the_kernel_did_not_take_is_said_with_why(short_runs, tmp_path, capsys,
                                                                              mistake, edit, said):  # noqa: F811
    """A plugin written from PROTOCOL.md whose hello held a mistake (a reply type misspelt, `checkpoint` for
    `checkpoint_now`) was told nothing (a malformed message is not answered, §11), and `trainbus run` said it
    `never said hello, so it took no event ... a command plugin speaks proto/PROTOCOL.md`: its author, who had sent
    one, had only kernel.log's first 10 malformed messages, not tied to any plugin, to find out why. The run's summary
    now says why the hello was not taken, malformed (the field, as kernel.log says it) or refused (the reason)."""
    from trainbus.kernel.cli_run_summary import print_summary

    script = example(tmp_path)
    text = script.read_text()
    assert edit[0] in text
    script.write_text(text.replace(edit[0], edit[1]))
    plugin = PluginConfig("raw_example", "", {}, [sys.executable, str(script)])
    result = run_training(run_config(short_runs, [plugin], epochs=1, target=PACED, batch_size=256,
                                     step_sleep_s=0.0, ready_timeout_s=3))
    entry = result.plugins["raw_example"]
    assert entry["greeted"] is False and said in entry.get("hello_trouble", ""), entry
    print_summary(result)
    lines = [line for line in capsys.readouterr().out.splitlines() if "never said" in line]
    assert len(lines) == 1 and said in lines[0] and "a command plugin speaks proto/PROTOCOL.md" in lines[0], lines
    shown = cli("runs", "show", result.run_dir)
    assert shown.returncode == 0 and "never said a hello the kernel took: " + said in " ".join(shown.stdout.split()), \
        shown.stdout


def test_a_plugin_started_by_a_launcher_that_forks_it_is_told_to_exec_it(short_runs, tmp_path):  # noqa: F811
    """A command plugin run through a launcher that starts it as a child (`sh -c "python raw_example.py; ..."`,
    `cargo run`, `npm start`) says hello with a pid the kernel did not start: refused `hello_pid`, whose reason said
    only `pid N is not the process the kernel started`, and not the fix PROTOCOL.md §7.1 gives (exec the plugin)."""
    launcher = ["sh", "-c", f"{sys.executable} {example(tmp_path)}; true"]  # `; true`: sh must fork, not exec
    result = run_training(run_config(short_runs, [PluginConfig("raw_example", "", {}, launcher)], epochs=1,
                                     target=PACED, batch_size=256, step_sleep_s=0.0, ready_timeout_s=3))
    trouble = result.plugins["raw_example"].get("hello_trouble", "")
    said = (r"its hello was refused: pid \d+ is not the process the kernel started; a launcher \(a shell script, "
            r"`cargo run`, `npm start`\) must exec the plugin, not start it as its child")
    assert re.fullmatch(said, trouble), result.plugins


def test_a_command_plugin_that_exits_before_its_hello_is_said_with_the_last_line_it_wrote(short_runs,  # noqa: F811
                                                                                         tmp_path):
    """A command plugin whose program failed at once (its script missing: `python3 monitor.py` from the wrong
    directory) crashed as `exit code 2`, and only plugins/NAME.log said why: the reason is read from a Python
    traceback only, and a program in another language, or Python's own refusal, writes none. A command plugin that
    exits with an error before its hello now has its log's last line in its crash, named as such."""
    missing = tmp_path / "nowhere" / "monitor.py"
    plugin = PluginConfig("gone", "", {}, [sys.executable, str(missing)])
    result = run_training(run_config(short_runs, [plugin], epochs=1, target=PACED, batch_size=256,
                                     step_sleep_s=0.0, ready_timeout_s=3))
    crashes = result.plugins["gone"]["crashes"]
    assert crashes and crashes[0].startswith("exit code 2; its log's last line: ") and "can't open file" in crashes[0] \
        and str(missing) in crashes[0], result.plugins["gone"]


def test_a_run_whose_temp_dir_holds_a_space_still_names_its_sockets_in_a_line_the_pattern_reads(
        tmp_path, monkeypatch):
    """[C111] A run directory too long for a socket path, or holding a space, has its sockets in the temp dir; one
    whose $TMPDIR held a space too (`/Users/Jo Doe/tmp`) had them there, and kernel.log's line named them with the
    space: §2's pattern (`\\S+` an endpoint) matched no line, so no client attached by hand found the run."""
    spaced_temp = Path(tempfile.mkdtemp(prefix="tb temp-", dir="/tmp"))  # short: the socket paths fit under it
    monkeypatch.setattr(tempfile, "tempdir", str(spaced_temp))  # what $TMPDIR sets
    run_dir = tmp_path / "my runs" / "20260101-000000-abcdef"
    run_dir.mkdir(parents=True)
    sockets = socket_dir(run_dir)
    try:
        line = (f"2026-01-01 00:00:00,000 INFO trainbus.kernel: sockets: events ipc://{sockets}/events.sock "
                f"control ipc://{sockets}/control.sock bursts ipc://{sockets}/bursts.sock")
        assert re.fullmatch(SOCKETS_LINE, line), line
        assert len(str(sockets / "control.sock").encode()) < 100  # still a path a Unix socket takes
    finally:
        remove_scratch_dir(sockets)
        shutil.rmtree(spaced_temp, ignore_errors=True)
