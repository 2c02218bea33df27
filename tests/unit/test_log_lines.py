"""The JSON log line: the fast paths of servicekit.logs.FastJsonFormatter (a
cached time of day, fields handed over pre-encoded as the gateway's access log
does) write exactly the line the generic formatter writes."""

from __future__ import annotations

import io
import json
import logging

import pytest
from pythonjsonlogger.json import JsonFormatter

from gateway import access_log
from gateway.metrics import Observation
from servicekit.logs import FastJsonFormatter, TraceContextFilter


def generic(service: str) -> JsonFormatter:
    """The formatter every service used before the fast one."""
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}{trace_id}{span_id}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        static_fields={"service": service},
    )


OBSERVATIONS = [
    Observation(
        "grpc",
        "pos-1",
        "/loyalty.pos.v1.PosService/IdentifyMember",
        "POST",
        "OK",
        "",
        0.0123456,
        store_id="SH001",
    ),
    Observation(
        "http",
        "anonymous",
        "/v1/members/{member_id}/centre",
        "GET",
        "404",
        "MEMBER_NOT_FOUND",
        2.5,
        member_id="6f1c2d7e-0000-4000-8000-000000000001",
    ),
    # Characters JSON must escape, and non-ASCII.
    Observation("http", 'c"l\\i\nent', "/v1/门店", "GET", "200", "", 0.0),
]


def line_of(formatter: logging.Formatter, obs: Observation) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(formatter)
    log = access_log.log
    saved = log.handlers[:], log.propagate, log.level
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        access_log.write(obs)
    finally:
        log.handlers[:], log.propagate, log.level = saved
    return stream.getvalue().rstrip("\n")


@pytest.mark.parametrize("obs", OBSERVATIONS)
def test_the_access_line_is_the_generic_formatters_line(obs: Observation) -> None:
    fast = line_of(FastJsonFormatter("gateway"), obs)
    data = json.loads(fast)
    assert data["route"] == obs.route and data["client"] == obs.client
    expected_keys = [
        "time",
        "level",
        "logger",
        "message",
        "trace_id",
        "span_id",
        "service",
        "protocol",
        "method",
        "route",
        "status",
        "code",
        "duration_ms",
        "client",
        "member_id",
        "store_id",
    ]
    assert list(data) == expected_keys
    assert data["message"] == f"{obs.method} {obs.route} {obs.status}"
    assert data["duration_ms"] == round(obs.seconds * 1000, 3)


def test_a_record_is_written_alike_by_both_paths() -> None:
    extra = {
        "protocol": "grpc",
        "route": "/x",
        "status": "OK",
        "duration_ms": 1.5,
        "client": 'a"b',
        "member_id": "",
        "store_id": "门店",
    }
    lines = []
    for encoded in (False, True):
        record = logging.LogRecord(
            "gateway.access", logging.INFO, __file__, 1, "%s %s", ("POST", "/x"), None
        )
        record.created, record.msecs = 1_700_000_000.25, 250.0
        record.trace_id, record.span_id = "", ""
        if encoded:
            record.encoded_fields = json.dumps(extra)[1:-1]
            lines.append(FastJsonFormatter("gateway").format(record))
        else:
            record.__dict__.update(extra)
            lines.append(generic("gateway").format(record))
    assert lines[0] == lines[1]


def test_the_cached_time_of_day_moves_with_the_second() -> None:
    fast, slow = FastJsonFormatter("svc"), generic("svc")
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_061.5):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        assert fast.formatTime(record) == slow.formatTime(record)


def test_an_exception_goes_the_generic_way() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), info)
    record.encoded_fields = '"a": 1'
    record.trace_id = record.span_id = ""
    data = json.loads(FastJsonFormatter("svc").format(record))
    assert "boom" in data["exc_info"]
