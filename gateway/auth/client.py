"""The caller's side, for Python integrators, tools and tests: sign HTTP
requests (an httpx Auth) and attach a POS store key (a grpc.aio interceptor).
docs/api.md shows the same in curl and grpcurl.

Also a one-shot signed call from a shell:

    python -m gateway.auth.client --key-id K --secret S GET http://127.0.0.1:8080/v1/admin/points/liability
    python -m gateway.auth.client --key-id K --secret S POST http://.../v1/members/identify --json '{...}'
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Generator
from typing import Any

import grpc
import httpx

from .crypto import SignedHeaders, sign
from .http import KEY_ID_HEADER, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class HmacAuth(httpx.Auth):
    """Signs every request (LOYALTY-HMAC-SHA256-2: the member headers and the
    Idempotency-Key are signed too, so set them before the request is sent);
    gives mutating requests an Idempotency-Key unless the caller set one (set
    your own to make a retry replay the first answer)."""

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
        signed = SignedHeaders(
            appid=request.headers.get("x-member-appid", ""),
            openid=request.headers.get("x-member-openid", ""),
            idempotency_key=request.headers.get("idempotency-key", ""),
            operator_user=request.headers.get("x-operator-user", ""),
        )
        request.headers[SIGNATURE_HEADER] = sign(
            self.secret, request.method, target, timestamp, nonce, request.content, signed
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m gateway.auth.client", description="one signed HTTP call to the gateway"
    )
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--json", default=None, help="request body (JSON text)")
    parser.add_argument("method")
    parser.add_argument("url")
    args = parser.parse_args(argv)
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    if args.json is not None:
        headers.setdefault("Content-Type", "application/json")
    with httpx.Client(auth=HmacAuth(args.key_id, args.secret), timeout=10) as client:
        reply = client.request(
            args.method.upper(),
            args.url,
            content=args.json.encode() if args.json is not None else None,
            headers=headers,
        )
    print(reply.text)
    return 0 if reply.status_code < 400 else 1


if __name__ == "__main__":
    raise SystemExit(main())
