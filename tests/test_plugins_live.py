"""`trainbus plugins attach` and `detach` on live runs: real kernels in their own processes, the `trainbus` command
(forked, or the installed one where its start counts), a raw owner peer and a plugin of the run that is not the
owner. Nothing is mocked.

Training is held by a gate (tests/fixture_targets.py paced_digits): batch N is not trained before the test
opens the gate to N, so "attached at step 10, detached at step 65" holds however slowly a busy box runs.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

from conftest import sigint_as_from_a_terminal, trainbus_cmd
from fixture_targets import open_gate
from helpers import assert_same_weights, metrics_records_expected, run_config
from kernel_process import KernelProcess, cli, of, process_gone, wait_until
from test_trust import (PACED, STEPS_PER_EPOCH, Intruder, attach_credential, short_runs,  # noqa: F401 (a fixture)
                        wait_sockets)
from trainbus.kernel.config import PluginConfig
from trainbus.kernel.journal import read_events
from trainbus.kernel.run_details import run_details

EPOCHS = 2
EVERY_N_STEPS = 5  # metrics_log's step records
ATTACH_AT, DETACH_AT = 10, 65  # steps: in epoch 1, and in epoch 2
STARTUP_S = 120  # a kernel (torch) or plugin starting on a busy box


def config(runs: Path, plugins=(), **settings):
    """The paced digits demo (held by a `gate`, if given; its weights are the unpaced run's), no checkpoints."""
    return run_config(runs, plugins, EPOCHS, PACED, step_sleep_s=0.0, checkpoint_every_n_epochs=0, **settings)


def plugins_cli(kernel: KernelProcess, *words: str) -> subprocess.CompletedProcess:
    """`trainbus plugins WORDS`, forked (kernel_process.cli): ~0.2 s of the ~0.45 s a fresh `trainbus` takes to
    start, twenty-odd times here. Where the console script itself or the command's directory counts, the tests
    start `trainbus` (conftest.trainbus_cmd)."""
    return cli("plugins", *words, "--runs-dir", str(kernel.run_dir.parent), timeout=STARTUP_S)


def step_records(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"] if path.exists() else []


def test_a_plugin_attached_mid_run_records_from_then_on_detaches_cleanly_and_changes_no_weight(
        short_runs, tmp_path, kernels):
    """metrics_log attached at step 10 writes step 15 onwards, the end of epoch 1 and nothing before; detached at
    step 65 it exits 0 (no restart, no trouble) and the run completes. Attached again with --from-start (into
    another file) it replays the run from seq 1: that file is every record the journal calls for. The final
    weights are those of the same run with nothing attached."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(config(short_runs, gate=str(gate)), tmp_path)
    reference = KernelProcess(config(tmp_path / "reference"), tmp_path)
    kernels += [kernel, reference]
    open_gate(gate, ATTACH_AT)
    kernel.wait_step(ATTACH_AT, timeout_s=STARTUP_S)

    attached = plugins_cli(kernel, "attach", kernel.run_id, "metrics_log", f"every_n_steps={EVERY_N_STEPS}")
    assert attached.returncode == 0, attached.stderr
    said = re.fullmatch(rf"started metrics_log in run {kernel.run_id} \(pid (\d+), from seq (\d+)\)\n", attached.stdout)
    assert said, attached.stdout
    pid = kernel.wait_ready("metrics_log", timeout_s=STARTUP_S)
    assert pid == int(said[1])
    open_gate(gate, DETACH_AT)
    log = kernel.run_dir / "metrics.jsonl"
    wait_until(lambda: step_records(log) and step_records(log)[-1]["step"] == DETACH_AT, STARTUP_S,
               f"metrics_log's record of step {DETACH_AT}")
    detached = plugins_cli(kernel, "detach", kernel.run_id, "metrics_log")
    assert (detached.returncode, detached.stdout) == (0, "stopped metrics_log (exit code 0)\n"), \
        (detached.stderr, (kernel.run_dir / "plugins" / "metrics_log.log").read_text())
    assert process_gone(pid)

    replayed = plugins_cli(kernel, "attach", kernel.run_id, "metrics_log", f"every_n_steps={EVERY_N_STEPS}",
                           "filename=replayed.jsonl", "--from-start")
    assert replayed.returncode == 0 and replayed.stdout.endswith("from seq 1)\n"), (replayed.stdout, replayed.stderr)
    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed" and result["outcome"]["steps"] == EPOCHS * STEPS_PER_EPOCH, result
    events = read_events(result["run_dir"])

    # the journal says who attached and detached what, and from which seq
    first, second = of(events, "plugin_attached", "metrics_log")
    assert first.data["by"].startswith("attach-") and first.data["from_seq"] == int(said[2]), first.data
    assert first.data["settings"] == {"every_n_steps": EVERY_N_STEPS} and first.step == ATTACH_AT, first.data
    assert (second.data["from_seq"], second.data["settings"]["filename"]) == (1, "replayed.jsonl"), second.data
    [detach] = of(events, "plugin_detached", "metrics_log")
    assert detach.data["by"].startswith("attach-") and detach.step == DETACH_AT, detach.data
    exited = of(events, "plugin_exited", "metrics_log")[0]  # (the second's exit at the run's end may go unjournaled)
    assert exited.data["exit_code"] == 0 and detach.seq < exited.seq < second.seq, exited
    assert not of(events, "plugin_crashed") and not of(events, "plugin_restarted")

    # from the moment it was attached until it was detached: step 15 on, epoch 1's end, nothing earlier or later
    detached_at = next(e.seq for e in events if e.type == "end_training_batch" and e.step == DETACH_AT)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["seq"]) for r in lines] == [
        r for r in metrics_records_expected(events, EVERY_N_STEPS) if first.data["from_seq"] <= r[1] <= detached_at]
    assert [r["step"] for r in lines if r["kind"] == "step"] == list(range(15, DETACH_AT + 1, EVERY_N_STEPS))
    assert [r["epoch"] for r in lines if r["kind"] == "epoch"] == [1]
    # from the start: the whole run, as if it had been there all along
    lines = [json.loads(line) for line in (kernel.run_dir / "replayed.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["seq"]) for r in lines] == metrics_records_expected(events, EVERY_N_STEPS)

    # not trouble: no restart, nothing undrained, `runs show` lists none
    assert result["plugins"]["metrics_log"] == {"state": "exited", "restarts": 0, "crashes": [], "errors_logged": 0, "greeted": True}
    assert result["undrained"] == {}
    details = run_details(kernel.run_dir)  # what `trainbus runs show RUN --json` prints
    assert details["plugin_trouble"] == [] and details["plugins"]["metrics_log"]["state"] == "exited", details
    # neither the attach nor the detach changed training
    assert_same_weights(result["run_dir"], reference.result(timeout_s=STARTUP_S)["run_dir"])


def test_a_relative_host_path_given_to_plugins_attach_is_read_from_where_the_command_ran(short_runs, tmp_path,
                                                                                      kernels):
    """`plugins attach RUN disk path=watched` in a directory that has `watched`, the kernel started in another: the
    command's check found it, and the plugin, in the kernel's directory, could not read it (a traceback, restarts,
    given up). The path is made absolute where the command ran, and the attached plugin watches it."""
    gate, here = tmp_path / "gate", tmp_path / "here"
    (here / "watched").mkdir(parents=True)
    kernel = KernelProcess(config(short_runs, gate=str(gate)), tmp_path)
    kernels.append(kernel)
    open_gate(gate, ATTACH_AT)
    kernel.wait_step(ATTACH_AT, timeout_s=STARTUP_S)
    assert Path.cwd() != here and not Path("watched").exists()  # the kernel's directory has none
    # a setting as a word, and one as `trainbus run --set` gives it (refused as no such option before)
    attached = subprocess.run([*trainbus_cmd(), "plugins", "attach", kernel.run_id, "disk", "path=watched",
                               "--set", "disk.interval_s=0.1", "--runs-dir", str(short_runs)], capture_output=True,
                              text=True, timeout=STARTUP_S, cwd=here)
    assert attached.returncode == 0, attached.stderr
    kernel.wait_ready("disk", timeout_s=STARTUP_S)
    event = kernel.wait_event("plugin_attached", lambda e: e.data["plugin"] == "disk", timeout_s=STARTUP_S)
    assert event.data["settings"]["path"] == str(here / "watched") and event.data["settings"]["interval_s"] == 0.1, \
        event.data
    kernel.wait_event("metric", lambda e: e.data["plugin"] == "disk", timeout_s=STARTUP_S)  # it reads the path
    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["plugins"]["disk"]["restarts"] == 0 and not result["plugins"]["disk"]["crashes"], result["plugins"]


def test_a_plugin_of_the_runs_config_attached_again_starts_from_its_configured_settings(tmp_path):
    """Detached and attached again, metrics_log came back with the defaults (every_n_steps 50, not the run's 5),
    and visualization with settings unlike its earlier files' (a gap in loss/train_step from step 55 to 100).
    What the command line gives still wins; a plugin the config runs from another target takes nothing of it."""
    from trainbus.kernel.cli_plugins import configured_settings

    (tmp_path / "config.json").write_text(json.dumps({"plugins": [
        {"name": "metrics_log", "target": "trainbus.plugins.metrics_log:MetricsLogPlugin",
         "settings": {"every_n_steps": 5}, "command": []},
        {"name": "visualization", "target": "mine:Visualizer", "settings": {"plots": False}, "command": []}]}))
    assert configured_settings(tmp_path, "metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin") == {
        "every_n_steps": 5}
    assert configured_settings(tmp_path, "visualization",
                               "trainbus.plugins.visualization:VisualizationPlugin") == {}
    assert configured_settings(tmp_path, "cpu", "trainbus.plugins.cpu_monitor:CpuMonitorPlugin") == {}
    (tmp_path / "config.json").unlink()  # a run directory of before config.json, or unreadable
    assert configured_settings(tmp_path, "metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin") == {}


def detached_and_attached_again(rec: PluginConfig, gate: Path, runs: Path, tmp_path: Path, kernels: list) -> list:
    """A run with plugin `rec` of its config, detached at step ATTACH_AT and attached again by its name
    (`trainbus plugins`), both said done; the run's journal once it has completed."""
    kernel = KernelProcess(config(runs, [rec], gate=str(gate)), tmp_path)
    kernels.append(kernel)
    open_gate(gate, ATTACH_AT)
    first = kernel.wait_ready(rec.name, timeout_s=STARTUP_S)
    kernel.wait_step(ATTACH_AT, timeout_s=STARTUP_S)
    detached = plugins_cli(kernel, "detach", kernel.run_id, rec.name)
    assert (detached.returncode, detached.stdout) == (0, f"stopped {rec.name} (exit code 0)\n"), detached.stderr
    attached = plugins_cli(kernel, "attach", kernel.run_id, rec.name)
    assert attached.returncode == 0 and attached.stdout.startswith(f"started {rec.name} in run "), attached.stderr
    kernel.wait_ready(rec.name, timeout_s=STARTUP_S, not_in=(first,))
    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    assert kernel.result(timeout_s=STARTUP_S)["status"] == "completed"
    return read_events(kernel.run_dir)


def test_a_plugin_of_your_own_from_the_runs_config_is_detached_and_attached_again_by_its_name(
        short_runs, tmp_path, kernels):  # noqa: F811
    """README: "a plugin of the run's config, detached and attached again, starts from the settings the config gave
    it". One of the author's own (`[plugins.rec] target = "module:Class"`, no entry point) was detached, and then
    `plugins attach RUN rec` said `unknown plugin 'rec'; installed: ...`: only installed names were looked up. Now
    its name finds the config's target, in the command and in the kernel, with the config's settings; being
    durable, it starts at the current seq, so its file holds each event once."""
    gate, path = tmp_path / "gate", tmp_path / "rec.txt"
    rec = PluginConfig("rec", "fixture_plugins:Recorder", {"path": str(path)})
    events = detached_and_attached_again(rec, gate, short_runs, tmp_path, kernels)
    [again] = of(events, "plugin_attached", "rec")
    assert again.data["target"] == "fixture_plugins:Recorder" and again.data["settings"]["path"] == str(path)
    seqs = [int(line.split()[0]) for line in path.read_text().splitlines()]
    assert seqs == sorted(set(seqs)), "an event handled twice or out of order"


def test_only_the_runs_owner_may_attach_and_each_mistake_is_one_line(short_runs, tmp_path, kernels):
    """A plugin of the run asking to attach another is refused (refused_not_owner, logged by it, nothing
    attached). The owner (a raw peer with the run's credential) gets a command_result for each mistake:
    an unknown plugin lists the installed ones, a second attach says already attached, a detach of what is not
    attached lists what is. The CLI says each mistake in one `error:` line, exit 2."""
    gate = tmp_path / "gate"
    usurper = PluginConfig("usurper", "fixture_plugins:Usurper", {"step": 3, "plugin": "metrics_log"})
    kernel = KernelProcess(config(short_runs, [usurper], gate=str(gate), ready_timeout_s=STARTUP_S), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    open_gate(gate, 5)
    kernel.wait_step(5, timeout_s=STARTUP_S)
    usurper_log = kernel.run_dir / "plugins" / "usurper.log"
    wait_until(lambda: usurper_log.exists() and "did not act on a message" in usurper_log.read_text(), STARTUP_S,
               "the kernel's refusal, in the usurper's log")
    assert "attach_plugin refused: only the run's owner may attach or detach plugins" in usurper_log.read_text()

    owner = Intruder(kernel.run_dir, "owner")
    try:
        owner.hello("owner", attach_credential(kernel.run_dir))
        owner.wait_reply("welcome")

        def command(type_: str, **fields) -> dict:
            owner.send(type_, id=type_ + fields["name"], **fields)
            return owner.wait_reply("command_result")

        unknown = command("attach_plugin", name="nosuch", settings={})
        assert not unknown["ok"] and re.match(r"unknown plugin 'nosuch'; installed: .*\bmetrics_log\b", unknown["text"])
        started = command("attach_plugin", name="cpu", settings={"interval_s": 0.5})
        assert started["ok"] and started["id"] == "attach_plugincpu", started
        kernel.wait_ready("cpu", timeout_s=STARTUP_S)  # its SIGTERM handler is in place: a clean exit
        again = command("attach_plugin", name="cpu", settings={})
        assert not again["ok"] and again["text"].startswith("cpu is already attached"), again
        missing = command("detach_plugin", name="metrics_log")
        assert missing["text"] == f"metrics_log is not attached to run {kernel.run_id}; attached: cpu, usurper"
        stopped = command("detach_plugin", name="cpu")
        assert stopped["ok"] and stopped["text"] == "stopped cpu (exit code 0)", stopped
    finally:
        owner.close()

    for words, error in [
            (("attach", kernel.run_id, "nosuch"), "unknown plugin 'nosuch'; installed: "),
            # an author's own class is a target, not a name: the error says how to attach it (README's by-hand way)
            (("attach", kernel.run_id, "mymodule:MyPlugin"), "'mymodule:MyPlugin' is a module:Class, not a plugin "
             f"name; attach your own class by hand: TRAINBUS_RUN_DIR={kernel.run_dir} python -m trainbus.sdk "
             "mymodule:MyPlugin"),
            (("attach", kernel.run_id, "memory", "--from-start"), "--from-start replays the journal to a durable "
                                                                   "plugin; memory is best_effort"),
            (("attach", kernel.run_id, "metrics_log", "every_n_steps=-1"), "plugin metrics_log: every_n_steps = -1 "
                                                                           "is not allowed"),
            (("attach", kernel.run_id, "early_stopping", "monitor=val_loss"),  # config.json's metrics, the run's
             "plugin early_stopping: monitor = 'val_loss' is not a metric this run produces; use one of: "
             "training_loss, training_accuracy, validation_loss"),
            # the later would win unsaid: as `trainbus run --set` refuses a setting given twice
            (("attach", kernel.run_id, "memory", "interval_s=1", "interval_s=2"), "plugin memory: interval_s given "
                                                                                   "twice (interval_s=1 and "
                                                                                   "interval_s=2): give it once"),
            # a traceback (ProtocolError: cannot encode dict: cannot serialize int) as the command was sent, exit 1
            (("attach", kernel.run_id, "metrics_log", f"every_n_steps={10**20}"),
             f"plugin metrics_log: every_n_steps = {10**20} is not allowed; it must be an integer >= 0 that fits in "
             f"64 bits"),
            (("attach", kernel.run_id, "metrics_log", "filename=a\udcffb.jsonl"),  # a Latin-1 file name
             "plugin metrics_log: filename = 'a\\udcffb.jsonl' is not UTF-8 text (a byte of another encoding: 0xff); "
             "give it in UTF-8"),
            (("detach", kernel.run_id, "metrics_log"), f"metrics_log is not attached to run {kernel.run_id}")]:
        said = plugins_cli(kernel, *words)
        assert said.returncode == 2 and said.stdout == "", (words, said.stdout, said.stderr)
        assert said.stderr.startswith(f"error: {error}") and said.stderr.count("\n") == 1, (words, said.stderr)

    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed", result
    assert result["bus"].get("refused_not_owner") == 1, result["bus"]
    events = read_events(result["run_dir"])
    assert [e.data["plugin"] for e in of(events, "plugin_attached")] == ["cpu"]
    assert of(events, "plugin_attached")[0].data["by"] == "owner"
    ended = plugins_cli(kernel, "attach", kernel.run_id, "metrics_log")
    assert ended.returncode == 2 and ended.stderr == (f"error: run {kernel.run_id} is not running (completed): there "
                                                      f"is nothing to attach metrics_log to\n"), ended.stderr


def test_attaching_a_plugin_under_a_name_a_live_hand_attached_peer_holds_is_refused(short_runs, tmp_path,
                                                                                    kernels):  # noqa: F811
    """The credential lets a peer attached by hand take any free name, `cpu` too; the owner's attach_plugin cpu
    then dropped that live peer from the table without a word (its next message was refused as from a stranger)
    and started ours under its name. Now the command is refused, saying who holds the name, and the peer goes on."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(config(short_runs, gate=str(gate)), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel, timeout_s=STARTUP_S)
    holder, owner = Intruder(kernel.run_dir, "cpu", subscribe=True), Intruder(kernel.run_dir, "owner")
    try:
        wait_until(lambda: holder.next_event(0.1), STARTUP_S, "a first event")  # our subscription is live
        holder.hello("cpu", attach_credential(kernel.run_dir))
        holder.wait_reply("welcome")
        owner.hello("owner", attach_credential(kernel.run_dir))
        owner.wait_reply("welcome")
        owner.send("attach_plugin", name="cpu", settings={}, id="a1")
        answer = owner.wait_reply("command_result")
        assert answer["ok"] is False and answer["text"].startswith(
            f"cpu is the name of a live peer attached by hand to run {kernel.run_id} (pid "), answer
        holder.send("snapshot")  # still welcomed: answered, not refused
        assert holder.wait_reply("run_state")["seq"] >= 1 and not [m for m in holder.replies if m["type"] == "refused"]
        holder.send("bye", reason="done")
        owner.send("bye", reason="done")
    finally:
        holder.close()
        owner.close()
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=STARTUP_S)["status"] == "completed"
    assert not of(read_events(kernel.run_dir), "plugin_attached")


def test_a_plugin_detached_before_its_hello_is_no_trouble(short_runs, tmp_path, kernels, monkeypatch):  # noqa: F811
    """A plugin detached while it still starts (importing, loading what it needs: no hello yet) was counted as
    `never said hello` in the run's summary, `runs list` and `runs show`, though its owner asked it to go; a script
    that attaches a plugin and detaches it at once met that trouble. Now a detached plugin is no trouble, hello
    or not. So is one whose handler the detach cuts short (README: after 0.5 s): that went to the kernel as an
    error, and the run ended `plugin visualization: 1 error logged` (a plot drawn as the detach came); the line
    is still in kernel.log, as a warning."""
    site = tmp_path / "site"  # an installed package registering the held plugin by name, as pip would
    info = site / "held_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: held_plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[trainbus.plugins]\nheld = fixture_plugins:HeldBeforeHello\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    gate, hello_gate = tmp_path / "gate", tmp_path / "hello-gate"  # the second never opens: no hello, ever
    marker = tmp_path / "in-handler"
    busy = PluginConfig("busy", "fixture_plugins:BusyAtEpochEnd", {"marker": str(marker)})
    kernel = KernelProcess(config(short_runs, [busy], gate=str(gate), ready_timeout_s=STARTUP_S), tmp_path)
    kernels.append(kernel)
    open_gate(gate, 5)
    kernel.wait_step(5, timeout_s=STARTUP_S)

    attached = plugins_cli(kernel, "attach", kernel.run_id, "held", f"gate={hello_gate}")
    assert attached.returncode == 0, attached.stderr
    detached = plugins_cli(kernel, "detach", kernel.run_id, "held")
    assert detached.returncode == 0 and detached.stdout.startswith("stopped held ("), detached.stderr
    open_gate(gate, STEPS_PER_EPOCH + 1)
    wait_until(marker.exists, STARTUP_S, "the busy plugin in its end_epoch handler")
    detached = plugins_cli(kernel, "detach", kernel.run_id, "busy")
    assert detached.returncode == 0 and detached.stdout == "stopped busy (exit code 0)\n", detached.stderr

    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed", result
    held = result["plugins"]["held"]
    assert (held["greeted"], held["detached"], held["crashes"]) == (False, True, []), held  # no hello: it was held
    assert result["plugins"]["busy"]["errors_logged"] == 0, result["plugins"]["busy"]
    assert "was cut short" in (kernel.run_dir / "kernel.log").read_text()
    details = run_details(kernel.run_dir)  # what `trainbus runs show RUN --json` prints
    assert details["plugin_trouble"] == [], details["plugin_trouble"]
    listed = subprocess.run([*trainbus_cmd(), "runs", "list", "--json", "--runs-dir", str(short_runs)],
                            capture_output=True, text=True, timeout=STARTUP_S)
    assert [r["plugin_trouble"] for r in json.loads(listed.stdout)] == [[]], listed.stdout
    shown = subprocess.run([*trainbus_cmd(), "runs", "show", kernel.run_id, "--runs-dir", str(short_runs)],
                           capture_output=True, text=True, timeout=STARTUP_S)
    assert "never said hello" not in shown.stdout, shown.stdout


def test_a_plugin_that_fails_as_it_starts_is_said_by_the_attach_not_called_started(short_runs, tmp_path, kernels,
                                                                                    monkeypatch):  # noqa: F811
    """`plugins attach` was answered as the process started: a plugin that failed at once (what only the kernel's
    environment shows: a password variable set in the attaching shell, not the kernel's) was reported `started`, and
    went on failing until given up. The answer now waits for its hello or its first exit: the command says why it
    exited and where its output is, exit 2."""
    site = tmp_path / "site"
    info = site / "failing_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: failing_plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[trainbus.plugins]\nfailing = fixture_plugins:FailsInInit\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ["PYTHONPATH"]]))
    gate = tmp_path / "gate"
    kernel = KernelProcess(config(short_runs, gate=str(gate)), tmp_path)
    kernels.append(kernel)
    open_gate(gate, 5)
    kernel.wait_step(5, timeout_s=STARTUP_S)
    attached = plugins_cli(kernel, "attach", kernel.run_id, "failing")
    assert attached.returncode == 2 and attached.stdout == "", (attached.stdout, attached.stderr)
    assert attached.stderr.startswith("error: failing exited before it said hello: "), attached.stderr
    assert f"{kernel.run_dir / 'plugins' / 'failing.log'}" in attached.stderr, attached.stderr
    assert f"trainbus plugins detach {kernel.run_id} failing" in attached.stderr, attached.stderr
    assert plugins_cli(kernel, "detach", kernel.run_id, "failing").returncode == 0
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=STARTUP_S)["status"] == "completed"


def test_ctrl_c_while_the_kernel_does_not_answer_says_nothing_was_sent(short_runs, tmp_path, kernels):  # noqa: F811
    """`plugins detach` to a kernel that is stopped (SIGSTOP, a debugger) waited 30 s in silence, and Ctrl-C then
    printed a Python traceback. Now the wait is said at once, with the fix, and Ctrl-C says that nothing was sent
    (exit 130); the plugin is as it was."""
    gate = tmp_path / "gate"
    metrics_log = PluginConfig("metrics_log", "trainbus.plugins.metrics_log:MetricsLogPlugin", {})
    kernel = KernelProcess(config(short_runs, [metrics_log], gate=str(gate), ready_timeout_s=STARTUP_S), tmp_path)
    kernels.append(kernel)
    open_gate(gate, 5)
    kernel.wait_step(5, timeout_s=STARTUP_S)
    os.kill(kernel.pid, signal.SIGSTOP)
    try:
        detach = subprocess.Popen([*trainbus_cmd(), "plugins", "detach", kernel.run_id, "metrics_log", "--runs-dir",
                                   str(short_runs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=sigint_as_from_a_terminal)
        try:
            assert select.select([detach.stderr], [], [], STARTUP_S)[0], "no word from `plugins detach`"
            assert detach.stderr.readline() == (f"trainbus: the run's kernel (pid {kernel.pid}) is stopped (SIGSTOP or "
                                                f"a debugger) and answers nothing; waiting up to 30 s for it to run "
                                                f"again (`kill -CONT {kernel.pid}`)\n")
            detach.send_signal(signal.SIGINT)
            out, err = detach.communicate(timeout=STARTUP_S)
        finally:
            detach.kill()
        assert (detach.returncode, out, err) == (130, "", "trainbus: Ctrl-C: nothing was sent; metrics_log is as it "
                                                           "was\n"), err
    finally:
        os.kill(kernel.pid, signal.SIGCONT)
    open_gate(gate, EPOCHS * STEPS_PER_EPOCH)
    result = kernel.result(timeout_s=STARTUP_S)
    assert result["status"] == "completed" and result["plugins"]["metrics_log"]["state"] == "exited", result
    assert not of(read_events(result["run_dir"]), "plugin_detached", "metrics_log")


def test_a_command_plugin_of_a_run_continued_from_elsewhere_attached_again_starts_where_it_first_did(
        short_runs, tmp_path, kernels):  # noqa: F811
    """A continued run's command plugins start in the directory its first session was started in (PluginConfig.cwd,
    their relative programs and files found there); detached and attached again by name, one started in the
    kernel's instead: `python rec.py` could not open its file and crashed at every restart until plugin_failed."""
    gate, path, project = tmp_path / "gate", tmp_path / "rec.txt", tmp_path / "project"
    project.mkdir()
    (project / "rec.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                    "from fixture_plugins import Recorder\nfrom trainbus.sdk import run\n"
                                    "run(Recorder)\n")
    rec = PluginConfig("rec", "", {"path": str(path)}, [sys.executable, "rec.py"], cwd=str(project))
    events = detached_and_attached_again(rec, gate, short_runs, tmp_path, kernels)
    assert not [e for e in events if e.type in ("plugin_crashed", "plugin_failed")]
