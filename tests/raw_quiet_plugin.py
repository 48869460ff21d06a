"""A plugin in plain pyzmq + msgpack for the liveness tests: it never sends a `heartbeat` message.

Usage: python raw_quiet_plugin.py MODE
  chatty: after hello, acks every event it receives and sends a `log` every 0.5 s (no heartbeat ever).
  silent: says hello, then sends nothing at all; it stays alive, reading events, until the run ends.
Both prove their name with TRAINBUS_SECRET, and exit when the run ends or the kernel is gone.
"""

import os
import sys
import time

import msgpack
import zmq

mode = sys.argv[1]
assert mode in ("chatty", "silent"), mode
name = os.environ["TRAINBUS_PLUGIN_NAME"]
kernel_pid = int(os.environ["TRAINBUS_KERNEL_PID"])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.LINGER, 0)
sub.connect(os.environ["TRAINBUS_EVENTS"])
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.ROUTING_ID, f"{name}-{os.getpid()}".encode())
dealer.setsockopt(zmq.LINGER, 1000)
dealer.connect(os.environ["TRAINBUS_CONTROL"])


def send(message_type, **fields):
    dealer.send(msgpack.packb({"v": 1, "type": message_type, **fields}))


said_hello, next_log, logs = False, 0.0, 0
while os.getppid() == kernel_pid:
    if sub.poll(100):
        topic, raw = sub.recv_multipart()
        event = msgpack.unpackb(raw)
        if not said_hello:  # the first event proves the subscription is live
            send("hello", name=name, pid=os.getpid(), subscriptions=[""], replies=["log"] if mode == "chatty" else [],
                 delivery="best_effort", votes=[], secret=os.environ["TRAINBUS_SECRET"])
            said_hello = True
        elif mode == "chatty":
            send("ack", seq=event["seq"])
        if event["type"] in ("end_training_session", "run_failed"):
            break
    while dealer.poll(0):
        dealer.recv()  # welcome (or refused): read and ignored; nothing from the kernel needs an answer here
    if mode == "chatty" and said_hello and time.monotonic() >= next_log:
        logs += 1
        send("log", level="info", text=f"chatty log {logs}, never a heartbeat")
        next_log = time.monotonic() + 0.5
dealer.close()
sub.close()
ctx.term()
