"""One trace from the door to the last consumer: a POS checkout is traced
through the gateway, rewards and the tiering consumer; an HTTP read through
the gateway and rewards."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import Gateway
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from tests.harness import eventually

from .test_pos_slice import STORE, identify, new_phone, new_txn

pytestmark = pytest.mark.e2e


@pytest.fixture
def spans(gateway: Gateway) -> InMemorySpanExporter:
    # After the gateway started: starting installs the process's tracer provider.
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "the gateway installs the SDK tracer provider"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def named(spans: InMemorySpanExporter, kind: trace.SpanKind, text: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind == kind and text in s.name]


async def test_a_checkout_is_one_trace_across_services(
    spans: InMemorySpanExporter, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    member = await identify(pos, new_phone())
    reply = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=new_txn(),
            member_id=member.member_id,
            paid_amount_fen=1800,
        ),
        timeout=10,
    )
    assert reply.points_earned == 18

    (door,) = named(spans, trace.SpanKind.SERVER, "PosService/CompleteOrder")
    trace_id = door.context.trace_id
    rewards = named(spans, trace.SpanKind.SERVER, "RewardsService/CompleteOrder")
    assert [s.context.trace_id for s in rewards] == [trace_id]

    def consumed() -> list[ReadableSpan]:
        return [
            s
            for s in named(spans, trace.SpanKind.CONSUMER, "OrderCompleted")
            if s.context.trace_id == trace_id
        ]

    assert await eventually(consumed, timeout=15), "tiering consumed the event in the same trace"


async def test_an_http_read_is_traced_to_the_service(
    spans: InMemorySpanExporter, pos: pos_pb2_grpc.PosServiceStub, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    spans.clear()
    assert (await http.get(f"/v1/members/{member.member_id}/points")).status_code == 200

    (door,) = named(spans, trace.SpanKind.SERVER, "/v1/members/{member_id}/points")
    rewards = named(spans, trace.SpanKind.SERVER, "RewardsService/GetPointsBalance")
    assert [s.context.trace_id for s in rewards] == [door.context.trace_id]
    # Probes are not traced.
    assert (await http.get("/healthz")).status_code == 200
    assert not named(spans, trace.SpanKind.SERVER, "healthz")
