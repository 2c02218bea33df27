"""POS CompleteOrder and the member behind the id (issue 13, item 3): an id
member does not know is refused with a named error, an erased one is refused,
an absorbed (merged) one is credited to its survivor; nothing is written for a
refused order."""

from __future__ import annotations

import uuid

import grpc
import httpx
import pytest

from loyalty.pos.v1 import pos_pb2_grpc
from servicekit.errors import error_info
from servicekit.server import ServiceApp
from tests.harness import eventually

from .test_pos_slice import complete, identify, new_phone, new_txn, points, rpc_error

pytestmark = pytest.mark.e2e


async def test_an_unknown_member_id_is_refused_and_nothing_is_written(
    pos: pos_pb2_grpc.PosServiceStub, http: httpx.AsyncClient
) -> None:
    stranger = str(uuid.uuid4())
    err = await rpc_error(complete(pos, stranger, paid_fen=1800))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err) == ("UNKNOWN_MEMBER", "member_id")
    # Rewards never heard of the id: no account was opened for it.
    reply = await http.get(f"/v1/members/{stranger}/points")
    assert reply.status_code == 200, reply.text
    assert reply.json()["lifetime_earned"] == 0


async def test_an_erased_member_is_refused(
    pos: pos_pb2_grpc.PosServiceStub, http: httpx.AsyncClient
) -> None:
    member = await identify(pos, new_phone())
    erased = await http.post(f"/v1/admin/members/{member.member_id}/erase", json={"reason": "PIPL"})
    assert erased.status_code == 200, erased.text
    err = await rpc_error(complete(pos, member.member_id, paid_fen=1800))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err) == ("MEMBER_ERASED", "member_id")


async def test_an_absorbed_member_id_is_credited_to_its_survivor(
    pos: pos_pb2_grpc.PosServiceStub, http: httpx.AsyncClient
) -> None:
    older = await identify(pos, new_phone())
    younger = await identify(pos, new_phone())
    merged = await http.post(
        "/v1/admin/members/merge",
        json={
            "member_ids": [older.member_id, younger.member_id],
            "reason": "one person, two phones",
        },
    )
    assert merged.status_code == 200, merged.text
    survivor = merged.json()["member"]["member_id"]
    absorbed = younger.member_id if survivor == older.member_id else older.member_id
    # Once rewards has seen the merge, an order for the absorbed id lands on the survivor.
    await eventually(
        lambda: _merged_in_rewards(pos, absorbed, survivor, http), timeout=15, interval=0.2
    )
    # A probe that reached rewards before the merge did was credited to the
    # absorbed id, as any order then: count from here, not from 0.
    kept = (await points(http, absorbed))["available"]
    before = (await points(http, survivor))["available"]
    txn = new_txn()
    order = await complete(pos, absorbed, paid_fen=2500, txn=txn)
    assert order.points_earned == 25
    assert (await points(http, survivor))["available"] == before + 25
    assert (await points(http, absorbed))["available"] == kept
    # A retry of the very request the till sent replays.
    again = await complete(pos, absorbed, paid_fen=2500, txn=txn)
    assert again.replayed and again.order_id == order.order_id


async def _merged_in_rewards(
    pos: pos_pb2_grpc.PosServiceStub, absorbed: str, survivor: str, http: httpx.AsyncClient
) -> bool:
    """Rewards has applied MemberMerged: a probe order's points reach the survivor."""
    before = (await points(http, survivor))["available"]
    await complete(pos, absorbed, paid_fen=100)
    return bool((await points(http, survivor))["available"] > before)


def _member_checks(member_app: ServiceApp) -> float:
    """GetMember calls member has answered, whatever their outcome."""
    registry = member_app.metrics.registry
    return sum(
        registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_service": "loyalty.member.v1.MemberService",
                "grpc_method": "GetMember",
                "grpc_code": code.name,
            },
        )
        or 0.0
        for code in grpc.StatusCode
    )


async def test_the_member_check_is_not_asked_again_until_an_erasure(
    pos: pos_pb2_grpc.PosServiceStub, http: httpx.AsyncClient, member_app: ServiceApp
) -> None:
    """The gateway keeps what member confirmed under the identity epoch
    (gateway/known_members.py): the identified member's orders cost no member
    call; an erasure moves the epoch, so the next order asks and is refused."""
    member = await identify(pos, new_phone())
    before = _member_checks(member_app)
    await complete(pos, member.member_id, paid_fen=1000)
    await complete(pos, member.member_id, paid_fen=1000)
    assert _member_checks(member_app) == before
    erased = await http.post(f"/v1/admin/members/{member.member_id}/erase", json={"reason": "PIPL"})
    assert erased.status_code == 200, erased.text
    err = await rpc_error(complete(pos, member.member_id, paid_fen=1800))
    assert error_info(err) == ("MEMBER_ERASED", "member_id")
    assert _member_checks(member_app) == before + 1
