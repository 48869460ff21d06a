"""The SDK's handshake against a stand-in kernel on real sockets: nothing published after hello is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

from conftest import TESTS_DIR
from trainbus.proto import Event, control, decode_control, encode_control, encode_event, pack


def test_an_event_that_arrives_before_the_welcome_is_handled(tmp_path):
    # The kernel answers hello with welcome on its ROUTER and, once every plugin said hello, publishes
    # start_training_session on its PUB: two sockets, so the event can reach the plugin first. The
    # stand-in kernel makes sure it does; a best-effort plugin gets no replay, so a dropped event is lost.
    record = tmp_path / "record.txt"
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    for socket in (pub, router):
        socket.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path}/events")
    router.bind(f"ipc://{tmp_path}/control")
    env = dict(os.environ, TRAINBUS_EVENTS=f"ipc://{tmp_path}/events", TRAINBUS_CONTROL=f"ipc://{tmp_path}/control",
               TRAINBUS_RUN_ID="stand-in", TRAINBUS_RUN_DIR=str(tmp_path), TRAINBUS_PLUGIN_NAME="live",
               TRAINBUS_PLUGIN_SETTINGS=pack({"path": str(record)}).hex(), PYTHONPATH=str(TESTS_DIR))
    env.pop("TRAINBUS_KERNEL_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "trainbus.sdk", "fixture_plugins:LiveRecorder"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seq = 0

    def publish(kind: str, **data) -> None:
        nonlocal seq
        seq += 1
        pub.send_multipart([kind.encode(), encode_event(Event(seq, "stand-in", kind, time.time(), 0, 0, data))])

    try:
        deadline, identity = time.monotonic() + 30, None
        while identity is None and time.monotonic() < deadline:
            publish("heartbeat", interval_s=1.0)  # releases the plugin's hello
            if router.poll(100):
                identity, raw = router.recv_multipart()
                assert decode_control(raw)["type"] == "hello"
        assert identity is not None, "no hello within 30 s"
        resume_from = seq + 1
        publish("start_training_session", epochs=3)
        time.sleep(0.5)  # the plugin's I/O thread has it queued before the welcome exists
        router.send_multipart([identity, encode_control(
            control("welcome", run="stand-in", heartbeat_interval_s=1.0, resume_from=resume_from))])
        publish("end_training_session")
        output = proc.communicate(timeout=20)[0].decode()
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
        pub.close()
        router.close()
        ctx.term()
    handled = [line.split()[1] for line in record.read_text().splitlines()]
    assert handled == ["start_training_session", "end_training_session"], (handled, output)
