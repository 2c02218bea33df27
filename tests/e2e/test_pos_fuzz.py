"""Hypothesis fuzz of the POS RPCs through the gateway: random fields (odd
text, NUL bytes, huge and negative numbers, unknown members and stores) never
crash the gateway or a service (no INTERNAL / UNKNOWN), every refusal carries
a stable code, and a refused call writes nothing (the member's points and
statement are as before)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import Gateway
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info

from .doors import StoreKeyInterceptor, StoreKeys
from .test_pos_slice import STORE, Pos, identify, new_phone

pytestmark = pytest.mark.e2e

CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED}
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "SH001\x00", "0" * 300, "SH001", "13912345678"]),
)


def order_lines() -> st.SearchStrategy[list[pos_pb2.OrderLine]]:
    line = st.builds(
        pos_pb2.OrderLine,
        sku=TEXT,
        name=TEXT,
        category=TEXT,
        quantity=INT64,
        paid_amount_fen=INT64,
    )
    return st.lists(line, max_size=3)


def ts() -> st.SearchStrategy[Any]:
    from google.protobuf import timestamp_pb2

    seconds = st.integers(min_value=-62135596800, max_value=253402300799)
    return st.builds(lambda s: timestamp_pb2.Timestamp(seconds=s), seconds)


def calls(member_id: str) -> st.SearchStrategy[tuple[str, Any]]:
    """(RPC name, request) with every field random, members and stores sometimes real."""
    member = st.one_of(st.just(member_id), TEXT)
    store = st.one_of(st.just(STORE), TEXT)
    identify_req = (
        st.builds(
            pos_pb2.IdentifyMemberRequest,
            store_id=store,
            phone=TEXT,
        )
        | st.builds(pos_pb2.IdentifyMemberRequest, store_id=store, member_code=TEXT)
        | st.builds(pos_pb2.IdentifyMemberRequest, store_id=store, card=TEXT)
    )
    complete_req = st.builds(
        pos_pb2.CompleteOrderRequest,
        store_id=store,
        pos_transaction_id=TEXT,
        member_id=member,
        paid_amount_fen=INT64,
        gross_amount_fen=INT64,
        lines=order_lines(),
        ordered_at=ts(),
        channel=st.integers(min_value=0, max_value=9),
        points_to_redeem=INT64,
    )
    refund_req = st.builds(
        pos_pb2.RefundOrderRequest,
        store_id=store,
        pos_transaction_id=TEXT,
        refund_transaction_id=TEXT,
        refunded_amount_fen=INT64,
    )
    upload_req = st.builds(
        pos_pb2.UploadOfflineOrdersRequest,
        store_id=store,
        orders=st.lists(st.builds(pos_pb2.OfflineOrder, order=complete_req), max_size=3),
    )
    return st.one_of(
        st.tuples(st.just("IdentifyMember"), identify_req),
        st.tuples(st.just("CompleteOrder"), complete_req),
        st.tuples(st.just("RefundOrder"), refund_req),
        st.tuples(st.just("UploadOfflineOrders"), upload_req),
    )


@pytest.fixture
async def till(gateway: Gateway, store_keys: StoreKeys) -> AsyncIterator[Pos]:
    """One store's POS: its key on every call, whatever store the request names
    (another store in a request is then the door's STORE_MISMATCH, also fuzzed)."""
    issued = await store_keys.key_for(STORE)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.pos_grpc_port}",
        interceptors=[StoreKeyInterceptor(STORE, issued.api_key)],
    ) as channel:
        yield pos_pb2_grpc.PosServiceStub(channel)


async def test_random_pos_calls_never_crash_and_refusals_write_nothing(
    till: Pos, http: httpx.AsyncClient
) -> None:
    pos = till
    # A member with points, so a refused redemption or refund has something to spoil.
    member = await identify(pos, new_phone())
    await pos.CompleteOrder(
        pos_pb2.CompleteOrderRequest(
            store_id=STORE,
            pos_transaction_id=f"seed-{member.member_id}",
            member_id=member.member_id,
            paid_amount_fen=5000,
        ),
        timeout=10,
    )
    loop = asyncio.get_running_loop()
    crashes: list[str] = []

    async def statement() -> tuple[object, object]:
        balance = (await http.get(f"/v1/members/{member.member_id}/points")).json()
        history = (await http.get(f"/v1/members/{member.member_id}/points/history")).json()
        return balance["available"], [line["transaction_id"] for line in history["lines"]]

    async def one(name: str, request: Any) -> None:
        before = await statement()
        try:
            await getattr(pos, name)(request, timeout=10)
        except grpc.aio.AioRpcError as err:
            code, _ = error_info(err)
            if err.code() in CRASHES or not code:
                crashes.append(f"{name} {err.code().name} {code}: {request!r}"[:600])
            elif err.code() not in (grpc.StatusCode.UNAVAILABLE,):
                # Refused: not a point, not a statement line moved.
                after = await statement()
                if after != before:
                    crashes.append(f"{name} refused ({code}) but wrote: {request!r}"[:600])

    # Hypothesis runs synchronously in a worker thread; each call runs on the
    # test's loop, where the gateway and the services serve.
    @given(call=calls(member.member_id))
    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(call: tuple[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(one(*call), loop).result(timeout=30)

    await asyncio.to_thread(fuzz)
    assert not crashes, "\n".join(crashes)
