"""The operator dashboards' filter as every service reads it: an
`AnalyticsFilter` (common.proto) checked and turned into a `DayRange` (local
days of a zone, both included; the UTC instants bounding them; the stores, or
None for all). Each service's analytics module computes its aggregates in SQL
from a DayRange; the gateway already validated the same bounds, a service
checks them again so the RPC is safe on its own."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loyalty.common.v1 import common_pb2

from .errors import InvalidArgument

MAX_RANGE_DAYS = 366
DEFAULT_TIME_ZONE = "Asia/Shanghai"


@dataclass(frozen=True)
class DayRange:
    first: date
    last: date
    time_zone: str
    # None: every store; otherwise only these (possibly none at all).
    store_ids: list[str] | None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    @property
    def start(self) -> datetime:
        """The first day's first instant, in UTC."""
        return datetime.combine(self.first, time(), self.zone).astimezone(UTC)

    @property
    def end(self) -> datetime:
        """The instant after the last day (exclusive bound), in UTC."""
        return datetime.combine(self.last + timedelta(days=1), time(), self.zone).astimezone(UTC)

    @property
    def by_store(self) -> bool:
        return self.store_ids is not None


def parse_day(value: str, field: str) -> date:
    try:
        if len(value) != 10:
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} must be a day as YYYY-MM-DD, got {value!r}", code="INVALID_DATE", field=field
        ) from None


def parse_day_range(
    from_value: str, to_value: str, from_field: str, to_field: str
) -> tuple[date, date]:
    """The inclusive days of a dashboard range, checked; errors name the
    caller's own field names (the gateway's `from`/`to`, the RPC's
    `from_day`/`to_day`)."""
    first = parse_day(from_value, from_field)
    last = parse_day(to_value, to_field)
    if last < first:
        raise InvalidArgument(
            f"{to_field} ({last}) is before {from_field} ({first})",
            code="INVALID_RANGE",
            field=to_field,
        )
    if (last - first).days + 1 > MAX_RANGE_DAYS:
        raise InvalidArgument(
            f"the range covers {(last - first).days + 1} days; at most {MAX_RANGE_DAYS}",
            code="RANGE_TOO_LONG",
            field=to_field,
        )
    return first, last


def day_range(f: common_pb2.AnalyticsFilter) -> DayRange:
    first, last = parse_day_range(f.from_day, f.to_day, "from_day", "to_day")
    zone = f.time_zone or DEFAULT_TIME_ZONE
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgument(
            f"time_zone {zone!r} is not an IANA zone", code="INVALID_TIME_ZONE", field="time_zone"
        ) from None
    return DayRange(first, last, zone, list(f.store_ids) if f.by_store else None)


def ratio(part: int, whole: int) -> float:
    """part / whole, 0 when whole is 0 (a rate over nobody)."""
    return part / whole if whole else 0.0
