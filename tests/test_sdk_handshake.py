"""The SDK's handshake against a stand-in kernel on real sockets: nothing published after hello is lost."""

from __future__ import annotations

import time

from stand_in_kernel import StandInKernel


def test_an_event_that_arrives_before_the_welcome_is_handled(tmp_path):
    # The kernel answers hello with welcome on its ROUTER and, once every plugin said hello, publishes
    # start_training_session on its PUB: two sockets, so the event can reach the plugin first. The
    # stand-in kernel makes sure it does; a best-effort plugin gets no replay, so a dropped event is lost.
    record = tmp_path / "record.txt"
    kernel = StandInKernel(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/control")
    proc = kernel.start_plugin("fixture_plugins:LiveRecorder", "live", {"path": str(record)}, tmp_path)
    try:
        deadline, hello = time.monotonic() + 30, None
        while hello is None and time.monotonic() < deadline:
            kernel.publish("heartbeat", interval_s=1.0)  # releases the plugin's hello
            hello = kernel.receive(100)
        assert hello is not None and hello[1]["type"] == "hello", hello
        resume_from = kernel.seq + 1
        kernel.publish("start_training_session", epochs=3)
        time.sleep(0.5)  # the plugin's I/O thread has it queued before the welcome exists
        kernel.welcome(hello[0], resume_from)
        kernel.publish("end_training_session")
        output = proc.communicate(timeout=20)[0].decode()
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
        kernel.close()
    handled = [line.split()[1] for line in record.read_text().splitlines()]
    assert handled == ["start_training_session", "end_training_session"], (handled, output)
