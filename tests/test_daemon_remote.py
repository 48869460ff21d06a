"""The kernel daemon's remote endpoint (`daemon start --listen`, kernel/daemon_serve.py Remote): CURVE keys with
roles, a flood of connections with no key, and the client commands' mistakes with --remote, --key and
--server-key. The local daemon's tests are in test_daemon.py, whose helpers these share."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from trainbus.kernel.daemon_files import daemon_dir
from trainbus.kernel.journal import read_events
from trainbus.kernel.registry import Registry

from conftest import start_daemon, child_path_with_tests, trainbus_cmd
from fixture_targets import open_gate
from kernel_process import wait_until
from remote_support import curve_dealers, peak_growth_while_flooding
from test_daemon import PACED, TINY, WAIT_S, cli, listed, one_error_line, started_by_a_gone_daemon


def test_key_file_mistakes_on_remote_daemon_commands_are_one_error_line(tmp_path):
    """No daemon is needed: the keys are read before anything is sent."""
    from trainbus.kernel.keys import KeyStore

    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    public, secret = store.generate_client("p", "control")
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a key\n")
    garbage.chmod(0o600)
    no_server_key = tmp_path / "remote.json"
    folder = tmp_path / "alice"  # a folder's mode, 0755: it was said as "readable by others; fix: chmod 600"
    folder.mkdir(mode=0o755)
    mistakes = [  # (command, --key, --server-key, what the line says)
        (["status"], tmp_path / "nosuch.key", store.server_public, "nosuch.key: No such file or directory"),
        (["cancel", "x"], garbage, store.server_public, f"key file {garbage} is not a readable CURVE key"),
        (["submit", "--", TINY], public, store.server_public, f"{public} holds no secret key; give the .key_secret"),
        (["status"], secret, no_server_key, f"server key file {no_server_key}: No such file or directory; copy"),
        (["cancel", "x"], secret, tmp_path / "nosuch.key", f"no key file {tmp_path / 'nosuch.key'}: copy it there"),
        (["status"], secret, store.server_secret, f"{store.server_secret} is a secret key: a client pins the server's "
                                                  f"public key"),
        (["status"], secret, garbage, f"server key file {garbage} is not a readable CURVE public key; copy server.key"),
        (["status"], folder, store.server_public, f"key file {folder} is a directory, not a key file: give the "
                                                  f"NAME.key_secret file itself"),
    ]
    free = socket.socket()  # a port nothing listens on
    free.bind(("127.0.0.1", 0))
    where = f"127.0.0.1:{free.getsockname()[1]}"
    free.close()
    for command, key, server_key, said in mistakes:
        done = cli("daemon", command[0], "--remote", where, "--key", str(key), "--server-key",
                   str(server_key), *command[1:], check=False)
        assert said in one_error_line(done), (command, done.stderr)
    # good keys, and nothing listening there: said in seconds (it waited its 15 s, then guessed at the keys)
    done = cli("daemon", "status", "--remote", where, "--key", str(secret), "--server-key", str(store.server_public),
               check=False)
    assert done.returncode == 2 and one_error_line(done).startswith(
        f"error: nothing accepts connections at tcp://{where} (refused or unreachable for "), done.stderr


def ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def listening_daemon(tmp_path: Path, daemons, clients: list[tuple[str, str]], *flags: str,
                     listen: str = "127.0.0.1:0") -> tuple[Path, list[Path], str, int]:
    """A daemon of tmp_path/runs started with FLAGS and --listen LISTEN, a new server pair and a client key per (name,
    role) of `clients`: (its runs directory, each client's secret key file, its endpoint, its pid)."""
    from trainbus.kernel.keys import KeyStore

    runs = tmp_path / "runs"
    runs.mkdir()
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    secrets = [store.generate_client(name, role)[1] for name, role in clients]
    pid = start_daemon(daemons, runs, *flags, "--listen", listen, "--keys-dir", str(store.directory))
    return runs, secrets, json.loads((daemon_dir(runs) / "remote.json").read_text())["endpoint"], pid


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One listening daemon (--gpus "": no devices) for the tests that only ask it something or end the runs they
    submit: its runs directory, a control key (`pilot`), a monitor key (`watcher`), its endpoint and remote.json.
    A daemon start and stop each cost those tests ~0.8 s of CPU; each test compares what it looks at with what was
    there before it, as others may have left ended runs."""
    served: list[Path] = []
    with child_path_with_tests():
        try:
            runs, [pilot, watcher], endpoint, pid = listening_daemon(tmp_path_factory.mktemp("shared"), served,
                                                                     [("p", "control"), ("w", "monitor")], "--gpus", "")
            yield {"runs": runs, "pilot": pilot, "watcher": watcher, "endpoint": endpoint,
                   "remote_json": daemon_dir(runs) / "remote.json", "pid": pid}
        finally:
            for directory in served:
                cli("daemon", "stop", "--runs-dir", str(directory), check=False)


def over_tcp_with(daemon: dict, key: str = "pilot"):
    """`trainbus daemon COMMAND --remote ... ARGS` to the shared daemon with its key `key`, check=False."""
    def over_tcp(command: str, *args: str) -> subprocess.CompletedProcess:
        return cli("daemon", command, "--remote", daemon["endpoint"], "--key", str(daemon[key]), "--server-key",
                   str(daemon["remote_json"]), *args, check=False)
    return over_tcp


def all_ended(runs: Path) -> bool:
    """Every job of the daemon's queue ended, as the daemon settles it once its run's process is gone."""
    with Registry(runs) as registry:
        return all(job["state"] == "ended" for job in registry.jobs())


@pytest.fixture(scope="module")
def ended_over_tcp(shared_daemon) -> str:
    """A run a control key submitted to the shared daemon, completed and settled (its job ended): its id."""
    runs = shared_daemon["runs"]
    ended = over_tcp_with(shared_daemon)("submit", "--", TINY, "--epochs", "1").stdout.strip()
    wait_until(lambda: listed(runs).get(ended, {}).get("status") == "completed" and all_ended(runs), WAIT_S,
               "the submitted run to complete and be settled")
    return ended


def test_a_remote_submission_leaves_torch_out_of_the_daemon(shared_daemon, ended_over_tcp):
    """The daemon's answer to a submit imported the kernel's session module for a new run id, and torch with it:
    ~1.5 s of CPU, and ~200 MB more of the daemon's memory kept for as long as it served. Its runs import torch, each in
    its own process."""
    assert "libtorch" not in Path(f"/proc/{shared_daemon['pid']}/maps").read_text()


def test_the_daemons_endpoint_and_remote_json_are_owner_only_whatever_the_umask(tmp_path, daemons):
    """The files that tell clients where the daemon listens (.daemon/endpoint, .daemon/remote.json) were written
    0644 under umask 022, in a 0700 directory; a run's connection.json is 0600, as Jupyter writes its connection
    files. Each is owner-only from its first byte (made 0600, then renamed into place)."""
    from trainbus.proto.remote import write_connection_file

    before = os.umask(0o022)
    try:
        runs, _, endpoint, _ = listening_daemon(tmp_path, daemons, [("w", "monitor")], "--gpus", "")
        connection = write_connection_file(tmp_path, "r", endpoint, endpoint, endpoint, b"k" * 40)
    finally:
        os.umask(before)
    written = [daemon_dir(runs) / "endpoint", daemon_dir(runs) / "remote.json", connection]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in written} == {path.name: "0o600"
                                                                                 for path in written}
    assert not [path.name for path in daemon_dir(runs).iterdir() if path.name.endswith(".tmp")]


def test_the_status_command_a_remote_submission_suggests_runs_as_printed_with_key_paths_that_have_spaces(tmp_path,
                                                                                                        shared_daemon):
    """`daemon submit --remote` prints the `daemon status --remote ...` command that shows the run: its key paths were
    printed bare, so with the keys in `~/My Keys/` the command pasted into a shell named files that do not exist."""
    pilot = shared_daemon["pilot"]
    keys = tmp_path / "my keys"
    keys.mkdir(mode=0o700)
    shutil.copy(pilot, keys / pilot.name)
    shutil.copy(shared_daemon["remote_json"], keys / "remote.json")
    submitted = cli("daemon", "submit", "--remote", shared_daemon["endpoint"], "--key", str(keys / pilot.name),
                    "--server-key", str(keys / "remote.json"), "--", TINY, "--epochs", "1", "--plugins", "")
    [suggested] = re.findall(r"`(trainbus daemon status [^`]*)`", submitted.stderr)
    status = cli(*shlex.split(suggested)[1:])
    assert status.stdout.startswith("daemon pid "), status.stdout
    wait_until(lambda: all_ended(shared_daemon["runs"]), WAIT_S, "the submitted run's end")  # the next test's daemon


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_daemon_that_cannot_bind_its_port_settles_nothing_and_leaves_no_endpoint(tmp_path):
    """`daemon start --listen` on a port another process holds ran its first round (settling the runs a killed
    daemon left: a job ended, a run adopted) before its bind failed, and exited with nobody watching what it had
    just taken on. The port is bound first: a daemon that cannot start changes nothing."""
    from trainbus.kernel.keys import KeyStore

    runs = tmp_path / "runs"
    runs.mkdir()
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    store.generate_client("w", "monitor")
    started_by_a_gone_daemon(runs, "d", tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("daemon", "start", "--runs-dir", str(runs), "--listen", f"127.0.0.1:{port}", "--keys-dir",
                   str(tmp_path / "keys"), check=False)
    assert proc.returncode == 2 and f"cannot bind port {port}" in proc.stderr, proc.stderr
    with Registry(runs) as registry:
        assert registry.job("d")["state"] == "running"  # left for a daemon that serves to settle
    assert not (daemon_dir(runs) / "remote.json").exists()
    assert "d:" not in (daemon_dir(runs) / "daemon.log").read_text()


def test_the_remote_endpoint_listens_on_an_ipv6_address_as_a_run_does(tmp_path, daemons):
    """`daemon start --listen [::1]:0`, as `run --listen` takes it: it said `[::1] is not an address of this
    machine` (libzmq's `No such device` for a socket without IPv6 on) and did not start."""
    runs, [watcher], endpoint, _ = listening_daemon(tmp_path, daemons, [("w", "monitor")], listen="[::1]:0")
    assert endpoint.startswith("tcp://[::1]:"), endpoint
    status = cli("daemon", "status", "--remote", endpoint, "--key", str(watcher), "--server-key",
                 str(daemon_dir(runs) / "remote.json"), "--json", check=False)
    assert status.returncode == 0 and json.loads(status.stdout)["serving"] is True, status.stderr


def test_a_remote_submission_asking_for_more_gpus_than_the_daemon_has_is_refused_as_run_detach_refuses_it(
        shared_daemon):
    """`daemon submit --remote ... --gpus 1` to a daemon with no devices printed `queued run ID` (exit 0), and the
    run failed a second later, found only in `daemon status`; `run --detach --gpus 1` on the host is refused at
    once. Now the submission is, in the same words, and nothing is queued."""
    runs, endpoint = shared_daemon["runs"], shared_daemon["endpoint"]
    before = set(listed(runs))
    submitted = over_tcp_with(shared_daemon)("submit", "--gpus", "1", "--", TINY)
    assert (submitted.returncode, submitted.stdout, submitted.stderr) == (2, "", (
        f"error: the daemon at {endpoint.removeprefix('tcp://')} refused: --gpus 1: the run asks for 1 GPU and the "
        f"daemon has 0 (none); start the daemon with --gpus listing them\n")), submitted.stderr
    assert set(listed(runs)) == before
    ended = json.loads(cli("daemon", "status", "--runs-dir", str(runs), "--json").stdout)["ended"]
    assert {job["run"] for job in ended} <= before, ended  # no run of this submission failed later


def test_an_option_before_dashes_that_daemon_submit_has_not_is_refused_here_in_its_words(tmp_path):
    """`daemon submit ... --gpu 1 -- train.py:build`: the mistyped --gpus, given before `--`, went to the daemon as part
    of the command, which said "`trainbus run` would refuse the command: No such option: --gpu (did you mean daemon
    submit's own --gpus, given before `--`?)" of an option given before `--`; with no daemon there, the typo was
    never said at all (`nothing accepts connections ...`, after 5 s). Before `--` are submit's own options: one it
    has not is refused here, in one line, nothing sent. Without `--`, the command's words are still the run's."""
    key = tmp_path / "k.key_secret"
    remote = ("daemon", "submit", "--remote", "127.0.0.1:9", "--key", str(key), "--server-key", str(key))
    for words, said in ((["--gpu", "1"], "No such option: --gpu (did you mean --gpus?)"),
                        (["--max-resumes=2", "--bogus"], "No such option: --bogus")):
        done = cli(*remote, *words, "--", TINY, "--epochs", "1", check=False)
        assert one_error_line(done) == f"error: {said} (`trainbus daemon submit --help` shows what it takes)", \
            done.stderr
    sent = cli(*remote, "--epochs", "1", TINY, check=False)  # no `--`: ARGS, read as the key files are
    assert "No such option" not in sent.stderr and "k.key_secret" in one_error_line(sent), sent.stderr


def test_a_remote_submission_is_read_as_trainbus_run_reads_it_refused_in_its_words_and_listed_with_its_target(
        tmp_path, shared_daemon):
    """`daemon submit ... -- --resume` (no value), `-- --bogus` or `-- --epochs x` printed `queued run ID` (exit 0),
    and the run failed once the daemon started it, click's usage error found only in the run's output; the daemon
    now refuses each in click's words, nothing queued. And it took a submission's first word for its target:
    `-- --epochs 1 missing.py:build` (an option first) was listed with target `-`, while queued and, failing before
    it had a directory, for good."""
    runs, host = shared_daemon["runs"], shared_daemon["endpoint"].removeprefix("tcp://")
    before = set(listed(runs))

    def submit(*argv: str) -> subprocess.CompletedProcess:
        return over_tcp_with(shared_daemon)("submit", "--", *argv)

    for argv, said in ((["--resume"], "Option '--resume' requires an argument."),
                       ([TINY, "--bogus"], "No such option: --bogus"),
                       ([TINY, "--epochs", "x"], "Invalid value for '--epochs'"),
                       # the near miss of an option `daemon submit` takes itself is pointed there, not at `run --gpus`,
                       # which a submission's ARGS may not hold
                       ([TINY, "--gpu", "1"], "No such option: --gpu (did you mean daemon submit's own --gpus, given "
                                              "before `--`?)"),
                       ([TINY, "--detatch"], "No such option: --detatch")):
        refused = submit(*argv)
        assert refused.returncode == 2 and one_error_line(refused).startswith(
            f"error: the daemon at {host} refused: `trainbus run` would refuse the command: {said}"), refused.stderr
        assert "--detach" not in refused.stderr, refused.stderr  # it queues; no --detach to suggest
    assert set(listed(runs)) == before
    missing = str(tmp_path / "missing.py") + ":build"
    run_id = submit("--epochs", "1", missing).stdout.strip()
    wait_until(lambda: listed(runs).get(run_id, {}).get("status") == "failed", WAIT_S, "the run failed", poll_s=0.2)
    assert listed(runs)[run_id]["target"] == missing, listed(runs)
    wait_until(lambda: all_ended(runs), WAIT_S, "the daemon to settle the failed run")  # the next test's daemon


def test_the_target_a_submitted_command_trains_is_its_own_the_demos_or_unknown_when_its_config_names_it():
    """As `trainbus run` reads it: a first word with `=` is a flag; no target trains the digits demo, unless a
    --config names one (the daemon reads no file for a listing)."""
    from trainbus.kernel.cli import read_run_command
    from trainbus.kernel.daemon_serve import _target
    from trainbus.kernel.target import DEFAULT_TARGET

    for argv, target in ((["--epochs", "1", "t.py:build", "lr=0.1"], "t.py:build"), (["lr=0.1"], DEFAULT_TARGET),
                         ([], DEFAULT_TARGET), (["-c", __file__, "--epochs", "2"], None)):
        command, refused = read_run_command(argv)
        assert refused is None and _target(command) == target, (argv, command)


def test_a_run_submitted_over_tcp_to_listen_on_a_free_port_is_listed_with_the_endpoint_to_attach_to(tmp_path,
                                                                                                     daemons):
    """Alice submits from her laptop a run that listens (`-- ... --listen 127.0.0.1:0`) to watch it there: the port
    it took was only in its connection.json, on the host, and nothing her key reaches said it. `daemon status` now
    lists each running run's --listen endpoint, and `trainbus attach` there, with the daemon's remote.json as the
    server key (the same host's key), shows the run."""
    from trainbus.kernel.keys import KeyStore
    from trainbus.proto.remote import CONNECTION_FILE, read_connection_file

    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    pilot = store.generate_client("alice", "control")[1]
    start_daemon(daemons, runs, "--listen", "127.0.0.1:0", "--keys-dir", str(store.directory))
    remote_json = daemon_dir(runs) / "remote.json"
    host_port = json.loads(remote_json.read_text())["endpoint"].removeprefix("tcp://")
    over_tcp = ["--remote", host_port, "--key", str(pilot), "--server-key", str(remote_json)]
    submitted = cli("daemon", "submit", *over_tcp, "--", PACED, "--set", f"gate={gate}", "--epochs", "1",
                    "--listen", "127.0.0.1:0", "--keys-dir", str(store.directory))
    run_id = submitted.stdout.strip()
    connection_file = runs / run_id / CONNECTION_FILE
    try:
        wait_until(connection_file.exists, WAIT_S, "the submitted run listening")
        endpoint = read_connection_file(connection_file)["control"]
        shown = cli("daemon", "status", *over_tcp).stdout
        assert f"running {run_id} (pid " in shown and f"listening on {endpoint}" in shown, shown
        status = json.loads(cli("daemon", "status", *over_tcp, "--json").stdout)
        assert status["running"][run_id]["listen"] == endpoint, status
        # the gate holds the run at its first batch, so attach would watch on: its first line is enough
        attach = subprocess.Popen([*trainbus_cmd(), "attach", endpoint, "--key", str(pilot), "--server-key",
                                   str(remote_json), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            ready = select.select([attach.stdout], [], [], 60)[0]
            first = json.loads(attach.stdout.readline()) if ready else {}
        finally:
            attach.kill()
            said = attach.communicate(timeout=30)[1]
        assert (first.get("type"), first.get("run")) == ("snapshot", run_id), said
    finally:
        open_gate(gate, 10 ** 6)
    wait_until(lambda: listed(runs).get(run_id, {}).get("status") == "completed", WAIT_S, "the run's end")


def test_over_tcp_a_monitor_key_sees_the_queue_a_control_key_submits_and_an_unknown_key_gets_nothing(tmp_path,
                                                                                                      daemons):
    from trainbus.kernel.keys import KeyStore

    runs = tmp_path / "runs"
    runs.mkdir()
    store = KeyStore(tmp_path / "keys")
    store.generate_server()
    watcher, pilot = (store.generate_client(name, role)[1] for name, role in (("w", "monitor"), ("p", "control")))
    stranger = KeyStore(tmp_path / "elsewhere").generate_client("s", "control")[1]
    start_daemon(daemons, runs, "--listen", "127.0.0.1:0", "--keys-dir", str(store.directory))
    remote = json.loads((daemon_dir(runs) / "remote.json").read_text())
    host_port = remote["endpoint"].removeprefix("tcp://")
    shown = cli("daemon", "status", "--runs-dir", str(runs)).stdout  # `daemon start` prints the same line
    assert f"remote endpoint {remote['endpoint']}: clients need a key" in shown, shown

    def over_tcp(key: Path, command: str, *args: str) -> subprocess.CompletedProcess:
        return cli("daemon", command, "--remote", host_port, "--key", str(key), "--server-key",
                   str(daemon_dir(runs) / "remote.json"), *args, check=False)

    status = over_tcp(watcher, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["serving"] is True, status.stderr
    pasted = cli("daemon", "status", "--remote", remote["endpoint"], "--key", str(watcher), "--server-key",
                 str(daemon_dir(runs) / "remote.json"), check=False)  # tcp://HOST:PORT, as status printed it
    assert pasted.returncode == 0 and " serves " in pasted.stdout, pasted.stderr
    refused = over_tcp(watcher, "submit", "--", TINY, "--epochs", "1")
    assert refused.returncode == 2 and ("submit is not granted to this key (role monitor): it takes a control key "
                                        "(`trainbus keys generate client NAME --role control` on the daemon's host)"
                                        ) in refused.stderr, refused.stderr
    # a key the daemon does not know, or another server's key pinned: one line saying which, at once (libzmq's
    # socket monitor; the CLI waited out its 15 s for an answer that never comes, then guessed)
    other_server = KeyStore(tmp_path / "elsewhere").generate_server()[0]
    for key, server_key, said in ((stranger, daemon_dir(runs) / "remote.json", "refused this client's key"),
                                  (pilot, other_server, "drops every handshake: the server key pinned for it is "
                                   "not that host's (give --server-key its server.key, or the daemon's "
                                   ".daemon/remote.json), its authenticator is down, or no trainbus daemon listens")):
        done = cli("daemon", "status", "--remote", host_port, "--key", str(key), "--server-key", str(server_key),
                   check=False)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"error: tcp://{host_port} {said}"), done.stderr  # a guess, before
    from trainbus.kernel.daemon_client import RemoteDaemon, request

    # a monitor key's hostile requests: each answered as unknown, and the daemon serves on

    monitor = RemoteDaemon(host_port, watcher, daemon_dir(runs) / "remote.json")
    for op in ([1], {"a": 1}, None, 7, "x" * 1000):
        answer = request(None, op, remote=monitor, timeout_s=30)
        assert answer is not None and answer["ok"] is False and "unknown request" in answer["error"], (op, answer)
    assert request(None, "status", remote=monitor, timeout_s=30)["ok"] is True

    submitted = over_tcp(pilot, "submit", "--", TINY, "--epochs", "1", "--plugins", "checkpoint", "--device", "cpu")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    wait_until(lambda: listed(runs).get(run_id, {}).get("status") == "completed", WAIT_S, "the remote submission")
    assert (runs / run_id / "config.json").is_file()  # in the daemon's runs directory, whatever cwd it has
    with Registry(runs) as registry:  # who asked: the connection's key, as the daemon's log says it too
        assert {job["id"]: job for job in registry.jobs()}[run_id]["submitted_by"] == "key p"
    log = (daemon_dir(runs) / "daemon.log").read_text()
    assert f"submit from key p: {{'ok': True, 'run': '{run_id}'}}" in log, log[-2000:]
    assert "refused submit from key w (role monitor)" in log, log[-2000:]
    # `--resume RUN` over TCP goes on with that run, under its id, as `run --resume RUN --detach` does
    detached = over_tcp(pilot, "submit", "--", TINY, "--detach")
    assert detached.returncode == 2 and "no --detach" in detached.stderr, detached.stderr
    done = over_tcp(pilot, "submit", "--", "--resume", run_id[:-1])  # checked as locally: nothing to resume
    assert done.returncode == 2 and f"run {run_id} has completed (1 epoch); nothing to resume" in done.stderr, \
        done.stderr
    # the fix it names is the remote key's own command, not `trainbus run --resume` on the daemon's host
    assert f"(to train it longer: `trainbus daemon submit --remote ... -- --resume {run_id} --epochs N` with N above " \
           f"1)" in done.stderr, done.stderr
    resumed = over_tcp(pilot, "submit", "--", "--resume", run_id[:-1], "--epochs", "2")
    assert resumed.returncode == 0 and resumed.stdout.strip() == run_id, (resumed.stdout, resumed.stderr)
    wait_until(lambda: all_ended(runs), WAIT_S, "the resume to end")
    # how a submission went is the remote key's to see in `status` (it has no `runs list` there), newest first
    failing = over_tcp(pilot, "submit", "--", "nosuch_module_xyz:build")
    assert f"`trainbus daemon status --remote {host_port} --key {pilot}" in failing.stderr, failing.stderr
    wait_until(lambda: all_ended(runs), WAIT_S, "the failing submission to end")
    ended = json.loads(over_tcp(watcher, "status", "--json").stdout)["ended"]
    assert [(job["run"], job["status"]) for job in ended] == [(failing.stdout.strip(), "failed"), (run_id, "completed")]
    assert "cannot import module 'nosuch_module_xyz'" in ended[0]["error"] and ended[0]["submitted_by"] == "key p"
    shown = over_tcp(watcher, "status").stdout
    assert f"ended {failing.stdout.strip()} " in shown and ": failed (ended before its run had a directory" in shown
    # a running run is the control key's to stop too: `daemon cancel` stops it, its reason naming the key
    gate = tmp_path / "gate"
    held = over_tcp(pilot, "submit", "--", PACED, "--plugins", "", "--device", "cpu", "--set", "batch_size=256",
                    "--set", f"gate={gate}").stdout.strip()
    assert "not granted" in over_tcp(watcher, "cancel", held).stderr
    wait_until(lambda: listed(runs).get(held, {}).get("status") == "running", WAIT_S, "the held run started")
    stopping = over_tcp(pilot, "cancel", held[:-3])
    assert stopping.returncode == 0 and f"stopping {held} at its next step boundary" in stopping.stdout, \
        stopping.stdout + stopping.stderr
    assert "no run id given" in over_tcp(pilot, "cancel", "").stderr  # not the one run that runs
    wait_until(lambda: (runs / held / "config.json").is_file()  # the stop's request, journaled as it came
               and any("cancelled by key p" in str(e.data.get("text")) for e in read_events(runs / held)), WAIT_S,
               "the stop journaled")
    open_gate(gate, 3)
    wait_until(lambda: listed(runs)[held]["status"] != "running", WAIT_S, "the stopped run to end")
    summary = json.loads((runs / held / "summary.json").read_text())
    assert summary["status"] == "stopped" and "cancelled by key p" in "; ".join(summary["outcome"]["stop_reasons"]), \
        summary["outcome"]
    # its process exits after the summary
    wait_until(lambda: all_ended(runs), WAIT_S, "the daemon to settle the stopped run")
    gone = over_tcp(pilot, "cancel", held)
    assert gone.returncode == 2 and f"run {held} is not queued: it ran and ended (" in gone.stderr, gone.stderr


def test_a_flood_of_connections_with_no_key_costs_the_daemon_a_bounded_number_of_descriptors(tmp_path, daemons):
    """As a kernel's (tests/test_remote_floods.py): connections that never finish a handshake each held a descriptor
    of the daemon's for 5 s, with no bound; over CONNECTIONS_PER_SOCKET at once its port is now closed and bound again,
    and a keyed client is answered once the flood stops."""
    from helpers import flood_connections
    from trainbus.kernel.remote import CONNECTIONS_PER_SOCKET

    runs, [watcher], endpoint, pid = listening_daemon(tmp_path, daemons, [("w", "monitor")])
    # 1,000 a second: the 128 on top of the cap give the daemon's loop (which also ticks its queue) 0.13 s to count
    # and cut; a burst of 512 in ~0.1 s left it, on a busy box, holding them all (once in five suites)
    before, peak = flood_connections([endpoint], 2 * CONNECTIONS_PER_SOCKET, 4.0, pid, per_s=1000)
    # those accepted between the count and the cut on top (the daemon may be busy with its queue meanwhile)
    assert peak - before <= CONNECTIONS_PER_SOCKET * 3 // 2, (before, peak)
    status = cli("daemon", "status", "--remote", endpoint, "--key", str(watcher), "--server-key",
                 str(daemon_dir(runs) / "remote.json"), "--json", check=False)
    assert status.returncode == 0 and json.loads(status.stdout)["serving"] is True, status.stderr
    assert "TCP connections at once" in (daemon_dir(runs) / "daemon.log").read_text()


def test_attach_given_the_daemons_endpoint_says_it_is_not_a_runs_at_once(shared_daemon):
    """`trainbus attach HOST:PORT` with the daemon's --listen endpoint (one port) instead of its run's (three): the
    daemon took the CURVE handshake, nothing listened on PORT + 1, and attach waited 30 s to say `no kernel
    heartbeat`, asking whether the run listens there. It now says within seconds that the port is not a run's."""
    from trainbus.proto.remote import UNANSWERED_S
    from trainbus.sdk.attach import Attachment, TargetError, target_of

    endpoint = shared_daemon["endpoint"]
    port = int(endpoint.rpartition(":")[2])
    attachment = Attachment(target_of(endpoint, str(shared_daemon["watcher"]), str(shared_daemon["remote_json"])))
    started = time.monotonic()
    with pytest.raises(TargetError) as said:
        for _ in attachment:
            assert time.monotonic() - started < 60, "still trying"
    assert time.monotonic() - started < UNANSWERED_S + 5, f"took {time.monotonic() - started:.0f} s"
    assert str(said.value).startswith(
        f"{endpoint} answers, but nothing accepts connections at tcp://127.0.0.1:"), said.value
    assert f":{port + 1} " in str(said.value) or f":{port + 2} " in str(said.value), said.value
    assert "not a run's --listen HOST:PORT" in str(said.value), said.value


def test_remote_options_given_where_they_do_nothing_are_refused_in_one_line(tmp_path):
    """--key or --server-key without --remote were dropped without a word (the local daemon was asked), and so was
    --runs-dir with --remote (the remote daemon serves its own): each is refused, naming the fix."""
    runs, key = tmp_path / "runs", tmp_path / "k.key_secret"
    for command in (["status"], ["cancel", "x"]):
        for option in ("--key", "--server-key"):
            done = cli("daemon", *command, "--runs-dir", str(runs), option, str(key), check=False)
            assert one_error_line(done).startswith(f"error: {option} is for a remote daemon: give --remote "
                                                   f"HOST:PORT with it, or leave it out"), done.stderr
        done = cli("daemon", *command, "--runs-dir", str(runs), "--remote", "127.0.0.1:9", "--key", str(key),
                   "--server-key", str(key), check=False)
        assert one_error_line(done).startswith("error: --runs-dir is for a daemon on this host: a remote daemon "
                                               "serves its own runs directory; leave --runs-dir out"), done.stderr
    # submit's --runs-dir, before `--` or after it, went into the command the daemon runs, which appends its own
    for words in (["--runs-dir", str(runs), "--", "train.py:build"], ["--", "train.py:build", f"--runs-dir={runs}"]):
        done = cli("daemon", "submit", "--remote", "127.0.0.1:9", "--key", str(key), "--server-key", str(key), *words,
                   check=False)
        assert one_error_line(done).startswith("error: --runs-dir is for a daemon on this host: a remote daemon "
                                               "serves its own runs directory; leave --runs-dir out"), done.stderr


def test_daemon_stop_with_remote_options_says_it_is_the_hosts_alone(tmp_path):
    """`daemon stop --remote ...` said only "No such option: --remote", as if the option were mistyped: stop is
    the host's (a key never stops the daemon), and a control key stops a run with `daemon cancel`."""
    key = tmp_path / "k.key_secret"
    for options in (["--remote", "127.0.0.1:9"], ["--key", str(key)], ["--server-key", str(key)]):
        done = cli("daemon", "stop", "--runs-dir", str(tmp_path / "runs"), *options, check=False)
        assert done.returncode == 2, done
        assert one_error_line(done) == ("error: `daemon stop` is for the daemon's own host: run it there; a control "
                                        "key stops a run with `daemon cancel RUN --remote HOST:PORT ...`"), done.stderr


def test_an_empty_key_file_or_a_remote_command_giving_an_option_twice_is_refused_before_anything_is_sent(tmp_path):
    """`--key "$UNSET"` was read as the current directory ("server key file . is not a readable CURVE public key");
    `daemon submit -- --epochs 3 --epochs 4` was queued, and failed once the daemon started it."""
    key = tmp_path / "k.key_secret"
    for command in (["daemon", "status", "--remote", "127.0.0.1:9"], ["attach", "127.0.0.1:9"]):
        for option in ("--key", "--server-key"):
            done = cli(*command, option, "", *(["--key", str(key)] if option != "--key" else []), check=False)
            assert done.returncode == 2 and one_error_line(done).startswith(
                f"error: Invalid value for '{option}': is empty: name a key file"), done.stderr
    done = cli("daemon", "submit", "--remote", "127.0.0.1:9", "--key", str(key), "--server-key", str(key), "--",
               TINY, "--epochs", "3", "--epochs", "4", check=False)
    assert done.returncode == 2 and one_error_line(done) == (
        "error: the command's --epochs given twice (--epochs 3 and --epochs 4): give it once; nothing was "
        "submitted"), done.stderr


def test_a_monitor_key_flooding_the_daemon_with_requests_holds_little_of_its_memory(tmp_path, daemons):
    """What a TCP connection sends waits in the daemon until its loop reads it: its ROUTER queued 100 requests of up
    to 64 KiB (MAXMSGSIZE) a connection, and 256 connections may be open. 32 connections of one monitor key sending
    requests the daemon decodes slower than the wire brings them (31,000 one-letter strings in an unknown field)
    grew it by ~180 MB in 15 s (64 connections: 400 MB). A client sends one request a connection and waits for its
    answer, so the daemon now queues REMOTE_RCVHWM (4) requests a connection; past it TCP holds the sender back."""
    import msgpack
    import psutil
    import zmq

    runs, [watcher], endpoint, pid = listening_daemon(tmp_path, daemons, [("w", "monitor")])
    server_key = json.loads((daemon_dir(runs) / "remote.json").read_text())["server_key"].encode()
    bulky = msgpack.packb({"op": "x", "y": ["a"] * 31_000})
    assert len(bulky) < 64 * 1024
    memory = psutil.Process(pid)
    ctx = zmq.Context()
    try:
        grown = peak_growth_while_flooding(curve_dealers(ctx, watcher, server_key, endpoint, 32), bulky, 10.0, memory)
    finally:
        ctx.destroy(linger=0)
    assert grown < 48 << 20, f"the daemon grew {grown >> 20} MB"
    status = cli("daemon", "status", "--remote", endpoint, "--key", str(watcher), "--server-key",
                 str(daemon_dir(runs) / "remote.json"), "--json", check=False)
    assert status.returncode == 0 and json.loads(status.stdout)["serving"] is True, status.stderr


def test_requests_that_are_costly_to_decode_cost_the_daemon_little(tmp_path, daemons):
    """A request is decoded before anything else is known of it, and msgpack makes one Python object per array or
    map: 64 KB of empty arrays (under MAXMSGSIZE) took the daemon ~9 ms to decode, 64 of them a round, so one
    monitor key kept it busy a second for every ~110 it sent. The daemon now stops decoding a request at its
    1,024th array or map (MAX_CONTROL_CONTAINERS, as a run's kernel reads its peers): no request needs more."""
    import psutil
    import zmq

    runs, [watcher], endpoint, pid = listening_daemon(tmp_path, daemons, [("w", "monitor")])
    server_key = json.loads((daemon_dir(runs) / "remote.json").read_text())["server_key"].encode()
    costly = b"\xdc\xfd\xe8" + b"\x90" * 65_000  # an array of 65,000 empty arrays
    ctx = zmq.Context()
    try:
        [asker] = curve_dealers(ctx, watcher, server_key, endpoint, 1)
        asker.send(costly)  # the handshake first, out of the count
        assert asker.poll(30_000), "no answer"
        assert b"unknown request" in asker.recv()
        daemon = psutil.Process(pid)
        before, count = sum(daemon.cpu_times()[:2]), 100
        for _ in range(count):
            asker.send(costly)
            assert asker.poll(10_000), "no answer"
            assert b"unknown request" in asker.recv()
        spent = sum(daemon.cpu_times()[:2]) - before
    finally:
        ctx.destroy(linger=0)
    assert spent / count < 0.003, f"{spent / count * 1000:.1f} ms of the daemon's CPU a request"
    status = cli("daemon", "status", "--remote", endpoint, "--key", str(watcher), "--server-key",
                 str(daemon_dir(runs) / "remote.json"), "--json", check=False)
    assert status.returncode == 0 and json.loads(status.stdout)["serving"] is True, status.stderr


def test_refusals_are_logged_a_keys_first_at_once_then_as_counts_at_most_once_an_interval(caplog):
    """Refusals on a fake clock: the first of a key at once, the rest counted, said by the next refusal past the
    interval or by the round's flush once it is over, each key on its own."""
    import logging

    from trainbus.kernel.daemon_serve import REFUSED_LOG_EVERY_S as EVERY, Refusals

    refusals, t0 = Refusals(), 1000.0
    with caplog.at_level(logging.WARNING, logger="trainbus.daemon"):
        for i in range(300):
            refusals.refused("submit", "key w", "monitor", t0 + i * EVERY / 1000)
        refusals.refused("submit", "key v", "monitor", t0)
        refusals.refused("cancel", "key v", "monitor", t0 + 1)  # counted
        refusals.flush(t0 + EVERY - 0.01)  # no interval over yet
        refusals.refused("cancel", "key w", "monitor", t0 + EVERY)  # past w's: said with w's count
        refusals.flush(t0 + EVERY)  # v's count, said by the round once v's interval is over
        refusals.flush(t0 + 5 * EVERY)  # nothing left to say
    assert [r.getMessage() for r in caplog.records] == [
        "refused submit from key w (role monitor)", "refused submit from key v (role monitor)",
        "refused cancel from key w (role monitor); 299 more refused from it since",
        "refused 1 more request(s) from key v"]


REFUSAL = re.compile(r"refused (?:\w+ from key w \(role monitor\)(?:; (\d+) more refused from it since)?"
                     r"|(\d+) more request\(s\) from key w)$")


def test_a_key_asking_in_a_loop_for_what_its_role_does_not_grant_leaves_daemon_log_its_history(tmp_path, daemons):
    """Each refused request was a line of daemon.log: a monitor key asking `submit` as fast as it was answered wrote
    ~240 KB a second, and rotated every older line (who submitted what, which run died and how to resume it) out of
    the log's 40 MB in ~3 minutes. A key's refusals are now logged the first at once, then as a count at most once
    every REFUSED_LOG_EVERY_S: every refusal is accounted for, in at most two lines an interval (however long the
    asking took: the timing itself is the fake-clock test's)."""
    import msgpack
    import zmq
    from trainbus.kernel.daemon_serve import REFUSED_LOG_EVERY_S

    runs, [watcher], endpoint, _ = listening_daemon(tmp_path, daemons, [("w", "monitor")])
    server_key = json.loads((daemon_dir(runs) / "remote.json").read_text())["server_key"].encode()
    log = daemon_dir(runs) / "daemon.log"

    def refusals() -> list[re.Match]:
        return [m for line in log.read_text().splitlines() if (m := REFUSAL.search(line))]

    def accounted() -> int:
        return sum(int(m[2]) if m[2] else 1 + int(m[1] or 0) for m in refusals())

    ctx = zmq.Context()
    started = time.monotonic()
    try:
        [asker] = curve_dealers(ctx, watcher, server_key, endpoint, 1)
        for _ in range(300):
            asker.send(msgpack.packb({"op": "submit", "argv": ["x"]}))
            assert asker.poll(10_000), "no answer"
            assert b"submit is not granted to this key (role monitor)" in asker.recv()
        time.sleep(REFUSED_LOG_EVERY_S)
        asker.send(msgpack.packb({"op": "cancel", "run": "x"}))  # the next one says how many went unsaid
        assert asker.poll(10_000) and b"not granted" in asker.recv()
    finally:
        ctx.destroy(linger=0)
    # the count is said by the next refusal past the interval, or by the daemon's round once the interval is over
    wait_until(lambda: accounted() == 301, 30, "every refusal accounted for in daemon.log")
    intervals = (time.monotonic() - started) / REFUSED_LOG_EVERY_S
    assert len(refusals()) <= 2 * (intervals + 1), log.read_text()[-2000:]


def test_remote_json_goes_with_the_daemon_and_a_stale_one_is_said_to_be_a_gone_daemons(tmp_path, daemons):
    """remote.json stayed after `daemon stop` (and after a kill), naming a port nothing listens on: a client given it
    waited 5 s and was told nothing accepts connections there. It is removed at a clean stop (a copy taken
    elsewhere pins the same server key still), and a client given the daemon's own file, missing or left by a
    daemon that is gone, is told so at once, in one line."""
    import os
    import signal

    runs, [pilot], endpoint, pid = listening_daemon(tmp_path, daemons, [("p", "monitor")], "--gpus", "")
    remote_json = daemon_dir(runs) / "remote.json"
    copied = tmp_path / "remote.json"
    shutil.copy(remote_json, copied)
    cli("daemon", "stop", "--runs-dir", str(runs))
    assert not remote_json.exists(), "remote.json outlived its daemon"
    host_port = endpoint.removeprefix("tcp://")

    def asked(server_key: Path) -> tuple[subprocess.CompletedProcess, float]:
        began = time.monotonic()
        done = cli("daemon", "status", "--remote", host_port, "--key", str(pilot), "--server-key", str(server_key),
                   check=False)
        return done, time.monotonic() - began

    done, _ = asked(remote_json)
    assert done.returncode == 2 and one_error_line(done).startswith(
        f"error: {remote_json}: no daemon serves {runs} with --listen"), done.stderr
    done, _ = asked(copied)  # a copy still pins the key: what is said is that nothing listens there
    assert "nothing accepts connections" in one_error_line(done), done.stderr

    pid = start_daemon(daemons, runs, "--gpus", "", "--listen", "127.0.0.1:0", "--keys-dir", str(tmp_path / "keys"))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               .lower(), 30, "the daemon gone")
    assert remote_json.exists()  # a killed daemon removes nothing
    done, took = asked(remote_json)
    assert done.returncode == 2 and one_error_line(done).startswith(
        f"error: {remote_json} is left from a daemon that is gone: no daemon serves {runs}"), done.stderr
    assert took < 5, took  # at once, not after waiting on a port no one listens on
    start_daemon(daemons, runs, "--gpus", "")  # serving without --listen: the dead one's file goes
    assert not remote_json.exists()


def test_a_remote_resume_of_a_run_the_daemon_does_not_have_names_fixes_a_remote_key_can_use(shared_daemon):
    """`daemon submit --remote ... -- --resume RUN` naming no run of the daemon's runs directory was refused with the
    host's hint, `is --runs-dir right? trainbus runs list shows the runs`: --runs-dir is refused with --remote and a
    remote key has no `runs list`. The refusal now names what such a key has: `daemon status`."""
    runs = shared_daemon["runs"]
    before = set(listed(runs))
    submitted = over_tcp_with(shared_daemon)("submit", "--", "--resume", "nope")
    line = one_error_line(submitted)
    assert submitted.returncode == 2 and "no run 'nope'" in line, line
    assert "--runs-dir" not in line and "runs list" not in line, line
    assert "a run of the daemon's runs directory" in line and "`trainbus daemon status --remote ...`" in line, line
    assert set(listed(runs)) == before


def test_a_remote_cancel_stops_a_running_run_only_by_a_start_of_its_id_no_other_run_shares(shared_daemon,
                                                                                            ended_over_tcp):
    """A remote `daemon cancel PREFIX` stopped the one running run whose id PREFIX starts, though runs that had
    ended shared it (`2026`, the start of every id this year): a key meaning an ended run stopped a live one.
    `runs stop PREFIX` on the host refuses such a start as ambiguous; so does the daemon now, stopping nothing."""
    runs, over_tcp, ended = shared_daemon["runs"], over_tcp_with(shared_daemon), ended_over_tcp
    running = over_tcp("submit", "--", PACED, "--plugins", "", "--device", "cpu", "--set", "step_sleep_s=0.2").stdout
    running = running.strip()
    wait_until(lambda: listed(runs).get(running, {}).get("status") == "running", WAIT_S, "the second run to train")
    shared = next(n for n in range(len(running), 0, -1) if ended.startswith(running[:n]))
    # the start the running run alone has: one character past the longest it shares with any other run here
    own = 1 + max(next(n for n in range(len(running), -1, -1) if other.startswith(running[:n]))
                  for other in listed(runs) if other != running)
    refused = over_tcp("cancel", running[:shared])
    line = one_error_line(refused)
    assert "several" in line and ended in line and running in line, line
    assert listed(runs)[running]["status"] == "running"
    assert over_tcp("cancel", running[:own]).returncode == 0  # its own start: stopped
    wait_until(lambda: listed(runs)[running]["status"] == "stopped", WAIT_S, "the second run to stop")
    wait_until(lambda: all_ended(runs), WAIT_S, "the daemon to settle the stopped run")  # the next test's daemon too


def test_a_remote_cancel_of_a_run_that_ended_names_the_remote_status_not_a_command_of_the_host(shared_daemon,
                                                                                               ended_over_tcp):
    """A remote `daemon cancel RUN` of a run that had ended was answered `... it ran and ended (...); trainbus runs
    show RUN says how`, a command of the training host a key has no use of. It now names `daemon status --remote`."""
    over_tcp, ended = over_tcp_with(shared_daemon), ended_over_tcp
    assert ended in [job["run"] for job in json.loads(over_tcp("status", "--json").stdout)["ended"]]
    line = one_error_line(over_tcp("cancel", ended))
    assert f"run {ended} is not queued: it ran and ended" in line, line
    assert "runs show" not in line and "`trainbus daemon status --remote ...` says how" in line, line
