"""Event consumers: Redis Streams consumer groups with exactly-once effects.

Each event is handled inside a database transaction that also records
(consumer, event_id) in the service's processed_events table; a redelivered
event finds its id there and changes nothing. The events of one read (of every
stream the read covers) share one transaction: one processed_events statement
for all of them, then each new one's handler, then one COMMIT (a WAL flush) for
the lot. A read that returns fewer events than a batch waits `linger_ms` and
reads once more without blocking, so at tens of events a second a commit
carries several events instead of one. If anything in that transaction fails,
it is rolled back whole and the read is applied again one event at a time,
each in its own savepoint (read alone: its own transaction), so a failing
event rolls back alone while its neighbours commit; handlers must keep their
effects in the transaction (a rolled-back batch runs them again). A
subscription's optional batch handler takes a run of the read's events of its
type, of distinct members, in one call (set-based statements); it must have
the effects of the handler applied to each in turn. A read of only types the
group does not handle opens no transaction: their numbers are held for the
next read's transaction, the next cursor check or the stop. An event
whose handler fails stays pending and is retried after `retry_after_ms`; after
`max_attempts` deliveries it is parked on a dead-letter stream with the error
and acknowledged, so one poison event never blocks the rest.

Durable events (servicekit/outbox.py): every entry carries its producer's
sequence number, and processed_events records it (events of types this group
does not handle and dead-lettered ones too, so the sequence has no holes of
its own making). `event_cursors` holds, per producer, the highest contiguous
sequence applied. A cursor that stands still for `gap_grace_seconds` while
events past it exist (applied, or published by the producer's `head`), with
the missing one neither pending nor still unread in the stream, is a gap: the
consumer asks the producer's relay to replay from there, and logs and counts
it (gap found, gap healed: metrics below). A stream or group that vanished
(NOGROUP, Redis restarted empty or failed over) asks for a replay at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import Counter, Gauge
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from loyalty.events.v1 import events_pb2

from . import member_views
from .db import Database, UnitOfWork
from .events import (
    ENVELOPE_FIELD,
    SEQ_FIELD,
    ReceivedEvent,
    dead_letter_stream,
    field_text,
    head_key,
    replay_key,
    stream_name,
    unpack,
)
from .redis_client import RedisClient, slot_of
from .tables import event_time
from .telemetry import extract_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Handler = Callable[[UnitOfWork, ReceivedEvent], Awaitable[None]]
# The same effects as the handler applied to each event in turn, for
# consecutive events of one type of distinct members (`_runs`).
BatchHandler = Callable[[UnitOfWork, list[ReceivedEvent]], Awaitable[None]]

# Process-wide (prometheus_client's default registry; each service's metrics port
# serves it beside the service's own registry: servicekit/metrics.py).
GAPS_FOUND = Counter(
    "loyalty_event_gaps_found",
    "Gaps in a producer's event sequence found by a consumer group (a replay was asked for)",
    ["consumer", "producer"],
)
GAPS_HEALED = Counter(
    "loyalty_event_gaps_healed",
    "Gaps in a producer's event sequence filled by a replay",
    ["consumer", "producer"],
)
STREAMS_LOST = Counter(
    "loyalty_event_streams_lost",
    "A consumer group found its stream or group gone (Redis lost data) and asked for a replay",
    ["consumer", "producer"],
)
CONSUMER_LAG = Gauge(
    "loyalty_event_consumer_lag",
    "Events a consumer group has not applied yet: producer's last sequence minus the cursor",
    ["consumer", "producer"],
)
# A walk of the cursor reads at most this many applied sequence numbers.
CURSOR_WALK_ROWS = 10_000


@dataclass(frozen=True)
class CursorStatus:
    """One consumer group's position on one producer's sequence."""

    consumer: str
    producer: str
    applied: int
    published: int  # the producer's head as last seen (0: unknown)
    replay_from: int | None
    gaps_found: int
    gaps_healed: int

    @property
    def lag(self) -> int:
        return max(0, self.published - self.applied)


@dataclass(frozen=True)
class Subscription:
    producer: str
    message_type: type[Message]
    handler: Handler
    # Optional: a read's run of these events, each of another member, in one
    # call (set-based statements); a failed read is retried event by event
    # with `handler`, so both must have the same effects.
    batch: BatchHandler | None = None


@dataclass(frozen=True, slots=True)
class _Routed:
    """One entry of a read, for a subscription of this group."""

    stream: str
    entry_id: str
    envelope: events_pb2.EventEnvelope
    sub: Subscription
    seq: int | None


class EventConsumer:
    def __init__(
        self,
        group: str,
        db: Database,
        redis: RedisClient,
        namespace: str,
        subscriptions: list[Subscription],
        max_attempts: int = 5,
        retry_after_ms: int = 2_000,
        block_ms: int = 1_000,
        batch_size: int = 100,
        gap_grace_seconds: float = 5.0,
        check_interval_seconds: float = 1.0,
        linger_ms: float = 0.0,
    ) -> None:
        self.group = group
        self._db = db
        self._redis = redis
        self._namespace = namespace
        self._max_attempts = max_attempts
        self._retry_after_ms = retry_after_ms
        self._block_ms = block_ms
        self._batch_size = batch_size
        self._gap_grace = gap_grace_seconds
        self._check_interval = check_interval_seconds
        self._linger = linger_ms / 1000
        self._consumer_name = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._stopping = False
        # Set by a service whose projection the gateway's member views show:
        # True (every event it applies) or the event types (full names) that move it.
        self.bumps_member_views: bool | frozenset[str] = False
        # (producer, event id, seq, occurred_at) of acknowledged events of
        # types this group does not handle, not yet in processed_events.
        self._held: list[tuple[str, str, int, datetime]] = []
        # Streams found caught up by their last cursor check: the producer's
        # (head, floor) then, and when a check last saw the stream so (loop time).
        self._quiet: dict[str, tuple[int, int]] = {}
        self._caught_up_at: dict[str, float] = {}
        # stream -> {event type -> subscription}
        self._routes: dict[str, dict[str, Subscription]] = {}
        self._producers: dict[str, str] = {}
        for sub in subscriptions:
            stream = stream_name(namespace, sub.producer)
            self._routes.setdefault(stream, {})[sub.message_type.DESCRIPTOR.full_name] = sub
            self._producers[stream] = sub.producer

    @property
    def streams(self) -> dict[str, str]:
        """Each stream this group reads, with its producing service."""
        return dict(self._producers)

    async def ensure_groups(self) -> list[str]:
        """Create missing groups (and streams); returns the streams whose group was created."""
        created = []
        for stream in self._routes:
            try:
                # "0": a new group starts from the beginning of the stream, so
                # events published before this consumer first ran are not lost.
                await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
                created.append(stream)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return created

    async def _recreate_groups(self) -> None:
        """A group made now is new or was lost with Redis's data: ask each of
        their producers to replay what this group has not applied."""
        for stream in await self.ensure_groups():
            await self.check_cursor(stream, lost=True)

    def read_sets(self) -> list[list[str]]:
        """The streams one XREADGROUP reads together: all of them on one Redis;
        on a Redis Cluster those of one hash slot (a command may not span
        slots, and each producer's stream has a slot of its own)."""
        if not isinstance(self._redis, RedisCluster):
            return [list(self._routes)]
        by_slot: dict[int, list[str]] = {}
        for stream in self._routes:
            by_slot.setdefault(slot_of(stream), []).append(stream)
        return list(by_slot.values())

    async def run(self) -> None:
        reads = self.read_sets()
        if len(reads) == 1:
            await self._read_loop(reads[0], upkeep=True)
            return
        # A reader per slot, each blocking on its own streams, so an event on
        # one never waits for another's read to time out; the first reader
        # also looks after cursors and retries.
        readers = [
            asyncio.create_task(
                self._read_loop(streams, upkeep=i == 0), name=f"{self.group}-read-{i}"
            )
            for i, streams in enumerate(reads)
        ]
        try:
            await asyncio.gather(*readers)
        finally:
            for reader in readers:
                reader.cancel()
            # Bounded: a cancel lost inside XREADGROUP ends with stop() or the pool's close.
            await asyncio.wait(readers, timeout=self._block_ms / 1000 + 1)

    async def _read_loop(self, streams: list[str], upkeep: bool) -> None:
        started = False
        reading = dict.fromkeys(streams, ">")
        last_retry = last_check = 0.0
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                try:
                    if not started:  # here, not before the loop: Redis may be down at start
                        await self._recreate_groups()
                        started = True
                    if upkeep and loop.time() - last_check >= self._check_interval:
                        last_check = loop.time()
                        await self.check_cursors()
                    read = await self._read(reading, self._batch_size, self._block_ms)
                    got = sum(len(entries) for entries in read.values())
                    if got and self._linger and got < self._batch_size:
                        # Gather what arrives within the linger into the same
                        # commit: at tens of events a second a read otherwise
                        # returns one event, and each paid a transaction of its own.
                        await asyncio.sleep(self._linger)
                        more = await self._read(reading, self._batch_size - got, None)
                        for stream, entries in more.items():
                            read.setdefault(stream, []).extend(entries)
                    if read:
                        await self._deliver(read)
                    if upkeep and loop.time() - last_retry >= self._retry_after_ms / 1000:
                        last_retry = loop.time()
                        await self.retry_pending()
                except asyncio.CancelledError:
                    raise
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):  # stream or group lost under us: recreate
                        log.warning("event consumer %s: %s; recreating its groups", self.group, exc)
                        with contextlib.suppress(Exception):
                            await self._recreate_groups()
                        continue
                    log.exception("event consumer %s failed; retrying", self.group)
                    await asyncio.sleep(1)
                except Exception:
                    log.exception("event consumer %s failed; retrying", self.group)
                    await asyncio.sleep(1)
        finally:
            # Else read as a gap, and replayed.
            with contextlib.suppress(Exception):
                await self.flush_held()

    async def _read(
        self, reading: dict[str, str], count: int, block: int | None
    ) -> dict[str, list[tuple[Any, Any]]]:
        """One XREADGROUP: entries by stream (`block` None: answer at once)."""
        replies: Any = await self._redis.xreadgroup(
            self.group,
            self._consumer_name,
            reading,  # type: ignore[arg-type]
            count=count,
            block=block,
        )
        return {field_text(stream): list(entries) for stream, entries in replies or [] if entries}

    def configure_gaps(self, grace_seconds: float, check_interval_seconds: float) -> None:
        self._gap_grace = grace_seconds
        self._check_interval = check_interval_seconds

    def configure_linger(self, linger_ms: float) -> None:
        self._linger = linger_ms / 1000

    async def check_cursors(self) -> None:
        """The periodic check of every stream's cursor. The producers' heads
        are read in one round trip; a stream whose last check found the
        cursor at the head, with no replay asked for, and whose head and
        floor have not moved since, is skipped: nothing was published, so
        nothing can be missing past the cursor (the relay sets the head in the
        pipeline of its XADDs, and a head lost with Redis reads as moved).
        An idle group then costs one Redis round trip per check instead of a
        transaction per stream."""
        flushed = bool(self._held)
        await self.flush_held()
        streams = list(self._routes)
        heads = await self._heads(streams)
        now = asyncio.get_running_loop().time()
        for stream in streams:
            if not flushed and self._quiet.get(stream) == heads[stream]:
                self._caught_up_at[stream] = now
                continue
            await self.check_cursor(stream, heads=heads[stream])

    async def _heads(self, streams: list[str]) -> dict[str, tuple[int, int]]:
        """Each producer's (last published, oldest kept) sequence; 0s when unknown."""
        if len(streams) == 1:
            raws = [await self._redis.hmget(head_key(streams[0]), [b"head", b"floor"])]
        else:  # on a cluster the pipeline sends each key to its node
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.hmget(head_key(stream), [b"head", b"floor"])
                raws = await pipe.execute()
        return {
            stream: (int(raw[0]) if raw[0] else 0, int(raw[1]) if raw[1] else 0)
            for stream, raw in zip(streams, raws, strict=True)
        }

    async def check_cursor(
        self, stream: str, lost: bool = False, heads: tuple[int, int] | None = None
    ) -> CursorStatus:
        """Move the cursor over what is applied; find and heal gaps (module
        docstring). `lost`: the stream or group was just recreated, so ask for
        a replay from the cursor at once. `heads`: the producer's (head, floor)
        just read by the caller."""
        producer = self._producers[stream]
        self._quiet.pop(stream, None)
        await self.flush_held()  # before the walk: they count on the cursor
        head, floor = heads if heads is not None else (await self._heads([stream]))[stream]
        schema = self._db.schema
        labels = (self.group, producer)
        select = (
            "SELECT applied_seq, replay_from, gaps_found, gaps_healed,"
            " extract(epoch FROM now() - progressed_at)::float8 AS stalled,"
            " extract(epoch FROM now() - replay_requested_at)::float8 AS asked"
            f" FROM {schema}.event_cursors WHERE consumer = $1 AND producer = $2 FOR UPDATE"
        )
        async with self._db.unit_of_work() as uow:
            conn = uow.conn
            cur = await conn.fetchrow(select, *labels)
            if cur is None:  # the group's first check: its row, then read it locked
                if await conn.fetchval(
                    f"INSERT INTO {schema}.event_cursors (consumer, producer) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    *labels,
                ):
                    lost = False  # a group running for the first time lost nothing
                cur = await conn.fetchrow(select, *labels)
            assert cur is not None
            stalled = cur["stalled"]
            seen = self._caught_up_at.get(stream)
            if seen is not None:
                # Checks skipped as quiet left progressed_at as it was; the
                # cursor stood at the head until then, not behind anything.
                stalled = min(stalled, asyncio.get_running_loop().time() - seen)
            applied = start = cur["applied_seq"]
            replay_from, found, healed = cur["replay_from"], cur["gaps_found"], cur["gaps_healed"]
            if floor and applied < floor - 1:
                log.error(
                    "consumer %s: events %d..%d of %s are past the producer's retention;"
                    " they cannot be replayed and are skipped",
                    self.group,
                    applied + 1,
                    floor - 1,
                    producer,
                )
                applied = floor - 1
                replay_from = None  # nothing left to heal it with
            seqs = await conn.fetch(
                f"SELECT seq FROM {schema}.processed_events"
                " WHERE consumer = $1 AND producer = $2 AND seq > $3 ORDER BY seq LIMIT $4",
                *labels,
                applied,
                CURSOR_WALK_ROWS,
            )
            for row in seqs:
                if row["seq"] != applied + 1:
                    break
                applied += 1
            published = max(head, seqs[-1]["seq"] if seqs else 0, applied)
            progressed = applied > start or applied >= published
            if replay_from is not None and applied >= replay_from:
                healed += 1
                GAPS_HEALED.labels(*labels).inc()
                log.warning(
                    "event gap healed: consumer %s, producer %s, from seq %d;"
                    " cursor now %d after standing %.1fs",
                    self.group,
                    producer,
                    replay_from,
                    applied,
                    cur["stalled"],
                )
                replay_from = None
            ask = False
            if lost:
                ask = True
                STREAMS_LOST.labels(*labels).inc()
                if applied < published and replay_from is None:
                    replay_from = applied + 1
                    found += 1
                    GAPS_FOUND.labels(*labels).inc()
                log.warning(
                    "consumer %s: stream of %s or its group was lost; asking for a replay"
                    " from seq %d (producer's head %d)",
                    self.group,
                    producer,
                    applied + 1,
                    head,
                )
            elif (
                not progressed
                and stalled >= self._gap_grace
                and (cur["asked"] is None or cur["asked"] >= self._gap_grace)
                and not await self._in_flight(stream, applied + 1)
            ):
                ask = True
                if replay_from is None:
                    replay_from = applied + 1
                    found += 1
                    GAPS_FOUND.labels(*labels).inc()
                log.warning(
                    "event gap found: consumer %s, producer %s: seq %d missing"
                    " (cursor %d, producer at %d); asking for a replay",
                    self.group,
                    producer,
                    applied + 1,
                    applied,
                    published,
                )
            await conn.execute(
                f"UPDATE {schema}.event_cursors SET applied_seq = $3,"
                " progressed_at = CASE WHEN $4 THEN now() ELSE progressed_at END,"
                " replay_from = $5,"
                " replay_requested_at = CASE WHEN $6 THEN now()"
                "  WHEN $5::bigint IS NULL THEN NULL ELSE replay_requested_at END,"
                " gaps_found = $7, gaps_healed = $8"
                " WHERE consumer = $1 AND producer = $2",
                *labels,
                applied,
                progressed,
                replay_from,
                ask,
                found,
                healed,
            )
        if progressed:
            self._caught_up_at.pop(stream, None)  # progressed_at is now()
        if ask:
            await self._redis.rpush(replay_key(stream), f"{self.group} {applied + 1}".encode())
        elif not lost and replay_from is None and applied >= published:
            self._quiet[stream] = (head, floor)
        CONSUMER_LAG.labels(*labels).set(max(0, published - applied))
        return CursorStatus(self.group, producer, applied, published, replay_from, found, healed)

    async def _in_flight(self, stream: str, seq: int) -> bool:
        """Whether event `seq` may still arrive on its own: the group has not
        read the whole stream yet, or the event is pending (failed, retrying)."""
        try:
            groups = await self._redis.xinfo_groups(stream)
        except ResponseError:  # no such stream (lost): nothing can arrive on its own
            return False
        mine = [g for g in groups if field_text(g["name"]) == self.group]
        if not mine:
            return False
        # An entry the group has not read yet (XINFO GROUPS' `lag` needs Redis 7,
        # and the last generated id still names a deleted entry).
        delivered = field_text(mine[0]["last-delivered-id"])
        if await self._redis.xrange(stream, min=f"({delivered}", max="+", count=1):
            return True
        pending = await self._redis.xpending_range(
            stream, self.group, min="-", max="+", count=self._batch_size
        )
        if len(pending) >= self._batch_size:
            return True  # too many to look at: wait for them
        if not pending:
            return False
        async with self._redis.pipeline(transaction=False) as pipe:
            for p in pending:
                pipe.xrange(stream, min=p["message_id"], max=p["message_id"], count=1)
            found = await pipe.execute()
        return any(entries and _seq(entries[0][1]) == seq for entries in found)

    def stop(self) -> None:
        """Leave the loop after the current read. Cancelling the task is not
        enough on its own: redis-py can miss a cancellation that lands in a
        blocking XREADGROUP (redis/redis-py#2579), and the loop then kept
        retrying against closed pools and held the process open."""
        self._stopping = True

    async def retry_pending(self) -> None:
        """Reclaim entries left unacknowledged (failed here, or by a dead
        consumer). The first XAUTOCLAIM of every stream goes in one pipeline:
        with nothing pending (the usual case) that is the whole pass."""
        streams = list(self._routes)

        def claim(pipe: Any, stream: str, start: str) -> Any:
            return pipe.xautoclaim(
                stream,
                self.group,
                self._consumer_name,
                min_idle_time=self._retry_after_ms,
                start_id=start,
                count=self._batch_size,
            )

        if len(streams) == 1:
            firsts = [await claim(self._redis, streams[0], "0-0")]
        else:  # on a cluster the pipeline sends each stream's to its node
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    claim(pipe, stream, "0-0")
                firsts = await pipe.execute()
        for stream, first in zip(streams, firsts, strict=True):
            reply = first
            while True:
                start, entries = field_text(reply[0]), reply[1]
                # Trimmed while pending: Redis >= 7 already dropped it from the
                # PEL; 6.2 returns it without an id or fields, nothing to ack.
                live = [(i, f) for i, f in entries if i is not None and f is not None]
                if live:
                    await self._deliver({stream: live})
                if start == "0-0" or not entries:
                    break
                reply = await claim(self._redis, stream, start)

    async def _deliver(self, read: dict[str, list[tuple[Any, Any]]]) -> None:
        """Handle one read's entries (of every stream it read) in one
        transaction, in member order when every entry names its member, then
        acknowledge them."""
        routed: list[_Routed] = []
        # (producer, event id, seq, occurred_at) of events not for this group
        skipped: list[tuple[str, str, int, datetime]] = []
        acks: dict[str, list[str]] = {}  # entries to acknowledge after the commit
        for stream, entries in read.items():
            done = acks.setdefault(stream, [])
            routes = self._routes.get(stream, {})
            for raw_id, fields in entries:
                entry_id = field_text(raw_id)
                raw = fields.get(ENVELOPE_FIELD)
                seq = _seq(fields)
                envelope = events_pb2.EventEnvelope()
                try:
                    if raw is None:
                        raise ValueError("stream entry has no envelope field")
                    envelope.ParseFromString(raw)
                except Exception as exc:
                    await self._dead_letter(
                        stream, entry_id, raw or b"", f"unreadable envelope: {exc}", 1, seq
                    )
                    continue
                sub = routes.get(envelope.event_type)
                if sub is None:  # an event this consumer does not care about
                    done.append(entry_id)
                    if seq is not None:
                        skipped.append(
                            (self._producers[stream], envelope.event_id, seq, event_time(envelope))
                        )
                else:
                    routed.append(_Routed(stream, entry_id, envelope, sub, seq))
        if all(r.envelope.member_id for r in routed):
            # Lock members in id order, as every batch job does (tiering's
            # recompute chunks): a read's transaction holds its members' rows
            # until it commits, and in arrival order it could deadlock with a
            # chunk. Stable: one member's events keep their order (no consumer
            # may depend on the order across members).
            routed.sort(key=lambda r: r.envelope.member_id)
        if routed:  # numbers held from reads of unhandled types only ride along
            skipped, self._held = self._held + skipped, []
        if len(routed) == 1:  # alone: its own transaction, no savepoint to pay for
            r = routed[0]
            if await self._handle(None, r, skipped):
                acks[r.stream].append(r.entry_id)
            elif skipped:  # rolled back with it: they still count on the cursor
                await self._record(self._db.pool, [], skipped)
        elif routed:
            if await self._apply_together(routed, skipped):
                for r in routed:
                    acks[r.stream].append(r.entry_id)
            else:
                await self._apply_one_by_one(routed, skipped, acks)
        elif skipped:
            # Only types this group does not handle: nothing to apply, so no
            # transaction of their own; their numbers (for the cursor) go with
            # the next read's transaction or the next cursor check, whichever
            # comes first. Lost in a crash, they read as a gap: replayed.
            self._held.extend(skipped)
            if len(self._held) >= self._batch_size:
                await self.flush_held()
        # After commit, with the XACK: a projection the gateway's member views
        # show (tiering's) moved for these members (servicekit/member_views.py).
        shown = self.bumps_member_views
        moved = [
            r.envelope.member_id
            for r in routed
            if shown is True or (shown and r.envelope.event_type in shown)
        ]
        await self._ack({stream: ids for stream, ids in acks.items() if ids}, moved)

    async def flush_held(self) -> None:
        """Record the held numbers of unhandled events (see `_deliver`)."""
        held, self._held = self._held, []
        if not held:
            return
        try:
            await self._record(self._db.pool, [], held)
        except BaseException:
            self._held = held + self._held
            raise

    async def _ack(self, acks: dict[str, list[str]], moved: list[str] | None = None) -> None:
        if moved:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, ids in acks.items():
                    pipe.xack(stream, self.group, *ids)
                member_views.bump(pipe, self._namespace, moved)
                await pipe.execute()
        elif len(acks) == 1:
            [(stream, ids)] = acks.items()
            await self._redis.xack(stream, self.group, *ids)
        elif acks:  # on a cluster the pipeline sends each stream's XACK to its node
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, ids in acks.items():
                    pipe.xack(stream, self.group, *ids)
                await pipe.execute()

    async def _record(
        self, conn: Any, routed: list[_Routed], skipped: list[tuple[str, str, int, datetime]]
    ) -> set[uuid.UUID]:
        """Record a batch's events in processed_events in one statement (the
        handled ones, and those of types this group does not handle, which
        still count on the cursor); returns the ids recorded now, i.e. not
        applied before."""
        ids = [r.envelope.event_id for r in routed] + [e for _, e, _, _ in skipped]
        producers = [r.sub.producer if r.seq is not None else None for r in routed]
        producers += [p for p, _, _, _ in skipped]
        seqs = [r.seq for r in routed] + [s for _, _, s, _ in skipped]
        # The event's own time: a redelivery lands in the same day partition.
        times = [event_time(r.envelope) for r in routed] + [o for _, _, _, o in skipped]
        rows = await conn.fetch(
            f"INSERT INTO {self._db.schema}.processed_events"
            " (consumer, event_id, producer, seq, occurred_at)"
            " SELECT $1, e, p, s, o"
            " FROM unnest($2::uuid[], $3::text[], $4::bigint[], $5::timestamptz[]) AS t(e, p, s, o)"
            " ON CONFLICT DO NOTHING RETURNING event_id",
            self.group,
            ids,
            producers,
            seqs,
            times,
        )
        return {row["event_id"] for row in rows}

    async def _apply_together(
        self, routed: list[_Routed], skipped: list[tuple[str, str, int, datetime]]
    ) -> bool:
        """The common case: every event of the read in one transaction with
        one processed_events statement and no savepoints. False if anything
        failed: the whole transaction is rolled back and nothing is recorded,
        for `_apply_one_by_one` to find the event at fault."""
        try:
            async with self._db.unit_of_work() as uow:
                fresh = await self._record(uow.conn, routed, skipped)
                new: list[_Routed] = []
                for r in routed:
                    key = uuid.UUID(r.envelope.event_id)
                    if key in fresh:  # not applied before, nor earlier in this read
                        fresh.discard(key)
                        new.append(r)
                for run in _runs(new):
                    batch = run[0].sub.batch
                    if batch is not None and len(run) > 1:
                        with self._span(run[0], len(run)):
                            await batch(uow, [self._received(r) for r in run])
                        continue
                    for r in run:
                        with self._span(r):
                            await r.sub.handler(uow, self._received(r))
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info(
                "event consumer %s: a read of %d events failed together (%r);"
                " applying them one by one",
                self.group,
                len(routed),
                exc,
            )
            return False

    async def _apply_one_by_one(
        self,
        routed: list[_Routed],
        skipped: list[tuple[str, str, int, datetime]],
        acks: dict[str, list[str]],
    ) -> None:
        """After a read failed together: each event in its own savepoint of
        one transaction, so a failing event rolls back alone and is retried or
        dead-lettered while its neighbours commit."""
        async with self._db.unit_of_work() as batch:
            for r in routed:
                if await self._handle(batch, r):
                    acks[r.stream].append(r.entry_id)
            if skipped:
                await self._record(batch.conn, [], skipped)

    @contextlib.asynccontextmanager
    async def _isolated(self, batch: UnitOfWork | None) -> AsyncIterator[UnitOfWork]:
        """One event's own transaction: a savepoint in the batch's, or a unit of work."""
        if batch is None:
            async with self._db.unit_of_work() as uow:
                yield uow
        else:
            async with batch.conn.transaction():
                yield batch

    @contextlib.contextmanager
    def _span(self, r: _Routed, batch: int = 1) -> Iterator[None]:
        """The event's consumer span, in its producer's trace (a batch's: the
        first event's, with the batch's size)."""
        token = otel_context.attach(extract_context(r.envelope.trace_context))
        attributes: dict[str, Any] = {
            "messaging.system": "redis",
            "messaging.destination.name": r.stream,
        }
        if batch > 1:
            attributes["messaging.batch.message_count"] = batch
        try:
            with tracer.start_as_current_span(
                f"consume {r.envelope.event_type}",
                kind=trace.SpanKind.CONSUMER,
                attributes=attributes,
            ):
                yield
        finally:
            otel_context.detach(token)

    @staticmethod
    def _received(r: _Routed) -> ReceivedEvent:
        return ReceivedEvent(
            r.stream, r.entry_id, r.envelope, unpack(r.envelope, r.sub.message_type)
        )

    async def _handle(
        self,
        batch: UnitOfWork | None,
        r: _Routed,
        skipped: list[tuple[str, str, int, datetime]] | None = None,
    ) -> bool:
        """Apply one event in its own transaction (see `_isolated`), recording
        `skipped` with it; False if it failed (its effects rolled back, the
        entry left pending or dead-lettered)."""
        envelope = r.envelope
        try:
            with self._span(r):
                event = self._received(r)
                async with self._isolated(batch) as uow:
                    first_time = await self._record(uow.conn, [r], skipped or [])
                    if uuid.UUID(r.envelope.event_id) in first_time:
                        await r.sub.handler(uow, event)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempts = await self._delivery_count(r.stream, r.entry_id)
            if attempts >= self._max_attempts:
                await self._dead_letter(
                    r.stream, r.entry_id, envelope.SerializeToString(), repr(exc), attempts, r.seq
                )
            else:
                log.warning(
                    "event %s (%s) failed on attempt %d/%d: %r",
                    envelope.event_id,
                    envelope.event_type,
                    attempts,
                    self._max_attempts,
                    exc,
                )
            return False

    async def _delivery_count(self, stream: str, entry_id: str) -> int:
        pending = await self._redis.xpending_range(
            stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else self._max_attempts

    async def _dead_letter(
        self,
        stream: str,
        entry_id: str,
        envelope: bytes,
        error: str,
        attempts: int,
        seq: int | None = None,
    ) -> None:
        dlq = dead_letter_stream(self._namespace, self._producers[stream], self.group)
        log.error("event %s on %s dead-lettered to %s: %s", entry_id, stream, dlq, error)
        if seq is not None:
            # Its number counts as settled (the dead-letter stream explains it),
            # under an id of its own: the event itself stays unprocessed, so a
            # redrive from the dead-letter stream still applies it.
            await self._db.pool.execute(
                f"INSERT INTO {self._db.schema}.processed_events"
                " (consumer, event_id, producer, seq, occurred_at)"
                " VALUES ($1, $2, $3, $4, now()) ON CONFLICT DO NOTHING",
                self.group,
                uuid.uuid4(),
                self._producers[stream],
                seq,
            )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                dlq,
                {
                    ENVELOPE_FIELD: envelope,
                    b"error": error.encode(),
                    b"attempts": str(attempts).encode(),
                    b"source_stream": stream.encode(),
                    b"source_id": entry_id.encode(),
                },
            )
            pipe.xack(stream, self.group, entry_id)
            await pipe.execute()


def _runs(routed: list[_Routed]) -> Iterator[list[_Routed]]:
    """Split a read's events, in their order, into runs of one subscription
    and distinct members (an event naming no member stands alone): a batch
    handler applies a run as the handler would each event, since no two of
    its events touch one member, and the order of the read is kept."""
    run: list[_Routed] = []
    members: set[str] = set()
    for r in routed:
        member = r.envelope.member_id
        if run and (r.sub is not run[0].sub or not member or not members or member in members):
            yield run
            run, members = [], set()
        run.append(r)
        if member:
            members.add(member)
    if run:
        yield run


def _seq(fields: dict[bytes, bytes]) -> int | None:
    """The producer's sequence number of an entry (None: published before sequences)."""
    raw = fields.get(SEQ_FIELD)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
