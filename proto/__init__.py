"""trainbus wire protocol v1: event names, message shapes, and the one codec that owns the bytes."""

from . import events
from .codec import (
    MAX_MESSAGE_BYTES,
    ProtocolError,
    check_control,
    control,
    decode_control,
    decode_event,
    encode_control,
    encode_event,
    encode_replay_batch,
    event_from_map,
    event_to_map,
    pack,
    unpack,
)
from .messages import (
    BEST_EFFORT,
    CONTROL_SCHEMAS,
    DELIVERY_CLASSES,
    DURABLE,
    JOURNAL_NAME,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    Event,
)

__all__ = [
    "BEST_EFFORT",
    "CONTROL_SCHEMAS",
    "DELIVERY_CLASSES",
    "DURABLE",
    "Event",
    "JOURNAL_NAME",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "ProtocolError",
    "REPLY_TYPES",
    "check_control",
    "control",
    "decode_control",
    "decode_event",
    "encode_control",
    "encode_event",
    "encode_replay_batch",
    "event_from_map",
    "event_to_map",
    "events",
    "pack",
    "unpack",
]
