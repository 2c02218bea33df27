"""Event envelopes and stream names shared by producers and consumers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from loyalty.events.v1 import events_pb2

from .redis_client import tagged
from .telemetry import inject_context

# Streams entries carry the serialized envelope under this field.
ENVELOPE_FIELD = b"envelope"
# ... and the producer's sequence number (servicekit/outbox.py), in decimal.
SEQ_FIELD = b"seq"


# Redis Cluster layout: a stream's name has no hash tag, so its slot is that
# of the whole name; every key beside it is tagged with that name, `{<stream>}`,
# which hashes to the same slot. So the dead-lettering MULTI (XADD to the
# dead-letter stream + XACK on the stream) stays in one slot, and each
# producer's stream (with its keys) lands on its own slot.


def field_text(value: bytes | str) -> str:
    """A stream reply's id, field or group name as text (clients may or may not decode)."""
    return value.decode() if isinstance(value, bytes) else value


def stream_name(namespace: str, producer: str) -> str:
    """One stream per producing service, e.g. "loyalty:events:rewards"."""
    return f"{namespace}:events:{producer}"


def head_key(stream: str) -> str:
    """Hash the relay keeps: `head` (last sequence published), `floor` (oldest kept)."""
    return f"{tagged(stream)}:head"


def replay_key(stream: str) -> str:
    """List of "group from_seq" requests the producer's relay serves."""
    return f"{tagged(stream)}:replay"


def dead_letter_stream(namespace: str, producer: str, group: str) -> str:
    """E.g. "{loyalty:events:rewards}:dlq:tiering": in its source stream's slot."""
    return f"{tagged(stream_name(namespace, producer))}:dlq:{group}"


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC))
    return ts


def make_envelope(producer: str, payload: Message, member_id: str = "") -> events_pb2.EventEnvelope:
    packed = any_pb2.Any()
    packed.Pack(payload)
    return events_pb2.EventEnvelope(
        event_id=str(uuid.uuid4()),
        event_type=payload.DESCRIPTOR.full_name,
        producer=producer,
        occurred_at=now_timestamp(),
        member_id=member_id,
        trace_context=inject_context(),
        payload=packed,
    )


@dataclass(frozen=True)
class ReceivedEvent:
    """An envelope read from a stream, with its unpacked payload."""

    stream: str
    entry_id: str
    envelope: events_pb2.EventEnvelope
    payload: Message


def unpack(envelope: events_pb2.EventEnvelope, message_type: type[Message]) -> Message:
    message = message_type()
    if not envelope.payload.Unpack(message):
        raise ValueError(
            f"event {envelope.event_id} carries {envelope.payload.TypeName()}, "
            f"not {message_type.DESCRIPTOR.full_name}"
        )
    return message
