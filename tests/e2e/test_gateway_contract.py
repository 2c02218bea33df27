"""The gateway against its own OpenAPI spec (schemathesis): every operation,
with the session's valid credentials, answers no 5xx and nothing the spec does
not promise (status codes, content types, body schemas).

Schemathesis drives the live gateway over HTTP from a worker thread: the
gateway's gRPC channels belong to the test's event loop, which keeps serving
meanwhile (an ASGI transport would run the app on a loop of its own).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway.api import engagement, guides
from gateway.app import Gateway

pytestmark = pytest.mark.e2e

# Per operation; ~50 operations keep the whole run well under a minute.
EXAMPLES = 6
# Schema-valid data a business rule refuses (a string that is no phone number,
# a ladder whose thresholds do not rise) is a documented 422 problem, not a
# broken contract; everything else schemathesis checks stays on: no 5xx,
# documented status codes, content types, headers and body schemas.
EXCLUDED = [positive_data_acceptance]


def case_request(client: httpx.Client, case: Any) -> httpx.Request:
    """A generated schemathesis case as a request of `client` (its auth signs
    it when sent); also the door fuzz's (test_gateway_door_fuzz.py)."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url).rstrip("/"))
    return client.build_request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        cookies=kwargs.get("cookies"),
        json=kwargs.get("json"),
        content=kwargs.get("data"),
    )


def _check_operation(operation: Any, client: httpx.Client, failures: list[str]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    def run(case: Any) -> None:
        case.validate_response(client.send(case_request(client, case)), excluded_checks=EXCLUDED)

    try:
        run()
    except (Exception, BaseExceptionGroup) as exc:  # every operation's failure, reported together
        failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:1500])


def _run_contract(
    spec: dict[str, Any], base_url: str, auth: httpx.Auth | None, skip: set[tuple[str, str]]
) -> list[str]:
    schema = schemathesis.openapi.from_dict(spec)
    assert isinstance(schema, OpenApiSchema)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30, "every route is in the spec"
    operations = [op for op in operations if (op.method.upper(), op.path) not in skip]
    with httpx.Client(base_url=base_url, auth=auth, timeout=10) as client:
        for operation in operations:
            _check_operation(operation, client, failures)
    return failures


def _undeployed(gateway: Gateway) -> set[tuple[str, str]]:
    """Routes of services the session gateway runs without (engagement, guides): they
    answer 503 SERVICE_NOT_DEPLOYED by design, which is no contract finding."""
    routers = [] if gateway.settings.engagement_addr else [engagement.router]
    if not gateway.settings.guides_addr:
        routers.append(guides.router)
    return {
        (method, route.path)
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }


async def test_every_operation_keeps_to_the_spec(gateway: Gateway, http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    failures = await asyncio.to_thread(
        _run_contract,
        spec,
        str(http.base_url),
        http.auth if http.auth else None,
        _undeployed(gateway),
    )
    assert not failures, "\n".join(failures)
