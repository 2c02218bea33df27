"""Bulk issuance through the gateway: an operator issues a template to a list
of members (POST /v1/admin/coupon-templates/{id}/issue); each member gets a
result; the batch sent again replays the same codes; a malformed batch is
refused whole with the item named."""

from __future__ import annotations

import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e


async def make_template(http: httpx.AsyncClient, stock: int) -> str:
    template_id = f"E2E-BULK-{uuid.uuid4().hex[:8]}"
    created = await http.post(
        "/v1/admin/coupon-templates",
        json={
            "template_id": template_id,
            "terms": {
                "name": "新人3天礼包",
                "kind": "amount_off",
                "discount_fen": 500,
                "valid_days": 3,
            },
            "limits": {"total_stock": stock, "per_member_limit": 1, "stock_shards": 2},
            "status": "active",
        },
    )
    assert created.status_code == 201, created.text
    return template_id


async def test_a_list_is_issued_per_member_and_a_resend_replays_the_codes(
    http: httpx.AsyncClient,
) -> None:
    template_id = await make_template(http, stock=3)
    members = [str(uuid.uuid4()) for _ in range(4)]
    body = {
        "reason": "registration",
        "items": [{"member_id": m, "issue_key": f"{template_id}-{m}"} for m in members],
    }
    path = f"/v1/admin/coupon-templates/{template_id}/issue"
    first = await http.post(path, json=body)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert (reply["issued"], reply["replayed"], reply["refused"]) == (3, 0, 1)
    results = reply["results"]
    assert [r["member_id"] for r in results] == members
    assert [r["outcome"] for r in results] == ["issued"] * 3 + ["refused"]
    assert (results[3]["refusal"], results[3]["code"]) == ("OUT_OF_STOCK", None)
    assert all(r["code"] and r["expires_at"] for r in results[:3])

    # The same batch under a new Idempotency-Key reaches rewards: each key replays.
    again = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert again.status_code == 200, again.text
    assert (again.json()["replayed"], again.json()["refused"]) == (3, 1)
    assert [r["code"] for r in again.json()["results"]] == [r["code"] for r in results]

    wallet = await http.get(f"/v1/members/{members[0]}/coupons")
    assert [c["code"] for c in wallet.json()["coupons"]] == [results[0]["code"]]
    assert wallet.json()["coupons"][0]["reason"] == "registration"
    report = await http.get(f"/v1/admin/coupon-templates/{template_id}/report")
    assert (report.json()["issued"], report.json()["remaining_stock"]) == (3, 0)


async def test_a_malformed_batch_is_refused_whole(http: httpx.AsyncClient) -> None:
    template_id = await make_template(http, stock=10)
    path = f"/v1/admin/coupon-templates/{template_id}/issue"
    member = str(uuid.uuid4())
    dup = await http.post(
        path,
        json={
            "items": [
                {"member_id": member, "issue_key": "k"},
                {"member_id": str(uuid.uuid4()), "issue_key": "k"},
            ],
        },
    )
    assert dup.status_code == 422, dup.text
    assert (dup.json()["code"], dup.json()["field"]) == (
        "DUPLICATE_ISSUE_KEY",
        "items[1].issue_key",
    )
    too_many = await http.post(
        path,
        json={
            "items": [{"member_id": member, "issue_key": f"k{n}"} for n in range(1001)],
        },
    )
    assert too_many.status_code == 422
    unknown = await http.post(
        f"/v1/admin/coupon-templates/{template_id}-NOPE/issue",
        json={"items": [{"member_id": member, "issue_key": "x"}]},
    )
    assert (unknown.status_code, unknown.json()["code"]) == (404, "UNKNOWN_TEMPLATE")
    report = await http.get(f"/v1/admin/coupon-templates/{template_id}/report")
    assert report.json()["issued"] == 0
