"""OpenTelemetry tracing: one provider per process, gRPC/asyncpg instrumented.

Context crosses service boundaries in gRPC metadata (W3C traceparent), and into
events through the envelope's trace_context, so a checkout is one trace from
the POS call through rewards to the tiering consumer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler

_configured = False


def configure_tracing(service: str, exporter: str = "none") -> None:
    """Install the global tracer provider once per process."""
    global _configured
    if _configured:
        return
    span_exporter: SpanExporter | None = None
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    # The standard OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG choose the
    # sampler (None lets the SDK read them). Without an exporter and without
    # that choice, nothing is recorded: the spans would go nowhere, and recording
    # them cost a fifth of the gateway's CPU. Unsampled spans still get trace
    # ids, so logs keep their trace_id and context still crosses services.
    sampler: Sampler | None = None
    if span_exporter is None and not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": service}), sampler=sampler)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    if span_exporter is not None:
        # A span per query costs real time on the checkout path; only pay it
        # when the spans are going somewhere.
        _instrument_asyncpg()
    _configured = True


def _instrument_asyncpg() -> None:
    try:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().instrument()
    except Exception:  # instrumentation is optional; tracing must never stop a service
        pass


def inject_context() -> dict[str, str]:
    """Current trace context as a carrier dict (stored in event envelopes)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]):  # type: ignore[no-untyped-def]
    return propagate.extract(dict(carrier))


def tracing_recorded() -> bool:
    """Whether this process records spans: configure_tracing installed an SDK
    provider whose sampler is not ALWAYS_OFF (an exporter, or OTEL_TRACES_SAMPLER).
    Read after configure_tracing; a process that never configured tracing records none."""
    sampler = getattr(trace.get_tracer_provider(), "sampler", None)
    return sampler is not None and sampler is not ALWAYS_OFF
