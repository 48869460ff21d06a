"""`trainbus runs stop` and `trainbus runs delete` on real runs: a live kernel (held mid-epoch by a gate) refused
deletion and stopped from the command line, an ended run told so in one line, the deletion confirmed on a real
terminal (a pty) or with --yes, and the registry forgetting what was deleted; a run the daemon has queued to be
resumed kept until it is taken off the queue."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from trainbus.kernel import daemon_files, daemon_queue
from trainbus.kernel.registry import Registry
from trainbus.kernel.session import run_training
from trainbus.proto import JOURNAL_NAME
from trainbus.proto import events as ev
from trainbus.proto.journal_format import read_journal

from conftest import TESTS_DIR, trainbus_cmd
from fixture_targets import open_gate
from helpers import ctrl_c_once_it_says, run_config
from kernel_process import KernelProcess, cli, wait_until
from test_trust import Intruder, attach_credential, short_runs, wait_sockets  # noqa: F401

PACED = f"{TESTS_DIR / 'fixture_targets.py'}:paced_digits"
TINY = f"{TESTS_DIR / 'specs.py'}:tiny"


def trainbus(*args: str) -> subprocess.CompletedProcess:
    """`trainbus ARGS`, forked with its libraries loaded (kernel_process.cli: a console script's start costs ~0.5 s of
    CPU, 19 times here); its stdin is /dev/null, not a terminal. on_a_terminal and the Ctrl-C test start the script
    itself."""
    return cli(*args)


def on_a_terminal(args: list[str], answer: str) -> tuple[int, str]:
    """The command with a pty as its stdin, `answer` typed ahead (the terminal holds it until the prompt reads);
    its exit code and what it printed."""
    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen([*trainbus_cmd(), *args], stdin=terminal, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        os.close(terminal)
        os.write(controller, answer.encode())
        output, _ = proc.communicate(timeout=120)
    finally:
        os.close(controller)
    return proc.returncode, output


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr.strip()


def test_stop_a_live_run_then_delete_it(runs_dir, tmp_path, kernels):
    gate = tmp_path / "gate"
    kernel = KernelProcess(run_config(runs_dir, epochs=3, target=PACED, batch_size=256, step_sleep_s=0.0,
                                      gate=str(gate)), tmp_path)
    kernels.append(kernel)
    # an ended run beside it, trained in this process while the kernel's process starts
    assert run_training(run_config(runs_dir, target=TINY), run_id="a-ended").status == "completed"
    open_gate(gate, 2)
    kernel.wait_step(2, timeout_s=60)  # now held before its third batch: live until the gate opens
    where = ("--runs-dir", str(runs_dir))

    # a running run is not deleted, nor anything named with it
    proc = trainbus("runs", "delete", "a-ended", kernel.run_id, "--yes", *where)
    assert proc.returncode == 2 and one_line(proc) == \
        f"error: run {kernel.run_id} is running; stop it first with `trainbus runs stop {kernel.run_id} --runs-dir " \
        f"{runs_dir}`"
    assert (runs_dir / "a-ended").is_dir() and kernel.run_dir.is_dir()

    # its socket files gone (a cleaner of /tmp, a hand's rm): said at once, with the signal that still stops it,
    # not minutes of connecting in silence
    # (where kernel.log says: a run directory too deep for a socket path has them elsewhere)
    sockets = [Path(p) for p in re.findall(r"ipc://(\S+\.sock)", (kernel.run_dir / "kernel.log").read_text())]
    assert len(sockets) == 3, sockets
    for path in sockets:
        path.rename(path.with_name(path.name + ".away"))
    proc = trainbus("runs", "stop", kernel.run_id, *where)
    assert proc.returncode == 2 and one_line(proc) == (
        f"error: no socket {sockets[0]}, though the run's kernel (pid {kernel.proc.pid}) is "
        f"alive: its socket files were removed, so nothing can reach it; `kill -TERM {kernel.proc.pid}` stops it "
        f"as Ctrl-C does")
    for path in sockets:  # a unix socket renamed back is the kernel's again
        path.with_name(path.name + ".away").rename(path)

    proc = trainbus("runs", "stop", kernel.run_id, "--reason", "enough for today", *where)
    assert proc.returncode == 0, proc.stderr
    assert f"stop sent to run {kernel.run_id} as attach-" in proc.stdout
    open_gate(gate, 10**6)
    assert kernel.result(timeout_s=120)["status"] == "stopped"
    stops = [e for e in read_journal(kernel.run_dir) if e.type == ev.STOP_REQUESTED]
    assert len(stops) == 1 and stops[0].data["reasons"][0].endswith(": stop: enough for today"), stops

    proc = trainbus("runs", "stop", kernel.run_id, *where)
    assert proc.returncode == 1 and one_line(proc) == \
        f"error: run {kernel.run_id} has already ended (stopped); there is nothing to stop"

    # no terminal to ask on: --yes or nothing
    proc = trainbus("runs", "delete", kernel.run_id, *where)
    assert proc.returncode == 2 and one_line(proc) == \
        f"error: deleting {kernel.run_id} needs a yes: add --yes (stdin is not a terminal to ask on)"
    # on a terminal it asks; anything but yes keeps the run
    code, output = on_a_terminal(["runs", "delete", kernel.run_id, *where], "n\n")
    assert code == 1 and f"Delete 1 run ({kernel.run_id}) with every file in it? [y/N]" in output, output
    assert "nothing deleted" in output and kernel.run_dir.is_dir()
    code, output = on_a_terminal(["runs", "delete", kernel.run_id, *where], "y\n")
    assert code == 0 and f"deleted run {kernel.run_id} ({kernel.run_dir})" in output, output
    assert not kernel.run_dir.exists()

    proc = trainbus("runs", "delete", "a-e", "--yes", *where)  # a unique start of an id will do
    assert proc.returncode == 0 and proc.stdout == f"deleted run a-ended ({runs_dir.resolve() / 'a-ended'})\n"
    assert not (runs_dir / "a-ended").exists()
    # the registry forgot both at once (what reads it alone, as the daemon does, sees no stale row)
    with Registry(runs_dir) as registry:
        assert registry.runs(0.0) == {}


def test_a_stop_reason_with_escape_codes_and_newlines_is_kept_escaped_not_sent_to_the_terminal(runs_dir, tmp_path,
                                                                                               kernels):
    """`runs stop --reason` took any text: the run's `stopped by:` line and `runs show` printed its escape sequence
    (which recolours, or clears, the terminal) and its newline as they were."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(run_config(runs_dir, epochs=3, target=PACED, batch_size=256, step_sleep_s=0.0,
                                      gate=str(gate)), tmp_path)
    kernels.append(kernel)
    open_gate(gate, 1)
    kernel.wait_step(1, timeout_s=60)
    proc = trainbus("runs", "stop", kernel.run_id, "--reason", "a\x1b[31mred\nline2", "--runs-dir", str(runs_dir))
    assert proc.returncode == 0, proc.stderr
    open_gate(gate, 10**6)
    result = kernel.result(timeout_s=120)
    assert result["status"] == "stopped" and result["outcome"]["stop_reasons"][0].endswith(": stop: a\\x1b[31mred"
                                                                                            "\\x0aline2"), result
    shown = trainbus("runs", "show", kernel.run_id, "--runs-dir", str(runs_dir))
    assert shown.returncode == 0 and "\x1b" not in shown.stdout, shown.stdout
    stopped_by = next(line for line in shown.stdout.splitlines() if "stopped by" in line)
    assert stopped_by.endswith(": stop: a\\x1b[31mred\\x0aline2"), shown.stdout


def test_a_run_queued_to_be_resumed_is_not_deleted_until_taken_off_the_queue(runs_dir):
    assert run_training(run_config(runs_dir, target=TINY), run_id="a-queued").status == "completed"
    # as `trainbus runs resume a-queued --detach` queues it for a daemon not running yet
    daemon_queue.submit(runs_dir, "a-queued", ["a-queued"], None, None, {}, resumes=runs_dir / "a-queued", wake=False)
    where = ("--runs-dir", str(runs_dir))

    proc = trainbus("runs", "delete", "a-queued", "--yes", *where)
    assert proc.returncode == 2 and one_line(proc) == \
        "error: run a-queued is queued for the daemon; take it off the queue first with `trainbus runs stop " \
        f"a-queued --runs-dir {runs_dir}`"
    assert (runs_dir / "a-queued" / JOURNAL_NAME).is_file()
    # nor resumed here meanwhile (the daemon would resume it again afterwards)
    proc = trainbus("run", "--resume", "a-queued", "--epochs", "3", *where)
    assert proc.returncode == 2 and one_line(proc) == (
        "error: run a-queued is queued for the daemon to resume: take it off the queue first "
        f"(`trainbus runs stop a-queued --runs-dir {runs_dir}`), or let the daemon resume it")

    proc = trainbus("runs", "stop", "a-queued", *where)
    assert proc.returncode == 0 and "cancelled the queued resume of a-queued; the run stays as it was" in proc.stdout
    output = daemon_files.output_file(runs_dir, "a-queued")  # as if a daemon had run it once: its output goes too
    daemon_files.make_daemon_dir(runs_dir)
    output.write_text("trainbus: ...\n")
    older = output.with_name(output.name + ".1")  # what the daemon's cap moved aside (kernel/daemon.py)
    older.write_text("epoch 1 ...\n")
    proc = trainbus("runs", "delete", "a-queued", "--yes", *where)
    assert proc.returncode == 0, proc.stderr
    assert not (runs_dir / "a-queued").exists() and not output.exists() and not older.exists()


def test_two_deletes_of_one_run_at_once_say_what_the_second_met(tmp_path):
    """Two `runs delete RUN` at once (a script, a key pressed twice): the one that found the journal locked by the
    other said the completed run `is running; stop it first`. It says another process holds the run now."""
    runs = tmp_path / "runs"
    run_id = run_training(run_config(runs, target=TINY)).run_id  # a completed run (in this process: no CLI start)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_JOURNAL, str(runs / run_id / JOURNAL_NAME)],
                              stdout=subprocess.PIPE, text=True)  # as the other delete holds it while files go
    try:
        assert holder.stdout.readline() == "locked\n"
        second = trainbus("runs", "delete", run_id, "--yes", "--runs-dir", str(runs))
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2 and second.stderr == (
        f"error: run {run_id} is in use by another process (a kernel continuing it, or another `trainbus runs "
        f"delete`); nothing deleted: try again once that is done\n"), second.stderr
    assert (runs / run_id / "summary.json").is_file()


def test_a_run_whose_resume_is_starting_is_not_deleted_under_it(tmp_path):
    """A resume takes the journal's lock only once it has set the run up (loaded its checkpoint, built the model):
    `runs delete` meanwhile found the journal free and the run ended, and removed the directory under the kernel
    continuing it, which then failed `cannot set up the run directory ...; free space there`."""
    from trainbus.kernel.plugin_names import resolve_plugin

    runs, gate = tmp_path / "runs", tmp_path / "restore-gate"
    result = run_training(run_config(runs, [resolve_plugin("checkpoint", {})], 1, "fixture_targets:restore_gated",
                                     checkpoint_every_n_epochs=1, step_sleep_s=0.0, batch_size=256,
                                     restore_gate=str(gate)))
    assert result.status == "completed", result.error
    resume = subprocess.Popen([*trainbus_cmd(), "runs", "resume", result.run_id, "--runs-dir", str(runs), "--epochs",
                               "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(tmp_path.glob("restore-gate.waiting-*")) or resume.poll() is not None, 180,
                   "the resume at its checkpoint's restore")
        deleted = trainbus("runs", "delete", result.run_id, "--yes", "--runs-dir", str(runs))
        open_gate(gate, 1)
        code, out, err = resume.wait(timeout=180), *resume.communicate(timeout=10)
    finally:
        resume.kill()
    assert deleted.returncode == 2 and deleted.stderr == (
        f"error: run {result.run_id} is in use by another process (a kernel continuing it, or another `trainbus runs "
        f"delete`); nothing deleted: try again once that is done\n"), deleted.stderr
    assert code == 0 and f"run {result.run_id}: completed after 2 epochs" in out, err


HOLD_JOURNAL = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


# `trainbus runs delete ...` whose third file removal in the runs directory waits a second, after saying so:
# the moment the test's Ctrl-C lands, every time (an audit hook: os.remove raises its event before it removes).
_HELD_REMOVAL = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal (a background job's is ignored)
runs, sys.argv, seen = sys.argv[1], ["trainbus", *sys.argv[2:]], []
def hook(event, args):
    # rmtree removes by a name within its directory's descriptor (dir_fd): any other removal names its path
    if event == "os.remove" and (args[1] is not None or str(args[0]).startswith(runs)) and len(seen) < 3:
        seen.append(args[0])
        if len(seen) == 3:
            print("deleting", flush=True)
            time.sleep(1)
sys.addaudithook(hook)
from trainbus.kernel.cli import main
main()
"""


def test_a_ctrl_c_while_a_run_is_deleted_stops_once_that_run_is_gone_whole(tmp_path):
    """It cut the rmtree where it was, leaving the run half there (some of its files gone), exit 130 and not a
    word. Now the run being deleted goes whole, the ones after it stay, and the line says which."""
    runs = tmp_path / "runs"
    # two completed runs, trained in this process (two `trainbus run`s cost a torch start each)
    ids = [run_training(run_config(runs, target=TINY), run_id=run_id).run_id for run_id in ("run-1", "run-2")]
    code, out, err = ctrl_c_once_it_says(_HELD_REMOVAL, [str(runs), "runs", "delete", *ids, "--yes", "--runs-dir",
                                                        str(runs)], "deleting")
    assert (code, err) == (130, f"trainbus: Ctrl-C: stopped; not deleted: {ids[1]}\n"), err
    assert out.startswith(f"deleted run {ids[0]} ")
    assert not (runs / ids[0]).exists() and (runs / ids[1] / "summary.json").is_file()


def test_runs_on_a_read_only_mount_are_refused_deletion_up_front_in_one_line(tmp_path, mount_tmpfs):
    """`runs delete A B` of runs on a read-only mount said `cannot delete run A: kernel.log: Read-only file system
    (some of its files may be gone)`: nothing could go, and the line said something might have. Refused before any
    file is touched, naming the mount."""
    disk = mount_tmpfs("archive", 64 << 20)
    runs = disk / "runs"
    ids = [run_training(run_config(runs, target=TINY)).run_id for _ in range(2)]
    remounted = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True, timeout=30)
    assert remounted.returncode == 0, remounted.stderr
    deleted = trainbus("runs", "delete", *ids, "--yes", "--runs-dir", str(runs))
    assert (deleted.returncode, deleted.stdout) == (2, ""), deleted
    assert deleted.stderr == (f"error: cannot delete run {ids[0]}: {runs.resolve()} is on a read-only filesystem; "
                              f"nothing deleted\n"), deleted.stderr


def test_delete_takes_only_a_run_the_kernel_made_never_a_folder_with_a_config_json_or_the_runs_directory(tmp_path):
    """A run is named by path too, and any folder with a config.json passed for one: `runs delete ..` deleted the
    project holding the runs directory, with everything in it; `runs delete ''` looked up the runs directory."""
    project = tmp_path / "project"
    runs = project / "runs"
    runs.mkdir(parents=True)
    (project / "config.json").write_text("{}\n")  # the project's own, not a run's
    (project / "data.csv").write_text("x\n")
    lookalike = tmp_path / "elsewhere"
    lookalike.mkdir()
    (lookalike / "config.json").write_text("{}\n")
    where = ("--runs-dir", str(runs))

    proc = trainbus("runs", "delete", "..", "--yes", *where)
    assert proc.returncode == 2 and one_line(proc) == (
        f"error: {project} holds the runs directory {runs}: it is not a run; nothing deleted")
    proc = trainbus("runs", "delete", str(lookalike), "--yes", *where)
    assert proc.returncode == 2 and f"error: {lookalike} is not a run directory: it has a config.json but none of " \
        "what a kernel writes beside it" in one_line(proc)
    proc = trainbus("runs", "delete", "", "--yes", "--runs-dir", str(project))
    assert proc.returncode == 2 and one_line(proc).startswith("error: no run given (an empty id): give a run id")
    assert (project / "data.csv").is_file() and runs.is_dir() and (lookalike / "config.json").is_file()


def test_a_stop_from_a_peer_whose_name_has_escape_codes_and_newlines_is_said_escaped(short_runs, tmp_path,
                                                                                     kernels):  # noqa: F811
    """A peer attached by hand says hello under any name: its stop's reason was escaped, its name was not, so the
    run's `stopped by:` line, summary.json and `runs show` carried its escape sequence and newline as they were."""
    gate = tmp_path / "gate"
    kernel = KernelProcess(run_config(short_runs, epochs=3, target=PACED, batch_size=256, step_sleep_s=0.0,
                                      gate=str(gate)), tmp_path)
    kernels.append(kernel)
    wait_sockets(kernel)
    peer = Intruder(kernel.run_dir, "stopper", subscribe=True)
    try:
        wait_until(lambda: peer.next_event(0.1), 60, "a first event")  # our subscription is live: say hello
        peer.hello("evil\x1b[31mRED\nX" + "n" * 150, attach_credential(kernel.run_dir), replies=["stop"])
        peer.wait_reply("welcome")
        peer.send("stop", reason="bye")
        open_gate(gate, 10**6)  # the stop lands at the next step boundary
        kernel.wait_event("stop_requested", timeout_s=60)
    finally:
        peer.close()
    result = kernel.result(timeout_s=120)
    said = result["outcome"]["stop_reasons"]
    assert result["status"] == "stopped" and len(said) == 1 and said[0].startswith("evil\\x1b[31mRED\\x0aXnnn"), said
    assert said[0].endswith(": stop: bye") and len(said[0]) < 1200, said
    shown = trainbus("runs", "show", kernel.run_id, "--runs-dir", str(short_runs))
    assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\nX" not in shown.stdout, shown.stdout
