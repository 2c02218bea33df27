"""The caller's side, for Python integrators, tools and tests: sign HTTP
requests (an httpx Auth) and attach a POS store key (a grpc.aio interceptor).
docs/api.md shows the same in curl and grpcurl."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

import grpc
import httpx

from .crypto import sign
from .http import KEY_ID_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class HmacAuth(httpx.Auth):
    """Signs every request; gives mutating requests an Idempotency-Key unless
    the caller set one (set your own to make a retry replay the first answer)."""

    requires_request_body = True

    def __init__(self, key_id: str, secret: str, *, clock: Callable[[], float] = time.time) -> None:
        self.key_id = key_id
        self.secret = secret
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if request.method in MUTATING and "idempotency-key" not in request.headers:
            request.headers["Idempotency-Key"] = str(uuid.uuid4())
        timestamp = str(int(self._clock()))
        nonce = secrets.token_hex(16)
        target = request.url.raw_path.decode("ascii")
        request.headers[KEY_ID_HEADER] = self.key_id
        request.headers[TIMESTAMP_HEADER] = timestamp
        request.headers[NONCE_HEADER] = nonce
        request.headers[SIGNATURE_HEADER] = sign(
            self.secret, request.method, target, timestamp, nonce, request.content
        )
        yield request


class StoreKeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds x-store-id and x-api-key to every call on the channel."""

    def __init__(self, store_id: str, api_key: str) -> None:
        self._metadata = (("x-store-id", store_id), ("x-api-key", api_key))

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        metadata = tuple(client_call_details.metadata or ()) + self._metadata
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request)
