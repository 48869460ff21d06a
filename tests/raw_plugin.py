"""A plugin written from PROTOCOL.md alone: pyzmq and msgpack, no trainbus import.

It says hello after its first event, records every seq it sees, and replies stop once it has seen
the end of training batch STOP_AT_STEP. Usage: python raw_plugin.py OUT_FILE STOP_AT_STEP
"""

import os
import sys
import time

import msgpack
import zmq

out_path, stop_at_step = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.connect(os.environ["TRAINBUS_EVENTS"])
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.ROUTING_ID, f"raw-{os.getpid()}".encode())  # a reconnect keeps our identity
dealer.setsockopt(zmq.LINGER, 1000)
dealer.connect(os.environ["TRAINBUS_CONTROL"])


def send(message_type, **fields):
    dealer.send(msgpack.packb({"v": 1, "type": message_type, **fields}))


said_hello, stopped = False, False
last_heartbeat = time.monotonic()
with open(out_path, "w") as out:
    while True:
        if sub.poll(100):
            topic, raw = sub.recv_multipart()
            event = msgpack.unpackb(raw)
            if not said_hello:  # our subscription is live once the first event arrives
                send("hello", name=os.environ.get("TRAINBUS_PLUGIN_NAME", "raw"), pid=os.getpid(), subscriptions=[""],
                     replies=["stop"], delivery="best_effort", votes=[], secret=os.environ["TRAINBUS_SECRET"])
                said_hello = True
            out.write(f"{event['seq']} {event['type']} {event['step']}\n")
            if event["type"] == "end_training_batch" and event["step"] >= stop_at_step and not stopped:
                send("stop", reason=f"raw plugin saw step {event['step']}")
                out.write(f"stop-sent-at-step {event['step']}\n")
                stopped = True
            if event["type"] in ("end_training_session", "run_failed"):
                break
        if said_hello and time.monotonic() - last_heartbeat > 1.0:
            send("heartbeat")
            last_heartbeat = time.monotonic()
dealer.close()
sub.close()
ctx.term()
