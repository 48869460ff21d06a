"""One command from a run's owner to its live kernel: hello with the run's credential, the command, its answer, bye.

    python -m trainbus.sdk.command RUN_DIR attach NAME [--settings JSON] [--from-start]
    python -m trainbus.sdk.command RUN_DIR detach NAME

What `trainbus plugins attach` and `detach` run once they have checked the plugin and its settings. Only the
control socket is used: an owner's command needs no events (PROTOCOL.md §7.1, `attach_plugin`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Any

import zmq

from trainbus.proto import BEST_EFFORT, MAX_MESSAGE_BYTES, ProtocolError, control, decode_control, encode_control

from .attach import AttachError, Target, client_name, kernel_died, target_of
from .kernel_watch import kernel_stopped, run_summary

WELCOME_TIMEOUT_S = 30.0  # the kernel answers a hello at once; a busy box can take a few seconds
# detach is answered once the plugin has exited: its teardown gets the supervisor's DETACH_GRACE_S (30 s) first
RESULT_TIMEOUT_S = 45.0
HEARTBEAT_S = 1.0  # while waiting: the kernel forgets a peer that is silent for 3 s
POLL_S = 0.2


class CommandError(Exception):
    """The kernel refused the command, or could not be reached: the text says which."""


class Interrupted(Exception):
    """Ctrl-C while the kernel had not answered; `sent`: whether the command had gone out (it may still be done)."""

    def __init__(self, sent: bool):
        super().__init__()
        self.sent = sent


def send_command(target: Target, command: dict[str, Any], timeout_s: float = RESULT_TIMEOUT_S) -> dict[str, Any]:
    """Send `command` (a control map with an `id`) as the run's owner; return the kernel's command_result."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    name = client_name()
    dealer.setsockopt(zmq.ROUTING_ID, f"{name}-{os.urandom(4).hex()}".encode()[:255])
    dealer.setsockopt(zmq.LINGER, 1000)  # the bye gets out, and we never hang at exit
    dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if target.secure is not None:
        target.secure(dealer)
    dealer.connect(target.control)
    welcomed = sent = False
    try:
        dealer.send(encode_control(control("hello", name=name, pid=os.getpid(), subscriptions=[], replies=[],
                                           delivery=BEST_EFFORT, votes=[], capabilities=[], secret=target.secret())))
        _wait_for(dealer, "welcome", "", WELCOME_TIMEOUT_S, target)
        welcomed = True
        dealer.send(encode_control(command))
        sent = True
        result = _wait_for(dealer, "command_result", command["id"], timeout_s, target)
        dealer.send(encode_control(control("bye", reason="command answered")))
        return result
    except KeyboardInterrupt:
        if welcomed:  # gone on purpose, not a peer to be declared hung
            with contextlib.suppress(zmq.ZMQError):
                dealer.send(encode_control(control("bye", reason="interrupted (Ctrl-C)")), zmq.NOBLOCK)
        raise Interrupted(sent) from None
    finally:
        ctx.destroy(linger=1000)


def _wait_for(dealer: zmq.Socket, type_: str, id_: str, timeout_s: float, target: Target) -> dict[str, Any]:
    """The kernel's next `type_` message (with `id_`, for a command_result), heartbeating meanwhile."""
    end = time.monotonic() + timeout_s
    next_beat = time.monotonic() + HEARTBEAT_S
    told_stopped = False
    while time.monotonic() < end:
        if dealer.poll(POLL_S * 1000):
            try:
                msg = decode_control(dealer.recv())
            except ProtocolError:
                continue
            if msg["type"] == "refused":
                raise CommandError(f"the kernel refused: {msg['reason']}")
            if msg["type"] == type_ and msg.get("id", "") == id_:
                return msg
        if type_ != "welcome" and time.monotonic() >= next_beat:
            dealer.send(encode_control(control("heartbeat")))
            next_beat = time.monotonic() + HEARTBEAT_S
        summary = run_summary(target.run_dir)
        if summary is not None:
            raise CommandError(f"run {summary.get('run_id', '?')} ended ({summary.get('status', '?')}) before its "
                               f"kernel answered")
        dead = kernel_died(target.run_dir)
        if dead:
            raise CommandError(dead)
        pid = kernel_stopped(target.run_dir) if not told_stopped else None
        if pid is not None:  # said, not waited on in silence until the timeout
            told_stopped = True
            print(f"trainbus: the run's kernel (pid {pid}) is stopped (SIGSTOP or a debugger) and answers nothing; "
                  f"waiting up to {end - time.monotonic():.0f} s for it to run again (`kill -CONT {pid}`)",
                  file=sys.stderr)
    raise CommandError(f"no answer from the run's kernel within {timeout_s:.0f} s")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainbus.sdk.command", description=__doc__.splitlines()[0])
    parser.add_argument("where", help="the run directory")
    parser.add_argument("action", choices=("attach", "detach"))
    parser.add_argument("name", help="the plugin's name")
    parser.add_argument("--settings", default="{}", help="attach: its settings, a JSON object, already checked")
    parser.add_argument("--from-start", action="store_true", help="attach: a durable plugin replays from seq 1")
    args = parser.parse_args(argv)
    command_id = os.urandom(8).hex()
    if args.action == "attach":
        command = control("attach_plugin", name=args.name, settings=json.loads(args.settings),
                          from_start=args.from_start, id=command_id)
    else:
        command = control("detach_plugin", name=args.name, id=command_id)
    try:
        result = send_command(target_of(args.where), command)
    except (AttachError, CommandError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as interrupted:
        print(f"trainbus: Ctrl-C: the {args.action} of {args.name} was sent but not answered; `trainbus runs show "
              f"{args.where}` lists the run's plugins" if interrupted.sent
              else f"trainbus: Ctrl-C: nothing was sent; {args.name} is as it was", file=sys.stderr)
        return 130
    if not result["ok"]:  # a mistake the kernel caught (unknown plugin, already attached): as the CLI's own, exit 2
        print(f"error: {result['text']}", file=sys.stderr)
        return 2
    print(result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
