"""Protobuf helpers every context's servicer shares: page bounds and cursors,
optional timestamps."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from servicekit.errors import InvalidArgument
from servicekit.protos import timestamp, to_datetime

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def page(size: int, cursor: str) -> tuple[int, int | None]:
    size = size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be between 1 and {MAX_PAGE_SIZE}",
            code="INVALID_PAGE_SIZE",
            field="page_size",
        )
    if not cursor:
        return size, None
    if not cursor.isdigit() or len(cursor) > 18:
        raise InvalidArgument(
            "cursor is not one this API returned", code="INVALID_CURSOR", field="cursor"
        )
    return size, int(cursor)


def optional_time(message: Any, field: str) -> datetime | None:
    return to_datetime(getattr(message, field)) if message.HasField(field) else None


def set_time(message: Any, field: str, value: datetime | None) -> None:
    """Set a Timestamp field only when there is a value (unset stays unset)."""
    if value is not None:
        getattr(message, field).CopyFrom(timestamp(value))
