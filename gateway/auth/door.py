"""Wiring of the door: one Postgres pool (credential reloads only), one Redis
client (nonces, buckets, epoch, idempotency records), and the pieces the HTTP
app and the POS server install."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis

from servicekit.db import create_pool

from ..clients import Downstreams
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import MUTATING, IdempotencyMiddleware
from ..ratelimit import Gatekeeper, Limit
from ..settings import GatewaySettings
from .crypto import SecretBox
from .http import AuthSettings, HttpAuthMiddleware
from .members import MemberAssertions
from .pos import PosAuthInterceptor
from .registry import CredentialRegistry
from .tokens import TokenIssuer, token_router

REDIS_CONNECTIONS = 64

IDEMPOTENCY_PARAMETER = {
    "name": IDEMPOTENCY_HEADER,
    "in": "header",
    "required": True,
    "description": "Unique per logical request (e.g. a UUID). A retry with the same key and "
    "body gets the first response again; the same key with another body is 409 "
    "IDEMPOTENCY_KEY_REUSED. Kept 24 h per client.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "example": "5f0c8a52-8d7e-4a43-9f0e-2b1d7c9e4a11",
}

# Each request is signed (docs/api.md, "Authentication"): the four headers go together.
SECURITY_SCHEMES = {
    name: {"type": "apiKey", "in": "header", "name": header, "description": text}
    for name, header, text in (
        ("keyId", "X-Key-Id", "The key id the gateway issued"),
        ("timestamp", "X-Timestamp", "Unix time in seconds, within 300 s of the gateway's"),
        ("nonce", "X-Nonce", "Unique per request (at most 128 characters)"),
        (
            "signature",
            "X-Signature",
            "hex HMAC-SHA256 of LOYALTY-HMAC-SHA256, method, path?query, timestamp, nonce, "
            "sha256(body) hex, joined by newlines",
        ),
    )
}


class Door:
    def __init__(self, settings: GatewaySettings, downstreams: Downstreams) -> None:
        self._s = settings
        self._downstreams = downstreams
        self.pool = None
        # A burst of concurrent requests waits for a connection instead of
        # failing (the default pool raises past 100 connections).
        self.redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=REDIS_CONNECTIONS,
                timeout=settings.downstream_timeout_seconds,
            )
        )
        self.gatekeeper = Gatekeeper(self.redis, settings.redis_namespace)
        self.auth_settings = AuthSettings(
            settings.auth_clock_skew_seconds,
            {kind: Limit(rate, burst) for kind, (rate, burst) in settings.rate_limits.items()},
        )
        self.members = MemberAssertions(
            downstreams,
            settings.member_assertion_ttl_seconds,
            redis=self.redis,
            namespace=settings.redis_namespace,
        )
        self.registry: CredentialRegistry | None = None
        self.tokens = TokenIssuer(settings.auth_secret_key, settings.token_ttl_seconds)

    async def open(self) -> None:
        s = self._s
        self.pool = await create_pool(s.database_url, min_size=1, max_size=2)
        self.registry = CredentialRegistry(
            self.pool, SecretBox(s.auth_secret_key), s.credential_max_age_seconds
        )
        # Load now, so the first request does not pay for it.
        await self.registry.ensure_current(await self.gatekeeper.current_epoch())

    def install(self, app: FastAPI) -> None:
        """Added innermost-first: the auth middleware runs before idempotency."""
        assert self.registry is not None, "open() first"
        s = self._s
        app.include_router(token_router(self))
        app.add_middleware(
            IdempotencyMiddleware,
            redis=self.redis,
            namespace=s.redis_namespace,
            ttl_seconds=s.idempotency_ttl_seconds,
            in_progress_seconds=s.idempotency_in_progress_seconds,
            router_app=app,
        )
        app.add_middleware(
            HttpAuthMiddleware,
            registry=self.registry,
            gatekeeper=self.gatekeeper,
            members=self.members,
            settings=self.auth_settings,
            tokens=self.tokens,
            router_app=app,
        )
        self._document(app)

    @staticmethod
    def _document(app: FastAPI) -> None:
        """Declare the signature headers and Idempotency-Key in /openapi.json."""
        build = app.openapi

        def openapi() -> dict[str, Any]:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for path in schema.get("paths", {}).values():
                for method, operation in path.items():
                    if method.upper() in MUTATING and not any(
                        p.get("name") == IDEMPOTENCY_HEADER for p in operation.get("parameters", [])
                    ):
                        operation.setdefault("parameters", []).append(IDEMPOTENCY_PARAMETER)
            return schema

        app.openapi = openapi  # type: ignore[method-assign]

    def pos_interceptor(self) -> PosAuthInterceptor:
        assert self.registry is not None, "open() first"
        s = self._s
        return PosAuthInterceptor(
            self.registry,
            self.gatekeeper,
            self.auth_settings,
            Limit(s.store_rate_per_second, s.store_burst),
        )

    async def close(self, timeout: float = 5.0) -> None:
        await self.redis.aclose()
        if self.pool is not None:
            # A connection never released (a task cancelled mid-reload) must not hang shutdown.
            try:
                await asyncio.wait_for(self.pool.close(), timeout)
            except TimeoutError:
                self.pool.terminate()
