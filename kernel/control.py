"""What each control message does: one handler per type, reached through a table, after the peer is checked.

Nothing from a peer that was not welcomed is acted on, and a welcomed peer only within its grant
(kernel/peers.py); every refusal is counted with its reason and told to the peer once.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from typing import Any

from trainbus.proto import (DURABLE, ProtocolError, control, decode_control, encode_control, encode_replay_batch,
                            events as ev)
from trainbus.proto.codec import MAX_CONTROL_CONTAINERS, unpack
from trainbus.proto.text import printable

from .limits import EVENT_JOURNAL_BYTES, truncate
from .live_plugins import LivePlugins
from .peers import Peer, Refused

log = logging.getLogger("trainbus.kernel")

REPLAY_BATCH_MAX_EVENTS = 512  # one replay_batch; the plugin asks for the next when done (pull = flow control)
REPLAY_BATCH_MAX_BYTES = 4 * 1024 * 1024
# A remote peer's batches are smaller: what a client asks for and never reads stays queued in the kernel, up to
# CONTROL_SNDHWM messages a connection (kernel/remote.py), and a monitor key may open 64 (peers.MAX_PEERS): 4 MiB
# batches of a journal of big events (plugins' 16 KiB log lines) made that 2 GiB of the kernel's memory; 512 KiB,
# 256 MiB (1 GiB counting the connections of peers forgotten as silent, up to the socket's 256), and what one key's
# connections may hold unread is bounded in bytes too (reply_ledger.py). A remote plugin catching up still gets its
# budget's 50 batches a second, 512 events each when they are the usual few hundred bytes.
REMOTE_REPLAY_BATCH_MAX_BYTES = 512 * 1024
SNAPSHOT_COST = 10  # replay batches one snapshot costs a peer's budget (it is built on the bus thread)
REASON_MAX_CHARS = 1000  # a stop's or a settlement's reason and path, as republished and logged
MALFORMED_LOGGED = 10  # malformed messages logged; the rest are counted
TOLD_MAX = 1024  # (peer, refusal, message type) keys logged once; a flood of new identities is only counted
REFUSAL_REPEAT_S = 1.0  # a refusal is told again to the same peer for the same reason at most this often
COMMAND_IDS_KEPT = 4096  # (sender, id) of stop/checkpoint_now commands seen: a resent one is ignored
VOTES_TOLD_MAX = 1024  # names told that some of their votes are never waited for (more names: not told again)
# A daemon's request (kernel/daemon_client.py: a msgpack map whose first key is "op") sent to a run's port, as
# `daemon status --remote` given a run's --listen endpoint does: malformed here, and dropped unanswered the client
# waited out its whole timeout to say no daemon answered. It is refused with this code (PROTOCOL.md §11), which the
# client says at once. Told by its first four bytes (a fixmap header, then the fixstr "op"), never decoded again.
NOT_A_DAEMON = "not_a_daemon"


class Dispatcher:
    """Dispatches the bus's control messages to the peer table, the checkpointer and the loop's replies."""

    def __init__(self, bus, supervisor, peers, checkpointer=None):
        self.bus, self.peers, self.checkpointer = bus, peers, checkpointer
        self.counters = bus.counters
        self._told: collections.OrderedDict = collections.OrderedDict()
        self.errors_logged: collections.Counter = collections.Counter()  # plugin name -> error-level log replies
        self.checkpoints_failed: collections.Counter = collections.Counter()  # persister name -> checkpoint_failed
        self.dropped: collections.Counter = collections.Counter()  # (plugin name, metric|log) -> dropped past [limits]
        self._command_ids: collections.OrderedDict = collections.OrderedDict()
        self._votes_told: set[str] = set()
        self.supervisor = supervisor
        self.newest_checkpoint_seq = 0  # the newest save_checkpoint a persister of this kernel said it saved
        self.live = LivePlugins(bus, supervisor, peers, checkpointer)
        self.handlers = {
            "heartbeat": _nothing, "ack": self._on_ack, "replay": self._on_replay,
            "bye": self._on_bye,
            "metric": self._on_metric, "log": self._on_log,
            "stop": self._on_reply, "checkpoint_now": self._on_reply,
            "checkpoint_saved": self._on_settle, "checkpoint_failed": self._on_settle,
            "snapshot": self._on_snapshot,
            "attach_plugin": self.live.attach, "detach_plugin": self.live.detach,  # the owner's only (peers.py)
        }

    def handle(self, identity: bytes, raw: bytes, user_id: str = "") -> None:
        """One message from the connection `identity`; `user_id` is its CURVE key (z85) on TCP, "" on ipc."""
        try:
            msg = decode_control(raw, MAX_CONTROL_CONTAINERS)
        except ProtocolError as exc:
            if len(raw) >= 4 and 0x81 <= raw[0] <= 0x8F and raw[1:4] == b"\xa2op":  # a daemon's request
                self._refuse(identity, "daemon_request", Refused(NOT_A_DAEMON, "this is a run's kernel, not a "
                                                                 "daemon: give the daemon's --listen HOST:PORT"),
                             time.monotonic())
                return
            peer = self._welcomed(identity, user_id, time.monotonic())
            # whose message: an author running several plugins needs to know
            self.malformed(str(exc), f"[{peer.label}]" if peer is not None else "a connection not welcomed")
            if not user_id:
                self._malformed_hello(raw, str(exc))
            return
        kind, now = msg["type"], time.monotonic()
        try:
            if kind == "hello":
                self._on_hello(identity, msg, now, user_id)
                return
            handler = self.handlers.get(kind)
            if handler is None:  # a kernel-to-plugin type sent our way
                self.counters["unexpected"] += 1
                self._welcomed(identity, user_id, now)
                return
            peer = self._welcomed(identity, user_id, now)
            if peer is None:
                raise Refused("unknown_peer", f"{kind} from a peer that was not welcomed: say hello first")
            self.peers.check_allowed(peer, kind)
            handler(peer, msg)
        except Refused as refusal:
            self._refuse(identity, kind, refusal, now)

    def _welcomed(self, identity: bytes, user_id: str, now: float) -> Peer | None:
        """The welcomed peer a message came from, if any, marked alive: whatever it sent, well-formed or not, its
        connection is live (PROTOCOL.md §8: any control message is a sign of life)."""
        peer = self.peers.get(identity)
        if peer is None or peer.user_id != user_id:  # another key on a welcomed peer's routing id is not it
            return None
        self.peers.seen(peer, now)
        return peer

    def malformed(self, why: str, sender: str = "") -> None:
        """Count a message that is not one (the first MALFORMED_LOGGED logged, whatever was wrong with them, and
        who sent it when known: `[name]`, or a connection not welcomed)."""
        self.counters["malformed"] += 1
        if self.counters["malformed"] <= MALFORMED_LOGGED:
            log.warning("dropped a malformed control message%s: %s", f" from {sender}" if sender else "", why)

    def _malformed_hello(self, raw: bytes, why: str) -> None:
        """A malformed message that is a hello under a name of the run's: the plugin is told nothing (§11), and the
        run's summary would say it never said hello, so its author, who sent one, learns why it was not taken."""
        if b"\xa5hello" not in raw:  # no msgpack str "hello" anywhere: not one (and a flood is not decoded twice)
            return
        try:
            m = unpack(raw, MAX_CONTROL_CONTAINERS)
        except ProtocolError:
            return
        if type(m) is dict and m.get("type") == "hello" and type(m.get("name")) is str:
            self.supervisor.hello_not_taken(m["name"], f"its hello was dropped as malformed: {why}")

    def _refuse(self, identity: bytes, kind: str, refusal: Refused, now: float) -> None:
        """Count every refusal; log it once per (peer, reason, message type), and tell the peer at most once a
        second per (peer, reason, message type): a client that says hello again after each refusal (a name still
        held by its killed predecessor) hears each answer, an undeclared stop is told although an undeclared metric
        was just told, and a flood costs at most one answer a second per type. The key is the reason's code, not
        its text, which can carry names the peer chose (a flood of made-up names would be answered each time)."""
        self.counters[f"refused_{refusal.code}"] += 1
        key = (identity, refusal.code, kind)
        told = self._told.get(key)
        if told is not None and now - told < REFUSAL_REPEAT_S:
            return
        self._told[key] = now
        self._told.move_to_end(key)
        if len(self._told) > TOLD_MAX:
            self._told.popitem(last=False)
        if told is None:
            log.warning("refused: %s", refusal)
        self.bus.send(identity, encode_control(control("refused", reason=str(refusal),
                                                       welcome_lost=refusal.welcome_lost, code=refusal.code)))

    # -- one handler per message type -------------------------------------------------------------

    def _on_hello(self, identity: bytes, msg: dict[str, Any], now: float, user_id: str) -> None:
        previous = self.peers.get(identity)
        try:
            peer = self.peers.welcome(identity, msg, now, user_id)
        except Refused as refusal:
            if not user_id:  # a plugin of the run's (a remote peer under its name is not it): its summary says why
                why = str(refusal).removeprefix(f"hello as {msg['name']!r} refused: ")
                self.supervisor.hello_not_taken(msg["name"], f"its hello was refused: {why}")
            if previous is not None and previous.user_id == user_id:  # (another key on that routing id is not it)
                # its refusal says welcome_lost (§7.2: nothing it sends is acted on), so the name the connection held
                # must not go on speaking for it: that name leaves as with a bye
                self.peers.left(previous)
                if not previous.spawned:
                    self.bus.emit(ev.PLUGIN_EXITED, {"plugin": previous.name, "exit_code": 0})
            raise
        if previous is not None and previous.name != peer.name and not previous.spawned:
            # the connection now speaks for another name: the old one left as with a bye, or the journal would
            # show it ready and never gone (`runs show`: "gone with the run")
            self.bus.emit(ev.PLUGIN_EXITED, {"plugin": previous.name, "exit_code": 0})
        peer.welcomed_at_seq = self.bus.last_seq  # votes at what was numbered before are not its to answer (§7.3)
        if self.checkpointer is not None:
            self.checkpointer.welcomed(peer)
        self.bus.send(identity, encode_control(control(
            "welcome", run=self.bus.run_id, resume_from=self.peers.resume_from(peer, self.bus.last_seq + 1),
            heartbeat_interval_s=self.bus.heartbeat_interval_s, session_seq=self.bus.session_seq, role=peer.role,
            farewell=True)))
        if (previous is None or previous.name != peer.name or previous.user_id != user_id or previous.pid != peer.pid
                or previous.delivery != peer.delivery):
            # a hello said again on the connection welcomed under that name (a client retrying a welcome it did not
            # see in time) is answered again, but the peer was ready already: one plugin_ready per welcome (§7.1);
            # one that says another pid or delivery is news (the run's state shows the plugin as its last ready said)
            self.bus.emit(ev.PLUGIN_READY, {"plugin": peer.name, "pid": peer.pid, "delivery": peer.delivery})
            if peer.spawned:
                self.live.ready(peer.name)
        # what the peer keeps (peer.votes) is trimmed to the awaited types: the rest is in its hello, a monitor key's
        # ignored unsaid (§15)
        unawaited = sorted(set(msg["votes"]) - ev.VOTED_EVENTS) if not peer.key_name or peer.role == "control" else []
        if unawaited and peer.name not in self._votes_told and len(self._votes_told) < VOTES_TOLD_MAX:
            # a hello may vote at any type (§7.1), but training waits only at end_epoch: a stop decided at another
            # lands at the next step boundary, late, and its author should hear why once
            self._votes_told.add(peer.name)
            log.warning("[%s] votes at %s are never waited for: the kernel waits for votes at %s only (PROTOCOL.md "
                        "§7.3)", peer.label, truncate(", ".join(unawaited), REASON_MAX_CHARS)[0],
                        ", ".join(sorted(ev.VOTED_EVENTS)))

    def _on_bye(self, peer: Peer, msg: dict[str, Any]) -> None:
        if peer.spawned:  # its exit, seen by the supervisor, is the event
            self.supervisor.leaving(peer.name)
        else:  # a peer attached by hand (attach, a remote plugin) has no process of ours: its goodbye is the exit
            self.peers.left(peer)
            self.bus.emit(ev.PLUGIN_EXITED, {"plugin": peer.name, "exit_code": 0})
        # Everything the peer sent before its bye is read now; until it hears so it keeps its socket open. A
        # connection closed with messages still in its buffers loses them: over TCP the kernel's next write to it
        # meets a reset, which drops what the kernel's side had not read (PROTOCOL.md §7.1).
        self.bus.send(peer.identity, encode_control(control("farewell")))

    def _on_ack(self, peer: Peer, msg: dict[str, Any]) -> None:
        self.peers.ack(peer, msg["seq"], self.bus.journal.written_seq)

    def _on_snapshot(self, peer: Peer, msg: dict[str, Any]) -> None:
        """The run's state as of the last numbered event (zguide's Clone pattern, PROTOCOL.md §7.4)."""
        replays = peer.budget.replays
        if not replays.take(time.monotonic(), min(SNAPSHOT_COST, replays.capacity)):
            self.counters["snapshot_dropped"] += 1  # too often: the peer asks again
            return
        state = self.bus.run_state
        acked = {name: self.peers.position(name) for name, p in state.plugins.items() if p["delivery"] == DURABLE}
        raw = encode_control(control("run_state", seq=state.seq, state=state.to_map(acked)))
        if peer.user_id and len(raw) > self.bus.ledger.room(peer.identity):
            # its key's connections may hold as much unread already (reply_ledger.py): the peer asks again
            self.counters["snapshot_dropped_queued"] += 1
            return
        self.bus.send(peer.identity, raw)
        self.counters["snapshots"] += 1

    def _on_replay(self, peer: Peer, msg: dict[str, Any]) -> None:
        peer.replay_from = max(msg["from_seq"], 1)  # served by serve_replays; a newer request replaces it

    def compactable_through(self, now: float) -> int:
        """The last seq the journal may compact through (PROTOCOL.md §13): before the newest checkpoint a persister
        saved, and acked by every durable plugin that may still return (connected, or spawned and restarting). 0
        (nothing) while a spawned plugin has not said hello (it may be durable and replay from seq 1), and in a run
        no persister saved a checkpoint of: without one, every event stays."""
        if not self.newest_checkpoint_seq or self.peers.unannounced():
            return 0
        return min(self.newest_checkpoint_seq - 1, self.peers.durable_floor(now))

    def tick(self, now: float) -> None:
        """Each round of the bus thread: replays served, owners' attaches waiting on their plugin answered."""
        self.serve_replays(now)
        self.live.tick(now)

    def serve_replays(self, now: float) -> None:
        """One batch per peer per round, within each peer's replay rate; the journal's bytes as stored."""
        journal = self.bus.journal
        for peer in self.peers:
            if peer.replay_from is None or not peer.budget.replays.take(now):
                continue
            from_seq, peer.replay_from = max(peer.replay_from, journal.first_seq), None
            # where the batch begins: past from_seq when a lost segment was skipped, so done is reckoned from there
            max_bytes = REPLAY_BATCH_MAX_BYTES
            if peer.user_id:  # within what its key's connections may hold unread (reply_ledger.py); one event always
                max_bytes = max(1, min(REMOTE_REPLAY_BATCH_MAX_BYTES, self.bus.ledger.room(peer.identity)))
            read = journal.read_batch(from_seq, REPLAY_BATCH_MAX_EVENTS, max_bytes)
            done = read.last >= journal.written_seq
            self.bus.send(peer.identity, encode_replay_batch(read.count, read.records, done, read.compacted))
            self.counters["replayed"] += read.count

    def _on_metric(self, peer: Peer, msg: dict[str, Any]) -> None:
        name, cut = truncate(msg["name"], peer.budget.limits.metric_name_max_chars)
        if self._admit(peer, "metric", len(name.encode()), cut):
            # no step of its own: the step it is numbered at (the bus fills it in), as the event's own step
            # a remote peer's with its key: a name is the peer's own choice, its key is not
            self.bus.emit(ev.METRIC, {"plugin": peer.label, "name": name, "value": float(msg["value"]),  # §6.2: float
                                      "step": msg["step"], "epoch": msg["epoch"]})

    def _on_log(self, peer: Peer, msg: dict[str, Any]) -> None:
        text, cut = truncate(msg["text"], peer.budget.limits.log_text_max_chars)
        if self._admit(peer, "log", len(text.encode()), cut):
            level = msg["level"]
            if level == "error" and self._detached(peer):
                # its owner asked it to go: a handler cut short then (README: 0.5 s) is said, not counted as trouble
                level = "warning"
            self.bus.emit(ev.LOG, {"plugin": peer.label, "level": level, "text": text})
            if level == "error" and peer.spawned:  # the run's own plugins, which its summary lists
                self.errors_logged[peer.name] += 1
            log.log(logging.getLevelName(level.upper()), "[%s] %s", peer.label, text)

    def _detached(self, peer: Peer) -> bool:
        """A plugin this kernel runs that `trainbus plugins detach` is stopping."""
        child = self.supervisor.children.get(peer.name) if peer.spawned else None
        return child is not None and child.detached

    def _admit(self, peer: Peer, kind: str, nbytes: int, truncated: bool) -> bool:
        """Within the peer's rate and byte budget; drops are counted, and logged once per peer."""
        self.counters[f"{kind}_truncated"] += truncated
        if peer.budget.admit(kind, nbytes, time.monotonic()):
            return True
        self.counters[f"{kind}_dropped"] += 1
        peer.counters[f"{kind}_dropped"] += 1
        if peer.spawned:  # the run's summary says each of its plugins': its author takes them for written. Not
            self.dropped[peer.name, kind] += 1  # others': a key saying hello under ever new names is no table
        if peer.budget.spent_out(nbytes + EVENT_JOURNAL_BYTES):
            if not peer.budget.said_spent_out:  # once a key: all its peers share the one total
                peer.budget.said_spent_out = True
                log.warning("key %s's metric and log messages have added %g MB to the journal, its [limits] "
                            "key_journal_mb: its metric and log messages are dropped from now on (counted); raise "
                            "it in the run's config for a reporter that needs more", peer.key_name,
                            peer.budget.limits.key_journal_mb)
        elif peer.counters[f"{kind}_dropped"] == 1:
            log.warning("[%s] sends %s messages faster than its limit; dropping the excess (counted)", peer.name, kind)
        return False

    def _on_reply(self, peer: Peer, msg: dict[str, Any]) -> None:
        if msg["id"]:  # a command resent (a client retrying after a reconnect, or replaying it) acts once
            # a digest of the whole id: bounded memory whatever peers send, and ids that share a long prefix
            # (a long name and a counter) stay distinct commands
            digest = hashlib.blake2b(msg["id"].encode("utf-8", "surrogatepass"), digest_size=16).digest()
            sent = (peer.user_id or peer.name, digest)
            if sent in self._command_ids:
                self.counters["duplicate_command"] += 1
                return
            self._command_ids[sent] = True
            if len(self._command_ids) > COMMAND_IDS_KEPT:
                self._command_ids.popitem(last=False)
        # escaped as it comes in: the run's `stopped by:` line, `runs show`, the console and kernel.log all show it
        reason = truncate(printable(msg["reason"]), REASON_MAX_CHARS)[0]
        if peer.key_name:  # who sent it, journaled with the stop_requested it leads to
            if peer.budget.reply_lines.take(time.monotonic()):  # a loop of them rotated kernel.log's history away
                log.info("[%s] %s from key %s (%s): %s", peer.name, msg["type"], peer.key_name, peer.role, reason)
            else:
                self.counters["reply_lines_dropped"] += 1
        # and who sent it, escaped and cut the same: a hand-attached peer's name is any string it said hello with
        self.bus.reply(msg["type"], truncate(printable(peer.label), REASON_MAX_CHARS)[0], reason)

    def _on_settle(self, peer: Peer, msg: dict[str, Any]) -> None:
        if self.checkpointer is None:
            raise Refused("settle_seq", f"{peer.name}: {msg['type']}, but this run takes no snapshots")
        if not self.checkpointer.settle(peer, msg, self.bus.journal.written_seq):
            return
        # text cut as a stop's reason is, but for the path: checked inside the run's directories, a cut one would
        # name another file (PATH_MAX is 4,096), and the message's size bounds it
        fields = {k: truncate(v, REASON_MAX_CHARS)[0] if isinstance(v, str) and k != "path" else v
                  for k, v in msg.items() if k not in ("v", "type")}
        event = ev.CHECKPOINT_SAVED if msg["type"] == "checkpoint_saved" else ev.CHECKPOINT_FAILED
        if event == ev.CHECKPOINT_SAVED:
            self.newest_checkpoint_seq = max(self.newest_checkpoint_seq, msg["seq"])
        self.bus.emit(event, {"plugin": peer.name, **fields})
        if event == ev.CHECKPOINT_FAILED and peer.spawned:
            self.checkpoints_failed[peer.name] += 1
            log.warning("[%s] checkpoint failed: %s", peer.name, fields["reason"])


def _nothing(peer: Peer, msg: dict[str, Any]) -> None:
    """A heartbeat: being received was the point (Peers.seen ran)."""
