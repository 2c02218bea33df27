"""Settings from the environment (pydantic-settings), one base for every process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# `make run` writes the URLs of the servers it started here (and removes the file
# when it stops), so an operator command run in another terminal of the same
# checkout (`python -m services.rewards audit`, `python -m gateway clients ...`)
# reaches those servers instead of falling back to 127.0.0.1:5432/6379, which may
# be another live server. Real environment variables always win; where the file
# does not exist (a container, CI) it changes nothing.
DEV_ENV_FILE = Path(
    os.environ.get(
        "LOYALTY_DEV_ENV_FILE",
        Path(__file__).resolve().parent.parent / ".data" / "run" / "platform.env",
    )
)


class CommonSettings(BaseSettings):
    """What every process reads: where the data lives and how to report."""

    model_config = SettingsConfigDict(env_file=DEV_ENV_FILE, extra="ignore", frozen=True)

    # production (the default for `python -m ...`) refuses development secrets
    # at start (servicekit/safety.py); make run, the benchmark and the tests
    # set development.
    loyalty_env: Literal["development", "production"] = "production"

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
    # Recycle client connections so a ClusterIP Service rebalances new pods.
    max_connection_age_ms: int = 300_000
    health_check_interval_seconds: float = 5.0
    # Prometheus /metrics on its own port (servicekit/metrics.py); 0 binds any
    # free port (dev and tests; the bound port is logged). 0.0.0.0 in a pod.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # Outbox, consumer lag, dead letters and pool use are read this often.
    metrics_sample_interval_seconds: float = Field(default=15.0, gt=0)
    outbox_poll_interval_seconds: float = 1.0
    outbox_batch_size: int = 500
    # A commit wakes the outbox relay, which waits this long so the commits
    # right behind it share one relay turn (docs/operations.md).
    outbox_coalesce_seconds: float = Field(default=0.02, ge=0, le=1)
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
    # A consumer's read that returns less than a batch waits this long and
    # reads again, so one commit carries the events arriving meanwhile
    # (servicekit/consumer.py; 0: each read is applied as it comes). 250:
    # measured quiet at 60 orders/s, the projection consumers' CPU per order
    # is ~40% of what it is at 20 (docs/operations.md, "Consumers' linger");
    # a projection sees an order later (median ~155 ms, p99 ~290 ms).
    event_linger_ms: float = Field(default=250.0, ge=0, le=1000)
    # processed_events rows (consumer dedup) are kept this long, then pruned
    # every prune_interval_seconds (servicekit/retention.py says why it is safe);
    # where the table is partitioned by month (member, engagement, tiering,
    # guides), a month's partition is dropped once wholly older than this.
    processed_events_retention_hours: float = Field(default=168.0, gt=0)
    prune_interval_seconds: float = Field(default=3600.0, gt=0)
    # Time-partitioned tables (servicekit/partitions.py): months of partitions
    # made ahead at start-up and every interval (the CronJob does the same).
    partitions_ahead_months: int = Field(default=3, ge=0)
    partitions_interval_seconds: float = Field(default=21600.0, gt=0)
    # Key for hashing and encrypting personal data (phone); base64 32 bytes.
    pii_key: str = "ZGV2LW9ubHktcGlpLWtleS1jaGFuZ2UtbWUtMzJieXQ="
