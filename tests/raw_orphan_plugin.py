"""A plugin in plain pyzmq + msgpack that never watches its kernel: it reads events and heartbeats until killed.

PROTOCOL.md §8 says a plugin SHOULD exit when its kernel is gone; this one does not, and it starts a child (a helper
program in its own process group, as most launchers leave it). It writes "PLUGIN_PID CHILD_PID" to PIDS_FILE once
welcomed. Usage: python raw_orphan_plugin.py PIDS_FILE
"""

import os
import subprocess
import sys
import time

import msgpack
import zmq

pids_file = sys.argv[1]
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.SUBSCRIBE, b"")
sub.setsockopt(zmq.LINGER, 0)
sub.connect(os.environ["TRAINBUS_EVENTS"])
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.connect(os.environ["TRAINBUS_CONTROL"])


def send(message_type, **fields):
    dealer.send(msgpack.packb({"v": 1, "type": message_type, **fields}))


child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
said_hello, next_beat = False, 0.0
while True:  # no end: not the run's final event, not a silent kernel, not a new parent
    if sub.poll(100):
        sub.recv_multipart()
        if not said_hello:
            send("hello", name=os.environ["TRAINBUS_PLUGIN_NAME"], pid=os.getpid(), subscriptions=[""], replies=[],
                 delivery="best_effort", secret=os.environ["TRAINBUS_SECRET"])
            said_hello = True
    if dealer.poll(0):
        if msgpack.unpackb(dealer.recv())["type"] == "welcome":
            with open(pids_file + ".tmp", "w") as f:
                f.write(f"{os.getpid()} {child.pid}\n")
            os.replace(pids_file + ".tmp", pids_file)
    if said_hello and time.monotonic() >= next_beat:
        send("heartbeat")
        next_beat = time.monotonic() + 0.5
