"""Bearer tokens the gateway issues (`POST /v1/auth/token`) and verifies
without a database: `lt1.<base64url "key_id.expiry">.<hex HMAC-SHA256>`,
keyed with a key derived from AUTH_SECRET_KEY. A token names the key it was
issued for, so revoking the key ends its tokens at once (the credential cache
no longer holds it); otherwise a token lives `TOKEN_TTL_SECONDS`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, Field

from .crypto import api_key_matches
from .model import ClientKind, Credential, Unauthenticated
from .signin import Attempt, SignIn, bound_key_id

PREFIX = "lt1"
_LABEL = b"loyalty gateway bearer tokens v1"


class TokenIssuer:
    def __init__(
        self, secret_key_b64: str, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        # A key of its own, so a token never doubles as anything else signed here.
        self._key = hmac.new(base64.b64decode(secret_key_b64), _LABEL, hashlib.sha256).digest()
        self.ttl_seconds = ttl_seconds
        self._clock = clock

    def _mac(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()

    def issue(self, key_id: str) -> str:
        expires = int(self._clock()) + self.ttl_seconds
        payload = base64.urlsafe_b64encode(f"{key_id}.{expires}".encode()).decode().rstrip("=")
        return f"{PREFIX}.{payload}.{self._mac(payload)}"

    def verify(self, token: str) -> str:
        """The key id a valid, unexpired token was issued for."""
        prefix, _, rest = token.strip().partition(".")
        payload, _, mac = rest.partition(".")
        if prefix != PREFIX or not hmac.compare_digest(self._mac(payload), mac.lower()):
            raise Unauthenticated(
                "the bearer token is not one this gateway issued",
                code="TOKEN_INVALID",
                field="authorization",
            )
        try:
            decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
            key_id, _, expires = decoded.rpartition(".")
            expiry = int(expires)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise Unauthenticated(
                "the bearer token is malformed", code="TOKEN_INVALID", field="authorization"
            ) from None
        if self._clock() >= expiry:
            raise Unauthenticated(
                "the bearer token has expired; ask for a new one",
                code="TOKEN_EXPIRED",
                field="authorization",
            )
        return key_id


class TokenRequest(BaseModel):
    key_id: str = Field(min_length=1, max_length=64, examples=["k_3f9c0a1b2c3d4e5f"])
    secret: str = Field(min_length=1, max_length=256, examples=["the secret printed at creation"])


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = Field(examples=["Bearer"])
    expires_in: int = Field(description="Seconds the token is valid", examples=[900])


def token_router(door: Any) -> APIRouter:
    """`POST /v1/auth/token`: client credentials in, a short-lived bearer token out."""
    router = APIRouter(tags=["auth"])

    @router.post(
        "/v1/auth/token",
        response_model=TokenResponse,
        summary="Exchange a key id and secret for a short-lived bearer token",
    )
    async def token(body: Annotated[TokenRequest, Body()], request: Request) -> TokenResponse:
        def parse() -> Attempt:
            def verify(credential: Credential) -> None:
                if not api_key_matches(credential.secret, body.secret):
                    raise Unauthenticated(
                        "the secret does not match", code="KEY_INVALID", field="secret"
                    )
                if credential.kind is ClientKind.POS:
                    raise Unauthenticated(
                        "a POS authenticates with its store key in call metadata",
                        code="KEY_INVALID",
                        field="key_id",
                    )

            return Attempt(
                key_id=bound_key_id(body.key_id, "key_id"), verify=verify, key_field="key_id"
            )

        # The same sequence as every request (gateway/auth/signin.py): a guessed
        # secret costs the source's failure budget; a right one, the client's bucket.
        signin: SignIn = door.signin
        source = request.client.host if request.client else "unknown"
        credential = await signin.sign_in(source, parse)
        issuer: TokenIssuer = door.tokens
        return TokenResponse(
            access_token=issuer.issue(credential.key_id),
            token_type="Bearer",
            expires_in=issuer.ttl_seconds,
        )

    return router
