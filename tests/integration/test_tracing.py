"""Trace context crosses the gRPC hop and the event bus."""

from __future__ import annotations

import random

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.asyncio import Redis

from loyalty.events.v1 import events_pb2
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from servicekit.clients import create_channel
from servicekit.events import ENVELOPE_FIELD, stream_name
from servicekit.server import ServiceApp

from ..harness import Infra, eventually


async def test_a_call_and_its_event_share_one_trace(infra: Infra, member_app: ServiceApp) -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "services install the SDK tracer provider"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    phone = f"137{random.randrange(10**8):08d}"

    channel = create_channel(f"127.0.0.1:{member_app.port}")
    try:
        with trace.get_tracer("test").start_as_current_span("pos checkout") as parent:
            trace_id = parent.get_span_context().trace_id
            reply = await member_pb2_grpc.MemberServiceStub(channel).IdentifyMember(
                member_pb2.IdentifyMemberRequest(
                    identifiers=[
                        member_pb2.Identifier(type=member_pb2.IDENTIFIER_TYPE_PHONE, value=phone)
                    ],
                    source="test",
                    request_key=f"trace-{phone}",
                ),
                timeout=5,
            )
    finally:
        await channel.close()
    assert reply.created

    server_spans = [
        s
        for s in exporter.get_finished_spans()
        if s.kind == trace.SpanKind.SERVER and "IdentifyMember" in s.name
    ]
    assert server_spans, "the member service recorded a server span"
    assert {s.context.trace_id for s in server_spans} == {trace_id}

    # The MemberRegistered event written in that call carries the same trace.
    redis = Redis.from_url(infra.redis_url)
    try:

        async def registered_envelope() -> events_pb2.EventEnvelope | None:
            for _, fields in await redis.xrange(stream_name(infra.namespace, "member")):
                envelope = events_pb2.EventEnvelope.FromString(fields[ENVELOPE_FIELD])
                if envelope.member_id == reply.member.member_id:
                    return envelope
            return None

        envelope = await eventually(registered_envelope)
    finally:
        await redis.aclose()
    assert envelope.event_type == "loyalty.events.v1.MemberRegistered"
    assert format(trace_id, "032x") in envelope.trace_context["traceparent"]
