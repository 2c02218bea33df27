"""Gateway settings. Environment variable names are the field names upper-cased
(HTTP_PORT, POS_GRPC_PORT, MEMBER_ADDR, ...); the `make run` launcher and the
Kubernetes manifests rely on exactly these names."""

from __future__ import annotations

from pydantic import Field

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
    # Deadline on every downstream call; a slow or dead service costs a caller
    # at most this long, then UNAVAILABLE / 503.
    downstream_timeout_seconds: float = Field(default=2.0, gt=0)
    # /readyz asks every downstream's health service, each within this long.
    readiness_timeout_seconds: float = Field(default=1.0, gt=0)
    # On SIGTERM: NOT_SERVING / 503 on /readyz first, then in-flight requests
    # get this long to finish.
    shutdown_grace_seconds: float = 10.0
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
