"""Console settings. Environment variable names are the field names upper-cased
(CONSOLE_PORT, CONSOLE_GATEWAY_URL, CONSOLE_GATEWAY_CLIENTS, ...); `make run`
and the Kubernetes manifests rely on exactly these names."""

from __future__ import annotations

from pydantic import BaseModel, Field

from servicekit.settings import CommonSettings


class GatewayKey(BaseModel):
    """One registered `operator_console` client of the gateway (`python -m gateway clients create`)."""

    key_id: str
    secret: str


class ConsoleSettings(CommonSettings):
    console_host: str = "127.0.0.1"
    # 0 binds any free port (tests); the bound port is on ConsoleServer.port.
    console_port: int = 8090
    # Where the gateway's HTTP API is; the console reaches the platform only there.
    console_gateway_url: str = "http://127.0.0.1:8080"
    # Above the gateway's longest answer: a dashboard may take 5 downstream
    # deadlines (ANALYTICS_DEADLINE_FACTOR x DOWNSTREAM_TIMEOUT_SECONDS, 10 s).
    console_gateway_timeout_seconds: float = Field(default=15.0, gt=0)
    # Role -> the gateway client that acts for it (JSON in the environment:
    # {"viewer": {"key_id": ..., "secret": ...}, "marketer": ..., ...}); each
    # client holds only its role's scopes, so the gateway refuses what a role lacks.
    console_gateway_clients: dict[str, GatewayKey] = Field(default_factory=dict)
    # A session ends after this long without a request, and this long after log-in at most.
    console_session_idle_seconds: int = Field(default=1800, gt=0)
    console_session_absolute_seconds: int = Field(default=12 * 3600, gt=0)
    # Failed log-ins before a lock-out, per account and per source address, within the window;
    # the lock-out lasts until the window ends.
    console_login_max_failures_per_account: int = Field(default=5, gt=0)
    console_login_max_failures_per_address: int = Field(default=20, gt=0)
    console_login_window_seconds: int = Field(default=900, gt=0)
    # Peers trusted to name the client (X-Forwarded-For/-Proto): the ingress's
    # addresses or CIDR ranges, comma-separated. Empty (default): none, the
    # per-address log-in limit keys on the TCP peer (servicekit/proxies.py).
    console_trusted_proxies: str = ""
    # TLS for the console itself: cookies are then always Secure.
    console_tls_certfile: str = ""
    console_tls_keyfile: str = ""
    # True also marks cookies Secure behind a TLS-terminating ingress (the console sees http).
    console_cookie_secure: bool = False
    console_default_locale: str = "zh-CN"
