"""The foundation slice end to end: a POS identifies a member and settles an
order through the gateway; points land in rewards, the order's event reaches
tiering, and the mini-program backend reads both over HTTP."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import TypeAlias

import grpc
import httpx
import pytest

from gateway.app import build
from gateway.errors import PROBLEM_JSON
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info
from tests.harness import eventually

from .conftest import CLOSED_STORE_ID, closed_port, gateway_settings

pytestmark = pytest.mark.e2e

STORE = "SH001"
Pos: TypeAlias = pos_pb2_grpc.PosServiceStub


def new_phone() -> str:
    """A valid mainland mobile number no other test uses."""
    return f"139{random.randrange(10**8):08d}"


def new_txn() -> str:
    return f"T-{uuid.uuid4().hex[:12]}"


async def identify(pos: Pos, phone: str, store_id: str = STORE) -> pos_pb2.IdentifyMemberResponse:
    return await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=store_id, phone=phone), timeout=10
    )


async def complete(
    pos: Pos, member_id: str, paid_fen: int, txn: str | None = None, store_id: str = STORE
) -> pos_pb2.CompleteOrderResponse:
    return await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=store_id,
            pos_transaction_id=txn or new_txn(),
            member_id=member_id,
            paid_amount_fen=paid_fen,
            gross_amount_fen=paid_fen,
        ),
        timeout=10,
    )


async def points(http: httpx.AsyncClient, member_id: str) -> dict[str, object]:
    reply = await http.get(f"/v1/members/{member_id}/points")
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_problem(reply: httpx.Response, status: int, code: str, field: str = "") -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM_JSON
    body = reply.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["field"] == field
    assert set(body) >= {"type", "title", "status", "code", "detail", "field"}
    return body  # type: ignore[no-any-return]


async def test_identify_by_phone_creates_then_finds(pos: Pos, http: httpx.AsyncClient) -> None:
    phone = new_phone()
    first = await identify(pos, phone)
    assert first.created
    assert first.member_id
    assert first.member_number
    assert first.phone_masked == f"{phone[:3]}****{phone[-4:]}"
    assert first.points_available == 0

    # The same person, typed differently at another store.
    spaced = f"+86 {phone[:3]} {phone[3:7]} {phone[7:]}"
    again = await identify(pos, spaced, store_id="SH002")
    assert not again.created
    assert again.member_id == first.member_id
    assert again.member_number == first.member_number

    profile = await http.get(f"/v1/members/{first.member_id}")
    assert profile.status_code == 200, profile.text
    body = profile.json()
    assert body["member_id"] == first.member_id
    assert body["member_number"] == first.member_number
    assert body["phone_masked"] == first.phone_masked
    assert set(body) == {"member_id", "member_number", "phone_masked", "registered_at"}
    registered = datetime.fromisoformat(body["registered_at"].replace("Z", "+00:00"))
    assert registered.tzinfo is not None


async def test_complete_order_accrues_points_shown_over_http(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    phone = new_phone()
    member = await identify(pos, phone)
    reply = await complete(pos, member.member_id, paid_fen=3250)
    assert reply.order_id
    assert reply.points_earned == 32  # floor(3250 / 100): one point per whole yuan
    assert reply.points_balance == 32
    assert not reply.replayed

    body = await points(http, member.member_id)
    assert body == {"member_id": member.member_id, "available": 32, "lifetime_earned": 32}
    assert all(type(body[k]) is int for k in ("available", "lifetime_earned"))

    # The POS sees the balance at the next identification.
    assert (await identify(pos, phone)).points_available == 32


async def test_concurrent_retries_settle_once(pos: Pos, http: httpx.AsyncClient) -> None:
    member = await identify(pos, new_phone())
    txn = new_txn()
    replies = await asyncio.gather(
        *(complete(pos, member.member_id, paid_fen=4890, txn=txn) for _ in range(32))
    )
    assert len({r.order_id for r in replies}) == 1
    assert sum(r.replayed for r in replies) == 31
    assert {r.points_earned for r in replies} == {48}
    assert {r.points_balance for r in replies} == {48}
    body = await points(http, member.member_id)
    assert (body["available"], body["lifetime_earned"]) == (48, 48)

    # A later retry, after the storm, is still the same order.
    late = await complete(pos, member.member_id, paid_fen=4890, txn=txn)
    assert late.order_id == replies[0].order_id and late.replayed


async def test_reusing_a_transaction_id_for_another_order_is_refused(
    pos: Pos, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    txn = new_txn()
    await complete(pos, member.member_id, paid_fen=1000, txn=txn)
    err = await rpc_error(complete(pos, member.member_id, paid_fen=2000, txn=txn))
    assert err.code() == grpc.StatusCode.ABORTED
    assert error_info(err) == ("IDEMPOTENCY_KEY_REUSED", "pos_transaction_id")
    assert (await points(http, member.member_id))["available"] == 10


async def test_the_order_reaches_tiering(pos: Pos, http: httpx.AsyncClient) -> None:
    member = await identify(pos, new_phone())
    await complete(pos, member.member_id, paid_fen=2680)

    async def spend_seen() -> dict | None:
        reply = await http.get(f"/v1/members/{member.member_id}/spend")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return body if body["order_count"] == 1 else None

    body = await eventually(spend_seen, timeout=15)
    assert body["member_id"] == member.member_id
    assert body["total_paid_fen"] == 2680
    assert type(body["total_paid_fen"]) is int
    assert body["last_order_at"] is not None
    datetime.fromisoformat(body["last_order_at"].replace("Z", "+00:00"))


async def test_malformed_phone_names_the_field(pos: Pos) -> None:
    for bad in ("12345", "not-a-phone", "139123456789012"):
        err = await rpc_error(identify(pos, bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert error_info(err) == ("INVALID_PHONE", "phone"), bad


async def test_missing_fields_are_refused_locally(pos: Pos) -> None:
    err = await rpc_error(identify(pos, new_phone(), store_id=""))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("STORE_ID_REQUIRED", "store_id")

    err = await rpc_error(pos.IdentifyMember(pos_pb2.IdentifyMemberRequest(store_id=STORE)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("PHONE_REQUIRED", "phone")

    member = await identify(pos, new_phone())
    err = await rpc_error(complete(pos, member.member_id, paid_fen=100, txn=" "))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("POS_TRANSACTION_ID_REQUIRED", "pos_transaction_id")


async def test_bad_amounts_are_refused_and_write_nothing(pos: Pos, http: httpx.AsyncClient) -> None:
    member = await identify(pos, new_phone())
    txn = new_txn()
    err = await rpc_error(complete(pos, member.member_id, paid_fen=-100, txn=txn))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("NEGATIVE_AMOUNT", "paid_amount_fen")

    err = await rpc_error(complete(pos, member.member_id, paid_fen=10**15, txn=txn))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("ORDER_AMOUNT_TOO_LARGE", "paid_amount_fen")

    assert (await points(http, member.member_id))["available"] == 0
    # The refused attempts did not burn the key: the corrected order settles.
    ok = await complete(pos, member.member_id, paid_fen=1500, txn=txn)
    assert not ok.replayed and ok.points_earned == 15


async def test_unknown_and_closed_stores_are_refused(pos: Pos) -> None:
    for store in ("NOPE01", CLOSED_STORE_ID):
        err = await rpc_error(identify(pos, new_phone(), store_id=store))
        assert err.code() == grpc.StatusCode.NOT_FOUND, store
        assert error_info(err) == ("UNKNOWN_STORE", "store_id"), store

    member = await identify(pos, new_phone())
    err = await rpc_error(complete(pos, member.member_id, paid_fen=1000, store_id="NOPE01"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err) == ("UNKNOWN_STORE", "store_id")


async def test_http_malformed_and_unknown_member_ids(http: httpx.AsyncClient) -> None:
    for path in ("/v1/members/not-a-uuid", "/v1/members/123/points", "/v1/members/x/spend"):
        body = assert_problem(await http.get(path), 422, "INVALID_ARGUMENT", "member_id")
        assert "member_id" in body["detail"]

    unknown = uuid.uuid4()
    assert_problem(await http.get(f"/v1/members/{unknown}"), 404, "UNKNOWN_MEMBER", "member_id")
    assert_problem(await http.get("/v1/nothing-here"), 404, "NOT_FOUND")


async def test_dead_downstreams_fail_fast() -> None:
    dead = f"127.0.0.1:{closed_port()}"
    settings = gateway_settings(
        member_addr=dead, rewards_addr=dead, tiering_addr=dead, engagement_addr=dead
    )
    gw = build(settings)
    await gw.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gw.pos_grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}", timeout=30) as http,
        ):
            stub = pos_pb2_grpc.PosServiceStub(channel)
            limit = 5.0  # a hang check, far above the 2 s downstream deadline

            started = time.monotonic()
            err = await rpc_error(identify(stub, new_phone()))
            assert time.monotonic() - started < limit
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(err)[0] == "DEPENDENCY_UNAVAILABLE"
            assert dead not in (err.details() or "")

            started = time.monotonic()
            err = await rpc_error(complete(stub, str(uuid.uuid4()), paid_fen=100))
            assert time.monotonic() - started < limit
            assert err.code() == grpc.StatusCode.UNAVAILABLE

            for path in (f"/v1/members/{uuid.uuid4()}/points", f"/v1/members/{uuid.uuid4()}"):
                started = time.monotonic()
                reply = await http.get(path)
                assert time.monotonic() - started < limit
                assert_problem(reply, 503, "DEPENDENCY_UNAVAILABLE")
                assert dead not in reply.text

            started = time.monotonic()
            reply = await http.get("/readyz")
            assert time.monotonic() - started < limit
            # Ready: the gateway itself serves (each call above failed fast and
            # cleanly); what is down is listed, not a reason to leave the balancer.
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert set(body["downstreams"]) == {"member", "rewards", "tiering", "engagement"}
            assert set(body["downstreams"].values()) == {"UNREACHABLE"}
            detail = (await http.get("/readyz/detail")).json()
            assert detail["status"] == "ready"
            assert set(detail["dependencies"].values()) == {"UNREACHABLE"}

            # Liveness does not depend on anyone else.
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await gw.stop()


async def test_openapi_documents_the_routes(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    routes = {
        "/healthz": "Liveness",
        "/readyz": "Readiness",
        "/v1/members/{member_id}": "Member",
        "/v1/members/{member_id}/points": "PointsBalance",
        "/v1/members/{member_id}/spend": "MemberSpend",
    }
    for path, model in routes.items():
        responses = spec["paths"][path]["get"]["responses"]
        ok = responses["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": f"#/components/schemas/{model}"}, path
        for status, response in responses.items():
            if status != "200":
                assert list(response["content"]) == [PROBLEM_JSON], (path, status)
    schemas = spec["components"]["schemas"]
    assert schemas["PointsBalance"]["properties"]["available"]["type"] == "integer"
    assert schemas["PointsBalance"]["examples"]
    assert schemas["Member"]["properties"]["registered_at"]["format"] == "date-time"
    member_errors = spec["paths"]["/v1/members/{member_id}"]["get"]["responses"]
    assert {"404", "422", "503"} <= set(member_errors)


async def test_probes_with_everything_up(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    reply = await http.get("/readyz")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["status"] == "ready"
    assert body["downstreams"] == {"member": "SERVING", "rewards": "SERVING", "tiering": "SERVING"}


async def test_order_with_lines_settles(pos: Pos, http: httpx.AsyncClient) -> None:
    member = await identify(pos, new_phone())
    reply = await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=new_txn(),
            member_id=member.member_id,
            paid_amount_fen=1980,
            gross_amount_fen=2380,
            lines=[
                pos_pb2.OrderLine(sku="TEA-01", name="多肉葡萄", quantity=1, paid_amount_fen=1200),
                pos_pb2.OrderLine(sku="TEA-07", name="芝芝莓莓", quantity=1, paid_amount_fen=780),
            ],
        ),
        timeout=10,
    )
    assert (reply.points_earned, reply.points_balance) == (19, 19)
    assert (await points(http, member.member_id))["available"] == 19

    # Lines that do not add up to the amount paid are refused, naming the field.
    err = await rpc_error(
        pos.CompleteOrder(
            pos_pb2.CompleteOrderRequest(
                store_id=STORE,
                pos_transaction_id=new_txn(),
                member_id=member.member_id,
                paid_amount_fen=1000,
                lines=[pos_pb2.OrderLine(sku="TEA-01", quantity=1, paid_amount_fen=900)],
            ),
            timeout=10,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err) == ("LINES_TOTAL_MISMATCH", "lines")
