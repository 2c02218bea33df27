"""Settings of the member service: the common service settings plus OneID,
PII key rotation and the member-code secret (environment variables are the
field names upper-cased)."""

from __future__ import annotations

from pydantic import Field

from servicekit.settings import ServiceSettings

from .cache import ENTRY_TTL_SECONDS


class MemberSettings(ServiceSettings):
    # JSON identifier policy; empty means services/member/identity_policy.json.
    identity_policy_path: str = ""
    # Extra AES keys, "k1:BASE64,k2:BASE64" (32 bytes each). PII_KEY itself is "k0".
    pii_encryption_keys: str = ""
    # New ciphertexts use this key; older keys stay listed until ReencryptPii is done.
    pii_active_key_id: str = "k0"
    # HMAC secret of the dynamic member code; base64 or any long random text.
    member_code_secret: str = "dev-only-member-code-secret-change-me"
    # Concurrent identifies that lost a race retry this many times in all.
    identify_max_attempts: int = Field(default=6, ge=1, le=20)
    # An IdentifyMember request key replays its first answer this long; then
    # the record is pruned and a retry under it simply identifies again (find
    # or enrol: the same member, nobody enrolled twice).
    identify_request_retention_days: float = Field(default=30.0, gt=0)
    # ResolveMember answers (identifier -> member) kept in Redis this long;
    # 0 turns the cache off (services/member/cache.py).
    resolve_cache_ttl_seconds: int = Field(default=ENTRY_TTL_SECONDS, ge=0, le=86_400)
    # Prometheus /metrics (services/member/metrics.py) on its own port; unset:
    # not served. 0 binds any free port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)


def member_settings(settings: ServiceSettings) -> MemberSettings:
    """Member settings from the environment, with what the caller set winning."""
    if isinstance(settings, MemberSettings):
        return settings
    return MemberSettings(**settings.model_dump(exclude_unset=True))
