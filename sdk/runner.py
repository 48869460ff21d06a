"""Runs a Plugin in its own process: connect, hello, heartbeat, receive, replay, dispatch, ack, exit.

Two threads. The I/O thread (plugin_io.py) owns both sockets: it reads events and control replies into the
inbox, sends what the main thread queued, heartbeats, and watches the kernel. The main thread runs the
handlers in seq order. Heartbeats stop when a handler runs past `handler_timeout_s`, so a plugin
that is truly stuck is declared hung by the kernel, while a slow one is not. How the process ends (a SIGTERM, a
kernel gone) is plugin_exit.py's; which events of a replay batch are taken, replay.py's.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from trainbus.proto import DURABLE, Event, control, events as ev
from trainbus.proto.process import class_warning_level

from .kernel_watch import kernel_alive, run_summary
from .plugin import KernelGoneInfo, Plugin, checked_subscriptions
from .plugin_exit import FINISH_ON_TERM_S, LEFTOVER_THREAD_S, CutShort, leave_if_orphaned, threads_left
from .kernel_liveness import REMOTE_SILENCE_S
from .plugin_io import FINAL_EVENTS, MAX_POLL_S, PluginIO, say
from .replay import REPLAY_RESEND_S, events_to_take
from .tracebacks import user_traceback

MAX_HANDLER_ATTEMPTS = 3  # a poison event is tried this often, then dead-lettered
MAX_REPORTED_TRACEBACKS = 20  # after this many, failures are counted, not each sent to the kernel
# What a durable plugin is always sent: every type but the per-batch ones (PROTOCOL.md §12). A type a newer kernel
# adds is not among them: its events look like a gap, and a replay brings them.
NOT_PER_BATCH = frozenset(ev.LIFECYCLE_EVENTS + ev.KERNEL_EVENTS) - ev.BATCH_EVENTS


class NotRetryable(Exception):
    """A handler failure that trying the same event again on the same instance cannot mend: the retry would
    fail alike, or worse pass on state the failed attempt left (bz's context.model). Such a failure is not
    retried, and each distinct one is reported once; repeats are counted (the end-of-run line, `failures`)."""


class Runner:
    """Drives one plugin instance: ordering, gap detection, replay, retries, dead letters, acks."""

    def __init__(self, plugin: Plugin, events_endpoint: str, control_endpoint: str, kernel_pid: int | None = None,
                 secret: str = "", secure: Callable[[zmq.Socket], None] | None = None,
                 make_io: Callable[..., PluginIO] = PluginIO):
        """`make_io` builds the I/O thread from (events_endpoint, control_endpoint, topics, hello,
        handler_timeout_s, kernel_pid, secure): tests pass a fake without sockets (tests/test_sdk_runner.py)."""
        self.plugin = plugin
        self.spawned = kernel_pid is not None  # the kernel started us, the leader of a process group of our own
        self.durable = plugin.delivery == DURABLE
        # A best-effort plugin is sent what it handles. A durable one is sent every event but the per-batch types
        # it does not handle, which are most of a run's events: it sees a gap by seq, or by the envelope's `n`
        # where only per-batch events it is not sent lie between (_only_unsent_between).
        wanted, self.subscription_warnings = checked_subscriptions(plugin)  # said once welcomed
        self.class_warnings: list[str] = []
        if type(plugin).warnings.__func__ is Plugin.warnings.__func__:  # (a bz plugin says its own as it is made)
            # what `trainbus run` said of the class before the run (`on_end_epok`, named for no event), said too by
            # a plugin run by hand or attached live, which no `trainbus run` checked, and in kernel.log
            self.class_warnings = type(plugin).warnings()
        if "" in wanted:
            topics = [""]
        elif self.durable:
            topics = sorted(NOT_PER_BATCH | set(wanted) | set(plugin.votes))
        else:  # its votes too: the kernel waits for an ack of each, which only a plugin sent the event can give
            topics = sorted(set(wanted) | set(plugin.votes) | {ev.HEARTBEAT, *FINAL_EVENTS})
        # the indices in `n` of the per-batch types it is sent (a subscription is a prefix): a jump over one is a gap
        self.sent_counts = frozenset(i for i, t in enumerate(ev.COUNTED_BATCH_EVENTS)
                                     if any(t.startswith(topic) for topic in topics))
        hello = control("hello", name=plugin.name, pid=os.getpid(), subscriptions=topics,
                        replies=["stop", "metric", "log", "checkpoint_now"], delivery=plugin.delivery,
                        votes=list(plugin.votes), capabilities=list(plugin.capabilities), secret=secret)
        self.io = make_io(events_endpoint, control_endpoint, topics, hello, plugin.handler_timeout_s, kernel_pid,
                          secure)
        self.remote = secure is not None  # over TCP: a silent kernel may be a network down; it is waited for
        if self.remote:
            self.io.liveness.wait_out_silence_s = REMOTE_SILENCE_S
        elif not self.spawned and plugin.run_dir:
            run_dir = Path(plugin.run_dir)
            self.io.liveness.kernel_alive = lambda: kernel_alive(run_dir)
        self.counts_gaps = topics == [""]
        # What is dispatched; the rest (a durable plugin is sent every type but the per-batch ones it does not
        # handle, a best-effort one heartbeats) is stepped over in order, without a handler call. A plugin with
        # on_event handles every type, heartbeats included.
        self.wanted = None if "" in wanted else frozenset(wanted) | FINAL_EVENTS | frozenset(plugin.votes)
        self.next_seq = 0  # durable: the next seq to process; best-effort: the next expected
        self.replaying = False
        self._replay_asked_at = 0.0  # monotonic: when the replay in flight was asked for
        self.gaps = 0
        self.failures = 0
        self.dead_letters = 0
        self._reported_once: set[str] = set()  # NotRetryable failures already told, as "Type: message"
        self.acked = 0
        self.processed = 0
        self.last_event: Event | None = None  # the last event taken in seq order, handled or stepped over
        self.finished = False
        self.session_seq = 1  # the first seq this kernel numbered (welcome)
        self._caught_up_said = False
        self._set_up = False  # setup() returned: only then may on_kernel_gone run
        self.ended = False  # _finish ran: teardown happens once, whichever way the plugin ends
        self.setup_failed = False  # setup() raised: the process ends, and the kernel restarts it
        self.terminating = False  # SIGTERM: no next event; the one being handled may finish (FINISH_ON_TERM_S)
        # Threads that were there before the plugin (set by run(), the plugin process's entry; None: not checked), and
        # the plugin's own, no daemons, still running after its teardown
        self.threads_before: frozenset[threading.Thread] | None = None
        self.threads_left: list[str] = []
        self.unreached = False  # no kernel ever answered (nothing listens; over TCP: io.denied says why, if known)

    def run(self) -> int:
        try:
            return self._run()
        except CutShort:  # the SIGTERM's grace ran out in our plugin's code: that frame is gone, teardown is not
            return self._finish(self.io.gone)
        except SystemExit as exc:  # the plugin's sys.exit(), honoured once it has left as any plugin leaves
            if exc.code not in (0, None):  # a failure: no bye, which would say it left on purpose
                self.io.gone = f"the plugin called sys.exit({exc.code!r})"
            # its teardown, and the replies of the handler that exited: sent, then (exit 0) a bye, which is how a
            # plugin attached by hand or remotely says it left (the kernel sees no exit code of its)
            self._finish(self.io.gone)
            raise

    def _run(self) -> int:
        self.io.start()
        threading.Thread(target=leave_if_orphaned, args=(self,), name="trainbus-orphan-watch", daemon=True).start()
        welcome, early = self._wait_welcome()
        if welcome is None:
            # refused, or stopped by SIGTERM while waiting (exit 0, as after the welcome): not an unreachable kernel
            if self.io.refused or self.terminating:
                return self._finish(self.io.gone)
            self.unreached = True
            self._finish(self.io.gone)
            return 1
        self.io.heartbeat_interval_s = welcome["heartbeat_interval_s"]
        self.plugin.run_id = welcome["run"]
        self.next_seq = welcome["resume_from"]
        # A continued run (--resume, torchrun restarting the group) replays its earlier sessions' final events
        # (run_failed, end_training_session): only this kernel's own final event ends the plugin.
        self.session_seq = self.plugin.session_seq = welcome["session_seq"]
        early = collections.deque(item for item in early if item[0] != "event" or item[1].seq >= self.next_seq)
        # replies from the plugin's own threads (a sampler) go out at once
        self.plugin.bind_sender(self.io.send, progress=self.io.still_working)
        said = class_warning_level(self.plugin.name)  # "info": `trainbus run` said those on the console's terminal
        for level, warning in [("warning", w) for w in self.subscription_warnings] + [
                (said, w) for w in self.class_warnings]:  # the kernel takes no log from a peer before its welcome
            self.io.send(control("log", level=level, text=warning))
            say(f"[{self.plugin.name}] warning: {warning}")
        # timed as a handler: one that never returns (a server that never answers) stops the heartbeats, so the
        # kernel restarts the plugin, saying so, rather than keep a live plugin that handles nothing all run
        self.io.busy_with, self.io.busy_since = None, time.monotonic()
        try:
            self.plugin.setup()
        except Exception as exc:  # the process ends, and the kernel restarts it (or gives up, saying so)
            self._report_outside_handlers("setup", exc)
            self.io.gone = f"setup failed ({type(exc).__name__})"  # set: no bye, which would say we left on purpose
            self.setup_failed = True
            self._finish(self.io.gone)
            return 1
        finally:
            self.io.busy_since = None
        self._set_up = True
        self._send_replies()  # what setup said (a monitor's "idle" line) goes out before any event
        if self.durable:
            self._request_replay()
        while not self._done():
            item = early.popleft() if early and not self.terminating else self._next_item()
            if item is None:
                return self._finish(self.io.gone)
            kind, payload = item
            if kind == "event":
                self._on_live(payload)
            elif payload["type"] == "replay_batch":
                self._on_replay(payload)
            elif payload["type"] == "welcome" and self.durable:
                # welcomed again (a remote plugin the kernel forgot while the network was down): a replay asked
                # for meanwhile was refused, so ask again from where we are
                self._request_replay()
            self._maybe_ack()
        return self._finish(None)

    def _done(self) -> bool:
        """The run's final event is handled, and the plugin expects nothing published after it."""
        return self.finished and not self.plugin.expecting()

    # -- ordering ---------------------------------------------------------------------------------

    def _on_live(self, event: Event) -> None:
        unwanted = not self._wants(event)
        if not self.durable:
            if unwanted:  # not for this plugin, but its seq is no gap: step over it
                self.next_seq = event.seq + 1
                self.last_event = event
                return
            if self.counts_gaps and self.next_seq and event.seq > self.next_seq:
                self.gaps += event.seq - self.next_seq
            self.next_seq = self.io.passed_seq = event.seq + 1
            self._dispatch(event)
            return
        if self.replaying:
            self._ask_again_if_lost()
            return  # replay covers it
        if event.seq < self.next_seq:
            return  # we have seen it
        if event.seq > self.next_seq and not self._only_unsent_between(event):
            # Heartbeats included: while the kernel waits for our vote, a heartbeat may be the only thing
            # that shows we missed the event it waits for (it went by while an earlier replay was in flight).
            self.gaps += event.seq - self.next_seq
            self._request_replay()
            return
        if unwanted:
            self.last_event = event
        else:
            self._dispatch(event)
        self.next_seq = event.seq + 1

    def _only_unsent_between(self, event: Event) -> bool:
        """Whether every event between the last one taken in order and `event` is of a per-batch type we are not
        sent, by the two events' `n` (PROTOCOL.md §12): then nothing was missed. Without `n` on both, no proof."""
        last = self.last_event
        if last is None or last.seq != self.next_seq - 1 or last.n is None or event.n is None:
            return False
        between, own = 0, ev.COUNTED_INDEX.get(event.type)
        for i, (now, before) in enumerate(zip(event.n, last.n)):
            count = now - before - (i == own)
            if count < 0 or (count and i in self.sent_counts):
                return False
            between += count
        return between == event.seq - last.seq - 1  # any other event between (not per-batch) was missed

    def _wants(self, event: Event) -> bool:
        return self.wanted is None or event.type in self.wanted

    def _on_replay(self, batch: dict[str, Any]) -> None:
        for event in events_to_take(batch, self.next_seq, f"[{self.plugin.name}]"):
            if self._wants(event):
                self._dispatch(event)
            else:
                self.last_event = event
            self.next_seq = event.seq + 1
            if self._done() or self.terminating:
                return
            self._maybe_ack()  # a batch is up to 512 events: ack as we go, so a kill costs little redo
        if batch["done"] and (not batch["events"] or batch["events"][-1].seq < self.next_seq):
            self.replaying = False
        else:
            self._request_replay()

    def _request_replay(self) -> None:
        self.replaying, self._replay_asked_at = True, time.monotonic()
        self.io.send(control("replay", from_seq=self.next_seq))

    def _ask_again_if_lost(self) -> None:
        if self.replaying and time.monotonic() - self._replay_asked_at >= REPLAY_RESEND_S:
            self._request_replay()

    # -- dispatch ---------------------------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        self.last_event = event
        if event.seq < self.session_seq:  # a continued run's earlier session, replayed (Plugin.catch_up)
            if not self.plugin.catch_up or event.type in FINAL_EVENTS:
                return
            if not self._caught_up_said:
                self._caught_up_said = True
                say(f"[{self.plugin.name}] catching up on the run's earlier session(s) (seq < {self.session_seq}): "
                    f"handlers see them, their replies are not sent")
        failure: Exception | None = None
        for attempt in range(1, MAX_HANDLER_ATTEMPTS + 1):
            self.io.busy_with, self.io.busy_since = event, time.monotonic()
            try:
                self.plugin.handling = event
                self.plugin.handle(event)
                failure = None
                break
            except CutShort as exc:
                again = "not acked: it comes again" if self.durable else "a best-effort plugin is not sent it again"
                said = (f"the handler for {event.type} (seq {event.seq}) was still running {FINISH_ON_TERM_S} s "
                        f"after SIGTERM and was cut short ({again})")
                say(f"[{self.plugin.name}] {said}:\n{user_traceback(exc)}")
                # to the kernel too: work a plugin never finished is trouble the run's summary names
                self.io.send(control("log", level="error", text=f"{said}; plugins/{self.plugin.name}.log has where"))
                raise
            except SystemExit as exc:  # the plugin's own choice, honoured; its log says where it was made
                say(f"[{self.plugin.name}] the handler for {event.type} (seq {event.seq}) "
                    f"called sys.exit({exc.code!r}):\n{user_traceback(exc)}")
                raise
            except Exception as exc:
                called = self.plugin.handler_of(event.type)
                failure, error = exc, user_traceback(exc, called) + "\n"
                if isinstance(exc, NotRetryable):
                    break
                if attempt < MAX_HANDLER_ATTEMPTS:  # the retry makes them again: one event's replies go out once
                    self.plugin.outbox.clear()
            finally:
                self.io.busy_since = None
                self.plugin.handling = None
                if event.seq < self.session_seq:
                    self.plugin.outbox.clear()  # about a session that is over: not this run's to act on
                else:
                    self._send_replies()
        if failure is not None:
            self._report_failure(event, error, attempt, failure)
        self.processed += 1
        if event.type in self.plugin.votes:  # the kernel is waiting for exactly this
            self.io.send(control("ack", seq=event.seq))
        if event.type in FINAL_EVENTS and event.seq >= self.session_seq:  # before it: an earlier session's end
            self.finished = True

    def _report_failure(self, event: Event, error: str, attempts: int, failure: Exception) -> None:
        self.failures += 1
        if self.durable:
            self.dead_letters += 1
            path = Path(self.plugin.run_dir) / "plugins" / f"{self.plugin.name}.deadletter.jsonl"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_file() and path.stat().st_size >= self.plugin.dead_letters_max_bytes:
                    os.replace(path, path.with_name(path.name + ".1"))  # the newest kept, the disk bounded
                with open(path, "a") as f:
                    f.write(json.dumps({"seq": event.seq, "type": event.type, "attempts": attempts,
                                        "traceback": error}) + "\n")
            except OSError as exc:  # its disk is full: the log reply below still tells the kernel
                error += f"(and the dead letter could not be written to {path}: {exc.strerror or exc})\n"
        if isinstance(failure, NotRetryable):
            self._report_once(event, error, failure)
            return
        if self.failures <= MAX_REPORTED_TRACEBACKS:
            what = "dead-lettered after" if self.durable else "failed after"
            self.io.send(control("log", level="error",
                                 text=f"handler for {event.type} (seq {event.seq}) {what} {MAX_HANDLER_ATTEMPTS} "
                                      f"attempts:\n{error}"))
        say(f"[{self.plugin.name}] handler for {event.type} seq {event.seq} failed:\n{error}")

    def _report_once(self, event: Event, error: str, failure: NotRetryable) -> None:
        """Each distinct failure once (at most MAX_REPORTED_TRACEBACKS of them): its own message first (the
        console shows one line), then where, then the traceback."""
        what = f"{type(failure).__name__}: {failure}"
        if what in self._reported_once or len(self._reported_once) >= MAX_REPORTED_TRACEBACKS:
            return
        self._reported_once.add(what)
        text = f"{what}\n(handler for {event.type}, seq {event.seq}; not retried, and reported once)\n{error}"
        self.io.send(control("log", level="error", text=text))
        say(f"[{self.plugin.name}] {text}")

    def _send_replies(self) -> None:
        while self.plugin.outbox:
            self.io.send(self.plugin.outbox.pop(0))

    # -- acks, waiting, exit ----------------------------------------------------------------------

    def _maybe_ack(self, force: bool = False) -> None:
        """Acknowledge what was handled: the I/O thread sends it with its next message (PROTOCOL.md §12: at least
        with every heartbeat); `force` sends it now (before exiting)."""
        if not self.durable:
            return
        done = self.next_seq - 1
        if done > self.acked or force:
            self.acked = max(self.acked, done)
            self.io.ack(self.acked, now=force)

    def _next_item(self) -> tuple | None:
        io = self.io
        with io.wake:
            while not io.inbox or self.terminating:
                if io.gone or not io.is_alive():
                    return None
                self._maybe_ack()  # idle: what we handled goes with the I/O thread's next message
                self._ask_again_if_lost()
                io.wake.wait(MAX_POLL_S)  # notified when an item comes or the I/O thread ends; a signal interrupts
            return io.inbox.popleft()

    def _wait_welcome(self) -> tuple[dict[str, Any] | None, collections.deque]:
        """The welcome, and what arrived before it, in order: the kernel answers hello on its ROUTER and
        publishes on its PUB, so start_training_session can overtake the welcome (a best-effort plugin
        that dropped it never saw the session start)."""
        early: collections.deque = collections.deque()
        while True:
            item = self._next_item()
            if item is None:
                return None, early
            if item[0] == "control" and item[1]["type"] == "welcome":
                return item[1], early
            early.append(item)

    def _finish(self, gone: str | None) -> int:
        if self.ended:  # a SIGTERM arriving while the run loop is already finishing
            return 0
        self.ended = True
        if self.terminating:
            signal.setitimer(signal.ITIMER_REAL, 0)  # what runs from here is ours: no cut short
        if gone and self._kernel_died():
            self._tell_kernel_gone(gone)
        if self._set_up:  # teardown undoes what setup did: refused at hello, or with no kernel, there is none
            try:
                self.plugin.teardown()
            except Exception as exc:
                self._report_outside_handlers("teardown", exc)
            self._send_replies()  # a last log line or metric of teardown's goes with the last ack
        if self.threads_before is not None:
            self.threads_left = threads_left(LEFTOVER_THREAD_S, self.threads_before)
        if self.threads_left:  # said while the kernel still listens; run() then exits without waiting for them
            names = ", ".join(repr(name) for name in self.threads_left)
            said = (f"thread {names} still runs after teardown() and is no daemon, so Python's exit would wait for it "
                    f"(the kernel kills a plugin still running 5 s after the run's end); exiting without it: stop "
                    f"it in teardown(), or start it with daemon=True")
            self.io.send(control("log", level="warning", text=said))
            say(f"[{self.plugin.name}] warning: {said}")
        if self.failures > MAX_REPORTED_TRACEBACKS:  # the first ones went with their tracebacks; say the rest
            self.io.send(control("log", level="warning", text=(
                f"{self.failures} handler failures in all: the first {MAX_REPORTED_TRACEBACKS} were reported with "
                f"their tracebacks, the rest only counted (plugins/{self.plugin.name}.log has more)")))
        self._maybe_ack(force=True)
        # received: live events; processed counts the replayed ones too (a restart's, a reconnect's)
        stats = f"received {self.io.received} live, processed {self.processed}, gaps {self.gaps}, " \
                f"failures {self.failures}, dead letters {self.dead_letters}, dropped {self.io.dropped}, " \
                f"malformed {self.io.malformed}" + "".join(f", {kind} replies dropped {count}"
                                                           for kind, count in self.io.replies_dropped.items())
        if self.unreached:
            pass  # no kernel ever answered: run() says so, and what to check, in one line
        elif self.io.refused and not self._set_up:  # turned down at hello: the kernel is there, and said why
            say(f"[{self.plugin.name}] {refused_hello(self.plugin.name, self.io.refused)}")
        elif gone and self.remote and self.io.lost_kernel:  # over TCP: which of the two, nothing here can say
            say(f"[{self.plugin.name}] lost the kernel ({gone}): it has exited or hangs, or this machine no longer "
                f"reaches its host (`trainbus runs list` there says whether the run goes on; start this plugin "
                f"again once it answers); exiting. {stats}")
        elif gone:  # the kernel lost, or (a SIGTERM from a live kernel, our I/O thread failing) ended on this side
            if not self.io.lost_kernel:
                self._report_missed(behind=True)
            say(f"[{self.plugin.name}] {f'kernel gone ({gone})' if self.io.lost_kernel else gone}; exiting. {stats}")
        else:
            self._report_missed(behind=False)
            if not sys.stderr.isatty():  # the plugin's log file; on a terminal (console) it would be noise
                say(f"[{self.plugin.name}] run ended. {stats}")
        self.io.close()
        self.io.join(timeout=3)
        return 1 if self.io.refused or self.io.denied or (self.remote and self.io.lost_kernel) else 0

    def _report_missed(self, behind: bool) -> None:
        """A best-effort plugin tells the kernel how many events it missed: the gaps its handler met and, stopped while
        `behind`, the events up to the run's final one that its inbox dropped past where its handler got to (no seq
        jump has shown it those)."""
        if self.durable or not self.counts_gaps:
            return
        ahead = 0
        if behind:
            end = getattr(self.io, "final_seq", 0) or float("inf")
            for first, last in list(getattr(self.io, "dropped_runs", ())):
                first, last = max(first, self.next_seq), min(last, end - 1)
                ahead += max(0, last - first + 1)
        if self.gaps + ahead:
            self.io.send(control("log", level="warning", text=f"missed {self.gaps + ahead} events (best-effort gaps)"))

    def _kernel_died(self) -> bool:
        """The kernel is gone with the run unfinished: not refused, not stopped by a live kernel, not after the
        run's final event, and no summary.json (a kernel that ends a run writes it, even a failed one). Never over
        TCP: the run's directory is not here, and a silence there may be the network's (an e-mail plugin run
        remotely would mail "run died" for a dropped link)."""
        return (self._set_up and self.io.lost_kernel and not self.finished and not self.remote
                and run_summary(self.plugin.run_dir) is None)

    def _tell_kernel_gone(self, reason: str) -> None:
        """Plugin.on_kernel_gone on a thread of its own, waited for at most kernel_gone_timeout_s: a hook
        that hangs must not keep a dead run's plugin alive."""
        last = self.last_event
        info = KernelGoneInfo(reason=reason, run_id=self.plugin.run_id, run_dir=str(self.plugin.run_dir),
                              last_seq=last.seq if last else None, last_step=last.step if last else None,
                              last_epoch=last.epoch if last else None)
        hook = threading.Thread(target=self._run_kernel_gone, args=(info,), name="trainbus-kernel-gone", daemon=True)
        hook.start()
        hook.join(self.plugin.kernel_gone_timeout_s)
        if hook.is_alive():
            self.failures += 1
            say(f"[{self.plugin.name}] on_kernel_gone still running after kernel_gone_timeout_s "
                f"{self.plugin.kernel_gone_timeout_s:g} s; going on without it")

    def _run_kernel_gone(self, info: KernelGoneInfo) -> None:
        try:
            self.plugin.on_kernel_gone(info)
        except Exception as exc:  # as any handler's: logged, and the plugin goes on (to its teardown)
            self.failures += 1
            say(f"[{self.plugin.name}] on_kernel_gone failed:\n{user_traceback(exc)}")

    def report_thread_failure(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook in a plugin's process: an exception that ends a thread of the plugin's own (a sampler
        whose reading the SDK refused) went to the plugin's log alone, so its readings stopped with no word in the
        kernel's log, the console or the run's summary; it is an error reported as a handler's is."""
        exc = args.exc_value
        if args.exc_type is SystemExit or exc is None:  # as Python's own hook: a thread's sys.exit() says nothing
            return
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == threading.__file__:  # Thread.run's frames
            tb = tb.tb_next
        error = user_traceback(exc.with_traceback(tb or exc.__traceback__))
        thread = args.thread.name if args.thread is not None else "?"
        try:
            self.io.send(control("log", level="error",
                                 text=f"thread {thread!r} failed: {type(exc).__name__}: {exc}\n{error}"))
        finally:
            say(f"[{self.plugin.name}] thread {thread!r} failed:\n{error}")

    def _report_outside_handlers(self, what: str, exc: Exception) -> None:
        """setup's or teardown's exception: in the plugin's log, and to the kernel's log (the console shows it)."""
        error = user_traceback(exc)
        self.io.send(control("log", level="error", text=f"{what} failed: {type(exc).__name__}: {exc}\n{error}"))
        say(f"[{self.plugin.name}] {what} failed:\n{error}")


def refused_hello(name: str, reason: str) -> str:
    """The kernel's refusal of our hello in one line, with the fix when it is the name (one the run's config gives a
    plugin, or a live peer's)."""
    why = reason.removeprefix(f"hello as {name!r} refused: ")  # the kernel's own words start so (kernel/peers.py)
    fix = "; pick another name with --name NAME" if "name" in why else ""
    return f"the kernel refused the hello as {name!r}: {why}{fix}"
