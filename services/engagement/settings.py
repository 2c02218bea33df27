"""Settings of the engagement service (environment variables, upper-cased names)."""

from __future__ import annotations

from servicekit.settings import ServiceSettings


class EngagementSettings(ServiceSettings):
    # Sweepers claim this many due steps per transaction.
    engagement_batch_size: int = 500
    engagement_sweepers: int = 2
    engagement_poll_seconds: float = 1.0
    engagement_dispatch_poll_seconds: float = 1.0
    # How often the birthday-month entry looks for members to enter (it only
    # finds work on the 1st of a month or after a birthday was set).
    engagement_birthday_poll_seconds: float = 600.0
    # Events parked for a member never introduced are deleted after this many
    # days; the expiry runs every ENGAGEMENT_PARKED_EXPIRY_POLL_SECONDS.
    engagement_parked_ttl_days: int = 30
    engagement_parked_expiry_poll_seconds: float = 3600.0
    # False: no background sweeper or dispatcher (tests drive them by hand).
    engagement_workers: bool = True
    quiet_start: str = "21:00"
    quiet_end: str = "09:00"
    quiet_jitter_minutes: int = 30
    # Provider endpoints; empty = the local sink (records what would be sent).
    wecom_endpoint: str = ""
    sms_endpoint: str = ""
    miniprogram_endpoint: str = ""
    app_push_endpoint: str = ""
    provider_timeout_seconds: float = 5.0
    # The rewards service (coupons, points for journey steps); empty = not
    # wired: reward requests stay pending.
    rewards_addr: str = ""
    rewards_timeout_seconds: float = 2.0
    # The member service: SMS phones and WeCom external_userids are read from
    # it at send time (audited there); empty = those channels have no address.
    member_addr: str = ""
    member_timeout_seconds: float = 2.0
    # Per-channel send rate limits (messages per second).
    wecom_rate_per_second: float = 50.0
    sms_rate_per_second: float = 100.0
    miniprogram_rate_per_second: float = 100.0
    app_push_rate_per_second: float = 500.0
