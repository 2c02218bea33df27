"""The one sign-in sequence, shared by HTTP request signing, bearer tokens,
the token route and the POS key check (docs/api.md "Authentication").

In this order, so that nothing is written and no budget of a real client is
spent for a caller that has not proven who it is:

1. the source's failed-sign-in budget (in process, bounded): a source that
   keeps failing is refused before any work (429 AUTH_FAILURES_LIMITED);
2. parse and bound what was sent (the caller's `parse`): missing or
   oversized headers are refused before any lookup;
3. look the key up in the credential cache, reloading it when the revocation
   epoch moved (a Redis read, never a write);
4. verify the proof (signature, secret, store key) against that key;
5. only then, in one Redis round trip for the verified principal: the nonce
   store's epoch, the nonce, the client's (and store's) bucket, the
   revocation epoch.

Every refusal in 2-4 spends one token of the source's budget. When Redis does
not answer in step 5, a call that needs a nonce (a signed HTTP request) is
refused with 503 NONCE_STORE_UNAVAILABLE; one that does not (POS, bearer,
token route) is admitted on the cached credential and a per-instance bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from servicekit.errors import PermissionDenied, Unavailable

from ..ratelimit import (
    NONCE_BEFORE_EPOCH,
    NONCE_FRESH,
    NONCE_REPLAYED,
    Gatekeeper,
    Limit,
    LocalBuckets,
    StoreUnreachable,
    Verdict,
)
from .members import admitted_identity_epoch
from .model import Credential, RateLimited, Unauthenticated
from .registry import CredentialRegistry

# Documented bounds (docs/api.md): refused before any lookup.
MAX_KEY_ID = 64
MAX_NONCE = 128


@dataclass(frozen=True)
class Attempt:
    """What a caller presented, parsed and bounded."""

    key_id: str
    # Raises Unauthenticated / PermissionDenied when the credential does not
    # prove this call (wrong signature or secret, another store's key, ...).
    verify: Callable[[Credential], None]
    key_field: str
    # Signed HTTP requests only: the nonce (already scoped by key id) and X-Timestamp.
    nonce: str = ""
    timestamp: int = 0
    # POS: its store's bucket is charged too.
    store_id: str = ""


@dataclass(frozen=True)
class SignInSettings:
    nonce_ttl_ms: int
    kind_limits: dict[str, Limit]
    store_limit: Limit
    # Failed sign-ins per source address.
    failure_limit: Limit

    def limit_of(self, credential: Credential) -> Limit:
        if credential.rate_per_second is not None and credential.burst is not None:
            return Limit(credential.rate_per_second, credential.burst)
        return self.kind_limits[credential.kind.value]


def unknown_key(registry: CredentialRegistry, key_id: str, field: str) -> Unauthenticated:
    revoked = registry.was_revoked(key_id)
    return Unauthenticated(
        "this key was revoked" if revoked else "unknown key",
        code="KEY_REVOKED" if revoked else "KEY_UNKNOWN",
        field=field,
    )


def bound_key_id(key_id: str, field: str) -> str:
    if not key_id or len(key_id) > MAX_KEY_ID or not key_id.isprintable():
        raise Unauthenticated(
            f"the key id must be 1 to {MAX_KEY_ID} printable characters",
            code="KEY_ID_INVALID",
            field=field,
        )
    return key_id


class SignIn:
    def __init__(
        self,
        registry: CredentialRegistry,
        gatekeeper: Gatekeeper,
        settings: SignInSettings,
        *,
        failures: LocalBuckets | None = None,
        fallback: LocalBuckets | None = None,
    ) -> None:
        self._registry = registry
        self._gate = gatekeeper
        self.settings = settings
        self._failures = failures if failures is not None else LocalBuckets()
        # Per-instance buckets while Redis is unreachable.
        self._fallback = fallback if fallback is not None else LocalBuckets()

    async def sign_in(self, source: str, parse: Callable[[], Attempt]) -> Credential:
        wait = self._failures.wait_ms(source, self.settings.failure_limit)
        if wait:
            raise RateLimited(
                "too many failed sign-ins from this address; retry later",
                retry_after_ms=wait,
                code="AUTH_FAILURES_LIMITED",
            )
        try:
            attempt = parse()
            credential = await self._verified(attempt)
        except (Unauthenticated, PermissionDenied):
            self._failures.spend(source, self.settings.failure_limit)
            raise
        return await self._admit(credential, attempt)

    async def _verified(self, attempt: Attempt) -> Credential:
        credential = self._registry.get(attempt.key_id)
        if credential is None:
            # A key created since the cache was loaded: the epoch says so (a read).
            await self._registry.ensure_current(await self._gate.current_epoch())
            credential = self._registry.get(attempt.key_id)
        if credential is None:
            raise unknown_key(self._registry, attempt.key_id, attempt.key_field)
        attempt.verify(credential)
        return credential

    async def _admit(self, credential: Credential, attempt: Attempt) -> Credential:
        s = self.settings
        limit = s.limit_of(credential)
        store_limit = s.store_limit if attempt.store_id else None
        try:
            verdict = await self._gate.admit(
                credential.client_id,
                limit,
                nonce=attempt.nonce,
                nonce_ttl_ms=s.nonce_ttl_ms,
                timestamp=attempt.timestamp,
                store_id=attempt.store_id,
                store_limit=store_limit,
            )
        except StoreUnreachable:
            verdict = self._admit_locally(credential, attempt, limit, store_limit)
        admitted_identity_epoch.set(
            None
            if verdict.identity_epoch is None or self._gate.identity_key is None
            else (self._gate.identity_key, verdict.identity_epoch)
        )
        if not self._registry.is_current(verdict.epoch):
            # Revoked meanwhile? The cache follows the epoch (or, without
            # Redis, its maximum age), then the key is looked up again.
            await self._registry.ensure_current(verdict.epoch)
            found = self._registry.get(attempt.key_id)
            if found is None:
                raise unknown_key(self._registry, attempt.key_id, attempt.key_field)
            credential = found
        if verdict.nonce == NONCE_REPLAYED:
            raise Unauthenticated(
                "this nonce was already used", code="NONCE_REPLAYED", field="x-nonce"
            )
        if verdict.nonce == NONCE_BEFORE_EPOCH:
            raise Unauthenticated(
                "the gateway's nonce store was reset after this request was signed; "
                "sign it again with the current time",
                code="NONCE_STORE_RESET",
                field="x-timestamp",
            )
        if not verdict.allowed:
            what = f"store {attempt.store_id}" if attempt.store_id else "client"
            raise RateLimited(
                f"rate limit of {what} {credential.client_id} reached; retry later",
                retry_after_ms=verdict.retry_after_ms,
            )
        return credential

    def _admit_locally(
        self, credential: Credential, attempt: Attempt, limit: Limit, store_limit: Limit | None
    ) -> Verdict:
        if attempt.nonce:
            # Without the shared nonce store a replay could not be recognised: fail closed.
            raise Unavailable(
                "the gateway cannot check request nonces right now; retry later",
                code="NONCE_STORE_UNAVAILABLE",
            )
        pairs = [(f"client:{credential.client_id}", limit)]
        if store_limit is not None:
            pairs.append((f"store:{attempt.store_id}", store_limit))
        return Verdict(NONCE_FRESH, self._fallback.take(pairs), None)
