"""Settings of the guides service: the common service settings plus WeCom
(corp, callback token and key, API endpoint), the guide-link secret,
attribution rules and window, tag rules and cadence (environment variables are
the field names upper-cased; docs/guides.md lists them)."""

from __future__ import annotations

from pydantic import Field

from servicekit.settings import ServiceSettings


class GuidesSettings(ServiceSettings):
    # The member service (OneID identify of WeCom customers).
    member_addr: str = "127.0.0.1:50051"
    member_timeout_seconds: float = Field(default=3.0, gt=0)
    # WeCom corp id (the callback's receive id) and the customer-contact app's secret.
    wecom_corp_id: str = "wwfakecorp"
    wecom_secret: str = "fake-secret"
    # The callback's Token and EncodingAESKey, as set in WeCom's admin console.
    wecom_callback_token: str = "dev-only-callback-token"
    wecom_encoding_aes_key: str = "ZGV2LW9ubHktd2Vjb20tYWVzLWtleS0zMi1ieXRlcyE"
    # "fake" (the in-process FakeWeCom, for make run) or e.g. https://.../cgi-bin.
    wecom_api_base: str = "fake"
    # Directory extattr names carrying a staff member's store and role.
    wecom_store_attr: str = "store_id"
    wecom_role_attr: str = "role"
    # A callback whose timestamp is further than this from now is refused.
    callback_max_age_seconds: int = Field(default=300, ge=10)
    callback_max_attempts: int = Field(default=5, ge=1)
    callback_poll_seconds: float = Field(default=1.0, gt=0)
    # HMAC secret of the guide link parameter.
    guide_link_secret: str = "dev-only-guide-link-secret-change-me"
    # Precedence of the attribution rules, first match wins.
    attribution_rules: str = "guide_link,staff_code,binding"
    # A link or a binding attributes orders this many days after it began (0: no limit).
    attribution_window_days: int = Field(default=30, ge=0)
    # The brand's time zone: attribution days and time-of-day habits.
    brand_timezone: str = "Asia/Shanghai"
    # Rule tags read orders of this many days; refreshed every N hours (0: only on demand).
    tag_window_days: int = Field(default=90, ge=1)
    tag_refresh_hours: float = Field(default=24.0, ge=0)
    # The workstation: HMAC key of its session tokens, and how long one lasts.
    workstation_secret: str = "dev-only-workstation-secret-change-me"
    workstation_session_minutes: int = Field(default=120, ge=5, le=1440)
    # The rewards service (coupons a guide grants from their budget).
    rewards_addr: str = "127.0.0.1:50054"
    rewards_timeout_seconds: float = Field(default=3.0, gt=0)
    # Guide tasks gather a journey step's members this long before WeCom gets
    # the message task; sent tasks are checked for completion every N seconds.
    task_gather_seconds: float = Field(default=300.0, ge=0)
    task_poll_seconds: float = Field(default=60.0, gt=0)
    # A task WeCom refuses is retried with back-off (1 min doubling to 1 h) and
    # failed after N tries; a sent task the guide never sends expires after
    # this many hours (its customers settled as not sent, no longer polled).
    task_max_attempts: int = Field(default=5, ge=1)
    task_life_hours: float = Field(default=72.0, gt=0)


def guides_settings(settings: ServiceSettings) -> GuidesSettings:
    if isinstance(settings, GuidesSettings):
        return settings
    return GuidesSettings(**settings.model_dump(exclude_unset=True))
