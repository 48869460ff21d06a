"""Drive a plugin without sockets: feed it events, read back the replies it would have sent."""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from typing import Any

from trainbus.proto import DURABLE, Event, check_control, events as ev

from .plugin import Plugin, check_constructed, checked_subscriptions, near_event_type
from .tracebacks import from_authors_frames


class Harness:
    """A fake kernel for plugin authors' tests.

    Example::

        from trainbus.plugins.early_stopping import EarlyStoppingPlugin

        h = Harness(EarlyStoppingPlugin({"patience": 1}))
        h.feed("end_epoch", epoch=1, validation_loss=0.5)
        h.feed("end_epoch", epoch=2, validation_loss=0.6)
        assert h.replies_of("stop")
    """

    def __init__(self, plugin: Plugin, run_id: str = "test-run", run_dir: str | None = None, session_seq: int = 1):
        """session_seq: the first seq of the kernel that welcomes the plugin (`welcome.session_seq`); above 1, a
        continued run's (PROTOCOL.md §12): the plugin sees it in `self.session_seq` and the events fed are numbered
        from it (set `seq` to feed a replay of earlier ones)."""
        if not isinstance(session_seq, int) or session_seq < 1:
            raise ValueError(f"session_seq must be a seq (an int >= 1), got {session_seq!r}")
        check_constructed(plugin)
        self.plugin = plugin
        if run_dir is not None or plugin.run_dir == ".":  # never write into the caller's cwd by default
            plugin.run_dir = run_dir or tempfile.mkdtemp(prefix="trainbus-harness-")
            if run_dir is None:  # ours: removed with the plugin, or as the process exits (a test suite left hundreds)
                weakref.finalize(plugin, shutil.rmtree, plugin.run_dir, ignore_errors=True)
        self.run_id = run_id
        self.seq = session_seq - 1  # the last seq fed: the next event is numbered seq + 1
        plugin.session_seq = session_seq
        self.step = 0
        self.epoch = 0
        self.replies: list[dict[str, Any]] = []
        plugin.run_id = run_id
        self.subscribed = set(checked_subscriptions(plugin)[0])
        plugin.setup()
        # what setup said (a "ready" log line) is no handler's reply: here, not in what the first feed returns
        self.replies.extend(check_control(m) for m in plugin.outbox)
        plugin.outbox.clear()

    def feed(self, type_: str, *, step: int | None = None, epoch: int | None = None, **data: Any) -> list[dict]:
        """Deliver one event; return the replies the handler sent (already checked against the protocol).

        An event type the plugin does not subscribe to is not delivered, as over sockets (a durable
        plugin gets every type, like any plugin handling every type through on_event)."""
        __tracebackhide__ = True  # pytest shows a handler's failure from the test's line to the handler's
        if type_ not in ev.ALL_EVENTS:
            raise ValueError(f"unknown event type {type_!r}{near_event_type(type_)}; the types are "
                             f"proto/PROTOCOL.md §6's: {', '.join(ev.LIFECYCLE_EVENTS + ev.KERNEL_EVENTS)}")
        self.seq += 1
        self.step = self.step if step is None else step
        self.epoch = self.epoch if epoch is None else epoch
        event = Event(seq=self.seq, run=self.run_id, type=type_, ts=time.time(), step=self.step,
                      epoch=self.epoch, data=data)
        if self.plugin.delivery == DURABLE or "" in self.subscribed or type_ in self.subscribed:
            self.plugin.handling = event
            try:
                self.plugin.handle(event)
            except Exception as exc:  # raised from the handler's frames: the SDK's dispatch to it is no place to fix
                raise exc.with_traceback(from_authors_frames(exc, self.plugin.handler_of(type_)))
            finally:
                self.plugin.handling = None
                # what it replied before raising went out in a run (its last try's): in h.replies, not the next feed's
                replied = self._take_outbox()
            return replied
        return self._take_outbox()

    def _take_outbox(self) -> list[dict[str, Any]]:
        new = [check_control(m) for m in self.plugin.outbox]
        self.plugin.outbox.clear()
        self.replies.extend(new)
        return new

    def replies_of(self, type_: str) -> list[dict[str, Any]]:
        return [r for r in self.replies if r["type"] == type_]

    def close(self) -> list[dict[str, Any]]:
        """Tear the plugin down; return what its teardown sent (a last metric or log line), as the kernel gets it."""
        before = len(self.plugin.outbox)  # what a test put there itself (a sampler's tick) stays for it to read
        self.plugin.teardown()
        new = [check_control(m) for m in self.plugin.outbox[before:]]
        self.replies.extend(new)
        return new
