"""Log-in failures counted per account and per source address in Redis; past
the limit within the window, log-in is refused (even with the right password)
until the window ends. A success clears the account's count."""

from __future__ import annotations

import hashlib

from servicekit.redis_client import RedisClient


class LoginThrottle:
    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        *,
        per_account: int,
        per_address: int,
        window_seconds: int,
    ) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:console:login-failures:"
        self.per_account = per_account
        self.per_address = per_address
        self.window_seconds = window_seconds

    def _keys(self, username: str, address: str) -> tuple[str, str]:
        account = hashlib.sha256(username.lower().encode()).hexdigest()
        return self._prefix + "account:" + account, self._prefix + "address:" + address

    async def locked(self, username: str, address: str) -> bool:
        account_key, address_key = self._keys(username, address)
        # Two GETs, not one MGET: the account and the address are different
        # subjects, so on a Redis Cluster their keys live in different slots.
        account = await self._redis.get(account_key)
        by_address = await self._redis.get(address_key)
        return int(account or 0) >= self.per_account or int(by_address or 0) >= self.per_address

    async def failed(self, username: str, address: str) -> None:
        # One MULTI per key (each key is its own cluster slot).
        for key in self._keys(username, address):
            async with self._redis.pipeline(transaction=True) as pipe:
                # The window starts at the first failure: SET NX gives the key its
                # TTL only when it is new, so later failures do not slide it.
                pipe.set(key, 0, ex=self.window_seconds, nx=True)
                pipe.incr(key)
                await pipe.execute()

    async def succeeded(self, username: str, address: str) -> None:
        account_key, _ = self._keys(username, address)
        await self._redis.delete(account_key)
