"""Settings of the engagement service (environment variables, upper-cased names)."""

from __future__ import annotations

from pydantic import Field, SecretStr

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
    # Months of sends kept attached (partitions by month of created_at): a
    # partition ending more than this many months before the current month may
    # be detached (`partitions detach`), and only once none of its sends is
    # pending, sending or unknown. 13 covers the journeys dashboard's longest
    # range (366 days) ending today; caps need a day, receipts 72 h
    # (docs/operations.md "Partitioned tables").
    sends_retention_months: int = Field(default=13, ge=1)
    # Events parked for a member never introduced are deleted after this many
    # days; the expiry runs every ENGAGEMENT_PARKED_EXPIRY_POLL_SECONDS.
    engagement_parked_ttl_days: int = 30
    engagement_parked_expiry_poll_seconds: float = 3600.0
    # False: no background sweeper or dispatcher (tests drive them by hand).
    engagement_workers: bool = True
    quiet_start: str = "21:00"
    quiet_end: str = "09:00"
    quiet_jitter_minutes: int = 30
    # Channel providers (docs/journeys.md, "Channels"). Endpoints are settings
    # so tests and `make run` point them at devtools/provider_fakes. A channel
    # without credentials fails its sends with CHANNEL_NOT_CONFIGURED.
    # Credentials come from the Secret (deploy/k8s), are SecretStr and never logged.
    wechat_api_base: str = "https://api.weixin.qq.com"
    wechat_app_id: str = ""
    wechat_app_secret: SecretStr = SecretStr("")
    # formal | trial | developer: which mini-program build a message opens.
    miniprogram_state: str = "formal"
    wecom_api_base: str = "https://qyapi.weixin.qq.com"
    wecom_corp_id: str = ""
    wecom_corp_secret: SecretStr = SecretStr("")
    # The staff userid named as sender (optional for 1-to-1 tasks).
    wecom_sender: str = ""
    # A WeCom send waits (`sending`, TASK_CREATED) until its task's result says
    # the staff member sent it; read every WECOM_RESULT_RECHECK_MINUTES per
    # task (the job wakes every WECOM_RESULTS_POLL_SECONDS). Not sent within
    # WECOM_TASK_LIFE_HOURS: `failed` NOT_SENT_BY_STAFF (the brand's choice).
    wecom_task_life_hours: float = 72.0
    wecom_result_recheck_minutes: float = 10.0
    wecom_results_poll_seconds: float = 60.0
    sms_endpoint: str = "https://dysmsapi.aliyuncs.com/"
    sms_access_key_id: str = ""
    sms_access_key_secret: SecretStr = SecretStr("")
    sms_sign_name: str = ""
    sms_region_id: str = "cn-hangzhou"
    # Per phone: count/seconds windows checked before calling (carriers' usual limits).
    sms_phone_limits: str = "1/60,5/3600,10/86400"
    # An accepted SMS whose delivery report has not come after this many hours
    # is `unknown` (NO_RECEIPT, never resent): Aliyun pushes reports for 72 h.
    sms_receipt_cutoff_hours: float = 72.0
    app_push_endpoint: str = ""
    app_push_token: SecretStr = SecretStr("")
    # Uncertain outcomes (time-out after sending, dropped connection) are not
    # resent unless the channel says so here (at most once by default).
    wecom_resend_unknown: bool = False
    sms_resend_unknown: bool = False
    miniprogram_resend_unknown: bool = False
    app_push_resend_unknown: bool = False
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


def engagement_settings(settings: ServiceSettings) -> EngagementSettings:
    """Engagement settings from the environment, with what the caller set winning."""
    if isinstance(settings, EngagementSettings):
        return settings
    return EngagementSettings(**settings.model_dump(exclude_unset=True))
