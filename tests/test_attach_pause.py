"""`trainbus attach` over TCP whose own control link stalls while the run's events still reach it (a laptop that
slept, a client stopped with Ctrl-Z, a congested link): the kernel forgets the silent client, and the client,
hearing the kernel all along, learns it only when its next message is refused as from a stranger. It must
connect again and go on, as it does when the kernel's heartbeats stop, not end the watch."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

from fixture_targets import open_gate
from kernel_process import Command, KernelProcess, wait_until
from remote_support import connection, keys, listening_config  # noqa: F401
from trainbus.proto.journal_format import read_journal


class HeldControlLink:
    """A TCP forwarder from a loopback port to a run's control port whose traffic can be held both ways and let
    go later, bytes kept: the client's heartbeats and the kernel's answers wait, as over a stalled link."""

    def __init__(self, target: int):
        self.target = target
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                far.settimeout(None)  # the kernel may say nothing for long: a timeout would end the pipe
            except OSError:
                return
            self.open += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while not self.flowing.wait(0.1):
                    pass
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in [self.listener, *self.open]:
            sock.close()


def test_attach_json_goes_on_after_the_kernel_forgot_it_during_a_stalled_control_link(runs_dir, tmp_path, keys,
                                                                                      kernels):
    # gated: the run steps on only where the test lets it, so it outlasts the stall however slowly a busy machine
    # forgets the client, and the events that go by during the stall are known to have gone by
    gate, per_epoch, epochs = tmp_path / "gate", 45, 3
    open_gate(gate, 1)
    kernel = KernelProcess(listening_config(runs_dir, keys["dir"], epochs=epochs, step_sleep_s=0.01, gate=gate),
                           tmp_path)
    kernels.append(kernel)
    conn = connection(kernel)
    link = HeldControlLink(int(conn["control"].rpartition(":")[2]))
    # the client's control connection goes through the link; its events and bursts come straight from the kernel
    via_link = tmp_path / "via_link.json"
    via_link.write_text(json.dumps({**conn, "control": f"tcp://127.0.0.1:{link.port}"}))
    via_link.chmod(0o600)
    attach = Command("attach", str(via_link), "--key", str(keys["pilot"]), "--json")
    try:
        printed = Path(attach.stdout_path)
        wait_until(lambda: printed.exists() and printed.read_text().count("\n") > 0, 60, "attach's snapshot")
        open_gate(gate, per_epoch)
        wait_until(lambda: printed.read_text().count("\n") > 20, 60, "attach's first events")
        link.flowing.clear()
        open_gate(gate, 2 * per_epoch)  # an epoch goes by during the stall
        # past twice the liveness window the kernel forgets a client attached by hand (peers.forget_dead)
        kernel.wait_event("plugin_hung", lambda e: e.data["plugin"].startswith("attach-"), timeout_s=60)
        kernel.wait_step(2 * per_epoch, timeout_s=60)
        assert not kernel.journal.of("end_training_session"), "the run ended before the test could look"
        link.flowing.set()
        said = Path(attach.stderr_path)
        wait_until(lambda: "reconnected after" in said.read_text() or attach.poll() is not None, 60, "attach back")
        open_gate(gate, epochs * per_epoch)
        kernel.result(timeout_s=180)
        attach.wait(60)
        out, err = attach.communicate(5)
    finally:
        link.close()
        attach.kill()
    assert attach.returncode == 0, err
    assert "forgot this client" in err and "reconnected after" in err, err
    items = [json.loads(line) for line in out.splitlines()]
    assert items[0]["type"] == "snapshot" and items[-1]["type"] == "bus_closing", (items[0], items[-1])
    seqs = [item["seq"] for item in items[1:]]
    assert seqs == list(range(items[0]["seq"] + 1, items[0]["seq"] + 1 + len(seqs))), "a gap or a duplicate"
    assert seqs[-1] == list(read_journal(kernel.run_dir))[-1].seq
