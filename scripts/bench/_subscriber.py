"""A minimal event subscriber for the benches: a SUB socket that counts, nothing else.

Started as a process by the benches (`python _subscriber.py EVENTS REPORT ID [RCVHWM]`); imports only
zmq and msgpack so that 64 of them start quickly and stay small. Protocol, by event type:

- any first message: report ("ready", id) so the bench knows the subscription is live (slow joiner);
- DATA (end_training_batch): counted; holes in their `step` numbering counted; first/last receive times kept;
- MARK (end_training_loop) with data {"rep": r}: report ("rep", id, r, count, gaps, t_first, t_last)
  once per r, then reset the counters;
- FINAL (end_training_session): report ("done", id) and exit.

Times are time.monotonic() (CLOCK_MONOTONIC: one clock for every process on the machine).
"""

import sys
import time

import msgpack
import zmq

DATA, MARK, FINAL = "end_training_batch", "end_training_loop", "end_training_session"


def main() -> int:
    events_endpoint, report_endpoint, ident = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rcvhwm = int(sys.argv[4]) if len(sys.argv) > 4 else 50_000  # what the SDK's SUB uses
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events_endpoint)
    report = ctx.socket(zmq.PUSH)
    report.setsockopt(zmq.LINGER, 2000)
    report.connect(report_endpoint)
    ready = False
    count = gaps = 0
    last_step = None
    t_first = t_last = 0.0
    reported = set()
    recv = sub.recv_multipart
    unpackb = msgpack.unpackb
    mono = time.monotonic
    if not sub.poll(30_000):
        report.send_pyobj(("timeout", ident))
        return 1
    while True:
        topic, raw = recv()
        now = mono()
        if not ready:
            report.send_pyobj(("ready", ident))
            ready = True
        if topic == b"end_training_batch":
            env = unpackb(raw)
            step = env["step"]  # the benches number their data events 0..N-1 in `step`
            if last_step is not None and step != last_step + 1:
                gaps += 1
            last_step = step
            if not count:
                t_first = now
            t_last = now
            count += 1
        elif topic == b"end_training_loop":
            env = unpackb(raw)
            rep = env["data"]["rep"]
            if rep not in reported:
                reported.add(rep)
                report.send_pyobj(("rep", ident, rep, count, gaps, t_first, t_last))
            count = gaps = 0
            last_step = None
        elif topic == b"end_training_session":
            report.send_pyobj(("done", ident))
            break
    report.close()
    sub.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
