"""Idempotency-Key on every mutating HTTP route (POST, PUT, PATCH, DELETE).

Keys are scoped per client (two clients may pick the same key). The first
request with a key sets an in-progress marker (SET NX); a concurrent
duplicate finds it and gets 409 IDEMPOTENCY_IN_PROGRESS, so the two never
both execute. The finished response (status, content type, body) replaces
the marker and is replayed for the same key and the same request (method,
target, body); the same key with another request is 409
IDEMPOTENCY_KEY_REUSED. A 5xx is not stored: the caller may retry it.

Records live in the gateway's PostgreSQL schema (gateway.idempotency_records)
for 24 h by default, pruned in batches: in Redis they were lost with Redis, and
a retry after the loss ran the request again (issue 14). An in-progress claim
whose request died is taken over after `in_progress_seconds`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import asyncpg
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.errors import Conflict, DomainError, InvalidArgument, Unavailable

from .auth import policy
from .auth.http import BODY_KEY, ROUTE_KEY, RouteTable, header, read_body, replay_body
from .auth.registry import DATABASE_ERRORS
from .errors import domain_problem

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_KEY_LENGTH = 255

log = logging.getLogger(__name__)

_T = "gateway.idempotency_records"
# Claim a new key, or one whose record expired or whose claim was abandoned.
_CLAIM = f"""
INSERT INTO {_T} AS r (client_id, key_hash, fingerprint, state, locked_until, expires_at)
VALUES ($1, $2, $3, 'in_progress', now() + $4 * interval '1 millisecond',
        now() + $5 * interval '1 millisecond')
ON CONFLICT (client_id, key_hash) DO UPDATE SET
  fingerprint = EXCLUDED.fingerprint, state = 'in_progress', status = NULL,
  content_type = NULL, body = NULL, locked_until = EXCLUDED.locked_until,
  expires_at = EXCLUDED.expires_at
WHERE r.expires_at < now() OR (r.state = 'in_progress' AND r.locked_until < now())
RETURNING true
"""
_READ = f"SELECT fingerprint, state, status, content_type, body FROM {_T}" + (
    " WHERE client_id = $1 AND key_hash = $2"
)
_FINISH = f"""
UPDATE {_T} SET state = 'done', status = $4, content_type = $5, body = $6,
  expires_at = now() + $7 * interval '1 millisecond'
WHERE client_id = $1 AND key_hash = $2 AND fingerprint = $3 AND state = 'in_progress'
"""
_ABANDON = f"""
DELETE FROM {_T}
WHERE client_id = $1 AND key_hash = $2 AND fingerprint = $3 AND state = 'in_progress'
"""
_PRUNE = f"""
DELETE FROM {_T} WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM {_T} WHERE expires_at < now() LIMIT $1))
"""


async def prune_expired(pool: asyncpg.Pool, batch: int = 1000) -> int:
    """Delete expired records, `batch` rows per statement; how many went."""
    total = 0
    while True:
        async with pool.acquire() as conn:
            status = await conn.execute(_PRUNE, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total
        await asyncio.sleep(0)  # let requests through between batches


class IdempotencyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        pool: asyncpg.Pool,
        ttl_seconds: int = 86_400,
        in_progress_seconds: int = 60,
        router_app: Any,
    ) -> None:
        self.app = app
        # The FastAPI app whose routes are matched (this middleware wraps its router).
        self._routes = RouteTable(router_app)
        self._pool = pool
        self._ttl_ms = ttl_seconds * 1000
        self._lock_ms = in_progress_seconds * 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        matched = scope.get(ROUTE_KEY) or self._routes.match(scope["method"], scope["path"])
        template = matched if isinstance(matched, str) else matched[0] if matched else None
        if template is None or policy.is_public(scope["method"], template):
            # 404 / 405 from the router; public routes (token exchange) change nothing.
            await self.app(scope, receive, send)
            return
        body = scope[BODY_KEY] if BODY_KEY in scope else await read_body(receive)
        try:
            await self._handle(scope, body, receive, send)
        except DomainError as exc:
            await domain_problem(exc)(scope, replay_body(body, receive), send)

    async def _handle(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        key = header(scope, HEADER.lower())
        if not key:
            raise InvalidArgument(
                f"mutating requests need an {HEADER} header (any unique string, e.g. a UUID)",
                code="IDEMPOTENCY_KEY_REQUIRED",
                field=HEADER,
            )
        if len(key) > MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidArgument(
                f"{HEADER} must be printable and at most {MAX_KEY_LENGTH} characters",
                code="IDEMPOTENCY_KEY_INVALID",
                field=HEADER,
            )
        credential = scope.get("state", {}).get("credential")
        client_id = credential.client_id if credential is not None else "anonymous"
        key_hash = hashlib.sha256(key.encode()).digest()
        target = (
            scope.get("raw_path", scope["path"].encode()) + b"?" + scope.get("query_string", b"")
        )
        fingerprint = hashlib.sha256(
            scope["method"].encode() + b"\n" + target + b"\n" + body
        ).digest()
        record_id = (client_id, key_hash, fingerprint)
        try:
            async with self._pool.acquire() as conn:
                claimed = await conn.fetchval(
                    _CLAIM, client_id, key_hash, fingerprint, self._lock_ms, self._ttl_ms
                )
                record = None if claimed else await conn.fetchrow(_READ, client_id, key_hash)
        except DATABASE_ERRORS as exc:
            log.warning("idempotency records unavailable: %r", exc)
            raise Unavailable(
                "the gateway cannot check Idempotency-Key right now; retry later",
                code="DEPENDENCY_UNAVAILABLE",
            ) from None
        if claimed:
            await self._execute(scope, body, receive, send, record_id)
            return
        if record is not None and bytes(record["fingerprint"]) != fingerprint:
            raise Conflict(
                f"this {HEADER} was used for another request",
                code="IDEMPOTENCY_KEY_REUSED",
                field=HEADER,
            )
        if record is None or record["state"] != "done":
            raise Conflict(
                f"a request with this {HEADER} is still being processed; retry shortly",
                code="IDEMPOTENCY_IN_PROGRESS",
                field=HEADER,
            )
        payload = bytes(record["body"] or b"")
        headers = [
            (b"content-type", (record["content_type"] or "").encode()),
            (REPLAYED_HEADER.lower().encode(), b"true"),
            (b"content-length", str(len(payload)).encode()),
        ]
        await send({"type": "http.response.start", "status": record["status"], "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _execute(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        record_id: tuple[str, bytes, bytes],
    ) -> None:
        status = 500
        content_type = ""
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status, content_type
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", []):
                    if name.lower() == b"content-type":
                        content_type = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_body(body, receive), capture)
        except BaseException:
            await self._release(record_id)
            raise
        if status >= 500:
            # Not stored: the caller may retry it.
            await self._release(record_id)
            return
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(
                    _FINISH, *record_id, status, content_type, b"".join(chunks), self._ttl_ms
                )
        except DATABASE_ERRORS as exc:
            # The answer was sent; the claim stays until in_progress_seconds,
            # so a retry meanwhile is told to wait rather than run again.
            log.error("idempotency record not stored: %r", exc)

    async def _release(self, record_id: tuple[str, bytes, bytes]) -> None:
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(_ABANDON, *record_id)
        except DATABASE_ERRORS as exc:
            log.warning("idempotency claim not released (expires on its own): %r", exc)
