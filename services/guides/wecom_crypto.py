"""WeCom's callback encryption scheme (企业微信回调加解密), pure functions.

- signature: SHA-1 of the sorted concatenation of token, timestamp, nonce and
  the encrypted text, hex;
- key: base64 of the 43-character EncodingAESKey plus "=" (32 bytes), IV = its
  first 16 bytes;
- plaintext: 16 random bytes, the message length (4 bytes, network order), the
  message, the receive id (the corp id); PKCS#7-padded to a multiple of 32
  bytes (WeCom's block size, not AES's 16) and AES-256-CBC encrypted, base64.

AES and padding come from `cryptography`; only the framing is WeCom's own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from servicekit.errors import InvalidArgument, PermissionDenied

# WeCom pads to 32-byte blocks (256 bits); PKCS7(256) pads and checks exactly that.
PAD_BITS = 256


class WeComCrypto:
    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        if len(encoding_aes_key) != 43:
            raise ValueError("the EncodingAESKey must be 43 characters (WeCom's format)")
        self.token = token
        self.key = base64.b64decode(encoding_aes_key + "=")
        if len(self.key) != 32:
            raise ValueError("the EncodingAESKey does not decode to 32 bytes")
        self.receive_id = receive_id

    def signature(self, timestamp: str, nonce: str, encrypted: str) -> str:
        parts = sorted([self.token, timestamp, nonce, encrypted])
        return hashlib.sha1("".join(parts).encode()).hexdigest()

    def verify(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        expected = self.signature(timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected, msg_signature.lower()):
            raise PermissionDenied(
                "the callback signature does not match", code="BAD_SIGNATURE", field="msg_signature"
            )

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.key[:16]))

    def encrypt(self, message: bytes, random16: bytes | None = None) -> str:
        """What WeCom sends (used by the fake and the tests)."""
        body = (random16 or os.urandom(16)) + struct.pack("!I", len(message)) + message
        body += self.receive_id.encode()
        padder = padding.PKCS7(PAD_BITS).padder()
        padded = padder.update(body) + padder.finalize()
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(padded) + encryptor.finalize()).decode()

    def decrypt(self, encrypted: str) -> bytes:
        """The message inside, after checking padding, length and receive id."""
        try:
            raw = base64.b64decode(encrypted, validate=True)
            if not raw or len(raw) % 16:
                raise ValueError("not a whole number of AES blocks")
            decryptor = self._cipher().decryptor()
            padded = decryptor.update(raw) + decryptor.finalize()
            unpadder = padding.PKCS7(PAD_BITS).unpadder()
            body = unpadder.update(padded) + unpadder.finalize()
            (length,) = struct.unpack("!I", body[16:20])
            message, receive_id = body[20 : 20 + length], body[20 + length :]
            if len(message) != length:
                raise ValueError("message length out of range")
        except (ValueError, struct.error) as exc:
            raise InvalidArgument(
                f"the callback body cannot be decrypted: {exc}",
                code="UNDECRYPTABLE_CALLBACK",
                field="Encrypt",
            ) from None
        if receive_id.decode(errors="replace") != self.receive_id:
            raise PermissionDenied(
                "the callback is for another corp (receive id mismatch)",
                code="WRONG_RECEIVER",
                field="Encrypt",
            )
        return message
