"""Who is on the control socket: hellos checked against credentials, what each peer may do, acks, liveness.

A peer is known only after a hello that proves its name (kernel/credentials.py). From then on it may
move only its own ack position, never past what was published; send only the reply types it declared;
and it is alive while it sends anything at all. The table is bounded and forgets peers that are gone.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from trainbus.proto import DURABLE
from trainbus.proto import events as ev
from trainbus.proto.messages import PERSISTS

from .credentials import Credentials
from .keys import ClientKey
from .limits import PeerBudget, PeerLimits

MAX_PEERS = 64  # peers attached by hand, and remote ones, at once (each side; Peers._attached); past it, refused
# Of the remote side's places, those monitor-role keys cannot take: a key that may only watch opening peers until the
# table was full kept every control key, and so the run's operator (`attach --control`, a remote stop), out.
CONTROL_PLACES = 8
MAX_NAMES = 256  # names whose ack position and role are remembered across reconnects and restarts
ALWAYS_ALLOWED = frozenset({"heartbeat", "ack", "replay", "bye", "snapshot"})  # reads of the run, and staying alive
PERSISTER_MESSAGES = frozenset({"checkpoint_saved", "checkpoint_failed"})
# What only a control-role key may send over TCP: what steers the run or frees its snapshot buffers. A monitor-role
# key watches (events, replays, snapshots) and reports (metric, log: a GPU monitor on the machine with the GPU).
CONTROL_ROLE_ONLY = frozenset({"stop", "checkpoint_now"}) | PERSISTER_MESSAGES
# What only the run's owner may send: it starts and stops processes on the kernel's host. The owner is a local peer
# whose hello carried the run's credential file (0600 in the 0700 run directory); not a spawned plugin, whose
# secret is its own name's, and not a remote key, whatever its role (a control key steers training, no more).
OWNER_ONLY = frozenset({"attach_plugin", "detach_plugin"})


class Refused(Exception):
    """A message the kernel will not act on: `code` is the counter's name, the text says why."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code

    @property
    def welcome_lost(self) -> bool:
        """The peer itself is turned away (not welcomed, or a hello refused), not just one message."""
        return self.code in ("unknown_peer", "key_revoked") or self.code.startswith("hello_")


class Supervision(Protocol):
    """The narrow questions peers ask the supervisor about the plugins it spawned."""

    def spawned(self, name: str) -> bool: ...
    def is_current(self, name: str, pid: int) -> bool: ...
    def coming_back(self, name: str) -> bool: ...
    def seen(self, name: str, pid: int, now: float) -> None: ...
    def starting(self) -> list[str]: ...
    def unannounced(self) -> list[str]: ...


@dataclass
class Peer:
    """A welcomed peer: what its hello said and what it has done since."""

    identity: bytes
    name: str
    pid: int
    delivery: str
    replies: frozenset[str]
    votes: frozenset[str]  # only types the kernel waits at (ev.VOTED_EVENTS): voters_behind reads it at every check
    capabilities: tuple[str, ...]
    spawned: bool
    last_seen: float
    budget: PeerBudget
    user_id: str = ""  # a remote peer's CURVE key (z85, ZAP's User-Id); "" on ipc
    key_name: str = ""  # that key's name in the key directory
    role: str = ""  # that key's role at hello (kernel/keys.py); "" on ipc
    owner: bool = False  # its hello proved the run's owner (kernel/credentials.py): it may send OWNER_ONLY commands
    acked: int = 0  # highest seq this connection acked (votes read it)
    # The seq of a vote this connection did not answer within vote_timeout_s: until it acks that far it is not
    # waited for again, so a voter that hangs costs one vote_timeout_s, not one every epoch.
    missed_vote: int = 0
    # The last seq numbered when it was welcomed: a peer receives what is published after its hello (§8), so a vote
    # at an event numbered before then (a voter that says hello while the kernel waits for another) is not its own.
    welcomed_at_seq: int = 0
    replay_from: int | None = None  # a replay asked for and not yet served (newer requests replace it)
    counters: collections.Counter = field(default_factory=collections.Counter)

    @property
    def label(self) -> str:
        """How its replies are attributed (stop_requested's reasons): a remote peer by its key too."""
        return f"{self.name} (key {self.key_name})" if self.key_name else self.name


class Peers:
    def __init__(self, credentials: Credentials, supervisor: Supervision, limits: PeerLimits, liveness_s: float):
        self.credentials = credentials
        self.supervisor = supervisor
        self.limits = limits
        self.liveness_s = liveness_s
        self._by_identity: dict[bytes, Peer] = {}
        self._by_name: collections.OrderedDict[str, Peer] = collections.OrderedDict()  # latest hello per name
        self.positions: dict[str, int] = {}  # durable name -> highest seq acked, across its restarts
        # name -> whose its position is: "" the run's own peers (ipc: spawned, or the owner's credential), else the
        # remote key that said hello under it last. A name is any free one a client chooses; its position is not.
        self._principals: dict[str, str] = {}
        # A remote key's one budget of metrics, logs and replays, shared by every peer it opens (up to MAX_PEERS):
        # the grant is the key's, and 64 peers of one monitor key at their own limits journaled ~100 MB in 30 s.
        self._key_budgets: dict[str, PeerBudget] = {}
        self._silent: list[Peer] = []  # forgotten hand-attached peers not yet returned by forget_dead (<= MAX_PEERS)
        # Until when the bus thread has read what peers sent (Bus._run), on the ipc socket and on the TCP one: silence
        # counts up to then, not up to `now`. The training thread judges liveness too (votes, the drain, has a
        # persister said hello), and a bus thread held up (a flush waiting for its disk) reads nobody meanwhile, nor
        # does it read a socket whose share of its time is spent (kernel/control_reading.py): those peers are not
        # silent, just unread.
        self.heard_at = float("inf")
        self.heard_remote_at = float("inf")

    def __iter__(self):
        return iter(list(self._by_identity.values()))

    def get(self, identity: bytes) -> Peer | None:
        return self._by_identity.get(identity)

    # -- hello ------------------------------------------------------------------------------------

    def welcome(self, identity: bytes, hello: dict[str, Any], now: float, user_id: str = "") -> Peer:
        """Register the peer a hello names, or raise Refused saying why not. A remote peer (`user_id`, its
        CURVE key) proves itself by that key, not by a secret, and may take any name no spawned plugin holds."""
        name, pid = hello["name"], hello["pid"]
        spawned = self.supervisor.spawned(name)
        key = self.credentials.remote_key(user_id, now) if user_id else None
        if not user_id:
            refusal = self.credentials.check(name, hello["secret"], spawned)
        elif key is None:
            refusal = "hello_key_revoked", "its key is no longer authorized (revoked)"
        elif spawned:
            refusal = "hello_name_spawned", f"name {name!r} belongs to a plugin this run spawned"
        else:
            refusal = None
        if refusal:
            code, why = refusal
            raise Refused(code, f"hello as {name!r} refused: {why}")
        if spawned and not self.supervisor.is_current(name, pid):
            raise Refused("hello_pid", f"hello as {name!r} refused: pid {pid} is not the process the kernel started; "
                                       "a launcher (a shell script, `cargo run`, `npm start`) must exec the plugin, "
                                       "not start it as its child")
        holder = self._by_name.get(name)
        # held only while its connection still speaks for it: one that said hello under another name let it go
        if holder is not None and holder.identity != identity and self._by_identity.get(holder.identity) is holder:
            # The process the kernel started, on a new connection (libzmq reconnected its DEALER under a new routing
            # id, §3, or it opened another): its secret and pid prove it is that holder, no rival. Refused, it was
            # silent to the kernel for as long as it lived: declared hung, restarted, the same again, then failed.
            same_process = spawned and holder.spawned and holder.pid == pid
            if self.is_live(holder, now) and not same_process:
                raise Refused("hello_name_taken", f"hello as {name!r} refused: a live peer holds that name")
            del self._by_identity[holder.identity]
        if not spawned and identity not in self._by_identity and self._no_place(key, bool(user_id)):
            self._drop_dead(now)  # the silent among them: reported by the bus's next forget_dead
            if why := self._no_place(key, bool(user_id)):
                raise Refused("hello_table_full", f"hello as {name!r} refused: {why}")
        principal = key.name if key is not None else ""
        if self._principals.get(name, principal) != principal:  # another client's position: not its to resume or move
            self.positions.pop(name, None)
        self._principals[name] = principal
        # A vote makes training wait (up to vote_timeout_s an epoch), and a persister holds every snapshot buffer
        # until it settles it (the run's checkpoints skipped meanwhile): both steer the run, a monitor key's must not.
        steers = key is None or key.role == "control"
        # Votes at types the kernel never waits at mean nothing, and a repeat adds nothing: kept, a 100k-entry list
        # (a 256 KiB hello) would be walked at every check of every vote wait (PROTOCOL.md §7.1).
        votes = frozenset(hello["votes"]) & ev.VOTED_EVENTS if steers else frozenset()
        capabilities = tuple(hello["capabilities"]) if steers else ()
        budget = PeerBudget(self.limits, now) if key is None else \
            self._key_budgets.setdefault(key.name, PeerBudget(self.limits, now, keyed=True))
        peer = Peer(identity, name, pid, hello["delivery"], frozenset(hello["replies"]), votes,
                    capabilities, spawned, now, budget, user_id,
                    key.name if key else "", key.role if key else "",
                    owner=not user_id and not spawned and self.credentials.proves_owner(hello["secret"]))
        self._by_identity[identity] = peer
        self._by_name[name] = peer
        self._by_name.move_to_end(name)
        while len(self._by_name) > MAX_NAMES:
            # the oldest name no connection holds and no plugin of the run's: those said hello first, and a peer
            # churning through names made the kernel forget them as they ran (refused, restarted, replayed from 1)
            gone = next((n for n, p in self._by_name.items()
                         if self._by_identity.get(p.identity) is not p and not self.supervisor.spawned(n)), None)
            if gone is None:  # all held or the run's own: as many as its plugins and MAX_PEERS a side, bounded too
                break
            self._forget_name(gone)
        self.seen(peer, now)
        return peer

    def _no_place(self, key: ClientKey | None, remote: bool) -> str:
        """Why a new peer on this side (and, remote, of this key's role) has no place; '' if it has one."""
        if self._attached(remote) >= MAX_PEERS:
            return f"{MAX_PEERS} {'remote' if remote else 'hand-attached'} peers already attached"
        if key is not None and key.role != "control" and sum(
                1 for peer in self._by_identity.values() if peer.user_id and peer.role != "control"
        ) >= MAX_PEERS - CONTROL_PLACES:
            return (f"{MAX_PEERS - CONTROL_PLACES} peers of monitor keys already attached (the other "
                    f"{CONTROL_PLACES} places are kept for control keys)")
        return ""

    def _attached(self, remote: bool) -> int:
        """Peers attached over TCP (`remote`) or by hand on ipc. Each side has MAX_PEERS places of its own, and the
        run's spawned plugins (as many as its config and its owner's attach commands) need none: a key that may only
        watch filled all 64, and kept the run's restarted plugins and its owner's `runs stop` from saying hello."""
        return sum(1 for peer in self._by_identity.values() if not peer.spawned and bool(peer.user_id) == remote)

    def resume_from(self, peer: Peer, next_seq: int) -> int:
        """Where a durable peer starts: after its name's last ack; a best-effort one: what comes next."""
        return self.positions.get(peer.name, 0) + 1 if peer.delivery == DURABLE else next_seq

    # -- what a welcomed peer may do --------------------------------------------------------------

    def check_allowed(self, peer: Peer, kind: str) -> None:
        """Raise Refused unless this peer's hello (and, remote, its key's role) granted it `kind` messages."""
        if peer.user_id:
            key = self.credentials.remote_key(peer.user_id, peer.last_seen)
            if key is None:
                raise Refused("key_revoked", f"{peer.name}: key {peer.key_name} is no longer authorized (revoked)")
            if kind in CONTROL_ROLE_ONLY and key.role != "control":
                raise Refused("role", f"{peer.name}: {kind} refused: key {key.name} has role {key.role}; "
                                      f"only a control-role key may send it")
        if kind in ALWAYS_ALLOWED:
            return
        if kind in OWNER_ONLY:
            if not peer.owner:
                raise Refused("not_owner", f"{peer.name}: {kind} refused: only the run's owner may attach or detach "
                                           f"plugins (a local client with the run's credential file, as `trainbus "
                                           f"plugins attach` is); not a plugin of the run, not a remote key")
            return
        if kind in PERSISTER_MESSAGES:
            if PERSISTS not in peer.capabilities:
                raise Refused("not_persister", f"{peer.name}: {kind} from a peer without the checkpoint capability")
            return
        if kind not in peer.replies:
            raise Refused("not_declared", f"{peer.name}: {kind} is not among the replies its hello declared")

    def seen(self, peer: Peer, now: float) -> None:
        """Any message is a sign of life (zguide: treat any incoming data as a heartbeat)."""
        peer.last_seen = now
        if peer.spawned:
            self.supervisor.seen(peer.name, peer.pid, now)

    def ack(self, peer: Peer, seq: int, published_seq: int) -> None:
        """Moves this peer's own position only, and never past what was published."""
        peer.acked = max(peer.acked, min(seq, published_seq))
        if peer.delivery == DURABLE:
            self.positions[peer.name] = max(self.positions.get(peer.name, 0), peer.acked)

    def held_by_hand(self, name: str, now: float) -> Peer | None:
        """The live peer attached by hand (or remotely) that holds `name`: not a process of ours, and its name is its
        own while it talks (a hello under it is refused "a live peer holds that name"); None if there is none."""
        peer = self._by_name.get(name)
        if peer is None or peer.spawned or self._by_identity.get(peer.identity) is not peer:
            return None
        return peer if self.is_live(peer, now) else None

    def start_at(self, name: str, after_seq: int) -> None:
        """A plugin attached to the live run as `name`: durable, it is welcomed with resume_from = after_seq + 1
        (0: from seq 1), whatever an earlier process of that name acked; that process's connection is forgotten, so
        nothing it still had in flight moves the new one's position."""
        earlier = self._by_name.get(name)
        if earlier is not None:
            self._by_identity.pop(earlier.identity, None)
        self.positions[name] = after_seq
        self._principals[name] = ""  # the supervisor's plugin, as its hello will say

    def position(self, name: str) -> int:
        peer = self._by_name.get(name)
        return self.positions.get(name, peer.acked if peer else 0)

    # -- liveness ---------------------------------------------------------------------------------

    def is_live(self, peer: Peer, now: float) -> bool:
        """A spawned peer lives while its process does; an attached one while it keeps talking."""
        if peer.spawned:
            return self.supervisor.is_current(peer.name, peer.pid)
        return self._silent_for(peer, now) < self.liveness_s

    def _silent_for(self, peer: Peer, now: float) -> float:
        """How long the peer has said nothing, counted while its socket was read."""
        return min(now, self.heard_remote_at if peer.user_id else self.heard_at) - peer.last_seen

    def may_return(self, name: str, now: float) -> bool:
        """Live, or spawned and on its way back (restarting); not failed, not left."""
        peer = self._by_name.get(name)
        if peer is None:
            return False
        if peer.spawned:
            return self.supervisor.coming_back(name)
        return peer.identity in self._by_identity and self.is_live(peer, now)

    def starting(self) -> list[str]:
        """Spawned plugins that have not said hello yet and may persist checkpoints (Supervisor.starting)."""
        return self.supervisor.starting()

    def unannounced(self) -> list[str]:
        """Spawned plugins that have not said hello yet: whether durable, and from where they replay, is not known."""
        return self.supervisor.unannounced()

    def forget_dead(self, now: float) -> list[Peer]:
        """Drop connections that are gone; their names keep their ack positions. Returns the peers attached by hand
        that went silent without a bye (killed, unplugged) and were dropped since the last call, here or by a hello
        that needed their room: no process of ours tells their end, so the caller does."""
        self._drop_dead(now)
        silent, self._silent = self._silent, []
        return silent

    def _drop_dead(self, now: float) -> None:
        for identity, peer in list(self._by_identity.items()):
            if not self.is_live(peer, now) and (peer.spawned or self._silent_for(peer, now) > 2 * self.liveness_s):
                del self._by_identity[identity]
                if not peer.spawned and self._by_name.get(peer.name) is peer:  # not since replaced by a new hello
                    self._silent.append(peer)

    def left(self, peer: Peer) -> None:
        """A peer attached by hand said bye: its connection is done, and its name free for a new hello at once
        (its durable position is kept, so it resumes where it acked)."""
        self._by_identity.pop(peer.identity, None)

    def _forget_name(self, name: str) -> None:
        peer = self._by_name.pop(name)
        if self._by_identity.get(peer.identity) is peer:  # its routing id may speak for another name by now
            del self._by_identity[peer.identity]
        self.positions.pop(name, None)
        self._principals.pop(name, None)

    # -- questions the bus and the checkpointer ask -----------------------------------------------

    def named(self, names_with: str, now: float) -> list[Peer]:
        """The latest peer of each name with capability `names_with` that may still return."""
        return [p for p in list(self._by_name.values())
                if names_with in p.capabilities and self.may_return(p.name, now)]

    def voters_behind(self, type_: str, seq: int, now: float) -> list[str]:
        """Live voters at `type_` that have not acked `seq`, less those still behind a vote they missed and those
        welcomed once `seq` was numbered."""
        return [p.name for p in self if type_ in p.votes and p.welcomed_at_seq < seq
                and p.missed_vote <= p.acked < seq and self.is_live(p, now)]

    def mark_missed_vote(self, names: list[str], seq: int) -> None:
        for name in names:
            peer = self._by_name.get(name)
            if peer is not None:
                peer.missed_vote = seq

    def has_voters(self, type_: str) -> bool:
        return any(type_ in p.votes for p in self)

    def durable_behind(self, seq: int, now: float) -> dict[str, int]:
        """Durable names that may still return and have not acked `seq`: what the end-of-run drain waits for."""
        return {name: position for name, position in self._durable_positions(now) if position < seq}

    def durable_floor(self, now: float) -> int:
        """The lowest position among durable names that may still return (what all of them acked); a large number
        when there is none."""
        return min((position for _, position in self._durable_positions(now)), default=2**63 - 1)

    def _durable_positions(self, now: float) -> Iterator[tuple[str, int]]:
        """(name, position) of each durable peer that may still return."""
        for p in list(self._by_name.values()):
            if p.delivery == DURABLE and self.may_return(p.name, now):
                yield p.name, self.positions.get(p.name, 0)

    def welcomed_names(self) -> set[str]:
        return {p.name for p in self}
