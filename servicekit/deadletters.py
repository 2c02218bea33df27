"""Dead-lettered events, for operators: list them across every producer's
stream and consumer group, and redrive one.

A consumer parks an event it keeps failing on in
`{<ns>:events:<producer>}:dlq:<group>` (servicekit/consumer.py). Redriving
re-publishes the entry's envelope to its source stream and deletes the dead
letter, in one script: the dead-letter stream is hash-tagged with its source
stream's name, so both (and the redrive audit stream beside them) are in one
Redis Cluster slot, and the script is atomic on one Redis and on a cluster
alike. Re-publishing is safe: every consumer group records the events it
applied (processed_events) and skips one it already applied, so only the group
that failed applies it, once. A second redrive of the same entry finds it gone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loyalty.events.v1 import events_pb2

from .errors import InvalidArgument, NotFound
from .events import ENVELOPE_FIELD, dead_letter_stream, stream_name
from .outbox import STREAM_MAX_LEN
from .redis_client import RedisClient, tagged

# A producer's or consumer group's name (a service name: "rewards", "tiering").
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_ENTRY_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
# Redrives kept per source stream (the audit trail of who redrove what).
REDRIVE_AUDIT_MAX_LEN = 100_000

# KEYS: dead-letter stream, source stream, audit stream.
# ARGV: dead letter id, operator, group, event id, the source stream's and the
# audit stream's max lengths.
# The envelope is re-published only if the dead letter is still there, so two
# operators pressing Replay publish it once.
_REDRIVE = """
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then return false end
local fields = entry[1][2]
local envelope = nil
for i = 1, #fields, 2 do
  if fields[i] == 'envelope' then envelope = fields[i + 1] end
end
if envelope == nil then return redis.error_reply('dead letter has no envelope') end
local published = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'envelope', envelope)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'operator', ARGV[2], 'group', ARGV[3],
  'dead_letter_id', ARGV[1], 'event_id', ARGV[4], 'published_id', published)
redis.call('XDEL', KEYS[1], ARGV[1])
return published
"""


@dataclass(frozen=True)
class DeadLetter:
    stream: str  # the source stream, e.g. "loyalty:events:rewards"
    group: str  # the consumer group that gave up on it
    entry_id: str  # its id on the dead-letter stream
    event_id: str
    event_type: str
    member_id: str
    error: str
    attempts: int
    dead_lettered_at: datetime  # from the entry id's milliseconds


def redrive_audit_stream(stream: str) -> str:
    """E.g. "{loyalty:events:rewards}:dlq-redrives": who redrove what, when."""
    return f"{tagged(stream)}:dlq-redrives"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _parse_key(namespace: str, key: str) -> tuple[str, str] | None:
    """(source stream, group) of a dead-letter stream key, None if not one."""
    prefix = "{" + f"{namespace}:events:"
    head, sep, group = key.partition("}:dlq:")
    if not sep or not head.startswith(prefix):
        return None
    producer = head[len(prefix) :]
    if not _NAME.match(producer) or not _NAME.match(group):
        return None
    return stream_name(namespace, producer), group


def _dead_letter(stream: str, group: str, entry_id: str, fields: Any) -> DeadLetter:
    """From a dead-letter entry's fields (bytes keys and values: the clients
    are created with decode_responses off)."""
    envelope = events_pb2.EventEnvelope()
    try:
        envelope.ParseFromString(fields.get(ENVELOPE_FIELD, b""))
    except Exception:  # an unreadable envelope is dead-lettered too; shown as such
        envelope = events_pb2.EventEnvelope()
    try:
        attempts = int(fields.get(b"attempts", b"0"))
    except ValueError:
        attempts = 0
    millis = int(entry_id.split("-", 1)[0])
    return DeadLetter(
        stream=stream,
        group=group,
        entry_id=entry_id,
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        member_id=envelope.member_id,
        error=_text(fields.get(b"error", b"")),
        attempts=attempts,
        dead_lettered_at=datetime.fromtimestamp(millis / 1000, UTC),
    )


async def dead_letter_streams(redis: RedisClient, namespace: str) -> list[tuple[str, str]]:
    """(source stream, group) of every dead-letter stream, sorted. SCAN visits
    every primary of a cluster (redis-py's cluster scan_iter)."""
    pattern = "{" + f"{namespace}:events:*" + "}:dlq:*"
    found = set()
    async for key in redis.scan_iter(match=pattern, count=500, _type="STREAM"):
        parsed = _parse_key(namespace, _text(key))
        if parsed is not None:
            found.add(parsed)
    return sorted(found)


async def list_dead_letters(
    redis: RedisClient, namespace: str, limit_per_stream: int = 100
) -> list[DeadLetter]:
    """The oldest `limit_per_stream` dead letters of each (stream, group)."""
    letters: list[DeadLetter] = []
    for stream, group in await dead_letter_streams(redis, namespace):
        key = dead_letter_stream(namespace, stream.rsplit(":", 1)[1], group)
        for raw_id, fields in await redis.xrange(key, "-", "+", count=limit_per_stream) or []:
            letters.append(_dead_letter(stream, group, str(_text(raw_id)), fields))
    return letters


def _check(namespace: str, stream: str, group: str, entry_id: str) -> str:
    """The producer of a valid reference; InvalidArgument naming the bad part."""
    prefix = f"{namespace}:events:"
    producer = stream[len(prefix) :] if stream.startswith(prefix) else ""
    if not _NAME.match(producer):
        raise InvalidArgument(
            f"stream: an event stream, {prefix}<producer>",
            code="INVALID_DEAD_LETTER_REF",
            field="stream",
        )
    if not _NAME.match(group):
        raise InvalidArgument(
            "group: a consumer group's name", code="INVALID_DEAD_LETTER_REF", field="group"
        )
    if not _ENTRY_ID.match(entry_id):
        raise InvalidArgument(
            "id: a stream entry id like 1733300000000-0",
            code="INVALID_DEAD_LETTER_REF",
            field="id",
        )
    return producer


@dataclass(frozen=True)
class Redriven:
    dead_letter: DeadLetter
    published_id: str  # the envelope's new entry id on the source stream


async def redrive(
    redis: RedisClient, namespace: str, stream: str, group: str, entry_id: str, operator: str
) -> Redriven:
    """Re-publish one dead letter's envelope to its source stream and delete
    it, recording `operator` on the redrive audit stream. NotFound
    (UNKNOWN_DEAD_LETTER) when there is no such entry (or it was redriven)."""
    producer = _check(namespace, stream, group, entry_id)
    dlq = dead_letter_stream(namespace, producer, group)
    entries = await redis.xrange(dlq, entry_id, entry_id)
    if not entries:
        raise NotFound(
            f"no dead letter {entry_id} of group {group} on {stream}",
            code="UNKNOWN_DEAD_LETTER",
            field="id",
        )
    letter = _dead_letter(stream, group, entry_id, entries[0][1])
    script = redis.register_script(_REDRIVE)
    published = await script(
        keys=[dlq, stream, redrive_audit_stream(stream)],
        args=[
            entry_id,
            operator,
            group,
            letter.event_id,
            STREAM_MAX_LEN,
            REDRIVE_AUDIT_MAX_LEN,
        ],
    )
    if published is None:  # redriven by someone else between the read and the script
        raise NotFound(
            f"no dead letter {entry_id} of group {group} on {stream}",
            code="UNKNOWN_DEAD_LETTER",
            field="id",
        )
    return Redriven(letter, _text(published))
