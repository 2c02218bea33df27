"""Browser sessions in Redis: an opaque random id in the cookie, only its hash
as the key, the CSRF token inside. A session ends after an idle time-out and
an absolute one, both judged by the injected clock (tests move it); Redis'
own TTL only cleans up. Log-in always starts a new id (no fixation).
Each operator's signed-in sessions are also listed in a set of their own, so
`python -m console users disable` (and reset-password) can end them at once."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from servicekit.redis_client import RedisClient

COOKIE = "console_session"


@dataclass
class Session:
    session_id: str
    csrf_token: str
    created_at: float
    last_seen_at: float
    # Empty before log-in: the anonymous session only carries the log-in form's CSRF token.
    username: str = ""
    roles: tuple[str, ...] = ()
    locale: str = ""
    # Set at log-in for a one-time password: every page asks for a new password first.
    must_change_password: bool = False

    @property
    def signed_in(self) -> bool:
        return bool(self.username)


class SessionStore:
    def __init__(
        self,
        redis: RedisClient,
        namespace: str,
        *,
        idle_seconds: int,
        absolute_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = f"{namespace}:console:session:"
        self._by_user = f"{namespace}:console:operator-sessions:"
        self.idle_seconds = idle_seconds
        self.absolute_seconds = absolute_seconds
        self._clock = clock

    def _key(self, session_id: str) -> str:
        return self._prefix + hashlib.sha256(session_id.encode()).hexdigest()

    async def new(self, **fields: object) -> Session:
        now = self._clock()
        session = Session(
            session_id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            **fields,  # type: ignore[arg-type]
        )
        await self.save(session)
        if session.username:
            # Listed under its operator; the set outlives its newest session
            # by no more than one absolute time-out.
            index = self._by_user + session.username
            await self._redis.sadd(index, self._key(session.session_id))
            await self._redis.expire(index, self.absolute_seconds + 60)
        return session

    async def save(self, session: Session) -> None:
        data = asdict(session)
        del data["session_id"]
        await self._redis.set(
            self._key(session.session_id), json.dumps(data), ex=self.absolute_seconds + 60
        )

    async def end_all(self, username: str) -> int:
        """Deletes every session of this operator; how many were live. One key
        per command: a Redis Cluster puts them in different slots."""
        index = self._by_user + username
        keys = await self._redis.smembers(index)
        ended = 0
        for key in keys:
            ended += await self._redis.delete(key.decode() if isinstance(key, bytes) else key)
        await self._redis.delete(index)
        return ended

    async def load(self, session_id: str) -> Session | None:
        """The live session of this id, its idle clock restarted; None when
        unknown or timed out (then it is deleted)."""
        if not session_id or len(session_id) > 128:
            return None
        raw = await self._redis.get(self._key(session_id))
        if raw is None:
            return None
        data = json.loads(raw)
        data["roles"] = tuple(data["roles"])
        session = Session(session_id=session_id, **data)
        now = self._clock()
        if (
            now - session.last_seen_at > self.idle_seconds
            or now - session.created_at > self.absolute_seconds
        ):
            await self.delete(session_id)
            return None
        session.last_seen_at = now
        await self.save(session)
        return session

    async def delete(self, session_id: str) -> None:
        await self._redis.delete(self._key(session_id))

    async def rotate(self, old: Session | None, **fields: object) -> Session:
        """A fresh id (and CSRF token) for a log-in; the old id stops working."""
        if old is not None:
            await self.delete(old.session_id)
        return await self.new(**fields)
