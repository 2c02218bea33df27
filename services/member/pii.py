"""Personal data at rest: keyed hashes for lookup, AES-GCM for the value."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


class PiiVault:
    def __init__(self, key_b64: str) -> None:
        key = base64.b64decode(key_b64)
        if len(key) != 32:
            raise ValueError("PII_KEY must be 32 bytes, base64-encoded")
        # Separate derived keys: the lookup hash never reveals the cipher key.
        self._hash_key = hmac.new(key, b"lookup-hash", hashlib.sha256).digest()
        self._aead = AESGCM(hmac.new(key, b"encryption", hashlib.sha256).digest())

    def lookup_hash(self, text: str) -> bytes:
        return hmac.new(self._hash_key, text.encode(), hashlib.sha256).digest()

    def encrypt(self, text: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, text.encode(), None)

    def decrypt(self, blob: bytes) -> str:
        return self._aead.decrypt(blob[:12], blob[12:], None).decode()
