"""The HTTP app's layers: the OpenTelemetry instrumentation only when spans are
recorded, FastAPI's own telemetry layer never (tracing through the gateway
with spans recorded: tests/e2e/test_tracing_through_gateway.py)."""

from __future__ import annotations

from typing import Any, cast

import httpx
import pytest

from gateway.clients import Downstreams
from gateway.http import create_app


def layers(app: Any) -> list[str]:
    """Class names of the app's middleware stack, outermost first."""
    names = []
    stack = app.build_middleware_stack()
    while stack is not None:
        names.append(type(stack).__name__)
        stack = getattr(stack, "app", None)
    return names


@pytest.mark.parametrize("traced", [True, False])
async def test_the_tracing_layer_is_there_only_when_spans_are_recorded(traced: bool) -> None:
    app = create_app(cast(Downstreams, None), traced=traced)
    assert ("OpenTelemetryMiddleware" in layers(app)) is traced
    # FastAPI's native layer would trace (or walk the stack) on every request.
    assert not app._native_telemetry.enabled()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        reply = await http.get("/healthz")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
