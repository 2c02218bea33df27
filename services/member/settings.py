"""Settings of the member service: the common service settings plus OneID,
PII key rotation and the member-code secret (environment variables are the
field names upper-cased)."""

from __future__ import annotations

from pydantic import Field

from servicekit.safety import secret_problem
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
    # Velocity flag (services/member/velocity.py): an identifier presented at
    # this many distinct stores within this many seconds is flagged (event,
    # metric, operator list) and still served. 5 stores in 10 minutes: no
    # customer crosses a city that fast; a phone typed for strangers does.
    velocity_stores: int = Field(default=5, ge=2, le=1000)
    velocity_window_seconds: int = Field(default=600, ge=1, le=86_400)
    # Prometheus /metrics (services/member/metrics.py) on its own port; unset:
    # not served. 0 binds any free port. Named apart from the gateway's
    # METRICS_PORT, which `make run` hands to every child.
    member_metrics_host: str = "127.0.0.1"
    member_metrics_port: int | None = Field(default=None, ge=0, le=65_535)


def production_problems(s: MemberSettings) -> list[str]:
    """The member service's secrets that may not reach production (servicekit/safety.py)."""
    problems = [
        secret_problem(
            "PII_KEY", s.pii_key, [_default("pii_key", ServiceSettings)], base64_key=True
        ),
        secret_problem(
            "MEMBER_CODE_SECRET", s.member_code_secret, [_default("member_code_secret")]
        ),
    ]
    for entry in filter(None, (e.strip() for e in s.pii_encryption_keys.split(","))):
        key_id, _, key = entry.partition(":")
        problems.append(
            secret_problem(f"PII_ENCRYPTION_KEYS ({key_id.strip()})", key.strip(), base64_key=True)
        )
    return [p for p in problems if p is not None]


def _default(name: str, cls: type[ServiceSettings] = MemberSettings) -> str:
    return str(cls.model_fields[name].default)


def member_settings(settings: ServiceSettings) -> MemberSettings:
    """Member settings from the environment, with what the caller set winning."""
    if isinstance(settings, MemberSettings):
        return settings
    return MemberSettings(**settings.model_dump(exclude_unset=True))
