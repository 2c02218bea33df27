"""Provider access tokens shared by every replica, in Redis (`TokenCache`):
read from Redis, refreshed before they expire, one refresh at a time across
replicas, forced after a token errcode. Provider-agnostic: engagement's WeChat
and WeCom providers and guides' WeCom client (through servicekit/wecom.py)
use it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx

from .redis_client import RedisClient


class Clock(Protocol):
    def now(self) -> datetime: ...


# errcodes (WeChat's and WeCom's alike) that mean the access token is no good:
# refresh once, call again.
TOKEN_ERRCODES = frozenset({40001, 40014, 42001})


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # epoch seconds, of the service clock


TokenFetch = Callable[[bool], Awaitable[tuple[str, int]]]


class TokenError(Exception):
    """The provider refused to issue a token (bad app id or secret, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class TokenCache:
    """One provider access token for every replica, in Redis.

    Read from Redis; refreshed `margin` before it expires; one refresh at a
    time across replicas (a Redis lock, SET NX with a time-out): the others
    wait for the new token to appear instead of asking the provider, which
    would invalidate each other's tokens (WeChat's stable token with
    force_refresh does). `refresh(stale)` after a 40001/42001 replaces the
    token only if it is still the one that failed."""

    def __init__(
        self,
        redis: RedisClient,
        key: str,
        fetch: TokenFetch,
        clock: Clock,
        margin: timedelta = timedelta(minutes=5),
        lock_ttl: timedelta = timedelta(seconds=15),
        poll: float = 0.02,
    ) -> None:
        self._redis = redis
        self._key = key
        self._lock_key = f"{key}:lock"
        self._fetch = fetch
        self._clock = clock
        self._margin = margin.total_seconds()
        self._lock_ttl_ms = int(lock_ttl.total_seconds() * 1000)
        self._poll = poll
        self._local = asyncio.Lock()
        # This process's copy, so a send costs no Redis round trip; a token
        # another replica replaced is noticed by its 40001 (refresh reads Redis).
        self._memo: Token | None = None
        # How many tokens this replica fetched (tests, metrics).
        self.fetches = 0

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def _cached(self) -> Token | None:
        raw = await self._redis.get(self._key)
        if raw is None:
            return None
        data = json.loads(raw)
        return Token(str(data["token"]), float(data["expires_at"]))

    def _fresh(self, token: Token | None) -> bool:
        return token is not None and token.expires_at - self._margin > self._now()

    async def get(self) -> str:
        if self._memo is not None and self._fresh(self._memo):
            return self._memo.value
        async with self._local:  # one Redis read per process, not one per send
            if self._memo is not None and self._fresh(self._memo):
                return self._memo.value
            found = await self._cached()
            if found is not None and self._fresh(found):
                self._memo = found
                return found.value
            return await self._refresh_locked(found.value if found else None, force=False)

    async def refresh(self, stale: str | None, force: bool = True) -> str:
        """A token other than `stale`: the cached one if another task or replica
        already replaced it, else a new one from the provider (one replica at a time)."""
        async with self._local:  # the process's other tasks queue here
            memo = self._memo
            if memo is not None and memo.value != stale and self._fresh(memo):
                return memo.value
            return await self._refresh_locked(stale, force)

    async def _refresh_locked(self, stale: str | None, force: bool) -> str:
        # Waiting is measured on the event loop's clock (the service clock may be a fake).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_ttl_ms / 1000 * 2
        while True:
            found = await self._cached()
            if found is not None and found.value != stale and self._fresh(found):
                self._memo = found
                return found.value
            me = secrets.token_hex(8)
            if await self._redis.set(self._lock_key, me, nx=True, px=self._lock_ttl_ms):
                try:
                    found = await self._cached()
                    if found is not None and found.value != stale and self._fresh(found):
                        self._memo = found
                        return found.value
                    value, expires_in = await self._fetch(force and stale is not None)
                    self.fetches += 1
                    token = Token(value, self._now() + expires_in)
                    stored = {"token": value, "expires_at": token.expires_at}
                    await self._redis.set(self._key, json.dumps(stored), ex=max(1, expires_in))
                    self._memo = token
                    return value
                finally:
                    await self._release(me)
            if loop.time() > deadline:
                raise TokenError("TOKEN_LOCK_TIMEOUT", "no replica finished refreshing")
            await asyncio.sleep(self._poll)

    async def _release(self, me: str) -> None:
        # Delete the lock only if it is still ours (it may have timed out).
        await self._redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1])"
            " end return 0",
            1,
            self._lock_key,
            me,
        )


async def response_json(reply: httpx.Response) -> dict[str, Any] | None:
    """The reply's JSON object, or None (not JSON, or not an object)."""
    try:
        data = reply.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
