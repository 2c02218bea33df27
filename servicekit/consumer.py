"""Event consumers: Redis Streams consumer groups with exactly-once effects.

Each event is handled inside a database transaction that first records
(consumer, event_id) in the service's processed_events table; a redelivered
event finds its id there and changes nothing. The events of one read share
one transaction, each in its own savepoint: under load a read returns many
events and the service pays one COMMIT (a WAL flush) for all of them instead
of one per event, while a failing event still rolls back alone. An event whose
handler fails stays pending and is retried after `retry_after_ms`; after
`max_attempts` deliveries it is parked on a dead-letter stream with the error
and acknowledged, so one poison event never blocks the rest. An event read
alone gets a transaction of its own (no savepoint to pay for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from loyalty.events.v1 import events_pb2

from .db import Database, UnitOfWork
from .events import ENVELOPE_FIELD, ReceivedEvent, dead_letter_stream, stream_name, unpack
from .telemetry import extract_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

Handler = Callable[[UnitOfWork, ReceivedEvent], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    producer: str
    message_type: type[Message]
    handler: Handler


class EventConsumer:
    def __init__(
        self,
        group: str,
        db: Database,
        redis: Redis,
        namespace: str,
        subscriptions: list[Subscription],
        max_attempts: int = 5,
        retry_after_ms: int = 2_000,
        block_ms: int = 1_000,
        batch_size: int = 100,
    ) -> None:
        self.group = group
        self._db = db
        self._redis = redis
        self._namespace = namespace
        self._max_attempts = max_attempts
        self._retry_after_ms = retry_after_ms
        self._block_ms = block_ms
        self._batch_size = batch_size
        self._consumer_name = f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._stopping = False
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

    async def ensure_groups(self) -> None:
        for stream in self._routes:
            try:
                # "0": a new group starts from the beginning of the stream, so
                # events published before this consumer first ran are not lost.
                await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def run(self) -> None:
        await self.ensure_groups()
        streams = dict.fromkeys(self._routes, ">")
        last_retry = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                replies: Any = await self._redis.xreadgroup(
                    self.group,
                    self._consumer_name,
                    streams,  # type: ignore[arg-type]
                    count=self._batch_size,
                    block=self._block_ms,
                )
                for stream, entries in replies or []:
                    await self._deliver_batch(_text(stream), entries)
                if loop.time() - last_retry >= self._retry_after_ms / 1000:
                    last_retry = loop.time()
                    await self.retry_pending()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # stream deleted under us: recreate
                    await self.ensure_groups()
                    continue
                log.exception("event consumer %s failed; retrying", self.group)
                await asyncio.sleep(1)
            except Exception:
                log.exception("event consumer %s failed; retrying", self.group)
                await asyncio.sleep(1)

    def stop(self) -> None:
        """Leave the loop after the current read. Cancelling the task is not
        enough on its own: redis-py can miss a cancellation that lands in a
        blocking XREADGROUP (redis/redis-py#2579), and the loop then kept
        retrying against closed pools and held the process open."""
        self._stopping = True

    async def retry_pending(self) -> None:
        """Reclaim entries left unacknowledged (failed here, or by a dead consumer)."""
        for stream in self._routes:
            start = "0-0"
            while True:
                reply = await self._redis.xautoclaim(
                    stream,
                    self.group,
                    self._consumer_name,
                    min_idle_time=self._retry_after_ms,
                    start_id=start,
                    count=self._batch_size,
                )
                start, entries = _text(reply[0]), reply[1]
                # Trimmed while pending: Redis >= 7 already dropped it from the
                # PEL; 6.2 returns it without an id or fields, nothing to ack.
                live = [(i, f) for i, f in entries if i is not None and f is not None]
                if live:
                    await self._deliver_batch(stream, live)
                if start == "0-0" or not entries:
                    break

    async def _deliver_batch(self, stream: str, entries: list[tuple[Any, Any]]) -> None:
        """Handle one read's entries in one transaction (in member order when
        every entry names its member), then acknowledge them."""
        routed: list[tuple[str, events_pb2.EventEnvelope, Subscription]] = []
        done: list[str] = []  # entries to acknowledge after the commit
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            raw = fields.get(ENVELOPE_FIELD)
            envelope = events_pb2.EventEnvelope()
            try:
                if raw is None:
                    raise ValueError("stream entry has no envelope field")
                envelope.ParseFromString(raw)
            except Exception as exc:
                await self._dead_letter(
                    stream, entry_id, raw or b"", f"unreadable envelope: {exc}", 1
                )
                continue
            sub = self._routes.get(stream, {}).get(envelope.event_type)
            if sub is None:  # an event this consumer does not care about
                done.append(entry_id)
            else:
                routed.append((entry_id, envelope, sub))
        if all(envelope.member_id for _, envelope, _ in routed):
            # Lock members in id order, as every batch job does (tiering's
            # recompute chunks): a read's transaction holds its members' rows
            # until it commits, and in arrival order it could deadlock with a
            # chunk. Stable: one member's events keep their order (no consumer
            # may depend on the order across members).
            routed.sort(key=lambda r: r[1].member_id)
        if len(routed) == 1:  # alone: its own transaction, no savepoint to pay for
            entry_id, envelope, sub = routed[0]
            if await self._handle(None, stream, entry_id, envelope, sub):
                done.append(entry_id)
        elif routed:
            async with self._db.unit_of_work() as batch:
                for entry_id, envelope, sub in routed:
                    if await self._handle(batch, stream, entry_id, envelope, sub):
                        done.append(entry_id)
        if done:
            await self._redis.xack(stream, self.group, *done)

    @contextlib.asynccontextmanager
    async def _isolated(self, batch: UnitOfWork | None) -> AsyncIterator[UnitOfWork]:
        """One event's own transaction: a savepoint in the batch's, or a unit of work."""
        if batch is None:
            async with self._db.unit_of_work() as uow:
                yield uow
        else:
            async with batch.conn.transaction():
                yield batch

    async def _handle(
        self,
        batch: UnitOfWork | None,
        stream: str,
        entry_id: str,
        envelope: events_pb2.EventEnvelope,
        sub: Subscription,
    ) -> bool:
        """Apply one event in its own transaction (see `_isolated`); False if
        it failed (its effects rolled back, the entry left pending or
        dead-lettered)."""
        token = otel_context.attach(extract_context(envelope.trace_context))
        try:
            with tracer.start_as_current_span(
                f"consume {envelope.event_type}",
                kind=trace.SpanKind.CONSUMER,
                attributes={"messaging.system": "redis", "messaging.destination.name": stream},
            ):
                event = ReceivedEvent(
                    stream, entry_id, envelope, unpack(envelope, sub.message_type)
                )
                async with self._isolated(batch) as uow:
                    first_time = await uow.conn.fetchval(
                        f"INSERT INTO {self._db.schema}.processed_events (consumer, event_id)"
                        " VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true",
                        self.group,
                        envelope.event_id,
                    )
                    if first_time:
                        await sub.handler(uow, event)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempts = await self._delivery_count(stream, entry_id)
            if attempts >= self._max_attempts:
                await self._dead_letter(
                    stream, entry_id, envelope.SerializeToString(), repr(exc), attempts
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
        finally:
            otel_context.detach(token)

    async def _delivery_count(self, stream: str, entry_id: str) -> int:
        pending = await self._redis.xpending_range(
            stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else self._max_attempts

    async def _dead_letter(
        self, stream: str, entry_id: str, envelope: bytes, error: str, attempts: int
    ) -> None:
        dlq = dead_letter_stream(self._namespace, self._producers[stream], self.group)
        log.error("event %s on %s dead-lettered to %s: %s", entry_id, stream, dlq, error)
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
