"""The message shapes of protocol v1: the event envelope and every control message, as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
JOURNAL_NAME = "events"  # the run journal's file name inside a run directory (PROTOCOL.md, the journal)
SUMMARY_NAME = "summary.json"  # written by the kernel when a run has ended: its presence means "over"


def kept_dir_name(uid: int) -> str:
    """The folder, in the temporary directory, where a kernel keeps what its run directory's full disk refused (the
    summary, the final weights, the journal's last events): owner-only, one a user (kept_files.kept_dir)."""
    return f"trainbus-kept-{uid}"


def kept_name(run_id: str, name: str) -> str:
    """The name there of the run directory's file `name` of run `run_id`."""
    return f"trainbus-{run_id}-{name}"

# What the kernel keeps in a run directory (the journal and its segments `events.*`, too): no plugin writes there
# (a PATH setting naming one is refused: metrics_log writing `events` cut the journal and wrote into it).
RUN_DIR_RESERVED = frozenset({JOURNAL_NAME, SUMMARY_NAME, "config.json", "credential", "kernel.pid", "kernel.host",
                              "kernel.log", "final.pt", "connection.json", "control.sock", "events.sock", "bursts.sock",
                              "plugins"})  # plugins/: each spawned plugin's log, NAME.log

# Delivery classes a plugin declares in its hello.
BEST_EFFORT = "best_effort"  # live PUB/SUB only; gaps are counted, not repaired
DURABLE = "durable"  # acks what it processed; missed events are replayed from the journal
DELIVERY_CLASSES = (BEST_EFFORT, DURABLE)

LOG_LEVELS = ("debug", "info", "warning", "error")
# A peer silent for this many heartbeat intervals is gone (zguide's Paranoid Pirate), on either side (PROTOCOL.md §8).
HEARTBEAT_LIVENESS = 3
# A hello's name rides in every event of that peer (each metric and log's `plugin`), so it is bounded like a metric's
# name: a hand-attached peer chooses it, and a 250 KiB one made each of its 400 burst metrics a 250 KiB event.
PEER_NAME_MAX_CHARS = 200
# The refusal codes of a remote peer's key revoked while it was connected (a message) or between two hellos: a key
# the host no longer takes, as a refused CURVE handshake is (a client says so as it would for a fresh connection).
KEY_REVOKED_CODES = frozenset({"key_revoked", "hello_key_revoked"})


@dataclass(frozen=True)
class Event:
    """One published event: the envelope of every frame on the events socket and every journal record."""

    seq: int  # gap-free per run, starting at 1
    run: str
    type: str
    ts: float  # wall time, seconds since the epoch
    step: int  # optimizer steps taken so far in this run
    epoch: int  # 0 before the first epoch starts, then 1-based
    data: dict[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION
    # How many events of each per-batch type (events.COUNTED_BATCH_EVENTS) the run had numbered up to and including
    # this one; None where the kernel did not say (a held-back heartbeat, a journal from before the field).
    n: list[int] | None = None

    @classmethod
    def fast(cls, seq: int, run: str, type_: str, ts: float, step: int, epoch: int, data: dict[str, Any],
             n: list[int] | None = None) -> Event:
        """Event(...) for values already known to be right (the bus's own, a checked decode): the same fields set
        without the frozen __init__'s object.__setattr__ per field (~1.5 -> 0.3 us; one per event, everywhere)."""
        event = object.__new__(cls)
        event.__dict__.update(seq=seq, run=run, type=type_, ts=ts, step=step, epoch=epoch, data=data,
                              v=PROTOCOL_VERSION, n=n)
        return event


@dataclass(frozen=True)
class Default:
    """An optional field: absent means `value`. Fields added within v1 are optional, so older peers still speak v1."""

    type: Any
    value: Any


# Control messages: plugin -> kernel on the DEALER/ROUTER socket, and kernel -> plugin replies to it.
# Each entry is field -> type (required) or Default (optional). `int` never admits bool; `float` admits int.
_STR_LIST = list[str]
# What a hello's `capabilities` may declare that a kernel acts on: PERSISTS persists save_checkpoint snapshots.
PERSISTS = "checkpoint"
CAPABILITIES = (PERSISTS,)
CONTROL_SCHEMAS: dict[str, dict[str, Any]] = {
    # plugin -> kernel
    "hello": {
        "name": str,
        "pid": int,
        "subscriptions": _STR_LIST,  # event-type prefixes; [""] means everything
        "replies": _STR_LIST,  # reply types it may send (stop, metric, log, checkpoint_now)
        "delivery": str,  # one of DELIVERY_CLASSES
        "votes": Default(_STR_LIST, ()),  # event types whose stop vote the kernel awaits (bounded)
        "capabilities": Default(_STR_LIST, ()),  # of CAPABILITIES; others are welcomed and mean nothing
        # Proof of who the peer is: TRAINBUS_SECRET for a spawned plugin, the run's credential file for one
        # attached by hand. A remote peer proves itself with its CURVE key instead and may leave it empty.
        "secret": Default(str, ""),
    },
    "heartbeat": {},
    "ack": {"seq": int},  # everything up to and including seq has been processed
    "replay": {"from_seq": int},  # send me the journal from this seq on
    "bye": {"reason": str},  # leaving on purpose: do not restart me
    # `id`: a command id of the sender's choosing; the kernel acts once per (sender, id), so a resent command
    # (a client retrying after a reconnect) is ignored. "" (the default): no deduplication.
    "stop": {"reason": str, "id": Default(str, "")},
    # `epoch`: the epoch of `step` (the handled event's), since a step at an epoch's end is also the next's start
    "metric": {"name": str, "value": float, "step": (int, type(None)), "epoch": Default((int, type(None)), None)},
    "log": {"level": str, "text": str},
    "checkpoint_now": {"reason": str, "id": Default(str, "")},
    # a persister's verdict on one save_checkpoint (by its seq); the kernel republishes it as an event
    "checkpoint_saved": {"seq": int, "path": str, "step": int, "epoch": int, "sha256": str, "size": int},
    "checkpoint_failed": {"seq": int, "reason": str},
    "snapshot": {},  # send me the run's state as of now (a run_state answer): how `trainbus attach` starts
    # The run's owner's commands (a local peer whose hello carried the run's credential): start a plugin, by its
    # installed name, in the live run, or stop one. A durable plugin attached starts at the current seq, or with
    # from_start at seq 1. Each is answered with one command_result.
    "attach_plugin": {"name": str, "settings": dict, "from_start": Default(bool, False), "id": Default(str, "")},
    "detach_plugin": {"name": str, "id": Default(str, "")},
    # kernel -> plugin
    "welcome": {
        "run": str,
        "heartbeat_interval_s": float,
        "resume_from": int,  # a durable plugin's first unacknowledged seq; 1 for a new one
        # the first seq this kernel numbered: a final event before it ends an earlier session of a continued run
        "session_seq": Default(int, 1),
        "role": Default(str, ""),  # over TCP, the connection's key's role (monitor, control); "" on ipc
        "farewell": Default(bool, False),  # this kernel answers a bye with farewell: wait for it before closing
    },
    "replay_batch": {
        "events": list,  # encoded-ready envelopes (maps), in seq order
        "done": bool,  # True when the batch reaches the journal's end
        # the seqs it skips (before its first event, between its events) were compacted away, not lost (§12, §13)
        "compacted": Default(bool, False),
    },
    "run_state": {
        "seq": int,  # the state includes every event up to and including this seq, and none after it
        "state": dict,  # proto/run_state.py RunState.to_map(): run, progress, series, plugins, ended, ...
    },
    # the answer to bye, once everything the peer sent before it was read: it may close its socket now
    "farewell": {},
    # the answer to attach_plugin or detach_plugin: `text` is one line for a person (a pid, or what was wrong)
    "command_result": {"id": str, "ok": bool, "text": str},
    # the kernel will not act on this peer's messages: a hello it turned down, or a message before any hello
    "refused": {
        "reason": str,
        # True: the peer is not (or no longer) welcome, nothing it sends is acted on (a refused hello, an unknown
        # routing id); False: only the message named in `reason` was not acted on (outside the peer's grant)
        "welcome_lost": Default(bool, True),
        # why, as the kernel counts it (`refused_<code>` in the summary): "role", "key_revoked", ... ("": not said)
        "code": Default(str, ""),
    },
}

PLUGIN_TO_KERNEL = frozenset(
    {"hello", "heartbeat", "ack", "replay", "bye", "stop", "metric", "log", "checkpoint_now",
     "checkpoint_saved", "checkpoint_failed", "snapshot", "attach_plugin", "detach_plugin"}
)
REPLY_TYPES = frozenset({"stop", "metric", "log", "checkpoint_now"})
KERNEL_TO_PLUGIN = frozenset({"welcome", "replay_batch", "run_state", "command_result", "refused", "farewell"})
