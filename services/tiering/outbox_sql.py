"""Change events written by SQL: the batch's SegmentChanged and
LifecycleStageChanged envelopes are built inside the statement that changes the
rows, so a period end (an event for most members) sends no row to Python and
none back (the Python path cost ~15-25 us an event: build, fetch, COPY).

Protobuf's wire format is a concatenation of fields (tag, length, bytes) and a
parser takes fields in any order. An envelope here is, in this order:

    head       event_type, producer, occurred_at, trace_context
               (one chunk: constant; serialized by protobuf itself)
    field 1    event_id                                  (per event)
    field 5    member_id                                 (per event)
    field 7    Any{type_url, value: field 2 old, field 3 new, changed_at,
                   field 1 member_id}

Everything but the event id and the member id depends only on the event type
and the (old, new) pair, so it is built once per distinct pair in the chunk
(a few dozen, whatever values the table holds); per event SQL concatenates five
byte strings. Ids and member ids are uuid texts, always 36 bytes, so their
lengths are constants. A test parses SQL-built envelopes with protobuf and
compares them with Python-built ones.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from google.protobuf import any_pb2
from google.protobuf.message import Message

from loyalty.events.v1 import events_pb2
from servicekit.events import make_envelope
from servicekit.protos import timestamp

_ENVELOPE = events_pb2.EventEnvelope.DESCRIPTOR.fields_by_name
_ANY_VALUE = any_pb2.Any.DESCRIPTOR.fields_by_name["value"].number
_LEN = 2  # wire type: length-delimited
UUID_TEXT = 36  # characters (bytes) of a uuid in its text form


def _tag(field_number: int) -> str:
    tag = field_number << 3 | _LEN
    if tag >= 128:  # one-byte tags: fields numbered below 16
        raise ValueError(f"field {field_number} needs a multi-byte tag")
    return f"{tag:02x}"


def _uuid_prefix(field_number: int) -> str:
    """Tag and length of a uuid text field, as a bytea literal."""
    return f"'\\x{_tag(field_number)}{UUID_TEXT:02x}'::bytea"


def varint_sql(n: str) -> str:
    """SQL for the protobuf varint of the non-negative integer expression `n`
    (1-3 bytes: below 2 MiB; beyond, NULL, which the outbox's NOT NULL
    envelope rejects instead of storing a corrupt one)."""
    b0 = f"set_byte('\\x00'::bytea, 0, {n})"
    b1 = f"set_byte(set_byte('\\x0000'::bytea, 0, ({n} & 127) | 128), 1, {n} >> 7)"
    b2 = (
        f"set_byte(set_byte(set_byte('\\x000000'::bytea, 0, ({n} & 127) | 128),"
        f" 1, (({n} >> 7) & 127) | 128), 2, {n} >> 14)"
    )
    return (
        f"(CASE WHEN {n} < 128 THEN {b0} WHEN {n} < 16384 THEN {b1}"
        f" WHEN {n} < 2097152 THEN {b2} END)"
    )


def text_field_sql(field_number: int, value: str) -> str:
    """A string field from the text expression `value`."""
    raw = f"convert_to({value}, 'UTF8')"
    return f"('\\x{_tag(field_number)}'::bytea || {varint_sql(f'length({raw})')} || {raw})"


@dataclass(frozen=True)
class ChangeKind:
    """The constant parts of one event type's envelopes in one chunk."""

    event_type: str
    head: bytes  # the envelope's fields other than event_id, member_id, payload
    any_head: bytes  # Any.type_url
    payload_tail: bytes  # changed_at


def change_kind(message: type[Message], changed_at: datetime) -> ChangeKind:
    """`message`: SegmentChanged or LifecycleStageChanged, string fields 1-3
    (member_id, from, to), then changed_at."""
    fields = message.DESCRIPTOR.fields
    string, nested = fields[0].TYPE_STRING, fields[0].TYPE_MESSAGE
    if [(f.number, f.type) for f in fields] != [(1, string), (2, string), (3, string), (4, nested)]:
        raise ValueError(f"{message.DESCRIPTOR.full_name} is not a (member, from, to, at) change")
    envelope = make_envelope("tiering", message())
    for name in ("event_id", "member_id", "payload"):
        envelope.ClearField(name)
    packed = any_pb2.Any()
    packed.Pack(message())
    tail = message()
    getattr(tail, fields[3].name).CopyFrom(timestamp(changed_at))
    return ChangeKind(
        event_type=message.DESCRIPTOR.full_name,
        head=envelope.SerializeToString(),
        any_head=any_pb2.Any(type_url=packed.type_url).SerializeToString(),
        payload_tail=tail.SerializeToString(),
    )


def pair_sql(head: str, any_head: str, payload_tail: str, old: str, new: str) -> tuple[str, str]:
    """(before, after): bytea expressions for one event type and (old, new)
    pair (text), from its ChangeKind's bytea `head`, `any_head`,
    `payload_tail`. An envelope is before || event_id || MIDDLE || member_id
    || after || member_id (row_sql)."""
    pair = f"({text_field_sql(2, old)} || {text_field_sql(3, new)} || {payload_tail})"
    payload_len = f"(length({pair}) + {2 + UUID_TEXT})"
    any_len = f"(length({any_head}) + 1 + length({varint_sql(payload_len)}) + {payload_len})"
    before = f"({head} || {_uuid_prefix(_ENVELOPE['event_id'].number)})"
    after = (
        f"('\\x{_tag(_ENVELOPE['payload'].number)}'::bytea || {varint_sql(any_len)}"
        f" || {any_head} || '\\x{_tag(_ANY_VALUE)}'::bytea || {varint_sql(payload_len)}"
        f" || {pair} || {_uuid_prefix(1)})"
    )
    return before, after


def row_sql(before: str, event_id: str, member: str, after: str) -> str:
    """One envelope from its pair's `before` / `after` and the uuid texts."""
    middle = _uuid_prefix(_ENVELOPE["member_id"].number)
    member_bytes = f"convert_to({member}, 'UTF8')"
    return (
        f"({before} || convert_to({event_id}, 'UTF8') || {middle} || {member_bytes}"
        f" || {after} || {member_bytes})"
    )


def id_prefix() -> str:
    """The first 24 characters of a chunk's event ids: a random version-4 uuid's
    (58 random bits); the last 12 are a counter within the chunk (row_number
    in hex). Unique per chunk and cheaper than a random id per event
    (gen_random_uuid cost ~6 us a row here)."""
    return str(uuid.uuid4())[:24]
