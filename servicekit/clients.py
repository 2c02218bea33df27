"""gRPC client channels: created once per process and reused, traced, with
round-robin balancing over DNS so every pod behind a headless Service is used."""

from __future__ import annotations

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from .telemetry import tracing_recorded


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
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),
            # Reconnect within a second of a restarted service: the defaults
            # (1 s, growing to 120 s) kept the gateway failing for seconds
            # after rewards was back (fault suite, docs/operations.md).
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ],
    )
