"""gRPC client channels: created once per process and reused, traced, with
round-robin balancing over DNS so every pod behind a headless Service is used.

The keepalive settings of both ends live here side by side, so they cannot
drift apart: a client that pings more often than the server permits is sent
GOAWAY `too_many_pings` and its calls fail (docs/deploy.md, gRPC balancing).
"""

from __future__ import annotations

import json

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from .telemetry import tracing_recorded

# round_robin through the service config (gRPC proposal A9): with a
# `dns:///name.namespace.svc.cluster.local:port` target of a headless Service
# the client keeps a subchannel to every pod and spreads calls over them.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Clients ping every 30 s, also while idle, so a pod that vanished without a
# FIN (node lost) is noticed within ~40 s instead of at the next call.
CLIENT_KEEPALIVE_TIME_MS = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
CLIENT_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Servers accept those pings: idle ones too, and as often as every 15 s (half
# the clients' interval, so jitter never counts as a strike).
SERVER_MIN_PING_INTERVAL_MS = CLIENT_KEEPALIVE_TIME_MS // 2
SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 2),
]


def create_channel(target: str, traced: bool | None = None) -> grpc.aio.Channel:
    """`traced` (default: the process records spans, telemetry.tracing_recorded())
    adds the OpenTelemetry client interceptors, which also carry the trace
    context to the callee; without them each call skips the interceptor chain."""
    if traced is None:
        traced = tracing_recorded()
    return grpc.aio.insecure_channel(
        target,
        interceptors=aio_client_interceptors() if traced else None,
        options=[
            ("grpc.service_config", SERVICE_CONFIG),
            *CLIENT_KEEPALIVE_OPTIONS,
            ("grpc.enable_retries", 0),
            # Reconnect within a second of a restarted service: the defaults
            # (1 s, growing to 120 s) kept the gateway failing for seconds
            # after rewards was back (fault suite, docs/operations.md).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
