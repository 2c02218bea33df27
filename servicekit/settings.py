"""Settings from the environment (pydantic-settings), one base for every process."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What every process reads: where the data lives and how to report."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        description="libpq-style URL of the PostgreSQL database all schemas live in.",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0")
    # Prefix of every Redis key and stream, so several deployments (or test
    # runs) can share one Redis without seeing each other.
    redis_namespace: str = "loyalty"
    log_level: str = "INFO"
    log_json: bool = True
    # "none", "console" or "otlp" (then OTEL_EXPORTER_OTLP_ENDPOINT applies).
    otel_traces_exporter: str = "none"


class ServiceSettings(CommonSettings):
    """A gRPC domain service (member, tiering, engagement, rewards)."""

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    db_pool_min: int = 2
    db_pool_max: int = 10
    # On SIGTERM: report NOT_SERVING, then let in-flight calls finish this long.
    shutdown_grace_seconds: float = 10.0
    # Between reporting NOT_SERVING and refusing new calls, so balancers notice.
    shutdown_delay_seconds: float = Field(default=3.0, ge=0)
    # Prometheus metrics (event gaps and lag, dependency state) on their own
    # port; unset: not served.
    service_metrics_port: int | None = None
    # Recycle client connections so a ClusterIP Service rebalances new pods.
    max_connection_age_ms: int = 300_000
    health_check_interval_seconds: float = 5.0
    outbox_poll_interval_seconds: float = 1.0
    outbox_batch_size: int = 500
    # An event a consumer fails on is retried this many times, then dead-lettered.
    event_max_attempts: int = 5
    event_retry_after_ms: int = 2_000
    # Durable events (servicekit/outbox.py, servicekit/consumer.py): published
    # events stay in the outbox this long, so a consumer can ask for them again.
    outbox_retention_days: float = Field(default=7.0, gt=0)
    # A consumer's cursor standing still this long while later events exist is
    # a gap: it asks the producer to replay. Checked every check interval.
    event_gap_grace_seconds: float = Field(default=5.0, ge=0)
    event_check_interval_seconds: float = Field(default=1.0, gt=0)
    # processed_events rows (consumer dedup) are kept this long, then pruned
    # every prune_interval_seconds (servicekit/retention.py says why it is safe).
    processed_events_retention_hours: float = Field(default=168.0, gt=0)
    prune_interval_seconds: float = Field(default=3600.0, gt=0)
    # Key for hashing and encrypting personal data (phone); base64 32 bytes.
    pii_key: str = "ZGV2LW9ubHktcGlpLWtleS1jaGFuZ2UtbWUtMzJieXQ="
