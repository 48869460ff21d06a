"""`trainbus attach`'s client: a live terminal dashboard of a run, JSON lines for scripts, or one command sent.

    python -m trainbus.plugins.dashboard RUN_DIR|ENDPOINT [--json] [--control] [--stop REASON | --checkpoint REASON]

Like any plugin it is a separate process on the bus (sdk/attach.py does the connecting); `trainbus attach`
finds the run, answers at once for one that has ended, and runs this for a live one.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import sys
import termios
import time
import tty
from typing import Any

from trainbus.proto import event_to_map, events as ev
from trainbus.proto.kept_files import kept_summary
from trainbus.proto.output import ATTACH_STOPS, RefusalGuard, error_on_stderr
from trainbus.proto.run_state import RunState
from trainbus.proto.strict_json import strict_dumps
from trainbus.proto.text import duration_text, printable
from trainbus.sdk.attach import (CLIENT_PREFIX, RECONNECT_ATTEMPTS, AttachError, Attachment, RunEnded, TargetError,
                                 target_of)
from trainbus.sdk.kernel_watch import disk_full, kernel_died, kernel_stopped, run_summary

MONITORS = ("cpu", "memory", "disk", "gpu", "perf")  # the resource monitors' metric name prefixes
COMMAND_ECHO_TIMEOUT_S = 30.0  # a one-shot command waits this long to see the kernel journal it
CHECKPOINT_ACT_WAIT_S = 5.0  # and a checkpoint_now this long more, for the snapshot (or why it was skipped)
CHECKPOINT_ACTS = (ev.SAVE_CHECKPOINT, ev.CHECKPOINT_SKIPPED)
REFRESH_S = 0.25  # at most this often a redraw; rich's own refresh is off (we redraw when events came)
SPARKS = "▁▂▃▄▅▆▇█"
KEYS = {"s": "stop", "c": "checkpoint_now"}  # --control: the key, then y to confirm
FINAL = (ev.END_TRAINING_SESSION, ev.RUN_FAILED)


def sparkline(values: list[float], width: int = 30) -> str:
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[int((v - low) / span * (len(SPARKS) - 1))] for v in values)


def _reading(name: str, value: float) -> str:
    """A resource reading; bytes in binary units."""
    if not name.endswith("_bytes"):
        return f"{value:.4g}"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def outcome(state: RunState) -> str:
    """How the run ended, from its final event: completed, stopped, or failed with its error."""
    ended = state.ended or {}
    if ended.get("type") == ev.RUN_FAILED:
        return f"failed: {ended.get('error') or '?'}"
    return "stopped" if ended.get("stopped_early") else "completed"


# -- the dashboard --------------------------------------------------------------------------------

def _escape(text: str) -> str:
    """Every string here came over the wire, and a peer's name or its metric's name is any string it chose: rich
    passes an escape sequence through to the terminal (one clears it), so control characters are shown escaped."""
    from rich.markup import escape

    return escape(printable(text))


def render(state: RunState, status: str, footer: str = ""):
    """One frame: run, progress, metrics, resources, plugins."""
    from rich.console import Group

    parts: list[Any] = [*_run_and_progress(state, status), *_series_tables(state), _plugins_table(state)]
    parts += _notes(state)
    if footer:
        parts.append(footer)
    return Group(*parts)


def _run_and_progress(state: RunState, status: str) -> list[Any]:
    """The run's id, target and device, and its progress: epoch, batch, step, rate, ETA, and a bar when planned."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    run, p = state.run, state.progress
    head = Table.grid(padding=(0, 2))
    head.add_row(f"[bold]run {_escape(str(run.get('id') or '?'))}[/bold]", status)
    head.add_row("target", _escape(str(run.get("target") or "-")))
    head.add_row("device", _escape(f"{run.get('device') or '-'}  model {run.get('model') or '-'} "
                                   f"({run.get('parameters') or '?'} parameters)"))
    rate, eta = state.steps_per_s(), state.eta_s()
    planned = p.get("batches_planned")
    head.add_row("progress", f"epoch {p.get('epoch', 0)}/{run.get('epochs') or '?'}  "
                             f"batch {p.get('batches_done', 0)}/{planned or '?'}  step {p.get('step', 0)}  "
                             f"{f'{rate:.1f} steps/s' if rate else '- steps/s'}  ETA {duration_text(eta)}")
    if not (run.get("epochs") and planned):
        return [head]
    total = run["epochs"] * planned
    done = min(total, (max(p.get("epoch", 1), 1) - 1) * planned + p.get("batches_done", 0))
    bar = Table.grid(padding=(0, 2))
    bar.add_row(ProgressBar(total=total, completed=done, width=60), f"{100 * done / total:.0f} %")
    return [head, bar]


def _series_tables(state: RunState) -> list[Any]:
    """The metrics table and the resources table (the monitors' readings; one row for all cores)."""
    from rich.table import Table

    titled = dict(box=None, pad_edge=False, title_justify="left")
    metrics = Table("metric", "latest", "step", "history", title="metrics", **titled)
    resources = Table("resource", "latest", "history", title="resources", **titled)
    cores = []
    for name, s in sorted(state.series.items()):
        if name.split("/")[0] in MONITORS:
            if "/core" in name:  # one row per core would fill the screen: summarised below
                cores.append(s["value"])
                continue
            resources.add_row(_escape(name), _reading(name, s["value"]), sparkline(list(s["history"])))
        else:
            metrics.add_row(_escape(name), f"{s['value']:.4g}", str(s.get("step", "")), sparkline(list(s["history"])))
    if cores:
        resources.add_row(f"cpu/cores ({len(cores)}, mean)", f"{sum(cores) / len(cores):.4g}",
                          f"min {min(cores):.4g}  max {max(cores):.4g}")
    if not resources.row_count:  # an empty table under its header reads as a view that is broken
        resources.add_row("[dim]none yet[/dim]", "", f"[dim]no monitor reports ({', '.join(MONITORS)}): `trainbus "
                                                     f"plugins attach RUN cpu` on the run's host adds one[/dim]")
    return [metrics, resources]


def _plugins_table(state: RunState):
    """The run's plugins: state, restarts, lag, errors, trouble (attached clients are counted in _notes)."""
    from rich.table import Table

    plugins = Table("plugin", "state", "restarts", "lag", "errors", "trouble", title="plugins", box=None,
                    pad_edge=False, title_justify="left")
    for name, plugin in sorted(state.plugins.items()):
        if name.startswith(CLIENT_PREFIX):  # attached views like this one: counted below, not plugins of the run
            continue
        # an exited or given-up plugin's lag is the kernel's last reading before it went: behind on nothing now
        gone = plugin.get("state") in ("exited", "failed")
        lag = "-" if plugin.get("lag") is None or gone else str(plugin["lag"])
        colour = {"running": "green", "failed": "red", "crashed": "red", "hung": "red"}.get(plugin.get("state"), "")
        text = _escape(str(plugin.get("state")))
        plugins.add_row(_escape(name), f"[{colour}]{text}[/{colour}]" if colour else text,
                        str(plugin.get("restarts", 0)), lag, str(plugin.get("errors", 0)),
                        _escape(str(plugin.get("reason") or "")))
    return plugins


def _notes(state: RunState) -> list[str]:
    """The lines under the tables: clients attached, training standing still, stops asked for, the last checkpoint."""
    notes = []
    clients = [name for name in state.plugins if name.startswith(CLIENT_PREFIX)]
    attached = len(clients) + state.dropped["clients_forgotten"]  # those gone long ago are counted, not kept
    if attached > 1:
        notes.append(f"{attached} clients have attached (trainbus attach)")
    if state.stalled:  # the loop reached no seam for [run] stalled_after_s: its thread's stack is in kernel.log
        stalled, where = state.stalled, state.stalled.get("where")
        since = time.strftime("%H:%M:%S", time.localtime(stalled["since_ts"]))
        notes.append(f"[bold red]training has stood still since {since} (after {_escape(str(stalled.get('after')))})"
                     f"{_escape(f' in your code at {where}') if where else ''}[/bold red]; its stack is in the run's "
                     f"kernel.log")
    if state.stop_reasons:
        notes.append(f"stop requested: {_escape('; '.join(state.stop_reasons))}")
    if state.checkpoint:
        checkpoint = state.checkpoint
        notes.append(f"last checkpoint: {_escape(str(checkpoint.get('path')))} (step {checkpoint.get('step')})")
    return notes


class Keys:
    """Single keys from the terminal (cbreak mode), without blocking; nothing when stdin is not a terminal."""

    def __init__(self):
        self.saved = None

    def __enter__(self):
        if sys.stdin.isatty():
            self.saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self.saved)

    def reading(self) -> bool:
        return self.saved is not None

    def read(self) -> str:
        if self.saved is None or not select.select([sys.stdin], [], [], 0)[0]:
            return ""
        return sys.stdin.read(1)


def dashboard(attachment: Attachment, steer: bool) -> int:
    from rich.console import Console

    console = Console()
    drawn: list[bool] = []  # one entry once a frame of the run is drawn
    try:
        return _dashboard(attachment, steer, console, drawn)
    finally:  # off a terminal rich draws a live display once, as it stops, and leaves that last line open
        if drawn and not console.is_terminal:
            console.line()


def _dashboard(attachment: Attachment, steer: bool, console, drawn: list[bool]) -> int:
    from rich.live import Live
    from rich.markup import escape

    pending, said = "", ""  # a command waiting for its y; what the last command did
    with Keys() as keys, Live(console=console, auto_refresh=False, transient=False) as live:
        # keys are read only from a terminal; the frame drawn at the run's end is the last (we are leaving)
        keys_help = ("" if not keys.reading() else "keys: s stop · c checkpoint now · q quit" if steer else "q quit")
        def reconnecting(why: str) -> None:
            if attachment.state is not None:
                status = (f"[yellow]reconnecting (try {attachment.reconnect_try} of {RECONNECT_ATTEMPTS}): "
                          f"{escape(why)}[/yellow]")
                live.update(render(attachment.state, status), refresh=True)
        attachment.on_reconnect = reconnecting
        drawn_at = 0.0
        # as the user named it: the run's directory, or a remote kernel's HOST:PORT (its control endpoint; events
        # and bursts are PORT + 1 and + 2, which would read as a wrong port)
        where = attachment.target.run_dir or attachment.target.control
        if console.is_terminal:  # off one, only the run's end is drawn: not this, should attaching fail
            live.update(f"attaching to {escape(str(where))} ...", refresh=True)
        for item in attachment:
            state = attachment.state
            if state is None:
                continue
            key = keys.read().lower()
            if key == "q":
                return 0
            if _output_refused():
                return 1
            if pending and key:
                if key == "y":
                    send_command(attachment, pending, "from the terminal")
                    said = escape(f"sent {pending} as {attachment.peer_name}")
                pending = ""
            elif steer and key in KEYS:
                pending = KEYS[key]
            if attachment.refusals:
                said = f"[red]refused: {escape(attachment.refusals.pop())}[/red]"
            ended = state.ended is not None  # said at the final event; its plugins' last words come after it
            now = time.monotonic()
            if ended or now - drawn_at >= REFRESH_S:
                again = f" (reconnected {attachment.reconnects}x)" if attachment.reconnects else ""
                status = f"[bold]run ended: {escape(outcome(state))}[/bold]" if ended else f"[cyan]live[/cyan]{again}"
                footer = (f"{pending}? y to confirm, any other key to cancel" if pending and not ended else
                          f"{said}  {'' if ended else keys_help}".strip())
                live.update(render(state, status, footer), refresh=True)
                drawn_at = now
                drawn.append(True)
    return 0


# -- scripts: JSON lines, and one command ---------------------------------------------------------

def json_lines(attachment: Attachment) -> int:
    """The snapshot as one line ({"type": "snapshot", "seq", "state"}), then each event's envelope, one a line."""
    # each try numbered, and the return said: a log of the stream tells one that went on from one still trying
    attachment.on_reconnect = lambda why: print(
        f"trainbus attach: {why}; reconnecting (try {attachment.reconnect_try} of {RECONNECT_ATTEMPTS})",
        file=sys.stderr)
    attachment.on_reconnected = lambda seconds: print(
        f"trainbus attach: reconnected after {seconds:.1f} s; going on from seq {attachment.next_seq}", file=sys.stderr)
    for item in attachment:
        if item is None:
            continue
        kind, value = item
        line = ({"type": "snapshot", "seq": value.seq, "run": value.run.get("id"), "state": value.to_map()}
                if kind == "snapshot" else event_to_map(value))
        print(strict_dumps(line, default=lambda b: b.hex() if isinstance(b, bytes) else str(b)), flush=True)
        if _output_refused():  # said once (_guard_stdout); every later line would go nowhere
            return 1
    if attachment.ended_quietly:  # the stream has the run's end, maybe not its plugins' last words
        print(f"trainbus attach: the kernel went quiet after the run's final event ({attachment.ended_quietly}); "
              f"ending without its bus_closing", file=sys.stderr)
    return 0


def send_command(attachment: Attachment, kind: str, reason: str) -> None:
    """The command, after a log line naming it: the kernel journals both under our peer name (who sent it)."""
    attachment.send("log", level="info", text=f"{kind} requested with trainbus attach: {reason}")
    attachment.send(kind, reason=reason)


def one_command(attachment: Attachment, kind: str, reason: str) -> int:
    """Send stop or checkpoint_now once attached. Done when the kernel journaled the request (our log line came
    back) and a heartbeat followed with no refusal (a monitor-role key's is refused at once, on the control
    socket), or, for a stop, when stop_requested naming us came first (it says the step); a checkpoint_now waits
    a little longer for what the next step boundary made of it (a snapshot taken, or skipped: no persister)."""
    sent: list[bool] = []  # one entry once the command went out
    try:
        return _one_command(attachment, kind, reason, sent)
    except AttachError as gone:  # RunEnded too
        if not sent:
            raise
        return _ended_after_sending(attachment, kind, gone)
    except KeyboardInterrupt:  # after a line that said the command would go in, say whether it went
        where = attachment.target.run_dir
        run = f"run {where.name}" if where is not None else "the run"
        print(f"trainbus: Ctrl-C: the {kind} was sent, but not yet seen journaled: `trainbus runs show` says how "
              f"{run} goes on" if sent else f"trainbus: Ctrl-C: no {kind} was sent; {run} goes on", file=sys.stderr)
        raise


def _one_command(attachment: Attachment, kind: str, reason: str, sent: list[bool]) -> int:
    end, echo, echoed_at = float("inf"), None, 0.0  # the clock starts once sent: reaching the kernel has its own
    run = lambda: attachment.state.run.get("id")  # noqa: E731
    told_stopped = False
    for item in attachment:
        if item is None and end == float("inf") and not told_stopped:
            pid = kernel_stopped(attachment.target.run_dir)
            if pid is not None:  # said, not waited on in silence; the command goes in once the kernel runs again
                # (by `trainbus runs stop` too: no command's name in the line)
                told_stopped = True
                print(f"trainbus: the run's kernel (pid {pid}) is stopped (SIGSTOP or a debugger) and "
                      f"answers nothing; {kind} goes in once it runs again (`kill -CONT {pid}`)",
                      file=sys.stderr)
        if attachment.refusals:
            print(f"error: the kernel refused: {attachment.refusals[0]}", file=sys.stderr)
            return 1
        event = item[1] if item is not None and item[0] == "event" else None
        now = time.monotonic()
        if item is not None and item[0] == "snapshot" and end == float("inf"):
            if item[1].ended is not None:  # attached as it ends: its plugins are draining, it steps no more
                print(f"error: run {run()} has ended ({outcome(item[1])}): "
                      f"there is nothing to {kind.partition('_')[0]}", file=sys.stderr)
                return 1
            send_command(attachment, kind, reason)
            sent.append(True)
            end = now + COMMAND_ECHO_TIMEOUT_S
        elif event is not None and event.type == ev.LOG and kind in str(event.data.get("text")) \
                and str(event.data.get("plugin")).partition(" (key ")[0] == attachment.peer_name:  # a remote: + key
            echo, echoed_at = event, now
        elif kind == "stop" and event is not None and event.type == ev.STOP_REQUESTED and any(
                str(r).startswith(attachment.peer_name) for r in event.data.get("reasons") or []):
            print(f"stop sent to run {run()} as {attachment.peer_name} (it stops at step {event.step}; "
                  f"stop_requested journaled at seq {event.seq})")
            return 0
        elif kind == "checkpoint_now" and echo is not None and event is not None and event.type in CHECKPOINT_ACTS:
            if event.type == ev.CHECKPOINT_SKIPPED:
                print(f"error: checkpoint_now reached run {run()}, but its checkpoint at step {event.step} was "
                      f"skipped: {event.data.get('reason')}", file=sys.stderr)
                return 1
            print(f"checkpoint_now sent to run {run()} as {attachment.peer_name}: snapshot taken at step "
                  f"{event.step} (save_checkpoint seq {event.seq}; checkpoint_saved follows once it is on disk)")
            return 0
        elif echo is not None and event is not None and (event.type in FINAL or event.type == ev.HEARTBEAT and (
                kind == "stop" or now - echoed_at > CHECKPOINT_ACT_WAIT_S)):
            # Accepted: it is acted on at the next step boundary, which a long step or a stalled loader may hold
            # back for longer than anyone should wait here.
            print(f"{kind} sent to run {run()} as {attachment.peer_name} (request journaled at seq {echo.seq}; "
                  f"acted on at the run's next step boundary)")
            return 0
        if now > end:
            break
    print(f"error: {kind} was not confirmed by the kernel within {COMMAND_ECHO_TIMEOUT_S:.0f} s", file=sys.stderr)
    return 1


def _ended_after_sending(attachment: Attachment, kind: str, gone: AttachError) -> int:
    """The run ended, or its kernel went, after the command was sent and before it was seen journaled (a full disk
    journals nothing more): what its summary says became of it, or that nothing says so, and what to do. On a full
    disk the kernel keeps the summary in the temporary directory (proto/kept_files.py), where this reads it, as
    `runs show` does."""
    where = attachment.target.run_dir
    run = where.name if where is not None else (attachment.state.run.get("id") if attachment.state else "?")
    if isinstance(gone, RunEnded):
        summary, kept = gone.summary, ""
    else:
        found = kept_summary(where.name) if where is not None else None
        summary, kept = None, ""
        if found is not None:
            summary, kept = found[1], f"; its disk is full: its summary is kept in {found[0]}, to move into {where} " \
                                      f"once it has space"
    if summary is not None:
        status = summary.get("status", "?")
        reasons = (summary.get("outcome") or {}).get("stop_reasons") or []
        if kind == "stop" and any(str(r).partition(": ")[0].partition(" (key ")[0] == attachment.peer_name
                                  for r in reasons):
            print(f"stop sent to run {run} as {attachment.peer_name}: the run stopped for it and ended {status}{kept}")
            return 0
        print(f"error: {kind} was sent to run {run}, but the run ended ({status}) before acting on it{kept}",
              file=sys.stderr)
        return 1
    full = f"; its disk is full: free space in {where}, then " if disk_full(where) else "; "
    print(f"error: {kind} was sent to run {run}, but its kernel exited before it was seen journaled, and no summary "
          f"says how the run ended ({gone}){full}`trainbus runs show {run}` says where it got to", file=sys.stderr)
    return 1


class _Terminated(Exception):
    """SIGTERM (`timeout`, a shell's kill): raised where the client is, so that it says bye on its way out (killed
    outright, the kernel would take it for hung once its liveness window passed)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def _guard_stdout() -> None:
    """stdout on a disk that fills (`trainbus attach --json RUN > events.jsonl`): the first refused write is said in
    one line on stderr, naming the file and the fix, and the client stops with exit 1 (_output_refused): what it
    makes is all in that file, and a script must not take a cut one for the stream. A closed pipe (`| head -1`)
    ends it quietly (__main__)."""
    sys.stdout = RefusalGuard(sys.stdout, error_on_stderr, then=ATTACH_STOPS)


def _output_refused() -> bool:
    return getattr(sys.stdout, "refused", None) is not None


def main(argv: list[str]) -> int:
    code = _main(argv)
    return 1 if _output_refused() else code


def _main(argv: list[str]) -> int:
    try:
        # `trainbus attach` (and `runs stop`) blocked Ctrl-C as they handed over to this process
        # (kernel/cli_common.py _attach_client): one pressed during its start comes now, where it can be said
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    except KeyboardInterrupt:
        print("trainbus: Ctrl-C before attaching; nothing was sent, and the run goes on", file=sys.stderr)
        return 130
    signal.signal(signal.SIGTERM, _on_sigterm)
    _guard_stdout()
    parser = argparse.ArgumentParser(prog="trainbus attach", description=__doc__.splitlines()[0])
    parser.add_argument("where", help="run directory, or ENDPOINT (ipc://DIR/events.sock, or EVENTS,CONTROL)")
    parser.add_argument("--key", default="", help="this client's secret key file: WHERE is a remote kernel's "
                                                   "HOST:PORT or connection.json, reached over TCP + CURVE")
    parser.add_argument("--server-key", default="", help="the server's public key file (pinned)")
    parser.add_argument("--json", action="store_true", help="JSON lines: the snapshot, then every event")
    parser.add_argument("--control", action="store_true", help="keys s (stop) and c (checkpoint now), confirmed")
    parser.add_argument("--stop", metavar="REASON", help="send stop with REASON, confirm, exit")
    parser.add_argument("--checkpoint", metavar="REASON", help="send checkpoint_now with REASON, confirm, exit")
    args = parser.parse_args(argv)
    try:
        target = target_of(args.where, args.key, args.server_key)
        summary = run_summary(target.ended_dir)
        if summary is not None:
            raise RunEnded(summary)
        dead = kernel_died(target.run_dir or target.ended_dir)  # said at once, not after the connect timeout
        if dead:
            raise AttachError(dead)
        # an empty REASON is still the command (`--stop ""`): None is "not asked"
        command = (("stop", args.stop) if args.stop is not None else
                   ("checkpoint_now", args.checkpoint) if args.checkpoint is not None else None)
        attachment = Attachment(target, steer=bool(args.control or command))
        if command:
            return one_command(attachment, *command)
        if args.json:
            return json_lines(attachment)
        if not sys.stdout.isatty():  # rich's Live draws only its last frame where it cannot redraw in place
            print("trainbus attach: stdout is not a terminal: the dashboard is drawn once, when the run ends "
                  "(--json streams every event as it comes)", file=sys.stderr)
        return dashboard(attachment, args.control)
    except RunEnded as ended:  # as `trainbus attach RUN_ID` says it of an ended run (kernel/cli.py), JSON under --json
        print(strict_dumps({"type": "ended", "id": ended.summary.get("run_id"), **ended.summary})
              if args.json else str(ended))
        if args.stop is not None or args.checkpoint is not None:  # not done: exit 1, as `trainbus attach RUN_ID`
            print(f"error: run {ended.summary.get('run_id', '?')} has ended ({ended.summary.get('status', '?')}): "
                  f"there is no run to {'stop' if args.stop is not None else 'checkpoint'}", file=sys.stderr)
            return 1
        return 0
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AttachError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a command's own line said what became of it (one_command)
        if args.stop is None and args.checkpoint is None:
            with contextlib.suppress(OSError):
                print("trainbus: Ctrl-C: attach ended; leaving does not stop the run", file=sys.stderr)
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):  # `| head` closed the pipe: not an error
        sys.exit(main(sys.argv[1:]))
