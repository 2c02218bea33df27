"""The mini-program's member assertion.

A mini-program backend (scope member:self, not member:any) acts for one
member per request: the one it asserts with `X-Member-Openid` and
`X-Member-Appid` (the openid is per app). The gateway resolves that openid
through the member service (ResolveMember, read-only) and requires the
request's {member_id} to be that member or a member merged into it.

Both answers are cached briefly (a member-centre page makes several calls in
a row), tagged with the member service's identity epoch: a Redis counter the
member service bumps around every commit of a merge, unmerge or erasure
(services/member/cache.py). Each request reads the epoch (one GET) and uses
an entry only if it was filled under the current epoch, so a split or an
erasure takes effect on the next request. Without Redis nothing is served
from these caches (every request asks the member service).

A mini-program backend speaks only for its registered WeChat apps: an
assertion for another app is refused (APP_NOT_BOUND) before any lookup.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

import grpc
from cachetools import TTLCache
from redis.exceptions import RedisError

from loyalty.member.v1 import member_pb2
from servicekit.errors import DomainError, PermissionDenied
from servicekit.redis_client import RedisClient

from ..clients import Downstreams
from ..errors import DownstreamError
from .model import ClientKind, Credential

log = logging.getLogger(__name__)

OPENID_HEADER = "x-member-openid"
# What the member service answers for an openid that names nobody (or junk).
_NOT_A_MEMBER = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
)
APPID_HEADER = "x-member-appid"


def identity_epoch_key(namespace: str) -> str:
    """The member service's identity epoch (services/member/cache.py bumps it;
    the same name there)."""
    return f"{namespace}:member:identity-epoch"


# The identity epoch the door's admission script read for this request, as
# (key, value) (gateway/ratelimit.py, one Redis only): the member checks of the
# same request use it instead of a GET of their own. Set by every sign-in (None
# when not read); each request is its own task, so it never outlives one.
admitted_identity_epoch: ContextVar[tuple[str, bytes] | None] = ContextVar(
    "admitted_identity_epoch", default=None
)


class IdentityEpoch:
    """Reads the identity epoch, the tag of every member answer the gateway
    caches (these assertions, the POS member check in gateway/known_members.py).
    None when it cannot be read: then no cached answer is trusted. After a
    failed read, the next `skip_after_failure` seconds do not try Redis, so a
    hanging Redis costs one call its timeout, not every call."""

    def __init__(
        self, redis: RedisClient | None, namespace: str, skip_after_failure: float = 0.0
    ) -> None:
        self._redis = redis
        self._key = identity_epoch_key(namespace)
        self._skip_after_failure = skip_after_failure
        self._skip_until = 0.0

    async def read(self) -> bytes | None:
        if self._redis is None or time.monotonic() < self._skip_until:
            return None
        admitted = admitted_identity_epoch.get()
        if admitted is not None and admitted[0] == self._key:
            # Read by this request's admission, before any member answer the
            # handler asks for: as current as a GET here (docs/operations.md).
            return admitted[1]
        try:
            value = await self._redis.get(self._key)
        except (RedisError, OSError) as exc:
            self._skip_until = time.monotonic() + self._skip_after_failure
            log.warning("identity epoch unreadable, cached member answers not used: %r", exc)
            return None
        return value.encode() if isinstance(value, str) else (value or b"0")


class MemberAssertions:
    def __init__(
        self,
        downstreams: Downstreams,
        ttl_seconds: float = 60.0,
        *,
        redis: RedisClient | None = None,
        namespace: str = "loyalty",
    ) -> None:
        self._down = downstreams
        # Values are (epoch they were filled under, answer).
        self._by_openid: TTLCache[tuple[str, str], tuple[bytes, str]] = TTLCache(
            100_000, ttl_seconds
        )
        self._root_of: TTLCache[str, tuple[bytes, str]] = TTLCache(100_000, ttl_seconds)
        self._epoch = IdentityEpoch(redis, namespace).read

    async def asserted(self, app_id: str, openid: str, credential: Credential | None = None) -> str:
        """The member id the caller asserts; PermissionDenied when it names none."""
        if not app_id.strip() or not openid.strip():
            raise PermissionDenied(
                "this route acts for one member: send X-Member-Appid and X-Member-Openid",
                code="MEMBER_ASSERTION_REQUIRED",
                field=OPENID_HEADER,
            )
        if (
            credential is not None
            and credential.kind is ClientKind.MINIPROGRAM_BACKEND
            and app_id not in credential.app_ids
        ):
            raise PermissionDenied(
                f"client {credential.client_id} is not registered for app {app_id}",
                code="APP_NOT_BOUND",
                field=APPID_HEADER,
            )
        epoch = await self._epoch()
        cache_key = (app_id, openid)
        cached = self._by_openid.get(cache_key)
        member_id = (
            cached[1] if cached is not None and epoch is not None and cached[0] == epoch else None
        )
        if member_id is None:
            identifier = member_pb2.Identifier(
                type=member_pb2.IDENTIFIER_TYPE_WECHAT_OPENID, value=openid, namespace=app_id
            )
            try:
                member = await self._down.member.resolve_member(identifier)
            except DownstreamError as exc:
                if exc.status in _NOT_A_MEMBER:
                    raise PermissionDenied(
                        "the asserted openid belongs to no member",
                        code="MEMBER_MISMATCH",
                        field=OPENID_HEADER,
                    ) from None
                raise
            member_id = member.member_id
            if epoch is not None:
                self._by_openid[cache_key] = (epoch, member_id)
        return member_id

    async def require_same(self, path_member_id: str, asserted: str) -> None:
        """The path's member is the asserted one, or was merged into it."""
        if path_member_id == asserted:
            return
        epoch = await self._epoch()
        cached = self._root_of.get(path_member_id)
        root = (
            cached[1] if cached is not None and epoch is not None and cached[0] == epoch else None
        )
        if root is None:
            try:
                root = (await self._down.member.get_member(path_member_id)).member_id
            except DomainError as exc:
                if exc.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                    raise
                # Unknown, erased or malformed: to this caller simply not its member.
                root = ""
            if epoch is not None:
                self._root_of[path_member_id] = (epoch, root)
        if root != asserted:
            raise PermissionDenied(
                "the request names another member than the one asserted",
                code="MEMBER_MISMATCH",
                field="member_id",
            )
