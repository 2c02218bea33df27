"""Outbox relay: moves committed events from a service's outbox table to its
Redis stream, numbered, and keeps them so a consumer can ask for them again.

Durable events (docs/architecture.md "Events"): Redis is not the only copy.

1. Sequence: committed rows without a number get the next ones of the
   producer's gap-free sequence, in id order, in a statement of their own
   under an advisory lock (one relay numbers and publishes at a time; replicas
   wait their turn). Numbers are given only to committed rows and the
   numbering commits before anything is published, so a number always names
   one event.
2. Publish: numbered, unpublished rows are XADDed in sequence order with their
   number (the `seq` field beside the envelope), then marked published (by
   range, in the query that lets the lock go; an asynchronous commit). A
   crash in between, or one that loses the mark, publishes them again;
   consumers drop the duplicate by event id.

A turn costs three round trips to PostgreSQL and one to Redis (publish_pending);
a turn with nothing to publish (the idle poll) one statement, which takes no lock.
A commit wakes the relay, which then waits `coalesce` seconds so the commits of
the next few milliseconds share its turn instead of each paying for one.
3. Keep: published rows stay for `OUTBOX_RETENTION_DAYS` (the pruner deletes
   them in batches, never the newest, which carries the sequence on).
4. Replay: a consumer that finds a gap (or finds its stream or group gone
   after Redis lost data) pushes "group from_seq" onto `<stream>:replay`; the
   relay publishes every kept event from there on again.

The relay also keeps `<stream>:head` (a hash: `head`, the last number
published, and `floor`, the oldest kept), so a consumer notices events lost
at the tail of the stream, where no later event shows the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from . import member_views
from .db import Connection, Database, session_state_changed
from .events import ENVELOPE_FIELD, SEQ_FIELD, head_key, replay_key
from .redis_client import RedisClient

log = logging.getLogger(__name__)

# Streams are trimmed approximately to this many entries; consumers keep up
# long before that, and the dead-letter streams keep what failed.
STREAM_MAX_LEN = 1_000_000
# Replay requests are served at most this often.
UPKEEP_SECONDS = 0.5
# The head hash is written again from PostgreSQL this often (the floor moves
# as the pruner deletes), and at the next upkeep when Redis no longer has it
# (lost with Redis's data); each turn that publishes sets `head` itself.
HEAD_REFRESH_SECONDS = 30.0
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext($1))"


@dataclass(frozen=True)
class OutboxStatus:
    """What `events status` shows for a producer."""

    last_published: int
    unpublished: int
    kept: int
    floor: int


class OutboxRelay:
    def __init__(
        self,
        db: Database,
        redis: RedisClient,
        stream: str,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        coalesce: float = 0.0,
    ) -> None:
        self._db = db
        self._redis = redis
        self._stream = stream
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._coalesce = coalesce
        self._table = f"{db.schema}.outbox"
        # One relay numbers and publishes at a time (advisory lock, per schema).
        self._lock_name = f"outbox:{db.schema}"
        self._stopping = False
        self._last_upkeep = 0.0
        self._last_head = -HEAD_REFRESH_SECONDS
        self._head_present = False  # as the last serve_replays saw it
        self._none_published = False  # as the last publish_head found
        t = self._table
        # Committed rows without a number get the next ones, in id order. Run
        # only under the lock, in a statement begun after taking it: its
        # snapshot then sees every number an earlier holder committed.
        numbering = (
            f"todo AS (SELECT id FROM {t} WHERE seq IS NULL ORDER BY id LIMIT $1 FOR UPDATE),"
            f" base AS (SELECT coalesce(max(seq), 0) AS last FROM {t}),"
            f" numbered AS (UPDATE {t} o SET seq = base.last + n.n"
            "  FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM todo) n, base"
            "  WHERE o.id = n.id RETURNING o.seq, o.envelope)"
        )
        self._number_sql = f"WITH {numbering} SELECT count(*) FROM numbered"
        # Rows numbered earlier but not published (a crash after the numbering
        # or the XADD) are not in `numbered`: the statement's snapshot shows
        # them with their number, the new ones without, so the two never meet.
        self._turn_sql = (
            f"WITH {numbering},"
            f" waiting AS (SELECT seq, envelope FROM {t}"
            "  WHERE seq IS NOT NULL AND published_at IS NULL ORDER BY seq LIMIT $1)"
            " SELECT seq, envelope FROM waiting UNION ALL SELECT seq, envelope FROM numbered"
            " ORDER BY seq LIMIT $1"
        )
        self._lock_sql = (
            "SELECT pg_try_advisory_lock(hashtext($1))"
            f" WHERE EXISTS (SELECT 1 FROM {t} WHERE seq IS NULL)"
            f" OR EXISTS (SELECT 1 FROM {t} WHERE seq IS NOT NULL AND published_at IS NULL)"
        )
        lock_literal = "'" + self._lock_name.replace("'", "''") + "'"
        # Sent as one simple query (one round trip): the marks commit before
        # the lock goes, so the relay that takes it next sees the range marked.
        # Without waiting for the WAL flush: a mark lost in a PostgreSQL crash
        # only publishes the range again (consumers drop duplicates), while
        # the numbering, which must survive, commits synchronously. Measured:
        # ~0.2 ms of PostgreSQL CPU less per turn (docs/operations.md).
        self._mark_sql = (
            "BEGIN; SET LOCAL synchronous_commit = off;"
            f" UPDATE {t} SET published_at = now()"
            " WHERE seq BETWEEN {first:d} AND {last:d} AND published_at IS NULL;"
            f" COMMIT; SELECT pg_advisory_unlock(hashtext({lock_literal}))"
        )

    async def sequence_pending(self) -> int:
        """Number one batch of committed rows (without publishing them); how
        many got a number (0 when another replica holds the lock)."""
        async with self._db.pool.acquire() as conn:
            try:
                # In the try: a cancel landing once the lock is granted would
                # otherwise leave it on the pooled connection.
                if not await self._lock(conn):
                    return 0
                status = await conn.execute(self._number_sql, self._batch_size)
                await conn.execute(_UNLOCK_SQL, self._lock_name)
            except BaseException:
                session_state_changed(conn)  # its release unlocks
                raise
            return int(status.split()[-1])

    async def publish_pending(self) -> int:
        """Number and publish one batch; returns how many events went out.

        A turn is three statements on one connection, each its own
        transaction: take the lock; number the new rows and read every
        numbered, unpublished one (the numbering commits with that statement,
        before the XADD); after the XADD, mark the published range and let the
        lock go. The lock is a session lock, so it spans the XADD without a
        transaction held open across it."""
        async with self._db.pool.acquire() as conn:
            try:
                if not await self._lock(conn):  # in the try: see sequence_pending
                    return 0
                rows = await conn.fetch(self._turn_sql, self._batch_size)
                if not rows:
                    await conn.execute(_UNLOCK_SQL, self._lock_name)
                    return 0
                first, last = rows[0]["seq"], rows[-1]["seq"]
                await self._xadd(rows, head=last)
                self._none_published = False
                await conn.execute(self._mark_sql.format(first=first, last=last))
            except BaseException:
                # A failed turn (a crash between XADD and marking publishes
                # the range again next turn) leaves the lock to the release,
                # which resets the session.
                session_state_changed(conn)
                with contextlib.suppress(Exception):
                    if conn.is_in_transaction():  # the marking's BEGIN, failed
                        await conn.execute("ROLLBACK")
                raise
            return len(rows)

    async def _lock(self, conn: Connection) -> bool:
        """The session advisory lock (one relay per schema at a time), taken
        only when a committed row waits for its number or its publication (in
        the lock's own statement, on the outbox's partial indexes): an idle
        turn is then one round trip, not three (the lock, the turn's
        statement, the unlock). A row committed after that statement's
        snapshot wakes its own process's relay, or the next poll finds it."""
        return bool(await conn.fetchval(self._lock_sql, self._lock_name))

    async def _xadd(self, rows: list, head: int | None = None) -> None:  # type: ignore[type-arg]
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xadd(
                    self._stream,
                    {ENVELOPE_FIELD: bytes(row["envelope"]), SEQ_FIELD: str(row["seq"]).encode()},
                    maxlen=STREAM_MAX_LEN,
                    approximate=True,
                )
            if head is not None:
                pipe.hset(head_key(self._stream), b"head", str(head).encode())
            # After commit: the gateway's cached views of these members are stale.
            member_views.bump_for_envelopes(pipe, self._stream, (r["envelope"] for r in rows))
            await pipe.execute()

    async def publish_head(self) -> bool:
        """Refresh `<stream>:head` (after a Redis loss it is gone until then);
        False when nothing was ever published (no head to write)."""
        row = await self._db.pool.fetchrow(
            f"SELECT (SELECT max(seq) FROM {self._table} WHERE published_at IS NOT NULL) AS head,"
            f" (SELECT min(seq) FROM {self._table}) AS floor"
        )
        if row is None or row["head"] is None:
            return False
        await self._redis.hset(
            head_key(self._stream),
            mapping={b"head": str(row["head"]).encode(), b"floor": str(row["floor"]).encode()},
        )
        return True

    async def serve_replays(self) -> int:
        """Publish again what consumers asked for; returns how many events went out."""
        key = replay_key(self._stream)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.delete(key)
            pipe.hget(head_key(self._stream), b"head")  # same slot: {stream}
            requests, _, present = await pipe.execute()
        self._head_present = present is not None
        if not requests:
            return 0
        asks: list[tuple[str, int]] = []
        for raw in requests:
            group, _, seq = raw.decode().rpartition(" ")
            try:
                asks.append((group, int(seq)))
            except ValueError:
                log.warning("ignoring malformed replay request %r on %s", raw, key)
        if not asks:
            return 0
        start = min(seq for _, seq in asks)
        sent = 0
        position = start
        while True:
            rows = await self._db.pool.fetch(
                f"SELECT seq, envelope FROM {self._table}"
                " WHERE seq >= $1 AND published_at IS NOT NULL ORDER BY seq LIMIT $2",
                position,
                self._batch_size,
            )
            if not rows:
                break
            if sent == 0 and rows[0]["seq"] > start:
                log.error(
                    "replay of %s from seq %d asked by %s: seqs %d..%d are past retention",
                    self._stream,
                    start,
                    ", ".join(sorted({g for g, _ in asks})),
                    start,
                    rows[0]["seq"] - 1,
                )
            await self._xadd(rows)
            sent += len(rows)
            position = rows[-1]["seq"] + 1
            if len(rows) < self._batch_size:
                break
        log.warning(
            "replayed %d events of %s from seq %d for %s",
            sent,
            self._stream,
            start,
            ", ".join(sorted({g for g, _ in asks})),
        )
        return sent

    async def status(self) -> OutboxStatus:
        row = await self._db.pool.fetchrow(
            f"SELECT coalesce(max(seq) FILTER (WHERE published_at IS NOT NULL), 0) AS last,"
            " count(*) FILTER (WHERE published_at IS NULL) AS unpublished,"
            " count(*) FILTER (WHERE published_at IS NOT NULL) AS kept,"
            f" coalesce(min(seq), 0) AS floor FROM {self._table}"
        )
        assert row is not None
        return OutboxStatus(row["last"], row["unpublished"], row["kept"], row["floor"])

    def stop(self) -> None:
        """Leave the loop once the batch in hand is published (graceful shutdown)."""
        self._stopping = True
        self._db.outbox_wakeup.set()

    async def run(self) -> None:
        wakeup = self._db.outbox_wakeup
        while not self._stopping:
            # Cleared before publishing: a commit landing meanwhile sets it again,
            # so the wait below returns at once instead of sleeping on it.
            wakeup.clear()
            try:
                while await self.publish_pending() == self._batch_size and not self._stopping:
                    pass
                now = asyncio.get_running_loop().time()
                if not self._stopping and now - self._last_upkeep >= UPKEEP_SECONDS:
                    # Not after every batch: under load the loop turns per commit.
                    self._last_upkeep = now
                    await self.serve_replays()
                    missing = not self._head_present and not self._none_published
                    if missing or now - self._last_head >= HEAD_REFRESH_SECONDS:
                        self._last_head = now
                        self._none_published = not await self.publish_head()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay failed; retrying: %r", exc)
                await asyncio.sleep(self._poll_interval)
            if self._stopping:
                break
            try:
                await asyncio.wait_for(wakeup.wait(), timeout=self._poll_interval)
            except TimeoutError:
                continue
            if self._coalesce > 0 and not self._stopping:
                # Woken by a commit: let the next few join this turn.
                await asyncio.sleep(self._coalesce)
