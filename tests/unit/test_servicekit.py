"""Shared plumbing without I/O: URL handling, error details, envelopes, log context."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from loyalty.events.v1 import events_pb2
from servicekit.db import asyncpg_dsn, sqlalchemy_url
from servicekit.errors import to_rpc_status
from servicekit.events import dead_letter_stream, make_envelope, stream_name, unpack
from servicekit.logs import TraceContextFilter
from servicekit.server import serve_until_signalled


def test_database_urls_are_accepted_in_either_style() -> None:
    assert asyncpg_dsn("postgresql+asyncpg://u@h:5/db") == "postgresql://u@h:5/db"
    assert asyncpg_dsn("postgres://u@h/db") == "postgresql://u@h/db"
    assert (
        sqlalchemy_url("postgresql://u@/db?host=/tmp/x") == "postgresql+asyncpg://u@/db?host=/tmp/x"
    )


def test_rpc_status_carries_code_and_field() -> None:
    status = to_rpc_status(grpc.StatusCode.INVALID_ARGUMENT, "bad phone", "INVALID_PHONE", "phone")
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.details == "bad phone"
    keys = [k for k, _ in status.trailing_metadata]
    assert "grpc-status-details-bin" in keys
    # The detail is what clients read: the stable code and the offending field.
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    info = error_details_pb2.ErrorInfo()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(info)
    assert (info.reason, info.metadata["field"]) == ("INVALID_PHONE", "phone")


def test_envelope_round_trip() -> None:
    payload = events_pb2.OrderCompleted(order_id="o1", member_id="m1", paid_amount_fen=3200)
    envelope = make_envelope("rewards", payload, member_id="m1")
    assert envelope.event_type == "loyalty.events.v1.OrderCompleted"
    assert envelope.producer == "rewards"
    parsed = events_pb2.EventEnvelope.FromString(envelope.SerializeToString())
    assert unpack(parsed, events_pb2.OrderCompleted) == payload


def test_unpack_refuses_the_wrong_type() -> None:
    envelope = make_envelope("member", events_pb2.MemberRegistered(member_id="m1"))
    try:
        unpack(envelope, events_pb2.OrderCompleted)
    except ValueError as exc:
        assert "MemberRegistered" in str(exc)
    else:
        raise AssertionError("unpacking the wrong payload type must fail")


def test_stream_names_are_namespaced() -> None:
    assert stream_name("ns", "rewards") == "ns:events:rewards"
    assert dead_letter_stream("ns", "rewards", "tiering") == "{ns:events:rewards}:dlq:tiering"


def test_log_records_carry_the_active_trace_id() -> None:
    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    with tracer.start_as_current_span("work") as span:
        TraceContextFilter().filter(record)
        expected = format(span.get_span_context().trace_id, "032x")
    assert record.trace_id == expected  # type: ignore[attr-defined]
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    TraceContextFilter().filter(outside)
    assert outside.trace_id == ""  # type: ignore[attr-defined]
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_a_serving_process_freezes_its_startup_heap_then_drains_on_sigterm() -> None:
    gc.unfreeze()
    started = asyncio.Event()
    frozen_at_stop: list[int] = []

    async def start() -> None:
        started.set()

    async def stop() -> None:
        frozen_at_stop.append(gc.get_freeze_count())

    try:
        serving = asyncio.create_task(serve_until_signalled("test", start, stop))
        await started.wait()
        await asyncio.sleep(0.05)  # the loop reaches its wait for the signal
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, timeout=5)
    finally:
        gc.unfreeze()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    # Startup objects were moved out of the collector's reach before serving.
    assert frozen_at_stop and frozen_at_stop[0] > 1000
