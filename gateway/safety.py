"""The gateway's settings that may not reach production (servicekit/safety.py):
its key for client secrets at rest, the WeChat app secrets, and the door left
open (AUTH_ENABLED=false) on an address other than loopback."""

from __future__ import annotations

from servicekit.safety import is_loopback, secret_problem

from .settings import GatewaySettings

# Values that appear in this repository (the demo's fake WeChat app).
KNOWN_WECHAT_SECRETS = ("dev-only-wechat-app-secret",)


def production_problems(s: GatewaySettings) -> list[str]:
    default_key = str(GatewaySettings.model_fields["auth_secret_key"].default)
    problems = [
        secret_problem("AUTH_SECRET_KEY", s.auth_secret_key, [default_key], base64_key=True)
    ]
    for app_id, secret in sorted(s.wechat_apps.items()):
        problems.append(secret_problem(f"WECHAT_APPS ({app_id})", secret, KNOWN_WECHAT_SECRETS))
    if not s.auth_enabled:
        exposed = [h for h in (s.http_host, s.pos_grpc_host) if not is_loopback(h)]
        if exposed:
            problems.append(f"AUTH_ENABLED=false on a non-loopback address ({', '.join(exposed)})")
    return [p for p in problems if p is not None]
