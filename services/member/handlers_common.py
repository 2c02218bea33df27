"""What every use case of the member service shares: the base class holding
the PII vault, the identity policy, the member-code secret and the service's
clock, resolving a member id to its live root, the input checks (required
text, page size and token, member ids), and LostRace, which makes the
servicer retry a transaction whose reads moved before it could lock them.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from servicekit.db import Connection
from servicekit.errors import (
    InvalidArgument,
    NotFound,
)

from . import repository as repo
from .pii import PiiVault
from .policy import IdentityPolicy
from .repository import MemberRecord

MAX_TEXT = 128


class LostRace(Exception):
    """What the call read moved before it could lock it: the servicer retries
    the whole transaction."""


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def required_text(value: str, field_name: str, limit: int = MAX_TEXT) -> str:
    text = value.strip()
    if not text:
        raise InvalidArgument(
            f"{field_name} is required", code=f"{field_name.upper()}_REQUIRED", field=field_name
        )
    if len(text) > limit:
        raise InvalidArgument(
            f"{field_name} is longer than {limit} characters",
            code="VALUE_TOO_LONG",
            field=field_name,
        )
    return text


def page_limit(page_size: int, default: int) -> int:
    """A list call's page size: 0 means the default, at most 500."""
    if page_size < 0 or page_size > 500:
        raise InvalidArgument("page_size is 0..500", code="INVALID_PAGE_SIZE", field="page_size")
    return page_size or default


def bad_page_token() -> InvalidArgument:
    return InvalidArgument(
        "page_token is not one this API returned", code="INVALID_PAGE_TOKEN", field="page_token"
    )


def encode_page_token(boundary: list[str]) -> str:
    """An opaque page token carrying the last row's key (JSON inside: a
    namespace may hold any character)."""
    return base64.urlsafe_b64encode(json.dumps(boundary).encode()).decode()


def decode_page_token(token: str, size: int) -> list[str]:
    """The key an encode_page_token() carried; INVALID_PAGE_TOKEN for anything else."""
    try:
        values = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError, binascii.Error):
        raise bad_page_token() from None
    if not isinstance(values, list) or len(values) != size:
        raise bad_page_token()
    return [str(v) for v in values]


def parse_member_id(member_id: str, field_name: str = "member_id") -> str:
    try:
        return str(uuid.UUID(member_id))
    except ValueError:
        raise InvalidArgument(
            f"{field_name} is not a member id", code="INVALID_MEMBER_ID", field=field_name
        ) from None


class HandlersBase:
    def __init__(
        self,
        vault: PiiVault,
        policy: IdentityPolicy,
        code_secret: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._vault = vault
        self.policy = policy
        self._code_secret = code_secret
        self._clock = clock

    def now(self) -> datetime:
        """The service's clock: every time the service writes and compares comes
        from here, never from the database's now()."""
        return datetime.fromtimestamp(self._clock(), UTC)

    async def _live_root(
        self, conn: Connection, member_id: str, field_name: str = "member_id"
    ) -> str:
        resolved = await repo.resolve(conn, parse_member_id(member_id, field_name))
        if resolved is None:
            raise NotFound(
                f"member {member_id} does not exist", code="UNKNOWN_MEMBER", field=field_name
            )
        root, status = resolved
        if status == "erased":
            raise NotFound(f"member {member_id} was erased", code="MEMBER_ERASED", field=field_name)
        return root

    async def _member(self, conn: Connection, member_id: str) -> MemberRecord:
        member = await repo.get_member(conn, member_id)
        assert member is not None, "a resolved member id must exist"
        return member
