"""Whole runs over real sockets and real plugin processes: event order, raw-protocol plugins, isolation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trainbus.kernel.config import PluginConfig, RunConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.session import open_bus, run_training
from trainbus.proto import events as ev
from trainbus.proto.codec import MAX_ARRAY_LEN, MAX_STR_BYTES

from conftest import TESTS_DIR
from helpers import PLUGIN_START_S, assert_same_weights, recorded, run_config
from specs import lifecycle
from test_trust import short_runs  # noqa: F401

TINY = f"{TESTS_DIR / 'specs.py'}:tiny"

def test_subscriber_sees_every_event_in_exact_order(runs_dir, tmp_path):
    rec = tmp_path / "seen.txt"
    cfg = RunConfig(target=TINY, epochs=2, runs_dir=str(runs_dir),
                    plugins=[PluginConfig("rec", "fixture_plugins:Recorder", {"path": str(rec)})])
    result = run_training(cfg)
    assert result.status == "completed"
    seen = recorded(rec)
    # every seq from 1 to end_training_session, once each, in order, no gap
    assert [s for s, _ in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][1] == ev.END_TRAINING_SESSION
    assert [t for _, t in seen if t in ev.LIFECYCLE_EVENTS] == lifecycle(2)
    # what the subscriber got is exactly what the journal holds
    journal = [(e.seq, e.type) for e in read_events(result.run_dir)]
    assert journal[: len(seen)] == seen

def test_raw_pyzmq_plugin_stop_ends_training_at_a_step_boundary(runs_dir, tmp_path):
    out = tmp_path / "raw.txt"
    stop_at = 5
    cfg = RunConfig(epochs=3, runs_dir=str(runs_dir), hyperparameters={"batch_size": 4}, plugins=[
        PluginConfig("raw", "", command=[sys.executable, str(TESTS_DIR / "raw_plugin.py"), str(out), str(stop_at)])])
    result = run_training(cfg)
    assert result.status == "stopped", result
    assert any("raw plugin saw step" in r for r in result.outcome["stop_reasons"])
    steps_per_epoch = -(-1438 // 4)  # the digits split: 1,438 training images
    assert stop_at <= result.outcome["steps"] < steps_per_epoch, "stop must land inside the first epoch"
    events = read_events(result.run_dir)
    types = [e.type for e in events if e.type in ev.LIFECYCLE_EVENTS or e.type == ev.STOP_REQUESTED]
    # the batch in flight finishes, then the epoch closes cleanly: no further training batch
    after_stop = types[types.index(ev.STOP_REQUESTED) + 1:]
    assert after_stop[0] == ev.END_TRAINING_LOOP and ev.START_TRAINING_BATCH not in after_stop
    assert after_stop[-1] == ev.END_TRAINING_SESSION
    assert "stop-sent-at-step" in out.read_text()

def test_hostile_plugins_cannot_change_or_stop_training(runs_dir):
    base = run_training(RunConfig(epochs=3, runs_dir=str(runs_dir), seed=7, plugins=[]))
    # Paced (same weights as unpaced, fixture_targets.py) so the run outlasts the self-kill at step 20
    # however loaded the box is.
    hostile = run_training(RunConfig(target="fixture_targets:paced_digits", epochs=3, runs_dir=str(runs_dir), seed=7,
                                     hyperparameters={"step_sleep_s": 0.01}, plugins=[
        PluginConfig("raiser", "fixture_plugins:Raiser"),
        PluginConfig("exit_at_start", "fixture_plugins:ExitAtStart"),
        PluginConfig("self_kill", "fixture_plugins:SelfKill", {"step": 20}),
    ]))
    assert base.status == hostile.status == "completed"
    assert_same_weights(hostile.run_dir, base.run_dir)
    assert hostile.plugins["exit_at_start"]["crashes"], "the crash must be seen and reported"
    assert any("SIGKILL" in c for c in hostile.plugins["self_kill"]["crashes"])
    logs = [e for e in read_events(hostile.run_dir) if e.type == ev.LOG and e.data["plugin"] == "raiser"]
    assert logs and "hostile plugin refuses" in logs[0].data["text"]

def test_training_exception_fails_the_run_and_tells_plugins(runs_dir, tmp_path):
    rec = tmp_path / "seen.txt"
    result = run_training(RunConfig(target=f"{TESTS_DIR / 'specs.py'}:failing", runs_dir=str(runs_dir),
                                    plugins=[PluginConfig("rec", "fixture_plugins:Recorder", {"path": str(rec)})]))
    assert result.status == "failed" and "loss exploded" in result.error
    failed = [e for e in read_events(result.run_dir) if e.type == ev.RUN_FAILED]
    assert len(failed) == 1 and "FloatingPointError" in failed[0].data["traceback"]
    assert result.outcome["steps"] == failed[0].step > 0  # the steps it trained, though the loop never ended
    assert recorded(rec)[-1] == (failed[0].seq, ev.RUN_FAILED), "a durable plugin sees the failure last"

def test_kernel_log_holds_the_whole_traceback_of_a_deep_failure(runs_dir, tmp_path):
    """A failure deep in the user's code (a nested model, a DataLoader worker's) has a traceback of more lines than
    the run_failed event carries: kernel.log keeps the whole of it, its outermost frames included."""
    target = tmp_path / "deep.py"
    target.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from specs import tiny\n"
        "def level0():\n"
        "    raise RuntimeError('deep down')\n"
        # frames of their own: a recursion's repeated frames are said in one line
        + "".join(f"def level{n}():\n    return level{n - 1}()\n" for n in range(1, 20)) +
        "def outermost_loss(outputs, targets):\n"
        "    return level19()\n"
        "def build(hyperparameters):\n"
        "    spec = tiny(hyperparameters)\n"
        "    spec.loss_fn = outermost_loss\n"
        "    return spec\n")
    result = run_training(RunConfig(target=f"{target}:build", runs_dir=str(runs_dir), plugins=[]))
    assert result.status == "failed" and "deep down" in result.error
    failed = [e for e in read_events(result.run_dir) if e.type == ev.RUN_FAILED]
    assert "outermost_loss" not in failed[0].data["traceback"], "the event carries the traceback's last lines"
    logged = Path(result.run_dir, "kernel.log").read_text()
    assert "Traceback (most recent call last)" in logged and "in outermost_loss" in logged, logged
    assert "RuntimeError: deep down" in logged


@pytest.mark.parametrize("data", [{1: "int key"}, {"s": "x" * (MAX_STR_BYTES + 1)}, {"a": [0] * (MAX_ARRAY_LEN + 1)}],
                         ids=["int key", "long string", "long array"])
def test_event_data_no_peer_could_decode_is_replaced_not_sent(tmp_path, data):
    """pack() accepts more than unpack(): the bus checks, keeps the seq, and says why in the data."""
    bus, _, _ = open_bus("r", tmp_path, plugins=[])
    bus.start()
    bus.publish(ev.METRIC, 0, 0, data)
    bus.publish(ev.METRIC, 0, 0, {"fine": 1.0})
    bus.flush_now()
    bus.close()
    metrics = [e for e in read_events(tmp_path) if e.type == ev.METRIC]
    assert "not encodable" in metrics[0].data["error"]
    assert len(metrics) == 2 and metrics[1].data == {"fine": 1.0}, "the bad event kept its place; nothing lost"


def test_a_plugin_program_that_cannot_be_started_fails_that_plugin_and_training_goes_on(runs_dir, tmp_path):
    """The CLI checks the program first; one that vanishes or cannot be executed by the time it is started
    is that plugin's failure (said once), never the run's."""
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    result = run_training(RunConfig(target=TINY, runs_dir=str(runs_dir), ready_timeout_s=5, plugins=[
        PluginConfig("ghost", "", command=[str(tmp_path / "missing-program")]),
        PluginConfig("noexec", "", command=[str(script)])]))
    assert result.status == "completed", result
    for name in ("ghost", "noexec"):
        assert result.plugins[name]["state"] == "failed" and result.plugins[name]["restarts"] == 0
        assert "cannot start" in result.plugins[name]["crashes"][0]
    failed = [e for e in read_events(result.run_dir) if e.type == ev.PLUGIN_FAILED]
    assert sorted(e.data["plugin"] for e in failed) == ["ghost", "noexec"]


def test_a_plugin_program_that_exits_without_a_hello_is_trouble_the_run_names(runs_dir):
    """A program that is no plugin (it speaks no PROTOCOL.md) and exits 0 at once: it took no event, which the
    run's summary and `runs list` used to show as no trouble at all ("exited, -")."""
    from trainbus.kernel.run_overview import run_overview

    result = run_training(RunConfig(target=TINY, runs_dir=str(runs_dir), ready_timeout_s=5, plugins=[
        PluginConfig("quiet", "", command=["true"])]))
    assert result.status == "completed", result
    assert result.plugins["quiet"]["greeted"] is False and result.plugins["quiet"]["state"] == "exited"
    assert run_overview(result.run_dir)["plugin_trouble"] == ["quiet never said hello"]


def test_a_plugin_that_never_says_hello_is_hung_by_its_cpu_time_or_the_wall_clock(runs_dir, monkeypatch):
    """Starting slowly because the machine is busy is not a hang: the startup clock is the plugin's own CPU
    time (a spinner), with a wall-clock cap for one that waits forever (a sleeper). Limits shrunk to fit a
    test; the spinner's wall cap is long, so that even starved beside busy processes it is hung for its CPU."""
    from trainbus.kernel import supervisor

    def first_hang(name: str, command: list[str], cpu_s: float, wall_s: float) -> str:
        monkeypatch.setattr(supervisor, "STARTUP_CPU_S", cpu_s)
        monkeypatch.setattr(supervisor, "STARTUP_TIMEOUT_S", wall_s)
        result = run_training(RunConfig(target=TINY, runs_dir=str(runs_dir), ready_timeout_s=wall_s + 30,
                                        plugins=[PluginConfig(name, "", command=command)]))
        assert result.status == "completed"
        return next(e.data["reason"] for e in read_events(result.run_dir) if e.type == ev.PLUGIN_HUNG)

    spun = first_hang("spinner", [sys.executable, "-c", "while True: pass"], cpu_s=0.3, wall_s=120)
    cpu_of = lambda reason: float(reason.split("(")[1].split(" s of CPU")[0])  # noqa: E731
    assert cpu_of(spun) >= 0.3, spun
    assert float(spun.removeprefix("no hello after ").split(" s")[0]) < 120, spun
    slept = first_hang("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], cpu_s=1.0, wall_s=3.0)
    assert float(slept.removeprefix("no hello after ").split(" s")[0]) >= 3 and cpu_of(slept) < 0.3, slept


def test_sigterm_stops_a_run_at_the_next_batch_and_it_ends_interrupted_with_its_plugins_drained(tmp_path):
    """`kill`, systemd's stop, SLURM's preemption: what Ctrl-C does, not a death without a summary."""
    import json
    import signal
    from fixture_targets import open_gate
    from kernel_process import Command, JournalTail, wait_until

    gate, runs = tmp_path / "gate", tmp_path / "runs"
    open_gate(gate, 3)
    proc = Command("run", f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits", "--device", "cpu", "--runs-dir",
                   str(runs), "--plugins", "metrics_log", "--epochs", "2", "--set", f"gate={gate}", "--set",
                   "step_sleep_s=0")
    try:
        journal = wait_until(lambda: next(runs.glob("*/events"), None), 120, "the run's journal")
        tail = JournalTail(journal)
        wait_until(lambda: tail.step() >= 3, 120, "3 steps")
        proc.send_signal(signal.SIGTERM)
        open_gate(gate, 10_000)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping at the next batch boundary" in err
    summary = json.loads((journal.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and not summary["undrained"], summary
    assert summary["outcome"]["epochs_completed"] < 2
    assert summary["outcome"]["stop_reasons"] == ["kernel: stop: interrupted (SIGTERM)"], summary["outcome"]


def test_a_continued_run_replays_its_earlier_session_to_durable_plugins_without_acting_on_it(runs_dir, tmp_path):
    """Session 1 stops after epoch 1 (a durable stopper that votes). Continued for more epochs, the stopper is
    replayed session 1 (its epoch 1 again: a stop it decides there is not sent) and is not handed session 1's end;
    it stops the new session at its own first epoch's end."""

    from trainbus.kernel.plugin_names import resolve_plugin

    seen = tmp_path / "finals.txt"
    plugins = [resolve_plugin("checkpoint", {}),
               PluginConfig("stopper", "fixture_plugins:DurableStopper", {"epoch": 1, "path": str(seen)})]
    tiny = f"{TESTS_DIR / 'specs.py'}:tiny"  # the checkpointer is waited for: a busy box starts it slowly
    first = run_training(run_config(runs_dir, plugins, epochs=1, target=tiny, ready_timeout_s=PLUGIN_START_S))
    assert first.status == "stopped" and first.outcome["epochs_completed"] == 1, first.error
    again = run_training(run_config(runs_dir, plugins, epochs=3, target=tiny, ready_timeout_s=PLUGIN_START_S,
                                    resume=first.run_dir), run_id=Path(first.run_dir).name, continue_run=True)
    assert again.status == "stopped" and again.outcome["stop_reasons"] == ["stopper: stop: enough after epoch 2"], \
        again.outcome
    finals = [e.seq for e in read_events(first.run_dir) if e.type == ev.END_TRAINING_SESSION]
    # each session's end, once: session 1's was not handed over again in session 2
    assert recorded(seen) == [(finals[0], ev.END_TRAINING_SESSION), (finals[1], ev.END_TRAINING_SESSION)]


def test_a_continued_runs_events_before_its_training_starts_are_at_the_step_it_goes_on_from(runs_dir):
    """A kernel continuing a run in place loads its checkpoint before its plugins start: what it journals before
    its start_training_session (plugin_started, plugin_ready, a monitor's first readings, stamped with the kernel's
    step as they come) is at that checkpoint's step, not at step 0 amid the run's later steps (TensorBoard and
    metrics.jsonl drew a resumed run's first cpu readings at step 0). [C17]"""
    from pathlib import Path

    from trainbus.kernel.plugin_names import resolve_plugin

    plugins = [resolve_plugin("checkpoint", {})]
    first = run_training(run_config(runs_dir, plugins, epochs=1, target=TINY, ready_timeout_s=PLUGIN_START_S))
    assert first.status == "completed", first.error
    again = run_training(run_config(runs_dir, plugins, epochs=2, target=TINY, ready_timeout_s=PLUGIN_START_S,
                                    resume=first.run_dir), run_id=Path(first.run_dir).name, continue_run=True)
    assert again.status == "completed", again.error
    events = read_events(first.run_dir)
    starts = [e for e in events if e.type == ev.START_TRAINING_SESSION]
    assert len(starts) == 2 and starts[1].step > 0, starts
    first_kernel_closed = min(e.seq for e in events if e.type == "bus_closing")
    before = [e for e in events if first_kernel_closed < e.seq < starts[1].seq and e.type != ev.HEARTBEAT]
    assert any(e.type == "plugin_started" for e in before), [e.type for e in before]
    assert {(e.type, e.step) for e in before} == {(e.type, starts[1].step) for e in before}, before


@pytest.mark.timeout(300)
def test_a_flood_of_stops_before_a_step_boundary_costs_bounded_memory_and_leaves_bounded_reasons(short_runs, tmp_path,
                                                                                                   kernels):  # noqa: F811
    """Every stop reply that came before the boundary the run stopped at was one of its reasons: a peer with
    `stop` among its replies (a control key, a plugin, a client attached by hand) sending 30,000 stops of 1,000
    characters while a step lasted made summary.json, the registry's row and `runs show` 30 MB each (and a
    daemon's `status`, which lists the runs it ended with their reasons, more than its clients take), and each was
    held until the boundary: ~1.2 KB a stop, 60,000 of them ~70 MB of the kernel's memory (a control key flooding
    through a long validation: GBs). The reasons of one boundary are now its first MAX_STOP_REASONS distinct ones
    and one saying how many more there were, and the kernel holds PENDING_REPLIES_MAX of each kind, counting the
    rest. Here 20,000 stops: held, they grew the kernel 27 MB; now ~4-7 MB (the socket's queue, the allocator)."""
    import json
    import os

    import msgpack
    import psutil
    import zmq

    from fixture_targets import open_gate
    from kernel_process import KernelProcess, cli, wait_until
    from trainbus.proto.run_state import MAX_STOP_REASONS

    gate = tmp_path / "gate"
    # a short runs directory: the sockets in the run directory (a long path puts them in the temp dir instead)
    cfg = RunConfig(target="fixture_targets:paced_digits", epochs=1, device="cpu", runs_dir=str(short_runs), plugins=[],
                    hyperparameters={"step_sleep_s": 0, "gate": str(gate)}, checkpoint_every_n_epochs=0)
    kernel = KernelProcess(cfg, tmp_path)
    kernels.append(kernel)
    wait_until(lambda: (kernel.run_dir / "control.sock").exists() and (kernel.run_dir / "credential").exists(), 60,
               "the run's control socket")
    ctx = zmq.Context()
    try:
        stopper = ctx.socket(zmq.DEALER)
        stopper.setsockopt(zmq.LINGER, 1000)
        stopper.connect(f"ipc://{kernel.run_dir / 'control.sock'}")
        send = lambda type_, **fields: stopper.send(msgpack.packb({"v": 1, "type": type_, **fields}))  # noqa: E731
        send("hello", name="stopper", pid=os.getpid(), subscriptions=[], replies=["stop"], delivery="best_effort",
             secret=(kernel.run_dir / "credential").read_text().strip())
        memory = psutil.Process(kernel.proc.pid)
        before = memory.memory_info().rss
        for number in range(20_000):
            send("stop", id=str(number), reason=f"{number:05d} " + "r" * 994)
            if number % 1000 == 0:
                send("heartbeat")
        # the kernel reads a socket's messages in order: once it answers a snapshot sent after the stops, it has
        # read every stop (a fixed wait was a margin a busy machine could outlast)
        send("snapshot")

        def answered() -> bool:
            while stopper.poll(100):
                if msgpack.unpackb(stopper.recv())["type"] == "run_state":
                    return True
            return False
        wait_until(answered, 120, "the kernel's answer to a snapshot sent after the stops", poll_s=0)
        grown = memory.memory_info().rss - before
    finally:
        ctx.destroy(linger=0)
    assert grown < 14 << 20, f"the kernel grew {grown >> 20} MB"
    open_gate(gate, 45)
    assert kernel.result(timeout_s=120)["status"] == "stopped"
    summary = json.loads((kernel.run_dir / "summary.json").read_text())
    reasons = summary["outcome"]["stop_reasons"]
    assert len(reasons) == MAX_STOP_REASONS + 1 and reasons[0] == "stopper: stop: 00000 " + "r" * 994, reasons[:2]
    assert reasons[-1] == "kernel: stop: 19,992 more stop requests at this step boundary, not listed", reasons[-1]
    assert (kernel.run_dir / "summary.json").stat().st_size < 64 * 1024
    shown = cli("runs", "show", kernel.run_id, "--runs-dir", str(short_runs))
    assert shown.returncode == 0 and len(shown.stdout) < 64 * 1024, len(shown.stdout)
