"""The HTTP door: an ASGI middleware in front of every route.

For each request: find the route template, look its scope up in the policy
(fail-closed), sign the caller in (gateway/auth/signin.py: bounded headers,
key lookup, HMAC over method / target / timestamp / nonce / body hash and the
member and Idempotency-Key headers, then nonce and rate limit for the
verified client only). Then the scope, and for a member:self-only caller the
asserted member. Refusals are DomainErrors rendered by gateway/errors.py, so
they look like every other error, and nothing downstream is called.

The authenticated credential is left in the ASGI scope for the idempotency
middleware and the routes (`request.state.credential`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from servicekit.errors import DomainError, PermissionDenied

from ..errors import domain_problem
from ..principal import OPERATOR_USER_HEADER
from . import policy
from .crypto import SignedHeaders, signature_matches
from .members import APPID_HEADER, OPENID_HEADER, MemberAssertions
from .model import MEMBER_SELF, Credential, Unauthenticated, acts_as_member_only, grants
from .signin import MAX_NONCE, Attempt, SignIn, bound_key_id
from .tokens import TokenIssuer

KEY_ID_HEADER = "x-key-id"
TIMESTAMP_HEADER = "x-timestamp"
NONCE_HEADER = "x-nonce"
SIGNATURE_HEADER = "x-signature"
IDEMPOTENCY_HEADER = "idempotency-key"

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


def source_address(scope: Scope) -> str:
    """The client's address: the TCP peer, or, when the peer is one of
    TRUSTED_PROXIES (the ingress), the client it names in X-Forwarded-For
    (uvicorn's ProxyHeadersMiddleware has already put it here)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def header(scope: Scope, name: str) -> str:
    wanted = name.encode()
    for key, value in scope["headers"]:
        if key == wanted:
            return str(value.decode("latin-1"))
    return ""


class HttpAuthMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        signin: SignIn,
        members: MemberAssertions,
        tokens: TokenIssuer,
        router_app: Any,
        clock_skew_seconds: int,
        accept_signature_v1: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        # The FastAPI app whose routes are matched (this middleware wraps its router).
        self._routes = RouteTable(router_app)
        self._signin = signin
        self._members = members
        self._tokens = tokens
        self._skew = clock_skew_seconds
        self._accept_v1 = accept_signature_v1
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
        # Bounded by the body-size middleware outside this one (gateway/http.py).
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
        source = source_address(scope)
        if authorization[:7].lower() == "bearer ":
            return await self._signin.sign_in(source, lambda: self._bearer(authorization[7:]))
        return await self._signin.sign_in(source, lambda: self._signed(scope, method, body))

    def _bearer(self, token: str) -> Attempt:
        """A token this gateway issued: no signature, no nonce (it is replayable
        until it expires, which is why it is short-lived); key and limit as usual."""
        key_id = self._tokens.verify(token)
        return Attempt(key_id=key_id, verify=lambda credential: None, key_field="authorization")

    def _signed(self, scope: Scope, method: str, body: bytes) -> Attempt:
        key_id = header(scope, KEY_ID_HEADER)
        timestamp = header(scope, TIMESTAMP_HEADER)
        nonce = header(scope, NONCE_HEADER)
        signature = header(scope, SIGNATURE_HEADER)
        if not (key_id and timestamp and nonce and signature):
            raise Unauthenticated(
                "sign the request: X-Key-Id, X-Timestamp, X-Nonce and X-Signature are required",
                code="CREDENTIALS_MISSING",
            )
        bound_key_id(key_id, KEY_ID_HEADER)
        if len(nonce) > MAX_NONCE or not nonce.isprintable():
            raise Unauthenticated(
                f"X-Nonce must be at most {MAX_NONCE} printable characters",
                code="NONCE_INVALID",
                field=NONCE_HEADER,
            )
        if len(timestamp) > 12 or not timestamp.isdigit():
            raise Unauthenticated(
                "X-Timestamp must be Unix time in seconds",
                code="TIMESTAMP_INVALID",
                field=TIMESTAMP_HEADER,
            )
        sent_at = int(timestamp)
        if abs(self._clock() - sent_at) > self._skew:
            raise Unauthenticated(
                f"X-Timestamp is more than {self._skew} s from now",
                code="TIMESTAMP_STALE",
                field=TIMESTAMP_HEADER,
            )
        target = scope["raw_path"].decode("latin-1") if scope.get("raw_path") else scope["path"]
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        signed = SignedHeaders(
            appid=header(scope, APPID_HEADER),
            openid=header(scope, OPENID_HEADER),
            idempotency_key=header(scope, IDEMPOTENCY_HEADER),
            operator_user=header(scope, OPERATOR_USER_HEADER),
        )

        def verify(credential: Credential) -> None:
            if not signature_matches(
                credential.secret,
                signature,
                method,
                target,
                timestamp,
                nonce,
                body,
                signed,
                accept_v1=self._accept_v1,
            ):
                raise Unauthenticated(
                    "the signature does not match", code="SIGNATURE_INVALID", field=SIGNATURE_HEADER
                )

        return Attempt(
            key_id=key_id,
            verify=verify,
            key_field=KEY_ID_HEADER,
            nonce=f"{key_id}:{nonce}",
            timestamp=sent_at,
        )
