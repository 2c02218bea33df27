"""Bulk earn through the gateway: an operator posts a batch of earns
(POST /v1/admin/points/earns); each line is applied, replayed or refused with
a code; the batch sent again applies nothing twice; a malformed batch is
refused whole with the line named; a member token cannot post one."""

from __future__ import annotations

import uuid

import httpx
import pytest

pytestmark = pytest.mark.e2e

PATH = "/v1/admin/points/earns"


async def test_a_batch_is_applied_per_line_and_a_resend_replays(http: httpx.AsyncClient) -> None:
    members = [str(uuid.uuid4()) for _ in range(3)]
    run = uuid.uuid4().hex[:8]
    body = {
        "lines": [
            {
                "member_id": m,
                "points": 10 * (n + 1),
                "reason": "e2e import",
                "idempotency_key": f"{run}-{n}",
            }
            for n, m in enumerate(members)
        ]
        + [
            {
                "member_id": members[0],
                "points": 5,
                "reason": "e2e import",
                "idempotency_key": f"{run}-future",
                "occurred_at": "2999-01-01T00:00:00Z",
            }
        ]
    }
    first = await http.post(PATH, json=body)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert (reply["applied"], reply["replayed"], reply["refused"]) == (3, 0, 1)
    assert [r["outcome"] for r in reply["results"]] == ["applied"] * 3 + ["refused"]
    assert reply["results"][3]["refusal"] == "INVALID_OCCURRED_AT"
    assert [r["available"] for r in reply["results"][:3]] == [10, 20, 30]

    again = await http.post(PATH, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert again.status_code == 200, again.text
    assert (again.json()["applied"], again.json()["replayed"]) == (0, 3)
    assert [r["transaction_id"] for r in again.json()["results"][:3]] == [
        r["transaction_id"] for r in reply["results"][:3]
    ]
    balance = await http.get(f"/v1/members/{members[2]}/points")
    assert balance.json()["available"] == 30


async def test_a_malformed_batch_is_refused_whole(http: httpx.AsyncClient) -> None:
    member = str(uuid.uuid4())
    line = {"member_id": member, "points": 5, "reason": "e2e", "idempotency_key": "same"}
    dup = await http.post(PATH, json={"lines": [line, line]})
    assert dup.status_code == 422, dup.text
    assert (dup.json()["code"], dup.json()["field"]) == (
        "DUPLICATE_IDEMPOTENCY_KEY",
        "lines[1].idempotency_key",
    )
    empty = await http.post(PATH, json={"lines": []})
    assert empty.status_code == 422, empty.text
    balance = await http.get(f"/v1/members/{member}/points")
    assert balance.json()["available"] == 0
