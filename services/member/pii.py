"""Personal data at rest: keyed hashes for lookup, AES-GCM for the value.

Encryption keys rotate: every ciphertext starts with the id of the key that
sealed it, new values are sealed with the active key, and older keys stay
configured (decrypt only) until `ReencryptPii` has moved every row over.
The lookup hash key does not rotate with them: it is derived from PII_KEY,
and changing it would orphan every stored hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The key derived from PII_KEY itself; always configured.
BASE_KEY_ID = "k0"
_FORMAT = b"\x01"


class PiiKeyError(ValueError):
    """A key is malformed, or a ciphertext names a key that is not configured."""


def _decode_key(key_b64: str, name: str) -> bytes:
    try:
        key = base64.b64decode(key_b64, validate=True)
    except ValueError:
        raise PiiKeyError(f"{name} is not base64") from None
    if len(key) != 32:
        raise PiiKeyError(f"{name} must be 32 bytes, base64-encoded")
    return key


def parse_keyring(spec: str) -> dict[str, str]:
    """ "k1:BASE64,k2:BASE64" -> {"k1": "BASE64", "k2": "BASE64"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key_id, sep, key_b64 = part.partition(":")
        if not sep or not key_id.strip() or len(key_id.strip()) > 32:
            raise PiiKeyError("PII_ENCRYPTION_KEYS entries look like id:base64key")
        out[key_id.strip()] = key_b64.strip()
    return out


class PiiVault:
    def __init__(
        self,
        key_b64: str,
        extra_keys: dict[str, str] | None = None,
        active_key_id: str = BASE_KEY_ID,
    ) -> None:
        key = _decode_key(key_b64, "PII_KEY")
        # Separate derived keys: a hash never reveals a cipher key, and the
        # suppression list cannot be joined to the lookup hashes.
        self._hash_key = hmac.new(key, b"lookup-hash", hashlib.sha256).digest()
        self._suppression_key = hmac.new(key, b"suppression-hash", hashlib.sha256).digest()
        self._keys: dict[str, AESGCM] = {
            BASE_KEY_ID: AESGCM(hmac.new(key, b"encryption", hashlib.sha256).digest())
        }
        for key_id, extra in (extra_keys or {}).items():
            if key_id == BASE_KEY_ID:
                raise PiiKeyError(f"key id {BASE_KEY_ID} is reserved for PII_KEY")
            self._keys[key_id] = AESGCM(_decode_key(extra, f"PII key {key_id}"))
        if active_key_id not in self._keys:
            raise PiiKeyError(f"active PII key {active_key_id!r} is not configured")
        self.active_key_id = active_key_id

    def lookup_hash(self, text: str) -> bytes:
        return hmac.new(self._hash_key, text.encode(), hashlib.sha256).digest()

    def suppression_hash(self, text: str) -> bytes:
        return hmac.new(self._suppression_key, text.encode(), hashlib.sha256).digest()

    def encrypt(self, text: str) -> bytes:
        key_id = self.active_key_id.encode()
        nonce = os.urandom(12)
        header = _FORMAT + bytes([len(key_id)]) + key_id
        # The header is authenticated: a ciphertext cannot be relabelled.
        return header + nonce + self._keys[self.active_key_id].encrypt(nonce, text.encode(), header)

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        if not blob or blob[:1] != _FORMAT:
            raise PiiKeyError("unknown ciphertext format")
        return blob[2 : 2 + blob[1]].decode()

    def decrypt(self, blob: bytes) -> str:
        key_id = self.key_id_of(blob)
        aead = self._keys.get(key_id)
        if aead is None:
            raise PiiKeyError(f"PII key {key_id!r} is not configured")
        header_len = 2 + blob[1]
        header, nonce, sealed = (
            blob[:header_len],
            blob[header_len : header_len + 12],
            blob[header_len + 12 :],
        )
        return aead.decrypt(nonce, sealed, header).decode()
