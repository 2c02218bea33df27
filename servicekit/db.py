"""PostgreSQL access: the asyncpg pool and the unit of work.

Hot paths (checkout) use asyncpg directly: measured several times faster than
the ORM for the same statements (docs/architecture.md). SQLAlchemy defines the
tables for Alembic; queries live in each service's repository module.

The request boundary (servicer or consumer) owns the transaction:
`async with uow_factory() as uow:` commits when the block ends cleanly and
rolls back on any exception. Business code never commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from google.protobuf.message import Message

from .errors import PG_CONNECTION_ERRORS
from .events import make_envelope

Connection = asyncpg.Connection
log = logging.getLogger(__name__)


def asyncpg_dsn(url: str) -> str:
    """Accept libpq or SQLAlchemy-style URLs ("postgresql+asyncpg://")."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit((scheme, *parts[1:]))


def sqlalchemy_url(url: str) -> str:
    parts = urlsplit(asyncpg_dsn(url))
    return urlunsplit(("postgresql+asyncpg", *parts[1:]))


def with_database(url: str, name: str) -> str:
    """The same server and credentials, another database (a scratch one for a run)."""
    parts = urlsplit(asyncpg_dsn(url))
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def create_pool(url: str, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        asyncpg_dsn(url),
        min_size=min_size,
        max_size=max_size,
        # Statements are schema-qualified; a fixed search_path keeps ad-hoc SQL honest.
        server_settings={"application_name": "loyalty", "search_path": "public"},
        reset=_reset_changed_session,
    )
    assert pool is not None
    return pool


# Connections whose session state (SET, a session advisory lock, LISTEN, an
# open cursor) was changed since they left the pool: only these pay asyncpg's
# reset query on release.
_CHANGED_SESSIONS: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()


def session_state_changed(conn: Any) -> None:
    """Call after changing a pooled connection's session state (SET, not SET
    LOCAL; pg_advisory_lock, not the xact kind; LISTEN): its release then
    resets the session, as asyncpg does for every release by default.

    Every other release skips that reset (a round trip with four statements
    per unit of work, in every process, measured by `make bench`): the
    platform's transactions leave no session state behind. asyncpg still rolls
    back a transaction left open and drops listeners before `reset` is called."""
    raw = conn._con if isinstance(conn, asyncpg.pool.PoolConnectionProxy) else conn
    _CHANGED_SESSIONS.add(raw)


async def _reset_changed_session(conn: asyncpg.Connection) -> None:
    """The pool's reset: asyncpg's reset query only for a connection marked
    by session_state_changed."""
    if conn in _CHANGED_SESSIONS:
        _CHANGED_SESSIONS.discard(conn)
        query = conn.get_reset_query()
        if query:
            await conn.execute(query)


class UnitOfWork:
    """One database transaction, plus the events it will publish through the outbox."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        producer: str,
        on_commit: Callable[[], None] | None = None,
        transactional: bool = True,
    ) -> None:
        self._pool = pool
        self._schema = schema
        self._producer = producer
        self._on_commit = on_commit
        self._transactional = transactional
        self._conn: Any = None
        self._tx: Any = None
        self._emitted = 0
        # Reads that stay put for one transaction (a programme's versions),
        # kept once for it: a consumer applies a whole read of events in one.
        self.memo: dict[Any, Any] = {}

    @property
    def conn(self) -> asyncpg.Connection:
        if self._conn is None:
            raise RuntimeError("unit of work used outside `async with`")
        return self._conn  # type: ignore[no-any-return]

    async def __aenter__(self) -> UnitOfWork:
        # Every idle connection may be one the server closed (a restart): at
        # most the whole pool, then one freshly connected.
        attempts = self._pool.get_max_size() + 1
        for attempt in range(attempts):
            self._conn = await self._pool.acquire()
            if not self._transactional:
                return self
            try:
                self._tx = self._conn.transaction()
                await self._tx.start()
                return self
            except PG_CONNECTION_ERRORS:
                # A pooled connection the server closed: nothing was done on
                # it yet, so drop it and take another.
                await self._discard()
                if attempt == attempts - 1:
                    raise
            except BaseException:
                await self._pool.release(self._conn)
                self._conn = None
                raise
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and isinstance(exc, PG_CONNECTION_ERRORS):
            # The connection is broken: a ROLLBACK on it would only fail again
            # (and hide `exc`); the server rolls back when the socket goes.
            await self._discard()
            return
        try:
            if self._tx is None:
                pass  # reads only: nothing to end
            elif exc_type is None:
                await self._tx.commit()
                if self._emitted and self._on_commit is not None:
                    self._on_commit()
            else:
                await self._tx.rollback()
        except PG_CONNECTION_ERRORS:
            await self._discard()
            if exc is None:
                raise  # a COMMIT whose outcome is unknown: the caller retries (idempotently)
            return  # the rollback failed with the connection: `exc` goes on
        except BaseException:
            await self._discard()
            raise
        await self._pool.release(self._conn)
        self._conn = None

    async def _discard(self) -> None:
        """Close the connection for good and give its slot back to the pool."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Either may find the pool already took the closed connection back.
        with contextlib.suppress(Exception):
            conn.terminate()
        with contextlib.suppress(Exception):
            await self._pool.release(conn)

    async def emit(self, payload: Message, member_id: str = "") -> str:
        """Write an event to this service's outbox, inside the current transaction."""
        if not self._transactional:
            raise RuntimeError("a reading unit of work writes nothing: use unit_of_work()")
        envelope = make_envelope(self._producer, payload, member_id)
        await self.conn.execute(
            f"INSERT INTO {self._schema}.outbox (event_id, event_type, envelope)"
            " VALUES ($1, $2, $3)",
            envelope.event_id,
            envelope.event_type,
            envelope.SerializeToString(),
        )
        self._emitted += 1
        return envelope.event_id


UnitOfWorkFactory = Callable[[], UnitOfWork]


class Database:
    """The pool and the unit-of-work factory of one service."""

    def __init__(self, pool: asyncpg.Pool, schema: str, producer: str) -> None:
        self.pool = pool
        self.schema = schema
        self.producer = producer
        # Set by the outbox relay so a commit with events wakes it at once.
        self.outbox_wakeup = asyncio.Event()

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self.pool, self.schema, self.producer, self.outbox_wakeup.set)

    def reading(self) -> UnitOfWork:
        """For read-only use cases: a pooled connection without a transaction.
        Under READ COMMITTED a transaction gives reads nothing (every statement
        takes its own snapshot either way) and costs a BEGIN and a COMMIT round
        trip: two of the three for a one-query read. Reads only: a write here
        would commit statement by statement, so emit() refuses outright."""
        return UnitOfWork(self.pool, self.schema, self.producer, transactional=False)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    async def close(self, timeout: float = 10.0) -> None:
        """Close gracefully; a connection never released (a task cancelled at a
        bad moment) must not hang shutdown, so terminate after `timeout`."""
        try:
            await asyncio.wait_for(self.pool.close(), timeout)
        except TimeoutError:
            log.warning("database pool did not close within %.0fs; terminating", timeout)
            self.pool.terminate()


async def with_retries(attempt: Callable[[], Awaitable[Any]], retries: int = 3) -> Any:
    """Retry a whole transaction on serialization failure or deadlock."""
    for n in range(retries + 1):
        try:
            return await attempt()
        except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
            if n == retries:
                raise
            await asyncio.sleep(0.005 * (2**n))
    raise AssertionError("unreachable")
