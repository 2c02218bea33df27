"""Every active credential, in memory: the happy path never touches Postgres.

The cache is reloaded when the revocation epoch (a Redis counter bumped by
every create / rotate / revoke, read in the same round trip as the nonce and
rate limit) differs from the one it was loaded at, and at least every
`max_age_seconds` in case an epoch bump was lost. So a revocation takes effect
on the next request on every gateway instance.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg

from servicekit.errors import Unavailable

from . import repository as repo
from .crypto import SecretBox
from .model import ClientKind, Credential

log = logging.getLogger(__name__)

# What a dropped, refused or exhausted database connection raises.
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# After a failed reload, the cache in hand serves this long before the next try.
RELOAD_RETRY_SECONDS = 1.0


class CredentialRegistry:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox, max_age_seconds: float = 30.0) -> None:
        self._pool = pool
        self._box = box
        self._max_age = max_age_seconds
        self._credentials: dict[str, Credential] = {}
        self._revoked: frozenset[str] = frozenset()
        # None: loaded while Redis could not tell the epoch (reloaded once it can).
        self._epoch: int | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    def get(self, key_id: str) -> Credential | None:
        return self._credentials.get(key_id)

    def was_revoked(self, key_id: str) -> bool:
        return key_id in self._revoked

    def is_current(self, epoch: int | None) -> bool:
        """`epoch` None: Redis could not say; the cache serves up to its maximum age."""
        fresh = time.monotonic() - self._loaded_at < self._max_age
        return fresh and (epoch is None or epoch == self._epoch)

    async def ensure_current(self, epoch: int | None) -> None:
        if self.is_current(epoch):
            return
        async with self._lock:
            if self.is_current(epoch):  # another request reloaded meanwhile
                return
            try:
                await self._load(epoch)
            except DATABASE_ERRORS as exc:
                if self._loaded_at and (epoch is None or epoch == self._epoch):
                    # Only the maximum age passed: nothing is known to have
                    # changed, so the cache in hand keeps serving for a moment.
                    log.warning("credential reload failed, serving the cache: %r", exc)
                    self._loaded_at = time.monotonic() - self._max_age + RELOAD_RETRY_SECONDS
                    return
                # A key may have been created or revoked: no stale answer.
                log.warning("credential reload failed: %r", exc)
                raise Unavailable(
                    "the gateway cannot load credentials right now; retry later",
                    code="DEPENDENCY_UNAVAILABLE",
                ) from None

    async def _load(self, epoch: int | None) -> None:
        async with self._pool.acquire() as conn:
            rows = await repo.active_keys(conn)
            revoked = await repo.revoked_key_ids(conn)
        credentials = {}
        for row in rows:
            credentials[row.key_id] = Credential(
                key_id=row.key_id,
                client_id=row.client_id,
                kind=ClientKind(row.kind),
                store_id=row.store_id,
                scopes=frozenset(row.scopes),
                secret=self._box.open(row.key_id, row.secret_cipher),
                rate_per_second=row.rate_per_second,
                burst=row.burst,
                app_ids=frozenset(row.app_ids),
            )
        self._credentials = credentials
        self._revoked = frozenset(revoked)
        self._epoch = epoch
        self._loaded_at = time.monotonic()
        log.info("credentials loaded: %d active keys (epoch %s)", len(credentials), epoch)
