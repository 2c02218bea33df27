"""What every use case of the guides service shares: HandlersBase, holding WeCom
(crypto and API), the member directory, the coupon issuer, the attribution and
tag rules, the secrets, windows, time zone and clock; the clock's type; the
actor named for WeCom's own changes; and reading a YYYY-MM-DD day.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from servicekit.errors import (
    InvalidArgument,
)

from .domain import AttributionRule, TagRules
from .ports import CouponIssuer, MemberDirectory
from .retries import RetryPolicy
from .wecom import WeComApi
from .wecom_crypto import WeComCrypto

Clock = Callable[[], datetime]


WECOM_ACTOR = "wecom"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def parse_day(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f"{field} must be a date, YYYY-MM-DD", code="INVALID_DATE", field=field
        ) from None


class HandlersBase:
    """The configuration every subject's use cases read."""

    def __init__(
        self,
        crypto: WeComCrypto,
        wecom: WeComApi,
        members: MemberDirectory,
        *,
        corp_id: str,
        link_secret: bytes,
        rules: tuple[AttributionRule, ...],
        window: timedelta,
        tz: ZoneInfo,
        callback_max_age: timedelta,
        callback_max_attempts: int = 5,
        tag_window: timedelta = timedelta(days=90),
        tag_rules: TagRules | None = None,
        clock: Clock | None = None,
        coupons: CouponIssuer | None = None,
        session_secret: bytes = b"",
        session_ttl: timedelta = timedelta(hours=2),
        task_gather: timedelta = timedelta(minutes=5),
        retry: RetryPolicy | None = None,
    ) -> None:
        self.crypto = crypto
        self.wecom = wecom
        self.members = members
        self.corp_id = corp_id
        self.link_secret = link_secret
        self.rules = rules
        self.window = window
        self.tz = tz
        self.callback_max_age = callback_max_age
        self.callback_max_attempts = callback_max_attempts
        self.tag_window = tag_window
        self.tag_rules = tag_rules or TagRules()
        self.clock = clock or _utcnow
        self.coupons = coupons
        self.session_secret = session_secret or link_secret + b"/workstation"
        self.session_ttl = session_ttl
        self.task_gather = task_gather
        self.retry = retry or RetryPolicy()
