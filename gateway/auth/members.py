"""The mini-program's member assertion.

A mini-program backend (scope member:self, not member:any) acts for one
member per request: the one it asserts with `X-Member-Openid` and
`X-Member-Appid` (the openid is per app). The gateway resolves that openid
through the member service (ResolveMember, read-only) and requires the
request's {member_id} to be that member or a member merged into it.

Both answers are cached briefly: a member-centre page makes several calls in
a row, and an openid's owner changes only by merge (the survivor still
matches) or erasure (refused by the member service within the TTL).
"""

from __future__ import annotations

import grpc
from cachetools import TTLCache

from loyalty.member.v1 import member_pb2
from servicekit.errors import DomainError, PermissionDenied

from ..clients import Downstreams
from ..errors import DownstreamError

OPENID_HEADER = "x-member-openid"
# What the member service answers for an openid that names nobody (or junk).
_NOT_A_MEMBER = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
)
APPID_HEADER = "x-member-appid"


class MemberAssertions:
    def __init__(self, downstreams: Downstreams, ttl_seconds: float = 60.0) -> None:
        self._down = downstreams
        self._by_openid: TTLCache[tuple[str, str], str] = TTLCache(100_000, ttl_seconds)
        self._root_of: TTLCache[str, str] = TTLCache(100_000, ttl_seconds)

    async def asserted(self, app_id: str, openid: str) -> str:
        """The member id the caller asserts; PermissionDenied when it names none."""
        if not app_id.strip() or not openid.strip():
            raise PermissionDenied(
                "this route acts for one member: send X-Member-Appid and X-Member-Openid",
                code="MEMBER_ASSERTION_REQUIRED",
                field=OPENID_HEADER,
            )
        cache_key = (app_id, openid)
        member_id = self._by_openid.get(cache_key)
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
            self._by_openid[cache_key] = member_id
        return member_id

    async def require_same(self, path_member_id: str, asserted: str) -> None:
        """The path's member is the asserted one, or was merged into it."""
        if path_member_id == asserted:
            return
        root = self._root_of.get(path_member_id)
        if root is None:
            try:
                root = (await self._down.member.get_member(path_member_id)).member_id
            except DomainError as exc:
                if exc.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                    raise
                # Unknown, erased or malformed: to this caller simply not its member.
                root = ""
            self._root_of[path_member_id] = root
        if root != asserted:
            raise PermissionDenied(
                "the request names another member than the one asserted",
                code="MEMBER_MISMATCH",
                field="member_id",
            )
