"""Idempotency-Key on every mutating HTTP route (POST, PUT, PATCH, DELETE).

Keys are scoped per client (two clients may pick the same key). The first
request with a key sets an in-progress marker (SET NX); a concurrent
duplicate finds it and gets 409 IDEMPOTENCY_IN_PROGRESS, so the two never
both execute. The finished response (status, content type, body) replaces
the marker and is replayed for the same key and the same request (method,
target, body); the same key with another request is 409
IDEMPOTENCY_KEY_REUSED. A 5xx is not stored: the caller may retry it.

Records live in Redis with a TTL (24 h by default), not in Postgres: they are
a retry window, not business data; the domain services are idempotent on
their own natural keys underneath (request_key, POS transaction id), so losing
a record at worst makes a late retry reach a service that recognises it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.errors import Conflict, DomainError, InvalidArgument

from .auth import policy
from .auth.http import BODY_KEY, ROUTE_KEY, RouteTable, header, read_body, replay_body
from .errors import domain_problem

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_KEY_LENGTH = 255


class IdempotencyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        redis: Redis,
        namespace: str,
        ttl_seconds: int = 86_400,
        in_progress_seconds: int = 60,
        router_app: Any,
    ) -> None:
        self.app = app
        # The FastAPI app whose routes are matched (this middleware wraps its router).
        self._routes = RouteTable(router_app)
        self._redis = redis
        self._ns = namespace
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
        digest = hashlib.sha256(key.encode()).hexdigest()
        record_key = f"{self._ns}:idem:{client_id}:{digest}"
        target = (
            scope.get("raw_path", scope["path"].encode()) + b"?" + scope.get("query_string", b"")
        )
        fingerprint = hashlib.sha256(
            scope["method"].encode() + b"\n" + target + b"\n" + body
        ).hexdigest()
        marker = json.dumps({"state": "in_progress", "fingerprint": fingerprint})
        if await self._redis.set(record_key, marker, nx=True, px=self._lock_ms):
            await self._execute(scope, body, receive, send, record_key, fingerprint)
            return
        stored = await self._redis.get(record_key)
        record = json.loads(stored) if stored else {"state": "in_progress"}
        if record.get("fingerprint", fingerprint) != fingerprint:
            raise Conflict(
                f"this {HEADER} was used for another request",
                code="IDEMPOTENCY_KEY_REUSED",
                field=HEADER,
            )
        if record["state"] != "done":
            raise Conflict(
                f"a request with this {HEADER} is still being processed; retry shortly",
                code="IDEMPOTENCY_IN_PROGRESS",
                field=HEADER,
            )
        headers = [
            (b"content-type", record["content_type"].encode()),
            (REPLAYED_HEADER.lower().encode(), b"true"),
        ]
        payload = base64.b64decode(record["body"])
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": record["status"], "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _execute(
        self,
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
        record_key: str,
        fingerprint: str,
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
            await self._redis.delete(record_key)
            raise
        if status >= 500:
            await self._redis.delete(record_key)
            return
        record = {
            "state": "done",
            "fingerprint": fingerprint,
            "status": status,
            "content_type": content_type,
            "body": base64.b64encode(b"".join(chunks)).decode(),
        }
        await self._redis.set(record_key, json.dumps(record), px=self._ttl_ms)
