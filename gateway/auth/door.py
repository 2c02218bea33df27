"""Wiring of the door: one Postgres pool (credential reloads, Idempotency-Key
records, the nonce-store marker), one Redis client (nonces, buckets, epochs),
the one sign-in sequence (signin.py), and the pieces the HTTP app and the POS
server install."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI

from servicekit.db import create_pool
from servicekit.redis_client import RedisClient, create_bounded_redis

from ..clients import Downstreams
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import MUTATING, IdempotencyMiddleware, prune_expired
from ..ratelimit import Gatekeeper, Limit, LocalBuckets
from ..settings import GatewaySettings
from .crypto import SIGNATURE_ALGORITHM, SecretBox
from .http import HttpAuthMiddleware
from .members import MemberAssertions, identity_epoch_key
from .pos import PosAuthInterceptor
from .registry import DATABASE_ERRORS, CredentialRegistry
from .signin import SignIn, SignInSettings
from .tokens import TokenIssuer, token_router

log = logging.getLogger(__name__)

REDIS_CONNECTIONS = 64
# A stale connection's command is sent again this many times, on a new connection.
STALE_CONNECTION_RETRIES = 1

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
            f"hex HMAC-SHA256 of {SIGNATURE_ALGORITHM}, method, path?query, timestamp, "
            "nonce, sha256(body) hex, X-Member-Appid, X-Member-Openid, Idempotency-Key, "
            "X-Operator-User "
            "(empty when absent), joined by newlines",
        ),
    )
}


def door_redis(settings: GatewaySettings) -> RedisClient:
    """The door's Redis client. A burst of concurrent requests waits for a
    connection instead of failing (the default pool raises past 100
    connections). A Redis that refuses connections is noticed at once; one that
    hangs costs a call at most the downstream deadline (then the POS falls
    back), and the gatekeeper then skips it for a moment (ratelimit.Gatekeeper).

    A pooled connection left stale by a Redis restart ("Connection closed by
    server") reconnects and sends its command again, once and at once: without
    it each stale connection failed one call after Redis came back, and each
    such failure made the gatekeeper skip Redis for another moment, so signed
    HTTP requests were refused (503 NONCE_STORE_UNAVAILABLE) for seconds after
    the restart, one stale connection per skip window. Not a timeout, nor with
    a back-off: a hung or refusing Redis must still fail fast.
    """
    return create_bounded_redis(
        settings.redis_url,
        REDIS_CONNECTIONS,
        settings.downstream_timeout_seconds,
        stale_connection_retries=STALE_CONNECTION_RETRIES,
    )


class Door:
    def __init__(self, settings: GatewaySettings, downstreams: Downstreams) -> None:
        self._s = settings
        self._downstreams = downstreams
        self.pool = None
        self.redis = door_redis(settings)
        self.namespace = settings.redis_namespace
        self.gatekeeper = Gatekeeper(
            self.redis,
            settings.redis_namespace,
            identity_epoch_key=identity_epoch_key(settings.redis_namespace),
        )
        self.signin_settings = SignInSettings(
            # A nonce only needs remembering while its timestamp is acceptable.
            nonce_ttl_ms=2 * settings.auth_clock_skew_seconds * 1000,
            kind_limits={
                kind: Limit(rate, burst) for kind, (rate, burst) in settings.rate_limits.items()
            },
            store_limit=Limit(settings.store_rate_per_second, settings.store_burst),
            failure_limit=Limit(settings.auth_failure_rate_per_second, settings.auth_failure_burst),
        )
        self.members = MemberAssertions(
            downstreams,
            settings.member_assertion_ttl_seconds,
            redis=self.redis,
            namespace=settings.redis_namespace,
        )
        self.registry: CredentialRegistry | None = None
        self.signin: SignIn | None = None
        self.tokens = TokenIssuer(settings.auth_secret_key, settings.token_ttl_seconds)
        self._pruning: asyncio.Task[None] | None = None

    async def open(self) -> None:
        s = self._s
        self.pool = await create_pool(s.database_url, min_size=1, max_size=s.door_db_pool_max)
        self.registry = CredentialRegistry(
            self.pool, SecretBox(s.auth_secret_key), s.credential_max_age_seconds
        )
        self.signin = SignIn(
            self.registry,
            self.gatekeeper,
            self.signin_settings,
            failures=LocalBuckets(s.auth_failure_sources),
        )
        # Load now, so the first request does not pay for it.
        await self.registry.ensure_current(await self.gatekeeper.current_epoch())
        await self._open_nonce_store()
        try:
            await self.gatekeeper.load_script()
        except Exception as exc:  # Redis down at start: the first call loads it
            log.warning("gatekeeper script not loaded at start: %r", exc)
        self._pruning = asyncio.create_task(self._prune(), name="idempotency-prune")

    async def _open_nonce_store(self) -> None:
        """The first start of an installation records that its nonce store (a
        Redis namespace) exists; an empty store at any later start lost its data."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            fresh = await conn.fetchval(
                "INSERT INTO gateway.door_markers (name) VALUES ($1)"
                " ON CONFLICT (name) DO NOTHING RETURNING true",
                f"nonce_store:{self._s.redis_namespace}",
            )
            client_ids = [
                r["client_id"] for r in await conn.fetch("SELECT client_id FROM gateway.clients")
            ]
        try:
            await self.gatekeeper.open_nonce_store(bool(fresh), client_ids)
        except Exception as exc:  # Redis down at start: the script sets it later
            log.warning("nonce store epoch not set at start: %r", exc)

    async def _prune(self) -> None:
        assert self.pool is not None
        while True:
            await asyncio.sleep(self._s.idempotency_prune_interval_seconds)
            try:
                pruned = await prune_expired(self.pool)
            except DATABASE_ERRORS as exc:
                log.warning("idempotency prune failed: %r", exc)
                continue
            if pruned:
                log.info("idempotency records pruned: %d", pruned)

    def install(self, app: FastAPI) -> None:
        """Added innermost-first: the auth middleware runs before idempotency."""
        assert self.registry is not None and self.pool is not None, "open() first"
        s = self._s
        app.include_router(token_router(self))
        app.add_middleware(
            IdempotencyMiddleware,
            pool=self.pool,
            ttl_seconds=s.idempotency_ttl_seconds,
            in_progress_seconds=s.idempotency_in_progress_seconds,
            router_app=app,
        )
        app.add_middleware(
            HttpAuthMiddleware,
            signin=self.signin,
            members=self.members,
            tokens=self.tokens,
            router_app=app,
            clock_skew_seconds=s.auth_clock_skew_seconds,
            accept_signature_v1=s.auth_accept_signature_v1,
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
        assert self.signin is not None, "open() first"
        return PosAuthInterceptor(
            self.signin, require_client_certificate=bool(self._s.pos_tls_client_ca_file)
        )

    async def close(self, timeout: float = 5.0) -> None:
        if self._pruning is not None:
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
        await self.redis.aclose()
        if self.pool is not None:
            # A connection never released (a task cancelled mid-reload) must not hang shutdown.
            try:
                await asyncio.wait_for(self.pool.close(), timeout)
            except TimeoutError:
                self.pool.terminate()
