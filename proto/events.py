"""Event names, spelled once: the lifecycle hooks users know from bz, and the kernel's own events."""

from __future__ import annotations

# The 14 lifecycle events, in the order a run meets them (bz's hook names, unchanged).
START_TRAINING_SESSION = "start_training_session"
LOAD_CHECKPOINT = "load_checkpoint"
START_EPOCH = "start_epoch"
START_TRAINING_LOOP = "start_training_loop"
START_TRAINING_BATCH = "start_training_batch"
END_TRAINING_BATCH = "end_training_batch"
END_TRAINING_LOOP = "end_training_loop"
START_VALIDATION_LOOP = "start_validation_loop"
START_VALIDATION_BATCH = "start_validation_batch"
END_VALIDATION_BATCH = "end_validation_batch"
END_VALIDATION_LOOP = "end_validation_loop"
SAVE_CHECKPOINT = "save_checkpoint"
END_EPOCH = "end_epoch"
END_TRAINING_SESSION = "end_training_session"

LIFECYCLE_EVENTS: tuple[str, ...] = (
    START_TRAINING_SESSION,
    LOAD_CHECKPOINT,
    START_EPOCH,
    START_TRAINING_LOOP,
    START_TRAINING_BATCH,
    END_TRAINING_BATCH,
    END_TRAINING_LOOP,
    START_VALIDATION_LOOP,
    START_VALIDATION_BATCH,
    END_VALIDATION_BATCH,
    END_VALIDATION_LOOP,
    SAVE_CHECKPOINT,
    END_EPOCH,
    END_TRAINING_SESSION,
)

# Per-batch events: by far the most frequent, so the kernel coalesces them into bursts. This order is the
# envelope's `n` (PROTOCOL.md §5): how many of each the run has numbered, which with `seq` tells a durable plugin
# sent only some per-batch types whether it missed anything it is sent (§12.1).
COUNTED_BATCH_EVENTS: tuple[str, ...] = (
    START_TRAINING_BATCH, END_TRAINING_BATCH, START_VALIDATION_BATCH, END_VALIDATION_BATCH,
)
BATCH_EVENTS: frozenset[str] = frozenset(COUNTED_BATCH_EVENTS)
COUNTED_INDEX: dict[str, int] = {type_: index for index, type_ in enumerate(COUNTED_BATCH_EVENTS)}

# Kernel events: published by the kernel itself, never by the loop's seams.
# The event types whose votes the kernel waits for (PROTOCOL.md §7.3): a hello may name others, never waited for.
VOTED_EVENTS: frozenset[str] = frozenset({END_EPOCH})

HEARTBEAT = "heartbeat"  # the kernel is alive; plugins exit cleanly when it stops coming
METRIC = "metric"  # a plugin's metric reply, republished for every subscriber
LOG = "log"  # a plugin's log reply (a failing handler's traceback arrives this way)
PLUGIN_STARTED = "plugin_started"
PLUGIN_READY = "plugin_ready"  # the plugin said hello: it is subscribed and will see what follows
PLUGIN_EXITED = "plugin_exited"  # left on purpose (exit code 0 or a goodbye); not restarted
PLUGIN_CRASHED = "plugin_crashed"
PLUGIN_HUNG = "plugin_hung"
PLUGIN_RESTARTED = "plugin_restarted"
PLUGIN_FAILED = "plugin_failed"  # restarted too often; given up for the rest of the run
PLUGIN_ATTACHED = "plugin_attached"  # the run's owner started a plugin in the live run (who, what, from which seq)
PLUGIN_DETACHED = "plugin_detached"  # the run's owner stopped one; its exit follows as plugin_exited
STOP_REQUESTED = "stop_requested"  # a stop reply was accepted; training ends at the next boundary
VOTE_MISSED = "vote_missed"  # voters that did not ack an event they vote at within vote_timeout_s: training went on
RUN_FAILED = "run_failed"
CHECKPOINT_SAVED = "checkpoint_saved"  # a persister made a snapshot durable (path, sha256, size)
CHECKPOINT_FAILED = "checkpoint_failed"  # a persister could not (reason); earlier files stand
CHECKPOINT_SKIPPED = "checkpoint_skipped"  # no snapshot taken: both buffers busy, or no persister
BUS_CLOSING = "bus_closing"  # the kernel's last event: its plugins drained and exited; nothing follows
TRAINING_STALLED = "training_stalled"  # the loop reached no seam for [run] stalled_after_s: where its thread waits
TRAINING_RESUMED = "training_resumed"  # the stalled loop reached a seam again

KERNEL_EVENTS: tuple[str, ...] = (
    HEARTBEAT,
    METRIC,
    LOG,
    PLUGIN_STARTED,
    PLUGIN_READY,
    PLUGIN_EXITED,
    PLUGIN_CRASHED,
    PLUGIN_HUNG,
    PLUGIN_RESTARTED,
    PLUGIN_FAILED,
    PLUGIN_ATTACHED,
    PLUGIN_DETACHED,
    STOP_REQUESTED,
    VOTE_MISSED,
    RUN_FAILED,
    CHECKPOINT_SAVED,
    CHECKPOINT_FAILED,
    CHECKPOINT_SKIPPED,
    BUS_CLOSING,
    TRAINING_STALLED,
    TRAINING_RESUMED,
)

ALL_EVENTS: frozenset[str] = frozenset(LIFECYCLE_EVENTS + KERNEL_EVENTS)
