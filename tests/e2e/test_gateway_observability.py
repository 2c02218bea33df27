"""Metrics on their own port, labelled by route template / RPC method and
client; JSON access logs that carry no personal data."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.auth.admin import IssuedKey
from loyalty.pos.v1 import pos_pb2
from servicekit.logs import configure_logging

from .doors import StoreKeys
from .test_pos_slice import STORE, Pos, identify, new_phone, rpc_error

pytestmark = pytest.mark.e2e

POINTS_ROUTE = "/v1/members/{member_id}/points"
IDENTIFY_RPC = "/loyalty.pos.v1.PosService/IdentifyMember"


async def scrape(gateway: Gateway) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{sample name: [(labels, value)]} from the metrics port."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    assert reply.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for ls, v in samples.get(name, []) if labels.items() <= ls.items())


async def test_metrics_are_on_their_own_port(gateway: Gateway, http: httpx.AsyncClient) -> None:
    assert gateway.metrics_port not in (0, gateway.http_port, gateway.pos_grpc_port)
    # Not on the public port: /metrics there is just an unknown route.
    assert (await http.get("/metrics")).status_code == 404


async def test_http_requests_counted_by_route_template_and_code(
    gateway: Gateway, http: httpx.AsyncClient, pos: Pos
) -> None:
    member = await identify(pos, new_phone())
    before = await scrape(gateway)
    # Any client: the session gateway may sign its calls (gateway/auth).
    ok = {"protocol": "http", "route": POINTS_ROUTE}
    assert (await http.get(f"/v1/members/{member.member_id}/points")).status_code == 200
    assert (await http.get("/v1/members/not-a-uuid/points")).status_code == 422
    after = await scrape(gateway)

    assert value(after, "gateway_requests_total", **ok, status="200") == (
        value(before, "gateway_requests_total", **ok, status="200") + 1
    )
    assert value(after, "gateway_errors_total", **ok, code="INVALID_ARGUMENT") == (
        value(before, "gateway_errors_total", **ok, code="INVALID_ARGUMENT") + 1
    )
    assert value(after, "gateway_request_duration_seconds_count", **ok) == (
        value(before, "gateway_request_duration_seconds_count", **ok) + 2
    )
    # Never the raw path: a member id in a label would be a series per member.
    labels = {v for series in after.values() for ls, _ in series for v in ls.values()}
    assert not any(member.member_id in v or "not-a-uuid" in v for v in labels)


async def test_unknown_paths_share_one_series(gateway: Gateway, http: httpx.AsyncClient) -> None:
    for _ in range(3):
        path = f"/v1/scan/{uuid.uuid4()}"
        assert (await http.get(path)).status_code == 404
    after = await scrape(gateway)
    routes = {ls["route"] for ls, _ in after["gateway_requests_total"]}
    assert "unmatched" in routes
    assert not any(r.startswith("/v1/scan") for r in routes)


async def test_pos_rpcs_counted_by_method_and_error_code(gateway: Gateway, pos: Pos) -> None:
    before = await scrape(gateway)
    await identify(pos, new_phone())
    err = await rpc_error(
        pos.IdentifyMember(pos_pb2.IdentifyMemberRequest(store_id=STORE, phone="12"), timeout=10)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await scrape(gateway)
    rpc = {"protocol": "grpc", "route": IDENTIFY_RPC}
    for status in ("OK", "INVALID_ARGUMENT"):
        assert value(after, "gateway_requests_total", **rpc, status=status) == (
            value(before, "gateway_requests_total", **rpc, status=status) + 1
        )
    assert value(after, "gateway_errors_total", **rpc, code="INVALID_PHONE") == (
        value(before, "gateway_errors_total", **rpc, code="INVALID_PHONE") + 1
    )


@pytest.fixture
def gateway_log() -> Iterator[io.StringIO]:
    """Everything the gateway's loggers write, formatted as in production (JSON)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    configure_logging("gateway", "DEBUG", json=True)
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    try:
        yield out
    finally:
        root.handlers[:], root.level = saved


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


async def test_access_log_is_json_without_pii(
    gateway_log: io.StringIO, http: httpx.AsyncClient, pos: Pos
) -> None:
    phone = new_phone()
    openid = f"o-{uuid.uuid4().hex}"
    member = await identify(pos, phone)
    # A phone in the body, in the query string, and in the path; an openid in a body.
    await http.post(
        "/v1/members/bind-phone",
        json={"request_key": uuid.uuid4().hex, "app_id": "wx1", "openid": openid, "phone": phone},
    )
    await http.get(f"/v1/members/{member.member_id}/points", params={"phone": phone})
    await http.get(f"/v1/members/{phone}/points")
    await rpc_error(
        pos.IdentifyMember(pos_pb2.IdentifyMemberRequest(store_id=STORE, phone="1"), timeout=10)
    )

    # Every line of the process but the test's own HTTP client's.
    logged = [line for line in lines(gateway_log) if not str(line["logger"]).startswith("http")]
    text = json.dumps(logged)
    assert phone not in text and phone[-8:] not in text
    assert openid not in text
    access = [line for line in lines(gateway_log) if line.get("logger") == "gateway.access"]
    routes = [(line["protocol"], line["route"], line["status"]) for line in access]
    assert ("http", "/v1/members/bind-phone", "200") in routes
    assert ("http", POINTS_ROUTE, "200") in routes
    assert ("http", POINTS_ROUTE, "422") in routes
    assert ("grpc", IDENTIFY_RPC, "OK") in routes
    assert ("grpc", IDENTIFY_RPC, "INVALID_ARGUMENT") in routes
    by_route = {(line["route"], line["status"]): line for line in access}
    ok = by_route[(POINTS_ROUTE, "200")]
    assert ok["member_id"] == member.member_id
    assert ok["client"] and isinstance(ok["client"], str)
    assert isinstance(ok["duration_ms"], float)
    assert by_route[(IDENTIFY_RPC, "INVALID_ARGUMENT")]["code"] == "INVALID_PHONE"
    assert by_route[(IDENTIFY_RPC, "INVALID_ARGUMENT")]["store_id"] == STORE
    # Joined to traces: the HTTP line was written inside the request's span.
    assert len(str(ok["trace_id"])) == 32


async def test_series_are_labelled_with_the_authenticated_client(
    gateway: Gateway,
    http: httpx.AsyncClient,
    pos: Pos,
    trusted_key: IssuedKey,
    store_keys: StoreKeys,
) -> None:
    # The gateway serves the whole session: judge only what this test adds.
    before = {
        tuple(sorted(ls.items())): v for ls, v in (await scrape(gateway))["gateway_requests_total"]
    }
    member = await identify(pos, new_phone())
    assert (await http.get(f"/v1/members/{member.member_id}/points")).status_code == 200
    # An unsigned request is refused by the door: counted, but as nobody's.
    async with httpx.AsyncClient(base_url=str(http.base_url)) as stranger:
        assert (await stranger.get(f"/v1/members/{member.member_id}/points")).status_code == 401
    samples = await scrape(gateway)
    till = (await store_keys.key_for(STORE)).client_id

    def clients(**labels: str) -> set[str]:
        return {
            ls["client"]
            for ls, v in samples["gateway_requests_total"]
            if v > before.get(tuple(sorted(ls.items())), 0.0) and labels.items() <= ls.items()
        }

    assert clients(route=POINTS_ROUTE, status="200") == {trusted_key.client_id}
    assert clients(route=POINTS_ROUTE, status="401") == {"anonymous"}
    assert till in clients(route=IDENTIFY_RPC, status="OK")
