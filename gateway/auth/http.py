"""The HTTP door: an ASGI middleware in front of every route.

For each request: find the route template, look its scope up in the policy
(fail-closed), authenticate the signed request (key id, timestamp window,
HMAC over method / target / timestamp / nonce / body hash), and in one Redis
round trip record the nonce, take a rate-limit token and read the
revocation epoch. Then the scope, and for a member:self-only caller the
asserted member. Refusals are DomainErrors rendered by gateway/errors.py, so
they look like every other error, and nothing downstream is called.

The authenticated credential is left in the ASGI scope for the idempotency
middleware and the routes (`request.state.credential`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.errors import DomainError, PermissionDenied

from ..errors import domain_problem
from ..ratelimit import Gatekeeper, Limit
from . import policy
from .crypto import signature_matches
from .members import APPID_HEADER, OPENID_HEADER, MemberAssertions
from .model import (
    MEMBER_SELF,
    Credential,
    RateLimited,
    Unauthenticated,
    acts_as_member_only,
    grants,
)
from .registry import CredentialRegistry
from .tokens import TokenIssuer

KEY_ID_HEADER = "x-key-id"
TIMESTAMP_HEADER = "x-timestamp"
NONCE_HEADER = "x-nonce"
SIGNATURE_HEADER = "x-signature"
_MAX_NONCE = 128

# Where this middleware leaves the buffered body and the matched route for the
# idempotency middleware behind it.
BODY_KEY = "loyalty.body"
ROUTE_KEY = "loyalty.route"


class RouteTable:
    """Every route of the app, flat: (methods, template, compiled path). Built
    on first use, when every router is included; the walk test uses it too."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._routes: list[tuple[frozenset[str], str, Any, dict[str, Any]]] | None = None

    def routes(self) -> list[tuple[frozenset[str], str, Any, dict[str, Any]]]:
        if self._routes is None:
            table = []
            for context in iter_route_contexts(self._app.routes):
                if context.path is None:  # a route without a path (none here today)
                    continue
                regex, template, convertors = compile_path(context.path)
                methods = frozenset(context.methods or ())
                table.append((methods, template, regex, convertors))
            self._routes = table
        return self._routes

    def match(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """(template, path params) of the route serving this request; None for
        a path or method no route takes (the router answers 404 / 405)."""
        for methods, template, regex, convertors in self.routes():
            found = regex.match(path)
            if found and method in methods:
                params = {k: convertors[k].convert(v) for k, v in found.groupdict().items()}
                return template, params
        return None


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def replay_body(body: bytes, then: Receive) -> Receive:
    """The body already read, as one message; afterwards the real channel, so
    the app still learns when the client goes away."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive


def header(scope: Scope, name: str) -> str:
    wanted = name.encode()
    for key, value in scope["headers"]:
        if key == wanted:
            return str(value.decode("latin-1"))
    return ""


class AuthSettings:
    def __init__(
        self,
        clock_skew_seconds: int,
        kind_limits: dict[str, Limit],
    ) -> None:
        self.clock_skew_seconds = clock_skew_seconds
        # A nonce only needs remembering while its timestamp is acceptable.
        self.nonce_ttl_ms = 2 * clock_skew_seconds * 1000
        self.kind_limits = kind_limits

    def limit_of(self, credential: Credential) -> Limit:
        if credential.rate_per_second is not None and credential.burst is not None:
            return Limit(credential.rate_per_second, credential.burst)
        return self.kind_limits[credential.kind.value]


class HttpAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CredentialRegistry,
        gatekeeper: Gatekeeper,
        members: MemberAssertions,
        settings: AuthSettings,
        tokens: TokenIssuer,
        router_app: Any,
        clock: Any = time.time,
    ) -> None:
        self.app = app
        # The FastAPI app whose routes are matched (this middleware wraps its router).
        self._routes = RouteTable(router_app)
        self._registry = registry
        self._gate = gatekeeper
        self._members = members
        self._settings = settings
        self._tokens = tokens
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        matched = self._routes.match(method, scope["path"])
        if matched is None or policy.is_public(method, matched[0]):
            # Unknown paths get their 404/405 from the router; probes and docs are open.
            await self.app(scope, receive, send)
            return
        template, params = matched
        body = await read_body(receive)
        try:
            credential = await self._authorise(scope, method, template, params, body)
        except DomainError as exc:
            await self._refuse(exc, scope, receive, send)
            return
        scope.setdefault("state", {})["credential"] = credential
        scope[BODY_KEY] = body
        scope[ROUTE_KEY] = template
        await self.app(scope, replay_body(body, receive), send)

    async def _refuse(self, exc: DomainError, scope: Scope, receive: Receive, send: Send) -> None:
        await domain_problem(exc)(scope, receive, send)

    async def _authorise(
        self, scope: Scope, method: str, template: str, params: dict[str, Any], body: bytes
    ) -> Credential:
        needed = policy.route_scope(method, template)
        if needed is None:
            raise PermissionDenied(
                f"{method} {template} is not open to any client", code="ROUTE_NOT_IN_POLICY"
            )
        credential = await self._authenticate(scope, method, body)
        if not grants(credential.scopes, needed):
            raise PermissionDenied(f"this route needs the scope {needed}", code="SCOPE_MISSING")
        if needed == MEMBER_SELF and acts_as_member_only(credential.scopes):
            asserted = await self._members.asserted(
                header(scope, APPID_HEADER), header(scope, OPENID_HEADER), credential
            )
            if "member_id" in params:
                await self._members.require_same(str(params["member_id"]), asserted)
            scope.setdefault("state", {})["asserted_member_id"] = asserted
        return credential

    async def _authenticate(self, scope: Scope, method: str, body: bytes) -> Credential:
        authorization = header(scope, "authorization")
        if authorization[:7].lower() == "bearer ":
            return await self._bearer(authorization[7:])
        key_id = header(scope, KEY_ID_HEADER)
        timestamp = header(scope, TIMESTAMP_HEADER)
        nonce = header(scope, NONCE_HEADER)
        signature = header(scope, SIGNATURE_HEADER)
        if not (key_id and timestamp and nonce and signature):
            raise Unauthenticated(
                "sign the request: X-Key-Id, X-Timestamp, X-Nonce and X-Signature are required",
                code="CREDENTIALS_MISSING",
            )
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise Unauthenticated(
                "X-Timestamp is Unix time in whole seconds",
                code="TIMESTAMP_STALE",
                field=TIMESTAMP_HEADER,
            ) from None
        if abs(self._clock() - sent_at) > self._settings.clock_skew_seconds:
            raise Unauthenticated(
                f"X-Timestamp is more than {self._settings.clock_skew_seconds} s from now",
                code="TIMESTAMP_STALE",
                field=TIMESTAMP_HEADER,
            )
        if len(nonce) > _MAX_NONCE:
            raise Unauthenticated(
                f"X-Nonce is longer than {_MAX_NONCE} characters",
                code="NONCE_INVALID",
                field=NONCE_HEADER,
            )
        cached = self._registry.get(key_id)
        verdict = await self._gate.admit(
            cached.client_id if cached else key_id,
            self._settings.limit_of(cached) if cached else None,
            nonce=f"{key_id}:{nonce}",
            nonce_ttl_ms=self._settings.nonce_ttl_ms,
        )
        await self._registry.ensure_current(verdict.epoch)
        credential = self._registry.get(key_id)
        if cached is None and credential is not None and verdict.nonce_fresh:
            # A key new to this instance: its bucket was not charged above.
            charged = await self._gate.admit(
                credential.client_id, self._settings.limit_of(credential)
            )
            verdict = replace(verdict, retry_after_ms=charged.retry_after_ms)
        if credential is None:
            revoked = self._registry.was_revoked(key_id)
            raise Unauthenticated(
                "this key was revoked" if revoked else "unknown key",
                code="KEY_REVOKED" if revoked else "KEY_UNKNOWN",
                field=KEY_ID_HEADER,
            )
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        if not signature_matches(
            credential.secret, signature, method, target, timestamp, nonce, body
        ):
            raise Unauthenticated(
                "the signature does not match", code="SIGNATURE_INVALID", field=SIGNATURE_HEADER
            )
        if not verdict.nonce_fresh:
            raise Unauthenticated(
                "this nonce was already used", code="NONCE_REPLAYED", field=NONCE_HEADER
            )
        if not verdict.allowed:
            raise RateLimited(
                f"rate limit of client {credential.client_id} reached; retry later",
                retry_after_ms=verdict.retry_after_ms,
            )
        return credential

    async def _bearer(self, token: str) -> Credential:
        """A token this gateway issued: no signature, no nonce (it is replayable
        until it expires, which is why it is short-lived); key and limit as usual."""
        key_id = self._tokens.verify(token)
        cached = self._registry.get(key_id)
        limit = self._settings.limit_of(cached) if cached else None
        verdict = await self._gate.admit(cached.client_id if cached else key_id, limit)
        await self._registry.ensure_current(verdict.epoch)
        credential = self._registry.get(key_id)
        if credential is None:
            raise Unauthenticated(
                "the key this token was issued for was revoked",
                code="KEY_REVOKED",
                field="authorization",
            )
        if cached is None:
            verdict = await self._gate.admit(
                credential.client_id, self._settings.limit_of(credential)
            )
        if not verdict.allowed:
            raise RateLimited(
                f"rate limit of client {credential.client_id} reached; retry later",
                retry_after_ms=verdict.retry_after_ms,
            )
        return credential
