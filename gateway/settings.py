"""Gateway settings. Environment variable names are the field names upper-cased
(HTTP_PORT, POS_GRPC_PORT, MEMBER_ADDR, ...); the `make run` launcher and the
Kubernetes manifests rely on exactly these names."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator

from servicekit.settings import CommonSettings


class GatewaySettings(CommonSettings):
    http_host: str = "127.0.0.1"
    # 0 binds any free port (tests); the bound port is on Gateway.http_port.
    http_port: int = 8080
    pos_grpc_host: str = "127.0.0.1"
    pos_grpc_port: int = 50050
    # Downstream gRPC targets (host:port, or dns:///name:port for every pod of a
    # headless Service). An empty value means "not deployed": nothing calls it
    # and /readyz does not wait for it.
    member_addr: str = "127.0.0.1:50051"
    tiering_addr: str = "127.0.0.1:50052"
    engagement_addr: str = "127.0.0.1:50053"
    rewards_addr: str = "127.0.0.1:50054"
    # Empty unless deployed (make run sets it): WeCom callbacks and the guide routes.
    guides_addr: str = ""
    # Deadline on every downstream call; a slow or dead service costs a caller
    # at most this long, then UNAVAILABLE / 503.
    downstream_timeout_seconds: float = Field(default=2.0, gt=0)
    # Every dependency (downstreams, PostgreSQL, Redis) is probed this often,
    # each within readiness_timeout_seconds; /readyz/detail and the
    # loyalty_dependency_up metric show the answers (readiness does not
    # depend on them: servicekit/dependencies.py).
    dependency_check_interval_seconds: float = Field(default=5.0, gt=0)
    readiness_timeout_seconds: float = Field(default=1.0, gt=0)
    # On SIGTERM: NOT_SERVING / 503 on /readyz first, then in-flight requests
    # get this long to finish.
    shutdown_grace_seconds: float = 10.0
    # Between reporting NOT_SERVING (/readyz 503) and refusing new calls, so
    # load balancers stop sending first; 0 in tests.
    shutdown_delay_seconds: float = Field(default=3.0, ge=0)
    # Recycle POS connections so new gateway pods behind a ClusterIP get traffic.
    max_connection_age_ms: int = 300_000
    # Prometheus /metrics on its own port, never the public one (gateway/metrics.py).
    # 0 binds any free port (tests); the bound port is on Gateway.metrics_port.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    # UploadOfflineOrders: orders per call, and how old an offline order may
    # be (its ordered_at) before it is refused as ORDER_TOO_OLD.
    offline_max_batch: int = Field(default=500, ge=1, le=5000)
    offline_max_age_hours: float = Field(default=72.0, gt=0)
    # Largest HTTP request body read (413 BODY_TOO_LARGE beyond, before
    # authentication), and largest POS gRPC message (MESSAGE_TOO_LARGE beyond).
    http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    pos_max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # TLS on the POS port: both paths set -> TLS; plus a CA -> client
    # certificates required (mTLS), each naming its store (CN or a SAN).
    pos_tls_cert_file: str = ""
    pos_tls_key_file: str = ""
    pos_tls_client_ca_file: str = ""
    # ---- the door (gateway/auth, docs/api.md "Authentication")
    # Off only for the benchmark's baseline gateway: never in a deployment.
    auth_enabled: bool = True
    # Encrypts client secrets at rest (AES-256-GCM); base64 of 32 bytes.
    auth_secret_key: str = "ZGV2LW9ubHktZ2F0ZXdheS1rZXktY2hhbmdlLW1lLTE="
    # A signed request's X-Timestamp may be this far from the gateway's clock.
    auth_clock_skew_seconds: int = Field(default=300, ge=1)
    # Accept LOYALTY-HMAC-SHA256 (version 1, which does not sign the member and
    # Idempotency-Key headers) besides version 2: only during a migration window.
    auth_accept_signature_v1: bool = False
    # Failed sign-ins per source address (in process, at most
    # auth_failure_sources addresses remembered): past the burst, 429
    # AUTH_FAILURES_LIMITED before any lookup.
    auth_failure_rate_per_second: float = Field(default=20.0, gt=0)
    auth_failure_burst: int = Field(default=200, ge=1)
    auth_failure_sources: int = Field(default=10_000, ge=1)
    # HTTP peers trusted to name the client (X-Forwarded-For/-Proto): the
    # ingress's addresses or CIDR ranges, comma-separated. Empty (default):
    # none, so the per-source limit keys on the TCP peer (servicekit/proxies.py).
    trusted_proxies: str = ""
    # The door's PostgreSQL pool: credential reloads and Idempotency-Key records.
    door_db_pool_max: int = Field(default=10, ge=2)
    # The credential cache is reloaded on a revocation epoch change, and at
    # least this often.
    credential_max_age_seconds: float = Field(default=30.0, gt=0)
    # Token buckets, per client kind: (requests per second, burst). A client
    # registered with its own rate/burst uses those instead.
    rate_limits: dict[str, tuple[float, int]] = Field(
        default_factory=lambda: {
            "miniprogram_backend": (2000.0, 4000),
            "pos": (20.0, 40),
            "operator_console": (50.0, 100),
            "ops_tooling": (200.0, 400),
        }
    )
    # Every store's bucket, whichever of its POS keys calls.
    store_rate_per_second: float = Field(default=50.0, gt=0)
    store_burst: int = Field(default=100, ge=1)
    # Idempotency records (PostgreSQL): replayable this long; a request in
    # progress holds its key at most this long; expired ones are pruned this often.
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60)
    idempotency_in_progress_seconds: int = Field(default=60, ge=1)
    idempotency_prune_interval_seconds: float = Field(default=300.0, gt=0)
    # Bearer tokens from POST /v1/auth/token live this long.
    token_ttl_seconds: int = Field(default=900, ge=60, le=86_400)
    # Mini-program member assertion: openid -> member id is remembered this long.
    member_assertion_ttl_seconds: float = Field(default=60.0, gt=0)
    # POS CompleteOrder's member check: an id member confirmed is not asked
    # again for this long while member's identity epoch stands
    # (gateway/known_members.py); 0 asks member for every order (needed when
    # member runs with RESOLVE_CACHE_TTL_SECONDS=0: it then bumps no epoch).
    known_member_ttl_seconds: float = Field(default=300.0, ge=0)
    # Member views (gateway/member_views.py): identify's balance and tier and the
    # member centre's reply kept in Redis per member, at most this long (and
    # never past the next local midnight in member_view_timezone, the tier
    # programme's, nor past a boundary the view names); 0 turns them off. Off
    # too when known_member_ttl_seconds is 0 (no identity epoch to file them under).
    member_view_ttl_seconds: float = Field(default=120.0, ge=0, le=3000)
    member_view_timezone: str = "Asia/Shanghai"

    # ---- identity (docs/identity.md "Trust boundaries"; kept apart from the door's block)
    # WeChat API (gateway/wechat.py): phone codes from bind-phone are exchanged
    # here for the phone WeChat verified. `make run` and the tests point it at
    # the local fake (gateway/wechat_fake.py).
    wechat_api_base: str = "https://api.weixin.qq.com"
    # App id -> app secret of every mini-program whose phone codes the gateway
    # checks, as JSON (WECHAT_APPS='{"wx123": "secret"}'), from a Secret.
    wechat_apps: dict[str, str] = Field(default_factory=dict)
    wechat_timeout_seconds: float = Field(default=3.0, gt=0)
    # The token in the SMS delivery-report URL configured at Aliyun
    # (POST /v1/callbacks/sms/aliyun?token=...), from a Secret; empty = reports refused.
    sms_receipt_token: SecretStr = SecretStr("")

    @field_validator("member_view_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a known time zone (e.g. Asia/Shanghai)") from None
        return value
