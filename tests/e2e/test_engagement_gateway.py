"""Engagement through the gateway's doors: operators publish, pause, resume and
read metrics; the mini-program reports events and unsubscribes. Behind it the
real member service (MemberRegistered reaches engagement over the event bus)
and the engagement service with its own sweeper and dispatcher (local sink).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.errors import PROBLEM_JSON
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.server import ServiceApp
from services.engagement import facts_repository as facts_repo
from tests.harness import eventually

from .conftest import gateway_settings

pytestmark = pytest.mark.e2e

RECEIPT_TOKEN = "e2e-receipt-token"


@pytest.fixture(scope="module")
async def eng_gateway(
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    engagement_app: ServiceApp,
    demo_stores: list[str],
) -> AsyncIterator[Gateway]:
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            engagement_addr=f"127.0.0.1:{engagement_app.port}",
            sms_receipt_token=RECEIPT_TOKEN,
        )
    )
    await gw.start()
    yield gw
    await gw.stop()


@pytest.fixture(scope="module")
async def api(eng_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{eng_gateway.http_port}", timeout=10
    ) as client:
        yield client


async def new_member(gw: Gateway) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.pos_grpc_port}") as channel:
        reply = await pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(
            pos_pb2.IdentifyMemberRequest(
                store_id="SH001", phone=f"137{random.randrange(10**8):08d}"
            ),
            timeout=10,
        )
    return str(reply.member_id)


def check_in_journey(journey_id: str) -> dict[str, Any]:
    return {
        "id": journey_id,
        "priority": 50,
        "entry": {"event": "check_in"},
        "reentry": {"policy": "after_exit"},
        "start": "thanks",
        "steps": {
            # Transactional: no marketing consent needed, not held by quiet hours.
            "thanks": {
                "type": "send",
                "channel": "app_push",
                "template": "check-in-thanks",
                "title": "Thanks",
                "body": "Thanks for checking in",
                "class": "transactional",
                "next": "end",
            },
            "end": {"type": "exit"},
        },
    }


async def test_publish_ingest_send_metrics_pause_resume(
    api: httpx.AsyncClient, eng_gateway: Gateway
) -> None:
    journey_id = f"check-in-{uuid.uuid4().hex[:8]}"
    published = await api.post("/v1/admin/journeys", json=check_in_journey(journey_id))
    assert published.status_code == 201, published.text
    assert published.json() == {"journey_id": journey_id, "version": 1}

    member = await new_member(eng_gateway)

    # One check-in: until MemberRegistered reaches engagement the event is
    # parked, then replayed. Each check-in re-enters the journey once the last
    # one exited, so posting on every poll could send twice (CI saw count 2).
    reply = await api.post(
        f"/v1/members/{member}/events",
        json={"event_id": str(uuid.uuid4()), "type": "check_in"},
    )
    assert reply.status_code == 202, reply.text

    async def enrolled() -> bool:
        metrics = (await api.get(f"/v1/admin/journeys/{journey_id}/metrics")).json()
        return bool(metrics["entered"] >= 1)

    await eventually(enrolled, timeout=60, interval=0.2)

    async def delivered() -> dict[str, Any] | None:
        metrics = (await api.get(f"/v1/admin/journeys/{journey_id}/metrics")).json()
        steps = {s["step_id"]: s for s in metrics["steps"]}
        return metrics if steps.get("thanks", {}).get("delivered", 0) >= 1 else None

    metrics = await eventually(delivered, timeout=60, interval=0.2)
    assert metrics["status"] == "active" and metrics["lift"] is None
    # Operators see the sends by status and provider code: it went through the
    # push provider's fake (devtools/provider_fakes), the production code path.
    sends = (await api.get(f"/v1/admin/journeys/{journey_id}/sends")).json()
    assert {
        "step_id": "thanks",
        "channel": "app_push",
        "status": "delivered",
        "error_code": "",
        "count": 1,
    } in sends["counts"]
    unknown = (await api.get(f"/v1/admin/journeys/{journey_id}/sends/unknown")).json()
    assert unknown == {"sends": [], "next_page_token": None}

    paused = await api.post(f"/v1/admin/journeys/{journey_id}/pause")
    assert paused.json() == {"journey_id": journey_id, "status": "paused", "live_version": 1}
    # The operators' list: every journey by id, paged; this one with its counts.
    listed: list[dict[str, Any]] = []
    token = ""
    while True:
        page = await api.get(
            "/v1/admin/journeys",
            params={"page_size": 3, **({"page_token": token} if token else {})},
        )
        assert page.status_code == 200, page.text
        listed += page.json()["journeys"]
        token = page.json()["next_page_token"] or ""
        if not token:
            break
    row = {j["journey_id"]: j for j in listed}[journey_id]
    assert {k: row[k] for k in ("name", "live_version", "status", "channels")} == {
        "name": journey_id,
        "live_version": 1,
        "status": "paused",
        "channels": ["app_push"],
    }
    assert row["entered"] >= 1
    bad = await api.get("/v1/admin/journeys", params={"page_token": "Not One!"})
    assert bad.status_code == 422
    assert (bad.json()["code"], bad.json()["field"]) == ("INVALID_PAGE_TOKEN", "page_token")
    resumed = await api.post(f"/v1/admin/journeys/{journey_id}/resume")
    assert resumed.json()["status"] == "active"


async def test_event_retries_are_harmless_and_unknown_members_are_parked(
    api: httpx.AsyncClient,
) -> None:
    body = {"event_id": str(uuid.uuid4()), "type": "page_view", "attributes": {"page": "menu"}}
    stranger = uuid.uuid4()
    first = await api.post(f"/v1/members/{stranger}/events", json=body)
    assert first.status_code == 202
    assert first.json() == {"parked": True, "duplicate": False, "enrolled_journeys": []}
    again = await api.post(f"/v1/members/{stranger}/events", json=body)
    assert again.json()["duplicate"] is True


async def test_unsubscribe_is_recorded_by_member_and_followed_by_engagement(
    api: httpx.AsyncClient, eng_gateway: Gateway, engagement_app: ServiceApp
) -> None:
    """The refusal lands in member's consent (with its history), and engagement's
    projection follows member's ConsentChanged: one source of truth."""
    member = await new_member(eng_gateway)
    reply = await api.post(f"/v1/members/{member}/unsubscribe", json={"channels": ["sms"]})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"member_id": member, "channels": ["sms"]}
    history = (await api.get(f"/v1/members/{member}/consents/history")).json()["records"]
    assert [(r["purpose"], r["channel"], r["granted"], r["source"]) for r in history] == [
        ("marketing", "sms", False, "mini-program:unsubscribe")
    ]
    db = engagement_app.db
    assert db is not None

    async def projected(channel: str) -> Any:
        row = await db.pool.fetchrow(
            "SELECT granted, source FROM engagement.consents WHERE member_id = $1 AND channel = $2",
            uuid.UUID(member),
            channel,
        )
        return row if row is not None and row["granted"] is False else None

    row = await eventually(lambda: projected("sms"), timeout=15, interval=0.1)
    assert row["source"] == "member:mini-program:unsubscribe"
    everything = await api.post(f"/v1/members/{member}/unsubscribe")
    assert everything.json()["channels"] == ["wecom", "sms", "miniprogram", "app_push"]
    history = (await api.get(f"/v1/members/{member}/consents/history")).json()["records"]
    assert len(history) == 5  # every refusal kept, the repeated sms one too
    for channel in ("wecom", "miniprogram", "app_push"):
        await eventually(lambda c=channel: projected(c), timeout=15, interval=0.1)  # type: ignore[misc]
    bad = await api.post(f"/v1/members/{member}/unsubscribe", json={"channels": ["fax"]})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith(PROBLEM_JSON)
    stranger = await api.post(f"/v1/members/{uuid.uuid4()}/unsubscribe")
    assert stranger.status_code == 404


async def test_bad_journeys_are_rejected_with_the_reason(api: httpx.AsyncClient) -> None:
    doc = check_in_journey("bad-journey")
    doc["steps"]["thanks"]["channel"] = "carrier-pigeon"
    doc["steps"]["orphan"] = {"type": "exit"}
    reply = await api.post("/v1/admin/journeys", json=doc)
    assert reply.status_code == 422
    problem = reply.json()
    assert problem["code"] == "UNKNOWN_CHANNEL"
    assert problem["field"] == "definition.steps.thanks.channel"
    assert "carrier-pigeon" in problem["detail"]
    missing = await api.get("/v1/admin/journeys/no-such-journey/metrics")
    assert missing.status_code == 404
    assert missing.json()["code"] == "UNKNOWN_JOURNEY"
    bad_type = await api.post(
        f"/v1/members/{uuid.uuid4()}/events",
        json={"event_id": str(uuid.uuid4()), "type": "teleported"},
    )
    assert bad_type.status_code == 422


async def test_launch_a_store_offer_to_members_nearby(
    api: httpx.AsyncClient, eng_gateway: Gateway
) -> None:
    journey_id = f"near-sh001-{uuid.uuid4().hex[:8]}"
    doc = check_in_journey(journey_id)
    doc["entry"] = {"event": "near_store", "where": {"store_id": "SH001"}}
    assert (await api.post("/v1/admin/journeys", json=doc)).status_code == 201
    member = await new_member(eng_gateway)
    location = {
        "type": "location_reported",
        "attributes": {"latitude": "31.2250", "longitude": "121.4480", "consent": "true"},
    }

    async def located() -> bool:
        reply = await api.post(
            f"/v1/members/{member}/events", json={**location, "event_id": str(uuid.uuid4())}
        )
        return reply.status_code == 202 and not reply.json()["parked"]

    await eventually(located, timeout=15, interval=0.2)
    reply = await api.post(
        f"/v1/admin/journeys/{journey_id}/launch-near-store", json={"store_id": "SH001"}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["store_id"] == "SH001" and body["entered"] >= 1
    unknown = await api.post(
        f"/v1/admin/journeys/{journey_id}/launch-near-store", json={"store_id": "XX404"}
    )
    assert unknown.status_code == 404
    not_a_store_journey = check_in_journey(f"plain-{uuid.uuid4().hex[:8]}")
    await api.post("/v1/admin/journeys", json=not_a_store_journey)
    refused = await api.post(
        f"/v1/admin/journeys/{not_a_store_journey['id']}/launch-near-store",
        json={"store_id": "SH001"},
    )
    assert refused.status_code == 409 or refused.status_code == 400 or refused.status_code == 422
    assert refused.json()["code"] == "NOT_A_STORE_JOURNEY"


async def test_operators_list_replay_and_expire_parked_events(
    api: httpx.AsyncClient, eng_gateway: Gateway
) -> None:
    stranger = uuid.uuid4()
    for kind in ("page_view", "check_in"):
        parked = await api.post(
            f"/v1/members/{stranger}/events",
            json={"event_id": str(uuid.uuid4()), "type": kind},
        )
        assert parked.json()["parked"] is True
    listed = await api.get("/v1/admin/parked-events", params={"member_id": str(stranger)})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [(e["member_id"], e["event"], e["reason"]) for e in body["events"]] == [
        (str(stranger), "page_view", "UNKNOWN_MEMBER"),
        (str(stranger), "check_in", "UNKNOWN_MEMBER"),
    ]
    assert body["next_page_token"] is None
    one = (
        await api.get(
            "/v1/admin/parked-events", params={"member_id": str(stranger), "page_size": 1}
        )
    ).json()
    assert len(one["events"]) == 1 and one["next_page_token"]
    bad = await api.get("/v1/admin/parked-events", params={"page_token": "nope"})
    assert bad.status_code == 422 and bad.json()["code"] == "INVALID_PAGE_TOKEN"
    # The member service does not know this id: nothing is replayed.
    refused = await api.post(f"/v1/admin/parked-events/{stranger}/replay")
    assert refused.status_code == 404, refused.text
    too_young = await api.post("/v1/admin/parked-events/expire", json={"older_than_days": 1})
    assert too_young.status_code == 200 and too_young.json()["expired"] >= 0
    still = await api.get("/v1/admin/parked-events", params={"member_id": str(stranger)})
    assert len(still.json()["events"]) == 2  # parked seconds ago: kept
    invalid = await api.post("/v1/admin/parked-events/expire", json={"older_than_days": 0})
    assert invalid.status_code == 422


async def test_sms_delivery_reports_need_the_callback_token(api: httpx.AsyncClient) -> None:
    report = [
        {
            "phone_number": "13900000000",
            "send_time": "2030-01-01 10:00:00",
            "report_time": "2030-01-01 10:00:05",
            "success": True,
            "err_code": "DELIVERED",
            "err_msg": "用户接收成功",
            "sms_size": "1",
            "biz_id": "900^1",
            "out_id": f"{uuid.uuid4()}:1",
        }
    ]
    forged = await api.post("/v1/callbacks/sms/aliyun?token=guess", json=report)
    assert forged.status_code == 403
    assert forged.json()["code"] == "BAD_CALLBACK_TOKEN"
    # The right token, a report of no send waiting: accepted (Aliyun stops
    # pushing it) and nothing changes.
    ok = await api.post(f"/v1/callbacks/sms/aliyun?token={RECEIPT_TOKEN}", json=report)
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"code": 0, "msg": "成功", "applied": 0}
    missing = await api.get("/v1/admin/journeys/no-such-journey/sends")
    assert missing.status_code == 404


async def test_a_real_sms_send_is_settled_once_by_the_fakes_report_through_the_gateway(
    api: httpx.AsyncClient,
    eng_gateway: Gateway,
    engagement_app: ServiceApp,
    provider_fakes: Any,
) -> None:
    """The session's engagement service sends an SMS through the real Aliyun
    provider to the fake; the fake's delivery report, pushed to the gateway's
    callback route, settles the send once (`applied: 1`, then 0 on a repeat)."""
    assert engagement_app.db is not None
    journey_id = f"sms-report-{uuid.uuid4().hex[:8]}"
    doc = check_in_journey(journey_id)
    doc["steps"]["thanks"] = {
        "type": "send",
        "channel": "sms",
        "template": "SMS_OFFER",
        "params": {},
        "class": "transactional",
        "next": "end",
    }
    published = await api.post("/v1/admin/journeys", json=doc)
    assert published.status_code == 201, published.text
    member = await new_member(eng_gateway)
    phone = f"139{random.randrange(10**8):08d}"
    # What member would answer for the send (the session's engagement has no
    # MEMBER_ADDR): the stored address.
    async with engagement_app.db.unit_of_work() as uow:
        await facts_repo.set_address(uow.conn, uuid.UUID(member), "sms", phone)

    # One check-in (engagement parks it if the member is not known there yet):
    # each check-in re-enters the journey once the last one exited, and a
    # second SMS to the phone is held by the per-phone guard, so posting again
    # while waiting made sends this test then read at random.
    reply = await api.post(
        f"/v1/members/{member}/events",
        json={"event_id": str(uuid.uuid4()), "type": "check_in"},
    )
    assert reply.status_code == 202, reply.text

    async def accepted() -> dict[str, Any] | None:
        rows = await engagement_app.db.pool.fetch(  # type: ignore[union-attr]
            "SELECT send_key, status, provider_ref FROM engagement.sends"
            " WHERE member_id = $1 AND journey_id = $2",
            uuid.UUID(member),
            journey_id,
        )
        assert len(rows) <= 1, [dict(r) for r in rows]
        # 'sending' is taken before the provider is called; the send is
        # accepted once the provider's id (BizId) is recorded.
        if rows and rows[0]["status"] == "sending" and rows[0]["provider_ref"]:
            return dict(rows[0])
        return None

    # The session's dispatcher may still be working through earlier modules'
    # sends (its per-channel rate): up to a minute.
    row = await eventually(accepted, timeout=60, interval=0.3)
    [sent] = [a for a in provider_fakes.sms.accepted if a.out_id == row["send_key"]]
    assert (sent.phone, sent.biz_id) == (phone, row["provider_ref"])
    url = f"http://127.0.0.1:{eng_gateway.http_port}/v1/callbacks/sms/aliyun?token={RECEIPT_TOKEN}"
    report = provider_fakes.sms.report(sent)
    first = await provider_fakes.sms.push(url, [report])
    assert first.status_code == 200, first.text
    assert first.json() == {"code": 0, "msg": "成功", "applied": 1}
    again = await provider_fakes.sms.push(url, [report])  # Aliyun pushes it again
    assert again.json() == {"code": 0, "msg": "成功", "applied": 0}
    status = await engagement_app.db.pool.fetchval(
        "SELECT status FROM engagement.sends WHERE send_key = $1", row["send_key"]
    )
    assert status == "delivered"
    sends = (await api.get(f"/v1/admin/journeys/{journey_id}/sends")).json()
    assert {
        "step_id": "thanks",
        "channel": "sms",
        "status": "delivered",
        "error_code": "",
        "count": 1,
    } in sends["counts"]
