"""Key material: ids, secrets, encryption at rest, request signatures.

Only library primitives: `secrets`, stdlib `hmac`/`hashlib`, and AES-GCM from
`cryptography`. A secret is stored encrypted, not hashed, because verifying an
HMAC needs the secret itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Version 2 also signs the headers that change a request's meaning (the member
# it acts for, its Idempotency-Key); version 1 is accepted only behind
# AUTH_ACCEPT_SIGNATURE_V1, for a migration window.
SIGNATURE_ALGORITHM = "LOYALTY-HMAC-SHA256-2"
SIGNATURE_ALGORITHM_V1 = "LOYALTY-HMAC-SHA256"
_NONCE_BYTES = 12


def new_key_id() -> str:
    return f"k_{secrets.token_hex(8)}"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


class SecretBox:
    """AES-256-GCM with the key id as associated data, so a cipher copied onto
    another key's row does not decrypt."""

    def __init__(self, key_b64: str) -> None:
        key = base64.b64decode(key_b64)
        if len(key) != 32:
            raise ValueError("the gateway secret key must be 32 bytes, base64-encoded")
        self._aead = AESGCM(key)

    def seal(self, key_id: str, secret: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), key_id.encode())

    def open(self, key_id: str, blob: bytes) -> str:
        nonce, cipher = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
        return self._aead.decrypt(nonce, cipher, key_id.encode()).decode()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class SignedHeaders:
    """The headers version 2 signs; empty when not sent."""

    appid: str = ""
    openid: str = ""
    idempotency_key: str = ""
    # The console's operator user: it names who is audited, so it is signed too.
    operator_user: str = ""


NO_HEADERS = SignedHeaders()


def string_to_sign(
    method: str,
    path: str,
    timestamp: str,
    nonce: str,
    body: bytes,
    headers: SignedHeaders = NO_HEADERS,
    *,
    version: int = 2,
) -> bytes:
    """What the caller signs: one field a line. `path` is the request target as
    sent: the path and, when present, "?" and the query string. Version 2 adds
    X-Member-Appid, X-Member-Openid, Idempotency-Key and X-Operator-User (empty
    lines when absent)."""
    fields = [method.upper(), path, timestamp, nonce, body_digest(body)]
    if version == 1:
        return "\n".join([SIGNATURE_ALGORITHM_V1, *fields]).encode()
    extra = [headers.appid, headers.openid, headers.idempotency_key, headers.operator_user]
    return "\n".join([SIGNATURE_ALGORITHM, *fields, *extra]).encode()


def sign(
    secret: str,
    method: str,
    path: str,
    timestamp: str,
    nonce: str,
    body: bytes,
    headers: SignedHeaders = NO_HEADERS,
    *,
    version: int = 2,
) -> str:
    message = string_to_sign(method, path, timestamp, nonce, body, headers, version=version)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_matches(
    secret: str,
    signature: str,
    method: str,
    path: str,
    timestamp: str,
    nonce: str,
    body: bytes,
    headers: SignedHeaders = NO_HEADERS,
    *,
    accept_v1: bool = False,
) -> bool:
    presented = signature.strip().lower()
    expected = sign(secret, method, path, timestamp, nonce, body, headers)
    if hmac.compare_digest(expected, presented):
        return True
    if not accept_v1:
        return False
    legacy = sign(secret, method, path, timestamp, nonce, body, version=1)
    return hmac.compare_digest(legacy, presented)


def api_key(key_id: str, secret: str) -> str:
    """A POS presents its key as one string: "<key_id>.<secret>"."""
    return f"{key_id}.{secret}"


def split_api_key(value: str) -> tuple[str, str]:
    key_id, _, secret = value.strip().partition(".")
    return key_id, secret


def api_key_matches(secret: str, presented: str) -> bool:
    return hmac.compare_digest(secret.encode(), presented.encode())
