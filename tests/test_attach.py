"""`trainbus attach` against real runs: the dashboard in tmux, JSON lines mid-run, an ended run, a stop sent.

Runs are real kernels in their own processes (tests/kernel_process.py) training the digits demo slowly
enough to attach mid-run (tests/fixture_targets.py); the client is the installed `trainbus` command. Waits
are bounded polls with margins for a busy 2-core machine; nothing asserts a wall-clock gap.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.plugin_names import resolve_plugin
from trainbus.proto import event_to_map, events as ev, pack
from trainbus.proto.codec import unpack
from trainbus.proto.journal_format import read_journal
from trainbus.proto.messages import HEARTBEAT_LIVENESS, Event
from trainbus.proto.run_state import HISTORY_POINTS, MAX_PLUGINS, MAX_SERIES, RunState

from conftest import TESTS_DIR, sigint_as_from_a_terminal, trainbus_cmd
from fixture_targets import open_gate
from kernel_process import KernelProcess, wait_until
from test_trust import Intruder, attach_credential, short_runs, wait_sockets  # noqa: F401

SLOW = f"{TESTS_DIR / 'fixture_targets.py'}:digits_slowly"  # 45 batches an epoch, each batch_s late
GATED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"  # the same, held where a gate file says (open_gate)
STEPS_PER_EPOCH = 45
SCREEN_TIMEOUT_S = 90.0  # a busy machine: the dashboard's start (a Python process, rich) can take tens of seconds


def live_run(runs_dir, tmp_path, kernels, epochs: int, batch_s: float, monitors: bool = True,
             gate: Path | None = None) -> KernelProcess:
    """A kernel training SLOW with the cpu and memory monitors sampling every 0.5 s; GATED by `gate` if given:
    it trains only as far as the test lets it, so it outlasts a slow start without a long fixed run."""
    plugins = [resolve_plugin(name, {"interval_s": 0.5}) for name in ("cpu", "memory")] if monitors else []
    target, hyperparameters = SLOW, {"batch_s": batch_s}
    if gate is not None:
        target, hyperparameters = GATED, {"step_sleep_s": batch_s, "gate": str(gate)}
    cfg = RunConfig(target=target, epochs=epochs, runs_dir=str(runs_dir), hyperparameters=hyperparameters,
                    plugins=plugins)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    return kernel


def attach_cmd(kernel: KernelProcess, *flags: str) -> list[str]:
    return [*trainbus_cmd(), "attach", kernel.run_id, "--runs-dir", str(kernel.run_dir.parent), *flags]


def as_json(event: Event) -> dict:
    return json.loads(json.dumps(event_to_map(event)))


# -- (1) the dashboard, read off a terminal ----------------------------------------------------------

@pytest.fixture
def tmux():
    """capture(), and start(command) in a detached tmux session on a server of its own; killed at teardown."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = f"trainbus-test-{secrets.token_hex(4)}"

    class Tmux:
        def start(self, command: str) -> None:
            # the pane's size is the terminal's: COLUMNS/LINES from the test's environment (pytest-xdist's
            # workers have them) would make rich draw for another size
            env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
            subprocess.run(["tmux", "-L", server, "new-session", "-d", "-x", "200", "-y", "60", command],
                           check=True, timeout=30, env=env)

        def keys(self, *keys: str) -> None:
            subprocess.run(["tmux", "-L", server, "send-keys", *keys], check=True, timeout=30)

        def capture(self) -> str:
            proc = subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-J"], capture_output=True,
                                  text=True, timeout=30)
            return proc.stdout

    yield Tmux()
    subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True, timeout=30)


def screen_step(screen: str) -> int | None:
    found = re.findall(r"step (\d+)\s+\S+ steps/s", screen)
    return int(found[-1]) if found else None


def test_dashboard_shows_a_live_run_and_then_that_it_ended(runs_dir, tmp_path, kernels, tmux):
    gate = tmp_path / "gate"  # epoch 1, then the run waits for the dashboard to show it
    open_gate(gate, STEPS_PER_EPOCH)
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=2, batch_s=0.05, gate=gate)
    kernel.wait_ready("memory", timeout_s=60)
    kernel.wait_step(2, timeout_s=60)
    command = " ".join(attach_cmd(kernel, "--control"))
    tmux.start(f"{command}; echo ATTACH-EXIT=$?; sleep 300")
    attached = time.monotonic()

    def everything_shown():
        screen = tmux.capture()
        wanted = [f"run {kernel.run_id}", "paced_digits", "device", "cpu", "progress", "loss",
                  "memory/", "cpu/", "plugins", "running"]
        return screen if all(w in screen for w in wanted) and screen_step(screen) is not None else None

    screen = wait_until(everything_shown, SCREEN_TIMEOUT_S, "the dashboard's progress, metrics and plugin rows",
                        poll_s=0.2)
    print(f"dashboard complete {time.monotonic() - attached:.1f} s after attaching")
    assert re.search(r"epoch \d/2\s+batch \d+/45", screen), screen
    assert re.search(r"^\s*memory\s+running", screen, re.M) and re.search(r"^\s*cpu\s+running", screen, re.M), screen
    first_step = screen_step(screen)
    open_gate(gate, 2 * STEPS_PER_EPOCH - 1)  # on to the last batch, where the run waits for the checkpoint_now
    wait_until(lambda: (screen_step(tmux.capture()) or 0) > first_step, SCREEN_TIMEOUT_S, "the step to move on screen",
               poll_s=0.2)

    # --control: c asks, y confirms; the kernel journals the command under the client's name
    tmux.keys("c")
    wait_until(lambda: "checkpoint_now? y to confirm" in tmux.capture(), SCREEN_TIMEOUT_S, "the confirmation",
               poll_s=0.2)
    tmux.keys("y")
    asked = kernel.wait_event(ev.LOG, lambda e: e.data["plugin"].startswith("attach-")
                              and "checkpoint_now requested" in e.data["text"], timeout_s=SCREEN_TIMEOUT_S)
    wait_until(lambda: f"sent checkpoint_now as {asked.data['plugin']}" in tmux.capture(), SCREEN_TIMEOUT_S,
               "the dashboard to say it was sent", poll_s=0.2)

    open_gate(gate, 2 * STEPS_PER_EPOCH)
    kernel.result(timeout_s=120)
    screen = wait_until(lambda: "ATTACH-EXIT=" in tmux.capture() and tmux.capture(), SCREEN_TIMEOUT_S,
                        "attach to exit after the run ended", poll_s=0.2)
    assert "run ended: completed" in screen, screen
    assert "ATTACH-EXIT=0" in screen, screen
    assert "q quit" not in screen, "the last frame offers keys that nothing reads any more: " + screen
    assert "epoch 2/2" in screen, screen


# -- (2) JSON lines attached mid-run: the snapshot, then every later event, equal to the journal's ---------

def test_json_lines_mid_run_have_no_gap_after_the_snapshot_and_equal_the_journal(runs_dir, tmp_path, kernels):
    gate = tmp_path / "gate"  # the run waits at step 20 until attach has written its snapshot
    open_gate(gate, 20)
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=2, batch_s=0.0, gate=gate)
    kernel.wait_step(10, timeout_s=60)
    out, err = tmp_path / "attach.jsonl", tmp_path / "attach.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=stdout, stderr=stderr, text=True)
    try:
        wait_until(lambda: out.read_text().count("\n") >= 1 or proc.poll() is not None, 60, "attach's snapshot")
        open_gate(gate, 2 * STEPS_PER_EPOCH)
        proc.wait(timeout=180)
    finally:
        open_gate(gate, 2 * STEPS_PER_EPOCH)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()
    kernel.result(timeout_s=120)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    snapshot, events = lines[0], lines[1:]
    assert snapshot["type"] == "snapshot", f"attached after the run ended: {snapshot}"
    assert snapshot["run"] == kernel.run_id
    seq = snapshot["seq"]
    assert seq > 1 and snapshot["state"]["progress"]["step"] >= 10, "attached mid-run"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seq + 1, seq + 1 + len(seqs))), "strictly increasing, no gap after the snapshot"
    assert events[-1]["type"] == ev.BUS_CLOSING, "on to the kernel's last event, past the final one"
    journal = {e.seq: e for e in read_journal(kernel.run_dir)}
    assert events == [as_json(journal[s]) for s in seqs], "the events are the journal's"
    assert seqs[-1] == max(journal), "every event of the journal after the snapshot's seq"
    ended = [e["type"] for e in events].index(ev.END_TRAINING_SESSION)
    assert ev.PLUGIN_EXITED in [e["type"] for e in events[ended:]], "the plugins' exits, after the final event"

    # Clone: the snapshot plus the events after it is the state the journal folds to
    cloned = RunState.from_map(seq, snapshot["state"])
    for e in events:
        cloned.fold(journal[e["seq"]])
    whole = RunState(kernel.run_id)
    for s in sorted(journal):
        if s <= seqs[-1]:
            whole.fold(journal[s])
    for part in ("progress", "series", "stop_reasons", "ended"):
        assert cloned.to_map()[part] == whole.to_map()[part], part


def test_json_lines_of_a_diverged_run_are_strict_json_with_null_for_nan(runs_dir, tmp_path, kernels):
    """A NaN loss was printed as NaN, which no JSON parser but Python's reads (jq made it null without a word)."""
    gate = tmp_path / "gate"
    open_gate(gate, 5)
    cfg = RunConfig(target=GATED, epochs=1, runs_dir=str(runs_dir), plugins=[], hyperparameters={
        "step_sleep_s": 0.0, "gate": str(gate), "diverged": True})
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(5, timeout_s=60)
    out = tmp_path / "attach.jsonl"
    with open(out, "w") as stdout:
        proc = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: out.read_text().count("\n") >= 1 or proc.poll() is not None, 60, "attach's snapshot")
        open_gate(gate, STEPS_PER_EPOCH)
        _, err = proc.communicate(timeout=180)
    finally:
        open_gate(gate, STEPS_PER_EPOCH)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err

    def refuse(constant: str):
        raise AssertionError(f"{constant} in attach --json: not JSON")
    lines = [json.loads(line, parse_constant=refuse) for line in out.read_text().splitlines()]
    batches = [e for e in lines if e["type"] == ev.END_TRAINING_BATCH and "loss" in e["data"]]
    assert batches and all(e["data"]["loss"] is None for e in batches), batches[:2]
    [end] = [e for e in lines if e["type"] == ev.END_TRAINING_SESSION]
    assert end["data"]["training_loss"] is None, end


def test_the_snapshot_handed_out_is_the_state_as_of_its_seq_not_with_the_events_buffered_meanwhile():
    """Live events that came before the snapshot's answer are folded into the client's state at once; the snapshot
    item must not show them (it did: `--json` printed a snapshot seq past its first event's, under load)."""
    from trainbus.sdk.attach import Attachment

    kernel_state = RunState("r")
    for seq, type_ in enumerate(["start_training_session", "start_epoch", "start_training_loop"], start=1):
        kernel_state.fold(Event(seq=seq, run="r", type=type_, ts=1.0, step=0, epoch=1))
    later = Event(seq=4, run="r", type="end_training_batch", ts=2.0, step=1, epoch=1, data={"loss": 0.5})
    client = Attachment(target=None)
    client._on_live(later)  # arrived before the answer to our snapshot: buffered
    client._on_run_state({"seq": 3, "state": kernel_state.to_map()})
    (kind, snapshot), (kind2, event) = client._ready
    assert (kind, snapshot.seq, snapshot.progress["step"]) == ("snapshot", 3, 0)
    assert (kind2, event.seq) == ("event", 4) and client.state.seq == 4 and client.next_seq == 5


@pytest.mark.slow  # a 5 s stall and the reconnect backoff (~20 s): run with -m slow
def test_json_lines_go_on_without_a_gap_after_the_kernel_stalled_and_came_back(runs_dir, tmp_path, kernels):
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=5, batch_s=0.05, monitors=False)
    kernel.wait_step(5, timeout_s=60)
    out, err = tmp_path / "attach.jsonl", tmp_path / "attach.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=stdout, stderr=stderr, text=True)
        try:
            wait_until(lambda: out.read_text().count("\n") >= 2 or proc.poll() is not None, 60, "attach's first lines")
            assert ev.END_TRAINING_SESSION not in out.read_text(), "the run must outlast the attach's start"
            kernel.signal(signal.SIGSTOP)  # heartbeats stop: the client takes the kernel for gone
            time.sleep(HEARTBEAT_LIVENESS * 1.0 + 2.0)
            kernel.signal(signal.SIGCONT)
            proc.wait(timeout=180)
        finally:
            kernel.signal(signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert "reconnecting" in stderr
    kernel.result(timeout_s=120)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    seqs = [e["seq"] for e in lines[1:]]
    assert seqs == list(range(lines[0]["seq"] + 1, lines[0]["seq"] + 1 + len(seqs)))
    assert lines[-1]["type"] == ev.BUS_CLOSING
    journal = {e.seq: e for e in read_journal(kernel.run_dir)}
    assert lines[1:] == [as_json(journal[s]) for s in seqs] and seqs[-1] == max(journal)


# -- (3) an ended run is told at once; a stop from the terminal is journaled with who sent it -------------

def run_quickly(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The command's result; it must not have waited for a kernel (a client waits 30 s for a first heartbeat)."""
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    assert time.monotonic() - started < 20, f"{command} took {time.monotonic() - started:.0f} s"
    return proc


@pytest.mark.parametrize("args, said", [
    (["x", "--stop", "a", "--checkpoint", "b"], "error: --stop and --checkpoint are ways of attaching: give one"),
    (["x", "--json", "--control"], "error: --json and --control are ways of attaching: give one"),
    (["ipc:///no/such/events.sock"], "error: no socket /no/such/events.sock: is the run still running?"),
    (["tcp://127.0.0.1:1,tcp://127.0.0.1:2"], "error: tcp://127.0.0.1:1,tcp://127.0.0.1:2: a kernel's TCP endpoint takes CURVE keys"),
], ids=["two commands", "json and control", "no such socket", "tcp without a key"])
def test_an_attach_that_cannot_work_says_why_at_once(args, said):
    """Each waited minutes for a kernel (reconnecting 8 times), or dropped all flags but one without a word."""
    proc = run_quickly([*trainbus_cmd(), "attach", *args])
    assert proc.returncode == 2 and proc.stderr.startswith(said) and proc.stderr.count("\n") == 1, proc.stderr


def test_a_dashboard_off_a_terminal_that_cannot_attach_leaves_its_error_on_a_line_of_its_own(tmp_path):
    """With stdout not a terminal the dashboard is drawn once, at the run's end: yet its `attaching to ...`
    placeholder was written there, with no newline, when the attach failed. `trainbus attach HOST:PORT ... 2>&1`
    then read `attaching to tcp://...:PORT ...error: nothing accepts connections ...`, the one error line glued to it.
    A port where nothing listens (free_port's pick) is refused for 5 s before the client gives up."""
    import zmq.auth

    from helpers import free_port

    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, _ = zmq.auth.create_certificates(keys, "server")
    _, client_secret = zmq.auth.create_certificates(keys, "me")
    os.chmod(client_secret, 0o600)
    where = f"127.0.0.1:{free_port()}"
    proc = subprocess.run([*trainbus_cmd(), "attach", where, "--key", str(client_secret), "--server-key",
                           str(server_public)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"error: nothing accepts connections at tcp://{where}" in proc.stderr, proc.stderr
    assert proc.stdout == "", "no frame was drawn: nothing was attached to"


def test_a_dashboard_off_a_terminal_draws_the_runs_end_once_as_whole_lines(runs_dir, tmp_path, kernels):
    """`trainbus attach RUN > dashboard.txt`: the frame drawn at the run's end lacked its last newline (rich draws
    a live display's end so only on a terminal), so the file's last line was cut and what came next joined it."""
    gate = tmp_path / "gate"  # the run waits at step 5 until the dashboard has said hello
    open_gate(gate, 5)
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=1, batch_s=0.0, monitors=False, gate=gate)
    kernel.wait_step(3, timeout_s=60)
    proc = subprocess.Popen(attach_cmd(kernel), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(e.type == ev.PLUGIN_READY and e.data["plugin"].startswith("attach-")
                               for e in read_journal(kernel.run_dir)) or proc.poll() is not None, 90,
                   "the dashboard's hello")
        open_gate(gate, STEPS_PER_EPOCH)
        out, err = proc.communicate(timeout=120)
    finally:
        open_gate(gate, STEPS_PER_EPOCH)
        proc.kill()
    assert proc.returncode == 0, err
    assert "run ended: completed" in out and out.endswith("\n"), repr(out[-200:])


def test_a_connection_file_missing_a_field_names_it(tmp_path):
    """A connection.json cut short or written by hand without its run: the line said only `is unreadable ('run')`,
    the bare repr of a KeyError; a file that holds no JSON object said `('str' object is not subscriptable)`."""
    connection = tmp_path / "connection.json"
    for content, said in ((json.dumps({"control": "tcp://127.0.0.1:1", "events": "tcp://127.0.0.1:2"}),
                           "holds no 'run'"),
                          ('"tcp://127.0.0.1:1"', "is not a JSON object of the run's endpoints")):
        connection.write_text(content)
        proc = run_quickly([*trainbus_cmd(), "attach", str(connection), "--key", str(tmp_path / "me.key_secret")])
        assert proc.returncode == 2 and proc.stderr == (
            f"error: connection file {connection} {said}; copy the run's connection.json again\n"), proc.stderr


def test_a_connection_file_renamed_is_read_as_one_not_as_host_port(tmp_path):
    """A connection.json copied under another name (`scp host:run/connection.json lab-run`) was read as HOST:PORT,
    and so was any file given: "'lab-run' is not HOST:PORT (...)", not what is wrong with the file."""
    for name, content, said in (("lab-run", json.dumps({"control": "tcp://127.0.0.1:1"}), "holds no 'run'"),
                                ("notes.txt", "hello", "is unreadable (Expecting value: line 1 column 1 (char 0))")):
        (tmp_path / name).write_text(content)
        proc = run_quickly([*trainbus_cmd(), "attach", str(tmp_path / name), "--key", str(tmp_path / "k")])
        assert proc.returncode == 2 and proc.stderr == (
            f"error: connection file {tmp_path / name} {said}; copy the run's connection.json again\n"), proc.stderr


def test_a_connection_file_whose_server_key_is_damaged_is_one_line(tmp_path):
    """A truncated copy of connection.json: libzmq refused the key with a traceback of our frames."""
    connection = tmp_path / "connection.json"
    connection.write_text(json.dumps({"run": "r", "control": "tcp://127.0.0.1:1", "events": "tcp://127.0.0.1:2",
                                      "server_key": "abc"}))
    proc = run_quickly([*trainbus_cmd(), "attach", str(connection), "--key", str(tmp_path / "me.key_secret")])
    assert proc.returncode == 2 and proc.stderr == (
        f"error: connection file {connection}: its server_key is not a CURVE public key (40 characters of z85); "
        f"copy the run's connection.json again\n"), proc.stderr


def test_attach_finds_the_kernels_bursts_socket_from_every_form_of_where(tmp_path):
    """Every form of WHERE names the bursts socket beside the events one (PROTOCOL.md §4), where the kernel has
    one; where it has none (an older kernel), attach takes the events socket as before."""
    import zmq.auth

    from trainbus.sdk.attach import TargetError, target_of

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("events.sock", "control.sock"):
        (run_dir / name).touch()
    events = f"ipc://{run_dir / 'events.sock'}"
    assert target_of(str(run_dir)).bursts == "" and target_of(events).bursts == ""
    (run_dir / "bursts.sock").touch()
    bursts = f"ipc://{run_dir / 'bursts.sock'}"
    assert target_of(str(run_dir)).bursts == bursts and target_of(events).bursts == bursts
    assert target_of(f"{events},ipc://{run_dir / 'control.sock'}").bursts == bursts

    deep = tmp_path / "deep"  # sockets elsewhere, named by kernel.log
    deep.mkdir()
    elsewhere = tmp_path / "s"
    elsewhere.mkdir()
    for name in ("events.sock", "control.sock", "bursts.sock"):
        (elsewhere / name).touch()
    line = (f"2026-01-01 00:00:00,000 INFO trainbus.kernel: sockets: events ipc://{elsewhere}/events.sock "
            f"control ipc://{elsewhere}/control.sock")
    (deep / "kernel.log").write_text(f"{line}\n")
    assert target_of(str(deep)).bursts == ""
    (deep / "kernel.log").write_text(f"{line} bursts ipc://{elsewhere}/bursts.sock\n")
    found = target_of(str(deep))
    assert (found.events, found.control, found.bursts) == tuple(f"ipc://{elsewhere}/{name}.sock"
                                                                for name in ("events", "control", "bursts"))
    (elsewhere / "events.sock").unlink()  # the sockets kernel.log names are gone: said, not connected to for minutes
    with pytest.raises(TargetError, match=f"no socket {elsewhere}/events.sock: is the run still running"):
        target_of(str(deep))

    keys = tmp_path / "keys"
    keys.mkdir()
    server_public, _ = zmq.auth.create_certificates(keys, "server")
    _, client_secret = zmq.auth.create_certificates(keys, "me")
    os.chmod(client_secret, 0o600)
    remote = target_of("127.0.0.1:5555", key=client_secret, server_key=server_public)
    assert (remote.control, remote.events, remote.bursts) == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556",
                                                              "tcp://127.0.0.1:5557")
    connection = tmp_path / "connection.json"
    info = {"run": "r", "control": "tcp://h:7000", "events": "tcp://h:7001",
            "server_key": zmq.auth.load_certificate(server_public)[0].decode()}
    connection.write_text(json.dumps(info))
    assert target_of(str(connection), key=client_secret).bursts == ""  # an older kernel's file
    connection.write_text(json.dumps({**info, "bursts": "tcp://h:7002"}))
    assert target_of(str(connection), key=client_secret).bursts == "tcp://h:7002"


def test_a_continued_runs_kernel_not_yet_bound_is_said_to_be_starting_not_to_be_killed(tmp_path):
    """PROTOCOL.md 2: a continued run's new kernel writes kernel.pid, then binds and says its sockets in kernel.log;
    in between, the last sockets line is the previous kernel's, whose socket files under the temp dir are gone. That
    is a kernel starting: said so, not taken for a live kernel whose sockets were removed (which `kill -TERM`
    stops)."""
    from trainbus.sdk.attach import AttachError, TargetError, target_of

    run_dir = tmp_path / "deep"
    run_dir.mkdir()
    gone = tmp_path / "gone"  # the previous kernel's socket directory, removed as it ended
    said = "2026-01-01 00:00:00"
    (run_dir / "kernel.log").write_text(f"{said},000 INFO trainbus.kernel: sockets: events ipc://{gone}/events.sock "
                                        f"control ipc://{gone}/control.sock bursts ipc://{gone}/bursts.sock\n")
    (run_dir / "kernel.pid").write_text(f"{os.getpid()}\n")  # this process stands for the new kernel: alive
    said_s = time.mktime(time.strptime(said, "%Y-%m-%d %H:%M:%S"))
    os.utime(run_dir / "kernel.pid", (said_s + 60, said_s + 60))  # written a minute after the line: a later kernel
    with pytest.raises(AttachError, match="is starting and has not said where its sockets are yet") as caught:
        target_of(str(run_dir))
    assert "kill" not in str(caught.value)
    os.utime(run_dir / "kernel.pid", (said_s - 60, said_s - 60))  # the line's own kernel: its sockets were removed
    with pytest.raises(TargetError, match="its socket files were removed"):
        target_of(str(run_dir))


def test_an_attachment_takes_its_events_from_the_bursts_socket(runs_dir, tmp_path, kernels):
    """What the kernel sends a monitor is one message a flush, not one an event (docs/benchmarks.md): the client's
    SUB is on bursts.sock, and what comes through it is every event in order after the snapshot."""
    import zmq

    from trainbus.sdk.attach import Attachment, target_of

    kernel = live_run(runs_dir, tmp_path, kernels, epochs=1, batch_s=0.02, monitors=False)
    kernel.wait_step(3, timeout_s=60)
    target = target_of(str(kernel.run_dir))
    assert target.bursts.endswith("/bursts.sock"), target  # in the run directory, or where kernel.log says
    attachment = Attachment(target)
    seqs, end = [], time.monotonic() + 60
    for item in attachment:
        if item is not None and item[0] == "snapshot":
            seqs.append(item[1].seq)
            assert attachment._io.sub.getsockopt_string(zmq.LAST_ENDPOINT) == target.bursts
        elif item is not None:
            seqs.append(item[1].seq)
        if len(seqs) > 40 or time.monotonic() > end:
            break
    attachment.close()
    assert len(seqs) > 40 and seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def test_attach_to_an_ended_run_says_so_at_once(runs_dir, tmp_path, kernels):
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=1, batch_s=0.0, monitors=False)
    kernel.result(timeout_s=120)
    proc = run_quickly(attach_cmd(kernel))
    assert proc.returncode == 0, proc.stderr
    assert f"run {kernel.run_id}: completed" in proc.stdout
    proc = run_quickly(attach_cmd(kernel, "--json"))
    assert json.loads(proc.stdout)["status"] == "completed"
    proc = run_quickly(attach_cmd(kernel, "--stop", "too late"))
    assert proc.returncode == 1, "a command that reached nothing fails"
    assert proc.stderr == f"error: run {kernel.run_id} has ended (completed): there is no run to stop\n", proc.stderr
    proc = run_quickly(attach_cmd(kernel, "--control"))  # its stdin is not a terminal to read keys from
    assert proc.returncode == 2 and proc.stderr == ("error: --control reads its keys from a terminal, and stdin is "
                                                    "not one: from a script, use --stop REASON or --checkpoint "
                                                    "REASON\n"), proc.stderr
    # --server-key without --key (it pins a remote kernel's key) was dropped without a word for a run of this host
    proc = run_quickly(attach_cmd(kernel, "--server-key", str(tmp_path / "server.key")))
    assert proc.returncode == 2 and proc.stderr == ("error: --server-key pins a remote kernel's key and goes with "
                                                    "--key: give --key too for a remote kernel's HOST:PORT or "
                                                    "connection.json, or leave --server-key out for a run of this "
                                                    "host\n"), proc.stderr
    # the endpoint form, and a plugin attached by hand, are told too
    endpoint = f"ipc://{kernel.run_dir / 'events.sock'}"
    proc = run_quickly([*trainbus_cmd(), "attach", endpoint])
    assert proc.returncode == 0 and "has ended: completed" in proc.stdout, proc.stdout + proc.stderr
    proc = run_quickly([*trainbus_cmd(), "attach", endpoint, "--checkpoint", "too late"])
    assert proc.returncode == 1 and proc.stderr == (f"error: run {kernel.run_id} has ended (completed): there is no "
                                                    f"run to checkpoint\n"), proc.stderr
    env = {**os.environ, "TRAINBUS_EVENTS": endpoint, "TRAINBUS_CONTROL": endpoint.replace("events", "control"),
           "TRAINBUS_RUN_DIR": str(kernel.run_dir)}
    env.pop("TRAINBUS_KERNEL_PID", None)
    proc = run_quickly([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Recorder"], env=env)
    assert proc.returncode == 0 and "has ended (completed)" in proc.stderr, proc.stderr
    alone = {k: v for k, v in env.items() if k not in ("TRAINBUS_EVENTS", "TRAINBUS_CONTROL")}  # the run directory
    proc = run_quickly([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Recorder"], env=alone)
    assert proc.returncode == 0 and "has ended (completed)" in proc.stderr, proc.stderr
    # a mistake in its settings is said first, ended run or not
    proc = run_quickly([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:Recorder", "--set", "nosuch=1"],
                       env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "nosuch" in proc.stderr, proc.stderr


def test_an_attached_client_killed_without_a_bye_is_said_gone_not_left_running(runs_dir, tmp_path, kernels):
    """attach killed with SIGKILL (no bye): after twice the liveness window of silence the kernel forgets it and
    journals plugin_hung under its name, so the dashboard, `runs show` and the run's plugin table do not show a
    vanished client as running. The run goes on."""
    gate = tmp_path / "gate"
    open_gate(gate, 2)
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=2, batch_s=0.0, monitors=False, gate=gate)
    kernel.wait_step(2, timeout_s=120)
    # SIGTERM (`timeout`, a shell's kill) is not that: the client says bye and exits 143, and it is gone at once
    polite = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        ready = kernel.wait_event("plugin_ready", lambda e: e.data["plugin"].startswith("attach-"), timeout_s=60)
        polite.terminate()
        assert polite.wait(timeout=60) == 143, polite.stderr.read()
    finally:
        polite.kill()
    exited = kernel.wait_event("plugin_exited", lambda e: e.data["plugin"] == ready.data["plugin"], timeout_s=60,
                               after_seq=ready.seq)
    client = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = kernel.wait_event("plugin_ready", lambda e: e.data["plugin"].startswith("attach-"), timeout_s=60,
                                  after_seq=exited.seq)
    finally:
        client.kill()
        client.wait()
    name = ready.data["plugin"]
    hung = kernel.wait_event("plugin_hung", lambda e: e.data["plugin"] == name, timeout_s=60, after_seq=ready.seq)
    assert "without a bye" in hung.data["reason"], hung.data
    state = RunState()
    for event in kernel.journal.poll():
        state.fold(event)
    assert state.plugins[name]["state"] == "hung", state.plugins[name]
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=120)["status"] == "completed"


def test_attaching_after_the_final_event_while_plugins_drain_streams_the_drain_to_bus_closing(runs_dir, tmp_path,
                                                                                             kernels):
    """The kernel lives on while a durable plugin drains: the snapshot holds the end, and what follows it (the
    plugin's exit) comes on to bus_closing. (Attach once waited for the final event, at or before the snapshot's
    seq, that never came; then it ended at the snapshot, without the drain.)"""
    release = tmp_path / "release"
    cfg = RunConfig(target=SLOW, epochs=1, runs_dir=str(runs_dir), hyperparameters={"batch_s": 0.0},
                    plugins=[PluginConfig("drainer", "fixture_plugins:HeldAtTheEnd", {"release": str(release)})],
                    drain_timeout_s=120)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_ready("drainer", timeout_s=120)
    wait_until(lambda: any(e.type == ev.END_TRAINING_SESSION for e in read_journal(kernel.run_dir)), 120, "the end")
    out, err = tmp_path / "attach.jsonl", tmp_path / "attach.stderr"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=stdout, stderr=stderr, text=True)
    try:
        wait_until(lambda: out.read_text().count("\n") >= 1 or proc.poll() is not None, 60, "attach's snapshot")
        assert not (kernel.run_dir / "summary.json").exists()  # the kernel was still there, waiting for its plugin
        release.touch()
        proc.wait(timeout=180)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()
    assert kernel.result(timeout_s=120)["status"] == "completed"
    snapshot, *events = [json.loads(line) for line in out.read_text().splitlines()]
    assert snapshot["type"] == "snapshot" and snapshot["state"]["ended"]["type"] == ev.END_TRAINING_SESSION, snapshot
    journal = {e.seq: e for e in read_journal(kernel.run_dir)}
    assert events == [as_json(journal[s]) for s in range(snapshot["seq"] + 1, max(journal) + 1)], events
    assert [e["data"].get("plugin") for e in events if e["type"] == ev.PLUGIN_EXITED] == ["drainer"], events
    assert events[-1]["type"] == ev.BUS_CLOSING


def test_stop_from_attach_is_journaled_with_who_sent_it(runs_dir, tmp_path, kernels):
    # gated: the run steps on only while a command waits for its step boundary, so however slowly the attaches
    # start it cannot end before them (three ungated epochs once did, on a busy box)
    gate = tmp_path / "gate"
    open_gate(gate, 3)
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=3, batch_s=0.05, gate=gate)
    kernel.wait_step(3, timeout_s=60)

    def stepped_until_done(command: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            step = kernel.journal.step()
            while proc.poll() is None and step < 3 * 45:  # one step at a time, each a boundary it may land at
                step += 1
                open_gate(gate, step)
                wait_until(lambda: proc.poll() is not None or kernel.journal.step() >= step, 60, f"step {step}")
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    # a checkpoint with no checkpoint plugin: what the step boundary made of it, not "sent" (exit 0) as before
    skipped = stepped_until_done(attach_cmd(kernel, "--checkpoint", "before it stops"))
    assert skipped.returncode == 1 and skipped.stderr.startswith("error: checkpoint_now reached run "), skipped.stderr
    # a live run's fix is to attach one, not to start the run again with --plugins (as the line used to say)
    assert ("was skipped: no checkpoint plugin is attached (`trainbus plugins attach RUN checkpoint` on the run's "
            "host adds one to the live run; `--plugins checkpoint` to a run at its start)") in skipped.stderr
    # an empty reason is a stop all the same (it was taken for no command: the dashboard, never ending)
    proc = stepped_until_done(attach_cmd(kernel, "--stop", ""))
    assert proc.returncode == 0, proc.stderr
    open_gate(gate, 3 * 45)  # the kernel has the stop (it exits 0 once so): it lands at the next boundary
    name = re.search(r"as (attach-\S+)", proc.stdout).group(1)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "stopped"
    journal = list(read_journal(kernel.run_dir))
    logs = [e for e in journal if e.type == ev.LOG and e.data["plugin"] == name]
    assert logs and "stop requested with trainbus attach" in logs[0].data["text"]
    stops = [e for e in journal if e.type == ev.STOP_REQUESTED]
    assert stops and f"{name}: stop: " in stops[0].data["reasons"]
    # it says where its request was journaled: its own log line's seq, or stop_requested's if that came first
    said = int(re.search(r"journaled at seq (\d+)", proc.stdout).group(1))
    assert said in (logs[0].seq, stops[0].seq), proc.stdout
    # it said goodbye: the run shows it as exited, not as a plugin still running
    exits = [e for e in journal if e.type == ev.PLUGIN_EXITED and e.data["plugin"] == name]
    assert exits and exits[0].seq > logs[0].seq
    # `runs show` lists the run's plugins, and the two attached clients apart: views, not plugins of the run
    shown = subprocess.run([*trainbus_cmd(), "runs", "show", kernel.run_id, "--runs-dir", str(runs_dir), "--json"],
                           capture_output=True, text=True, timeout=60, check=True)
    details = json.loads(shown.stdout)
    assert sorted(details["plugins"]) == ["cpu", "memory"] and name in details["attached"], details
    assert len(details["attached"]) == 2, details["attached"]
    text = subprocess.run([*trainbus_cmd(), "runs", "show", kernel.run_id, "--runs-dir", str(runs_dir)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "attached: 2 clients (attach-" in text and "\nattach-" not in text, text


@pytest.mark.parametrize("mode", [["--json"], []])
def test_ctrl_c_ends_an_attach_in_one_line_saying_the_run_goes_on(runs_dir, tmp_path, kernels, mode):
    """Ctrl-C is how a script's `attach --json` (and a dashboard off a terminal) ends: it exited 130 without a word,
    leaving the user to wonder whether it stopped the run. One line says it did not."""
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=20, batch_s=0.05, monitors=False)
    kernel.wait_step(3, timeout_s=60)
    proc = subprocess.Popen([*trainbus_cmd(), "attach", *mode, kernel.run_id, "--runs-dir", str(runs_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_from_a_terminal)
    try:
        # the client runs: the snapshot's line (--json, on stdout: only the client writes there), or its line that
        # says the dashboard is drawn at the end; not any line on stderr, which `trainbus` itself may say first (a
        # warning): a Ctrl-C after it lands in `trainbus`'s start or its exec of the client
        stream = proc.stdout if mode else proc.stderr
        wanted = "" if mode else "trainbus attach: stdout is not a terminal"
        said, deadline = "", time.monotonic() + 90
        while not any(line.startswith(wanted) for line in said.splitlines(keepends=True) if line.endswith("\n")):
            chunk = (os.read(stream.fileno(), 65536).decode()
                     if select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0] else "")
            assert chunk, f"the attach client said nothing in 90 s: {said!r}"
            said += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        err = err if mode else said + err
    finally:
        proc.kill()
    said = [line for line in err.splitlines() if "Ctrl-C" in line]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert said == ["trainbus: Ctrl-C: attach ended; leaving does not stop the run"], err
    assert kernel.proc.poll() is None, "the run goes on"


def test_ctrl_c_as_the_attach_client_starts_is_said_in_one_line(runs_dir, tmp_path, kernels):
    """`trainbus attach` execs its client (plugins/dashboard.py): a Ctrl-C from the exec until the client's Python had
    started and imported what it needs killed it without a word (exit -2), or with a traceback of an import. Sent as
    soon as the exec is seen (/proc's cmdline), it is one line and exit 130, wherever in its start it lands."""
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=20, batch_s=0.05, monitors=False)
    kernel.wait_step(3, timeout_s=60)
    proc = subprocess.Popen(attach_cmd(kernel, "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_from_a_terminal)
    try:
        wait_until(lambda: b"trainbus.plugins.dashboard" in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 90,
                   "attach's exec of its client", poll_s=0.0005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    said = [line for line in err.splitlines() if "Ctrl-C" in line]
    assert said in (["trainbus: Ctrl-C before attaching; nothing was sent, and the run goes on"],  # in its start
                    ["trainbus: Ctrl-C: attach ended; leaving does not stop the run"]), err  # a busy box: later
    assert kernel.proc.poll() is None, "the run goes on"


def test_runs_stop_of_a_stopped_kernel_says_so_and_goes_in_once_it_runs_again(runs_dir, tmp_path, kernels):
    """A SIGSTOPped kernel answers nothing: `runs stop` waited in silence for as long as it stayed stopped. It says
    the kernel is stopped and how to let it run; after SIGCONT the stop goes in as any other."""
    kernel = live_run(runs_dir, tmp_path, kernels, epochs=20, batch_s=0.05, monitors=False)
    kernel.wait_step(3, timeout_s=60)
    kernel.signal(signal.SIGSTOP)

    def stop_said_waiting() -> subprocess.Popen:
        proc = subprocess.Popen([*trainbus_cmd(), "runs", "stop", kernel.run_id, "--runs-dir", str(runs_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=sigint_as_from_a_terminal)
        # said within its first poll; a busy box makes the client's start (Python, pyzmq) the long part
        ready, _, _ = select.select([proc.stderr], [], [], 90)
        said = proc.stderr.readline() if ready else "(nothing said in 90 s)"
        assert said.startswith(f"trainbus: the run's kernel (pid {kernel.pid}) is stopped (SIGSTOP or a debugger) "
                               f"and answers nothing; stop goes in once it runs again "
                               f"(`kill -CONT {kernel.pid}`)"), said
        assert proc.poll() is None, "it must wait for the kernel, not give up on it"
        return proc

    try:
        # Ctrl-C there says that no stop went in (it exited 130 saying nothing, after the line above)
        interrupted = stop_said_waiting()
        interrupted.send_signal(signal.SIGINT)
        out, err = interrupted.communicate(timeout=60)
        assert (interrupted.returncode, out, err) == (
            130, "", f"trainbus: Ctrl-C: no stop was sent; run {kernel.run_id} goes on\n"), (out, err)
        proc = stop_said_waiting()
    finally:
        kernel.signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.startswith(f"stop sent to run {kernel.run_id} as attach-"), (out, err)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "stopped" and len(result["outcome"]["stop_reasons"]) == 1, result["outcome"]


def listening_run(runs_dir, tmp_path, kernels, epochs: int, *clients: tuple[str, str]) -> tuple[KernelProcess, Path]:
    """A SLOW run listening on loopback TCP, at step 3, with keys made by `trainbus keys generate`: the server pair
    and a client key per (name, role). The kernel, and the key directory (tmp_path/keys)."""
    keys = tmp_path / "keys"
    for args in (["server"], *(["client", name, "--role", role] for name, role in clients)):
        subprocess.run([*trainbus_cmd(), "keys", "generate", *args, "--keys-dir", str(keys)], check=True,
                       capture_output=True, timeout=60)
    cfg = RunConfig(target=SLOW, epochs=epochs, runs_dir=str(runs_dir), hyperparameters={"batch_s": 0.05},
                    plugins=[], listen="127.0.0.1:0", keys_dir=str(keys))
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    kernel.wait_step(3, timeout_s=60)
    return kernel, keys


def test_attach_over_tcp_with_curve_keys_watches_and_only_a_control_key_stops(runs_dir, tmp_path, kernels):
    kernel, keys = listening_run(runs_dir, tmp_path, kernels, 8, ("watcher", "monitor"), ("pilot", "control"))
    connection = kernel.run_dir / "connection.json"

    def remote(key: str, *flags: str) -> list[str]:
        return [*trainbus_cmd(), "attach", str(connection), "--key", str(key), *flags]

    monitor, control = keys / "monitor" / "watcher.key_secret", keys / "control" / "pilot.key_secret"
    out = tmp_path / "remote.jsonl"
    with open(out, "w") as stdout:
        watcher = subprocess.Popen(remote(monitor, "--json"), stdout=stdout, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: out.read_text().count("\n") >= 2 or watcher.poll() is not None, 60, "a remote snapshot")
            refused = subprocess.run(remote(monitor, "--stop", "not mine to stop"), capture_output=True, text=True,
                                     timeout=120)
            # said before anything is sent: the welcome carries the key's role
            assert refused.returncode == 2 and "key has role monitor" in refused.stderr, refused.stderr
            assert len(refused.stderr.splitlines()) == 1, refused.stderr  # said once, not also by the plugin IO
            sent = subprocess.run(remote(control, "--stop", "the pilot stops it"), capture_output=True, text=True,
                                  timeout=120)
            assert sent.returncode == 0, sent.stderr
            watcher.wait(timeout=120)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    assert kernel.result(timeout_s=120)["status"] == "stopped"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["type"] == "snapshot" and lines[-1]["type"] == ev.BUS_CLOSING
    seqs = [e["seq"] for e in lines[1:]]
    assert seqs == list(range(lines[0]["seq"] + 1, lines[0]["seq"] + 1 + len(seqs)))
    reasons = [r for e in read_journal(kernel.run_dir) if e.type == ev.STOP_REQUESTED for r in e.data["reasons"]]
    assert len(reasons) == 1 and reasons[0].startswith("attach-") and "the pilot stops it" in reasons[0], reasons


# -- the snapshot's bounds ---------------------------------------------------------------------------

def test_a_snapshot_stays_bounded_however_long_and_wide_the_run():
    state = RunState("r")
    seq = 0
    for i in range(MAX_SERIES * 2):  # twice the series it keeps, each with twice the history, long names
        for step in range(HISTORY_POINTS * 2):
            seq += 1
            state.fold(Event(seq, "r", ev.METRIC, 1.0, step, 1, {"plugin": "p" * 200, "name": f"{i:03d}" + "n" * 197,
                                                                  "value": 1.0 / (step + 1), "step": step}))
    for i in range(MAX_PLUGINS * 2):
        seq += 1
        state.fold(Event(seq, "r", ev.PLUGIN_FAILED, 1.0, 0, 1, {"plugin": f"{i}" + "x" * 300, "reason": "y" * 5000,
                                                                  "log": "z"}))
    seq += 1
    state.fold(Event(seq, "r", ev.END_EPOCH, 1.0, 0, 1, {"training_metrics": "not a map", "lr": True}))
    snapshot = state.to_map()
    assert len(snapshot["series"]) == MAX_SERIES and len(snapshot["plugins"]) == MAX_PLUGINS
    assert all(len(s["history"]) == HISTORY_POINTS for s in snapshot["series"].values())
    assert snapshot["dropped"]["series_dropped"] > 0 and not snapshot["dropped"].get("fold_errors")
    size = len(pack(snapshot))
    assert size < 1024 * 1024, f"{size} bytes"
    assert RunState.from_map(seq, json.loads(json.dumps(snapshot))).to_map() == snapshot


def test_clients_that_have_gone_make_room_in_the_snapshot_for_a_peer_that_comes_after_them(short_runs, tmp_path,
                                                                                           kernels):  # noqa: F811
    """Every `trainbus attach`, `runs stop` and `plugins attach` is a peer of its own name (attach-USER@HOST-PID), and
    the snapshot keeps MAX_PLUGINS plugin rows: in a run of days, once 64 had come and gone, a plugin attached later
    (and any peer after them) never showed in a dashboard. The oldest gone client's row makes room, counted."""
    gate = tmp_path / "gate"
    kernel = live_run(short_runs, tmp_path, kernels, epochs=1, batch_s=0.0, monitors=False, gate=gate)
    wait_sockets(kernel)
    credential, clients = attach_credential(kernel.run_dir), MAX_PLUGINS + 6
    try:
        for i in range(clients):  # each comes, is welcomed and says bye, as a `runs stop` does
            client, name = Intruder(kernel.run_dir, f"client{i}"), f"attach-ann@host-{1000 + i}"
            try:
                client.hello(name, credential)
                client.wait_reply("welcome", timeout_s=60)
                client.send("bye", reason="done")
                kernel.wait_event(ev.PLUGIN_EXITED, lambda e: e.data["plugin"] == name, timeout_s=60)
            finally:
                client.close()
        late = Intruder(kernel.run_dir, "late")
        try:
            late.hello("late_monitor", credential, replies=["metric"])
            late.wait_reply("welcome", timeout_s=60)
            kernel.wait_event(ev.PLUGIN_READY, lambda e: e.data["plugin"] == "late_monitor", timeout_s=60)
            late.send("snapshot")  # its hello is folded now: the journal has it
            state = late.wait_reply("run_state", timeout_s=60)["state"]
        finally:
            late.close()
    finally:
        open_gate(gate, 10**6)
    assert "late_monitor" in state["plugins"], sorted(state["plugins"])
    assert len(state["plugins"]) <= MAX_PLUGINS and not state["dropped"].get("plugins_dropped"), state["dropped"]
    assert state["dropped"]["clients_forgotten"] >= clients + 1 - MAX_PLUGINS, state["dropped"]
    assert kernel.result(timeout_s=120)["status"] == "completed"


def test_a_peers_name_and_metric_name_reach_the_dashboard_escaped_not_obeyed(short_runs, tmp_path,
                                                                            kernels):  # noqa: F811
    """A peer attached by hand names itself and its metrics with any string: the dashboard put them through rich's
    markup escape only, and rich passes an escape sequence on to the terminal (this one clears the screen)."""
    gate = tmp_path / "gate"
    kernel = live_run(short_runs, tmp_path, kernels, epochs=1, batch_s=0.0, monitors=False, gate=gate)
    wait_sockets(kernel)
    peer = Intruder(kernel.run_dir, "painter", subscribe=True)
    try:
        wait_until(lambda: peer.next_event(0.1), 60, "a first event")  # our subscription is live: say hello
        peer.hello("painter\x1b[2J", attach_credential(kernel.run_dir), replies=["metric"])
        peer.wait_reply("welcome")
        peer.send("metric", name="gpu/util\x1b[2J", value=0.5, step=None)
        kernel.wait_event("metric", timeout_s=60)
        attach = subprocess.Popen(attach_cmd(kernel), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # its snapshot, once it holds the peer, has the metric too: then let the run end, which draws the frame
        kernel.wait_event("plugin_ready", lambda e: e.data["plugin"].startswith("attach-"), timeout_s=SCREEN_TIMEOUT_S)
        peer.send("bye", reason="painted")
    finally:
        peer.close()
    open_gate(gate, 10**6)
    drawn, said = attach.communicate(timeout=SCREEN_TIMEOUT_S + 120)
    assert attach.returncode == 0, said
    assert "\x1b" not in drawn and "gpu/util\\x1b[2J" in drawn and "painter\\x1b[2J" in drawn, drawn


def test_the_dashboard_says_when_no_monitor_reports_and_shows_no_lag_for_a_plugin_that_has_gone():
    """Drawn from a folded state with rich's own console: the default plugins have no resource monitor, and the
    resources table was a header over nothing; a plugin that exited kept the lag the kernel last read for it."""
    from rich.console import Console

    from trainbus.plugins.dashboard import render

    state = RunState("r")
    state.fold(Event(1, "r", ev.PLUGIN_READY, 1.0, 0, 1, {"plugin": "metrics_log", "pid": 7, "delivery": "durable"}))
    state.fold(Event(2, "r", ev.PLUGIN_READY, 1.0, 0, 1, {"plugin": "console", "pid": 8, "delivery": "best_effort"}))
    for plugin in state.plugins.values():
        plugin["lag"] = 173  # as a refresh of the kernel's snapshot sets it
    state.fold(Event(3, "r", ev.PLUGIN_EXITED, 2.0, 0, 1, {"plugin": "metrics_log", "pid": 7, "exit_code": 0}))

    def drawn() -> str:
        console = Console(width=150, record=True, file=io.StringIO())
        console.print(render(state, "live"))
        return console.export_text()

    screen = drawn()
    assert re.search(r"^\s*none yet\s+no monitor reports \(cpu, memory, disk, gpu, perf\)", screen, re.M), screen
    assert re.search(r"^\s*metrics_log\s+exited\s+0\s+-\s", screen, re.M), screen
    assert re.search(r"^\s*console\s+running\s+0\s+173\s", screen, re.M), screen
    state.fold(Event(4, "r", ev.METRIC, 3.0, 0, 1, {"plugin": "cpu", "name": "cpu/percent", "value": 50.0}))
    screen = drawn()
    assert "none yet" not in screen and re.search(r"^\s*cpu/percent\s", screen, re.M), screen


def test_the_dashboard_says_training_stands_still_until_it_moves_and_a_snapshot_carries_it():
    from rich.console import Console

    from trainbus.plugins.dashboard import render

    state = RunState("r")
    state.fold(Event(1, "r", ev.END_TRAINING_BATCH, 1_000.0, 3, 1, {"loss": 1.0, "training_batch_count": 3}))
    state.fold(Event(2, "r", ev.TRAINING_STALLED, 1_600.0, 3, 1, {
        "stalled_s": 600.0, "after": "end_training_batch", "where": "/home/me/train.py, line 12", "stack": []}))

    def drawn(state: RunState) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(render(state, "live"))
        return console.export_text()

    since = time.strftime("%H:%M:%S", time.localtime(1_000.0))
    said = (f"training has stood still since {since} (after end_training_batch) in your code at /home/me/train.py, "
            f"line 12; its stack is in the run's kernel.log")
    assert said in drawn(state)
    attached = RunState.from_map(2, unpack(pack(state.to_map())))  # attached mid-stall: the snapshot says it
    assert said in drawn(attached)
    attached.fold(Event(3, "r", ev.TRAINING_RESUMED, 1_700.0, 3, 1,
                        {"stalled_s": 700.0, "event": "start_training_batch"}))
    assert "stood still" not in drawn(attached)


def test_a_remote_attach_whose_kernel_was_killed_gives_up_naming_what_to_check(runs_dir, tmp_path, kernels,
                                                                               monkeypatch):
    """`kill -9` of a kernel watched over TCP: a remote client cannot read the run directory that would say the
    kernel is gone, so it tries again, then gave up with `lost the kernel (...) and could not reach it again after
    8 tries`, naming nothing to check. Its line now says what the silence may be and where to look. (The tries are
    cut to two here: the backoff itself is not what is tested.)"""
    from trainbus.sdk import attach
    from trainbus.sdk.attach import AttachError, Attachment, target_of

    monkeypatch.setattr(attach, "RECONNECT_ATTEMPTS", 2)
    monkeypatch.setattr(attach, "RECONNECT_FIRST_S", 0.1)
    kernel, keys = listening_run(runs_dir, tmp_path, kernels, 50, ("watcher", "monitor"))
    host_port = json.loads((kernel.run_dir / "connection.json").read_text())["control"]
    attachment = Attachment(target_of(host_port, str(keys / "monitor" / "watcher.key_secret"),
                                      str(kernel.run_dir / "connection.json")))
    started = None
    with pytest.raises(AttachError) as lost:
        for item in attachment:
            if item is not None and item[0] == "snapshot" and started is None:
                kernel.kill()
                started = time.monotonic()
            assert started is None or time.monotonic() - started < 60, "still trying"
    said = str(lost.value)
    assert said.startswith("lost the kernel (") and "could not reach it again after 2 tries" in said, said
    assert ("its kernel has exited or hangs, or this machine no longer reaches its host (`trainbus runs list` on "
            "the run's host says whether the run still goes; attach again once it answers)") in said, said


def _hello_to_stand_in(kernel, items) -> bytes:
    """An attachment's steps under the stand-in's heartbeats until it is subscribed and says hello (bounded): its
    routing id."""
    got, deadline = None, time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        kernel.publish("heartbeat", interval_s=1.0)
        next(items)
        got = kernel.receive(50)
    assert got is not None, "no hello within 30 s"
    identity, hello = got
    assert hello["type"] == "hello", hello
    return identity


def test_an_attached_clients_replay_whose_answer_was_lost_is_asked_for_again(tmp_path):
    """As a durable plugin's (sdk/runner.py): a replay_batch lost on its way left `attach` replaying for ever, every
    live event ignored, the dashboard frozen at the gap while the run went on."""
    import zmq
    from stand_in_kernel import StandInKernel

    from trainbus.proto import control, encode_control
    from trainbus.sdk.attach import Attachment, Target
    from trainbus.sdk.replay import REPLAY_RESEND_S

    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    endpoints = [s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (kernel.pub, kernel.router)]
    attachment = Attachment(Target(*endpoints))
    items = iter(attachment)
    try:
        identity = _hello_to_stand_in(kernel, items)
        kernel.welcome(identity, 1)
        asked: list[dict] = []
        answering = []  # once it holds True, the stand-in answers every replay, as a kernel does

        def pump(until) -> None:
            """The attachment's steps, the stand-in's heartbeats, and what it asks, until `until()` (bounded)."""
            end = time.monotonic() + 3 * REPLAY_RESEND_S + 10
            while not until() and time.monotonic() < end:
                kernel.publish("heartbeat", interval_s=1.0)
                next(items)
                while (got := kernel.receive(10)) is not None:
                    asked.append(got[1])
                    if answering and got[1]["type"] == "replay":
                        kernel.replay(identity, got[1]["from_seq"])

        pump(lambda: any(m["type"] == "snapshot" for m in asked))
        snapshot_seq = kernel.seq
        kernel.router.send_multipart([identity, encode_control(control(
            "run_state", seq=snapshot_seq, state=RunState(kernel.run_id, snapshot_seq).to_map()))])
        kernel.publish("end_epoch", live=False, epoch=0)  # the live stream misses it: a gap, replayed
        end_epoch = kernel.seq
        pump(lambda: any(m["type"] == "replay" for m in asked))  # asked for, never answered
        first = next(m for m in asked if m["type"] == "replay")
        asked.clear()
        pump(lambda: any(m["type"] == "replay" for m in asked))
        assert [m["from_seq"] for m in asked if m["type"] == "replay"][:1] == [first["from_seq"]], asked
        answering.append(True)
        kernel.replay(identity, first["from_seq"])
        pump(lambda: attachment.next_seq > end_epoch + 20)
        assert attachment.next_seq > end_epoch + 20, (attachment.next_seq, end_epoch)  # past the gap, and live
    finally:
        attachment.close()
        kernel.close()


def test_an_attached_client_says_nothing_after_the_kernels_bus_closing(tmp_path):
    """bus_closing is the kernel's last word before it closes its sockets (PROTOCOL.md §6): a bye then is answered by
    no one. `attach` said one all the same and waited for its farewell, so it exited 3 s after the run's end (its
    I/O thread's join timeout), in every script that watches a run to its end."""
    import zmq
    from stand_in_kernel import StandInKernel

    from trainbus.proto import control, encode_control
    from trainbus.sdk.attach import Attachment, Target

    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    attachment = Attachment(Target(*[s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (kernel.pub, kernel.router)]))
    items = iter(attachment)
    said: list[dict] = []
    try:
        identity = _hello_to_stand_in(kernel, items)
        # a kernel that answers a bye with farewell, as trainbus's does (until it closes)
        kernel.router.send_multipart([identity, encode_control(control(
            "welcome", run=kernel.run_id, heartbeat_interval_s=1.0, resume_from=1, farewell=True))])
        asked, deadline = [], time.monotonic() + 30
        while "snapshot" not in asked and time.monotonic() < deadline:  # its steps read the welcome and ask
            kernel.publish("heartbeat", interval_s=1.0)
            next(items)
            while (got := kernel.receive(10)) is not None:
                asked.append(got[1]["type"])
        assert "snapshot" in asked, asked
        kernel.router.send_multipart([identity, encode_control(control(
            "run_state", seq=kernel.seq, state=RunState(kernel.run_id, kernel.seq).to_map()))])
        kernel.publish("end_training_session")
        kernel.publish("bus_closing")
        seen = []
        for item in items:  # a caller may stop at bus_closing; the iteration itself ends there
            if item is not None:
                seen.append(item)
                if getattr(item[1], "type", None) == "bus_closing":
                    break
        items.close()  # its connection closed, as when the caller's loop is gone
        assert [(kind, getattr(what, "type", None)) for kind, what in seen[-2:]] == [
            ("event", "end_training_session"), ("event", "bus_closing")], seen
        while (got := kernel.receive(500)) is not None:  # what it sent after bus_closing (the stand-in stays)
            said.append(got[1])
    finally:
        attachment.close()
        kernel.close()
    assert [m["type"] for m in said if m["type"] not in ("heartbeat", "ack", "snapshot")] == [], said
