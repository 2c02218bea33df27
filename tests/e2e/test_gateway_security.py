"""The door, attacked: unsigned, wrongly signed, replayed, stale, unknown,
revoked, wrong-scope, wrong-member and wrong-store calls are refused with
the stable codes, and write nothing; rotation overlaps; rate limits answer
429 / RESOURCE_EXHAUSTED with a retry hint; Idempotency-Key replays,
refuses reuse and never runs a request twice."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.app import Gateway
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth, StoreKeyInterceptor
from gateway.auth.crypto import SignedHeaders, sign
from gateway.auth.model import ADMIN_REWARDS, MEMBER_ANY, ClientKind
from gateway.ratelimit import Limit
from gateway.wechat_fake import FakeWeChatServer
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.errors import error_info

pytestmark = pytest.mark.e2e

APP_ID = "wx-shop"
STORE = "SH001"
OTHER_STORE = "SH002"
DUMMY_MEMBER = "00000000-0000-4000-8000-000000000000"


def url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"


def signed_headers(
    key: IssuedKey,
    method: str,
    target: str,
    body: bytes,
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
    secret: str | None = None,
    idempotency_key: str = "",
    appid: str = "",
    openid: str = "",
) -> dict[str, str]:
    """The headers of a signed request (version 2: the member headers and the
    Idempotency-Key are signed too, and sent when given)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce or secrets.token_hex(16)
    signed = SignedHeaders(appid=appid, openid=openid, idempotency_key=idempotency_key)
    headers = {
        "X-Key-Id": key.key_id,
        "X-Timestamp": ts,
        "X-Nonce": nonce,
        "X-Signature": sign(secret or key.secret, method, target, ts, nonce, body, signed),
        "Content-Type": "application/json",
    }
    extra = {
        "Idempotency-Key": idempotency_key,
        "X-Member-Appid": appid,
        "X-Member-Openid": openid,
    }
    return headers | {name: value for name, value in extra.items() if value}


async def new_member(http: httpx.AsyncClient) -> tuple[str, str]:
    """(member_id, openid) of a fresh mini-program member."""
    openid = f"o-{uuid.uuid4().hex[:12]}"
    reply = await http.post(
        "/v1/members/identify",
        json={"request_key": str(uuid.uuid4()), "app_id": APP_ID, "openid": openid},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["member"]["member_id"], openid


def adjustment(points: int = 7) -> bytes:
    return json.dumps(
        {
            "points": points,
            "reason": "security test",
            "idempotency_key": str(uuid.uuid4()),
        }
    ).encode()


async def available(http: httpx.AsyncClient, member_id: str) -> int:
    reply = await http.get(f"/v1/members/{member_id}/points")
    assert reply.status_code == 200, reply.text
    return int(reply.json()["available"])


def assert_problem(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/problem+json")
    assert reply.json()["code"] == code


@pytest.fixture(scope="module")
async def operator(client_admin: ClientAdmin) -> IssuedKey:
    return await client_admin.create(
        ClientKind.OPERATOR_CONSOLE, "security operator", scopes=[MEMBER_ANY, ADMIN_REWARDS]
    )


@pytest.fixture(scope="module")
async def miniprogram(client_admin: ClientAdmin) -> IssuedKey:
    return await client_admin.create(
        ClientKind.MINIPROGRAM_BACKEND, "security mini-program", app_ids=[APP_ID]
    )


# ---- HTTP: every refusal writes nothing ----------------------------------------


async def test_bad_credentials_are_refused_and_write_nothing(
    gateway: Gateway, http: httpx.AsyncClient, operator: IssuedKey
) -> None:
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment()
    idem = str(uuid.uuid4())
    now = int(time.time())
    unknown = IssuedKey("nobody", "k_0000000000000000", "x" * 43, "")

    def signed(key: IssuedKey = operator, **kw: Any) -> dict[str, str]:
        return signed_headers(
            key, "POST", kw.pop("target", target), kw.pop("body", body), idempotency_key=idem, **kw
        )

    attempts: list[tuple[dict[str, str], str]] = [
        ({"Content-Type": "application/json", "Idempotency-Key": idem}, "CREDENTIALS_MISSING"),
        (signed(secret="wrong"), "SIGNATURE_INVALID"),
        # Signed over another body: tampering in transit.
        (signed(body=adjustment(999)), "SIGNATURE_INVALID"),
        # Signed for another path.
        (signed(target=target + "x"), "SIGNATURE_INVALID"),
        # Signed for another Idempotency-Key (version 2 signs it).
        (signed() | {"Idempotency-Key": str(uuid.uuid4())}, "SIGNATURE_INVALID"),
        (signed(timestamp=now - 400), "TIMESTAMP_STALE"),
        (signed(timestamp=now + 400), "TIMESTAMP_STALE"),
        (signed(unknown), "KEY_UNKNOWN"),
    ]
    async with httpx.AsyncClient(base_url=url(gateway), timeout=10) as raw:
        for headers, code in attempts:
            reply = await raw.post(target, content=body, headers=headers)
            assert_problem(reply, 401, code)
    assert await available(http, member_id) == 0


async def test_a_replayed_request_is_refused_and_applied_once(
    gateway: Gateway, http: httpx.AsyncClient, operator: IssuedKey
) -> None:
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment(5)
    headers = signed_headers(operator, "POST", target, body, idempotency_key=str(uuid.uuid4()))
    async with httpx.AsyncClient(base_url=url(gateway), timeout=10) as raw:
        first = await raw.post(target, content=body, headers=headers)
        assert first.status_code == 200, first.text
        # Captured on the wire and sent again, byte for byte.
        replay = await raw.post(target, content=body, headers=headers)
    assert_problem(replay, 401, "NONCE_REPLAYED")
    assert await available(http, member_id) == 5


async def test_wrong_scope_is_forbidden_and_writes_nothing(
    gateway: Gateway, http: httpx.AsyncClient, miniprogram: IssuedKey
) -> None:
    member_id, openid = await new_member(http)
    async with httpx.AsyncClient(
        base_url=url(gateway), timeout=10, auth=HmacAuth(miniprogram.key_id, miniprogram.secret)
    ) as mp:
        reply = await mp.post(
            f"/v1/admin/members/{member_id}/points/adjustments",
            content=adjustment(),
            headers={"X-Member-Appid": APP_ID, "X-Member-Openid": openid},
        )
        assert_problem(reply, 403, "SCOPE_MISSING")
        pii = await mp.get(f"/v1/admin/members/{member_id}/pii", params={"purpose": "x"})
        assert_problem(pii, 403, "SCOPE_MISSING")
    assert await available(http, member_id) == 0


async def test_the_mini_program_acts_only_for_the_member_it_asserts(
    gateway: Gateway, http: httpx.AsyncClient, miniprogram: IssuedKey
) -> None:
    mine, openid = await new_member(http)
    theirs, _ = await new_member(http)
    asserted = {"X-Member-Appid": APP_ID, "X-Member-Openid": openid}
    async with httpx.AsyncClient(
        base_url=url(gateway), timeout=10, auth=HmacAuth(miniprogram.key_id, miniprogram.secret)
    ) as mp:
        ok = await mp.get(f"/v1/members/{mine}/points", headers=asserted)
        assert ok.status_code == 200, ok.text
        assert_problem(
            await mp.get(f"/v1/members/{theirs}/points", headers=asserted), 403, "MEMBER_MISMATCH"
        )
        assert_problem(await mp.get(f"/v1/members/{mine}/points"), 403, "MEMBER_ASSERTION_REQUIRED")
        stranger = {"X-Member-Appid": APP_ID, "X-Member-Openid": f"o-{uuid.uuid4().hex}"}
        assert_problem(
            await mp.get(f"/v1/members/{mine}/points", headers=stranger), 403, "MEMBER_MISMATCH"
        )
        # A write for another member is refused before it reaches the service.
        refused = await mp.put(
            f"/v1/members/{theirs}/consents",
            json={"channel": "sms", "purpose": "marketing", "granted": True, "source": "mp"},
            headers=asserted,
        )
        assert_problem(refused, 403, "MEMBER_MISMATCH")
        # Login needs no assertion: it is how the member becomes known.
        login = await mp.post(
            "/v1/members/identify",
            json={"request_key": str(uuid.uuid4()), "app_id": APP_ID, "openid": openid},
        )
        assert login.status_code == 200 and login.json()["member"]["member_id"] == mine


async def test_revocation_is_immediate_and_rotation_overlaps(
    gateway: Gateway, client_admin: ClientAdmin
) -> None:
    first = await client_admin.create(ClientKind.OPERATOR_CONSOLE, "rotating operator")
    second = await client_admin.rotate(first.client_id)
    assert second.key_id != first.key_id
    path = "/v1/admin/points/liability"
    async with (
        httpx.AsyncClient(base_url=url(gateway), auth=HmacAuth(first.key_id, first.secret)) as old,
        httpx.AsyncClient(
            base_url=url(gateway), auth=HmacAuth(second.key_id, second.secret)
        ) as new,
    ):
        assert (await old.get(path)).status_code == 200
        assert (await new.get(path)).status_code == 200
        await client_admin.revoke_key(first.key_id)
        assert_problem(await old.get(path), 401, "KEY_REVOKED")
        assert (await new.get(path)).status_code == 200
        await client_admin.revoke_client(first.client_id)
        assert_problem(await new.get(path), 401, "KEY_REVOKED")


async def test_http_rate_limit_answers_429_with_retry_after(
    gateway: Gateway, client_admin: ClientAdmin
) -> None:
    slow = await client_admin.create(
        ClientKind.OPERATOR_CONSOLE, "slow operator", rate_per_second=0.5, burst=2
    )
    async with httpx.AsyncClient(
        base_url=url(gateway), auth=HmacAuth(slow.key_id, slow.secret)
    ) as client:
        replies = [await client.get("/v1/admin/points/liability") for _ in range(3)]
    assert [r.status_code for r in replies[:2]] == [200, 200]
    assert_problem(replies[2], 429, "RATE_LIMITED")
    assert int(replies[2].headers["Retry-After"]) >= 1


async def test_probes_and_the_spec_are_open(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=url(gateway)) as raw:
        assert (await raw.get("/healthz")).status_code == 200
        spec = (await raw.get("/openapi.json")).json()
        assert_problem(await raw.get("/v1/admin/points/liability"), 401, "CREDENTIALS_MISSING")
    adjust = spec["paths"]["/v1/admin/members/{member_id}/points/adjustments"]["post"]
    declared = {p["name"]: p for p in adjust["parameters"] if p["in"] == "header"}
    assert declared["Idempotency-Key"]["required"] is True


# ---- HTTP: Idempotency-Key ----------------------------------------------------------


async def test_idempotency_key_replays_refuses_reuse_and_is_required(
    http: httpx.AsyncClient,
) -> None:
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment(3)
    key = {"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"}
    first = await http.post(target, content=body, headers=key)
    again = await http.post(target, content=body, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    other = await http.post(target, content=adjustment(4), headers=key)
    assert_problem(other, 409, "IDEMPOTENCY_KEY_REUSED")
    assert await available(http, member_id) == 3
    # Without a key: refused before anything runs (httpx Auth adds one unless
    # told otherwise, so send the request raw).
    request = http.build_request("POST", target, content=adjustment(9))
    missing = await http.send(request, auth=_SignOnly(http))
    assert_problem(missing, 422, "IDEMPOTENCY_KEY_REQUIRED")
    assert await available(http, member_id) == 3


class _SignOnly(httpx.Auth):
    """The session client's signature without its automatic Idempotency-Key."""

    requires_request_body = True

    def __init__(self, client: httpx.AsyncClient) -> None:
        assert isinstance(client.auth, HmacAuth)
        self._auth = client.auth

    def auth_flow(self, request: httpx.Request) -> Any:
        # Present but empty: HmacAuth adds none and signs an empty key, which
        # is what the gateway sees once the header is removed.
        request.headers["Idempotency-Key"] = ""
        flow = self._auth.auth_flow(request)
        signed = next(flow)
        del signed.headers["Idempotency-Key"]
        yield signed


async def test_concurrent_duplicates_execute_once(http: httpx.AsyncClient) -> None:
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment(11)
    key = {"Idempotency-Key": str(uuid.uuid4()), "Content-Type": "application/json"}
    replies = await asyncio.gather(
        *(http.post(target, content=body, headers=key) for _ in range(20))
    )
    ok = [r for r in replies if r.status_code == 200]
    busy = [r for r in replies if r.status_code == 409]
    assert len(ok) + len(busy) == 20 and ok
    assert all(r.json()["code"] == "IDEMPOTENCY_IN_PROGRESS" for r in busy)
    # A second execution would have reached rewards and come back "replayed":
    # every 200 is the first execution's answer.
    transaction_ids = {r.json()["transaction_id"] for r in ok}
    assert len(transaction_ids) == 1 and not any(r.json()["replayed"] for r in ok)
    assert await available(http, member_id) == 11


# ---- POS: store keys --------------------------------------------------------------


async def pos_stub(
    gateway: Gateway, store_id: str, api_key: str
) -> tuple[grpc.aio.Channel, pos_pb2_grpc.PosServiceStub]:
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.pos_grpc_port}",
        interceptors=[StoreKeyInterceptor(store_id, api_key)] if api_key else None,
    )
    return channel, pos_pb2_grpc.PosServiceStub(channel)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def order(store_id: str, member_id: str, txn: str) -> pos_pb2.CompleteOrderRequest:
    return pos_pb2.CompleteOrderRequest(
        store_id=store_id,
        pos_transaction_id=txn,
        member_id=member_id,
        paid_amount_fen=3200,
        gross_amount_fen=3200,
    )


async def test_a_pos_acts_only_for_its_own_store_and_nothing_is_written(
    gateway: Gateway,
    http: httpx.AsyncClient,
    client_admin: ClientAdmin,
) -> None:
    member_id, _ = await new_member(http)
    till = await client_admin.create(ClientKind.POS, "till 1", store_id=STORE)
    txn = f"T-{uuid.uuid4().hex[:10]}"
    cases = [
        # (metadata store, api key, request store) -> status, code
        (STORE, "", STORE, grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING"),
        (STORE, f"{till.key_id}.wrong", STORE, grpc.StatusCode.UNAUTHENTICATED, "KEY_INVALID"),
        (
            OTHER_STORE,
            till.api_key,
            OTHER_STORE,
            grpc.StatusCode.PERMISSION_DENIED,
            "STORE_MISMATCH",
        ),
        (STORE, till.api_key, OTHER_STORE, grpc.StatusCode.PERMISSION_DENIED, "STORE_MISMATCH"),
    ]
    for meta_store, key, request_store, status, code in cases:
        channel, stub = await pos_stub(gateway, meta_store, key)
        async with channel:
            err = await rpc_error(
                stub.CompleteOrder(order(request_store, member_id, txn), timeout=10)
            )
        assert (err.code(), error_info(err)[0]) == (status, code)
    assert await available(http, member_id) == 0
    # Nothing was written: the same POS transaction is new to rewards.
    channel, stub = await pos_stub(gateway, STORE, till.api_key)
    async with channel:
        first = await stub.CompleteOrder(order(STORE, member_id, txn), timeout=10)
        # A retry (lost reply) is recognised by its natural key and changes nothing.
        retry = await stub.CompleteOrder(order(STORE, member_id, txn), timeout=10)
    assert not first.replayed and retry.replayed and retry.order_id == first.order_id
    assert await available(http, member_id) == first.points_balance
    await client_admin.revoke_key(till.key_id)
    channel, stub = await pos_stub(gateway, STORE, till.api_key)
    async with channel:
        err = await rpc_error(stub.CompleteOrder(order(STORE, member_id, "T-after"), timeout=10))
    assert (err.code(), error_info(err)[0]) == (grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED")


async def test_an_operator_key_is_not_a_pos_key(gateway: Gateway, operator: IssuedKey) -> None:
    channel, stub = await pos_stub(gateway, STORE, operator.api_key)
    async with channel:
        err = await rpc_error(
            stub.IdentifyMember(
                pos_pb2.IdentifyMemberRequest(store_id=STORE, phone="13912345678"), timeout=10
            )
        )
    assert (err.code(), error_info(err)[0]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "STORE_MISMATCH",
    )


async def test_pos_rate_limit_is_resource_exhausted_with_retry_info(
    gateway: Gateway, client_admin: ClientAdmin
) -> None:
    till = await client_admin.create(
        ClientKind.POS, "busy till", store_id="SH003", rate_per_second=0.5, burst=1
    )
    channel, stub = await pos_stub(gateway, "SH003", till.api_key)
    request = pos_pb2.IdentifyMemberRequest(store_id="SH003", member_code="000000")
    async with channel:
        first = await rpc_error(stub.IdentifyMember(request, timeout=10))
        assert first.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        err = await rpc_error(stub.IdentifyMember(request, timeout=10))
    assert (err.code(), error_info(err)[0]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
    )
    trailers = dict(err.trailing_metadata() or ())
    assert int(trailers["retry-after-ms"]) > 0
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
    assert retry.retry_delay.ToMilliseconds() > 0


async def test_a_bucket_never_hands_out_more_than_it_holds(gateway: Gateway) -> None:
    """500 concurrent takes from a bucket of 50 that barely refills: exactly 50
    pass (the Lua script is atomic), the rest are told when to retry."""
    assert gateway.door is not None
    client = f"bucket-{uuid.uuid4().hex[:8]}"
    limit = Limit(rate_per_second=0.001, burst=50)
    verdicts = await asyncio.gather(
        *(gateway.door.gatekeeper.admit(client, limit) for _ in range(500))
    )
    assert sum(v.allowed for v in verdicts) == 50
    assert all(v.retry_after_ms > 0 for v in verdicts if not v.allowed)
    # A store's bucket is shared by every key of the store.
    store = f"ST-{uuid.uuid4().hex[:6]}"
    store_limit = Limit(rate_per_second=0.001, burst=5)
    roomy = Limit(rate_per_second=1000, burst=1000)
    verdicts = await asyncio.gather(
        *(
            gateway.door.gatekeeper.admit(
                f"till-{n % 3}-{store}", roomy, store_id=store, store_limit=store_limit
            )
            for n in range(30)
        )
    )
    assert sum(v.allowed for v in verdicts) == 5


async def test_an_absorbed_member_id_is_the_asserted_members_own(
    gateway: Gateway,
    http: httpx.AsyncClient,
    pos: pos_pb2_grpc.PosServiceStub,
    miniprogram: IssuedKey,
    wechat: FakeWeChatServer,
) -> None:
    """The till met the phone first (a member of its own); binding the phone
    merges that member into the logged-in one: its old id is now the same person."""
    survivor, openid = await new_member(http)
    phone = f"139{uuid.uuid4().int % 10**8:08d}"
    at_till = await pos.IdentifyMember(
        pos_pb2.IdentifyMemberRequest(store_id=STORE, phone=phone), timeout=10
    )
    bound = await http.post(
        "/v1/members/bind-phone",
        json={
            "request_key": str(uuid.uuid4()),
            "app_id": APP_ID,
            "openid": openid,
            "code": wechat.fake.issue_code(APP_ID, phone),
        },
    )
    assert bound.status_code == 200, bound.text
    assert bound.json()["merged_member_ids"] == [at_till.member_id]
    asserted = {"X-Member-Appid": APP_ID, "X-Member-Openid": openid}
    async with httpx.AsyncClient(
        base_url=url(gateway), timeout=10, auth=HmacAuth(miniprogram.key_id, miniprogram.secret)
    ) as mp:
        reply = await mp.get(f"/v1/members/{at_till.member_id}/points", headers=asserted)
    # The door let it through (what the points route answers for an absorbed
    # id is rewards' business); another member's id would be MEMBER_MISMATCH.
    assert reply.status_code == 200, reply.text
    assert survivor != at_till.member_id


async def test_bearer_tokens_are_issued_verified_and_die_with_their_key(
    gateway: Gateway, client_admin: ClientAdmin
) -> None:
    console = await client_admin.create(ClientKind.OPERATOR_CONSOLE, "token operator")
    till = await client_admin.create(ClientKind.POS, "token till", store_id=STORE)
    path = "/v1/admin/points/liability"
    async with httpx.AsyncClient(base_url=url(gateway), timeout=10) as raw:
        wrong = await raw.post(
            "/v1/auth/token", json={"key_id": console.key_id, "secret": "not-it"}
        )
        assert_problem(wrong, 401, "KEY_INVALID")
        pos_key = await raw.post(
            "/v1/auth/token", json={"key_id": till.key_id, "secret": till.secret}
        )
        assert_problem(pos_key, 401, "KEY_INVALID")
        issued = await raw.post(
            "/v1/auth/token", json={"key_id": console.key_id, "secret": console.secret}
        )
        assert issued.status_code == 200, issued.text
        token = issued.json()["access_token"]
        assert issued.json()["token_type"] == "Bearer" and issued.json()["expires_in"] > 0
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await raw.get(path, headers=bearer)).status_code == 200
        # Scopes still apply: an operator console has no PII scope.
        pii = await raw.get(f"/v1/admin/members/{DUMMY_MEMBER}/pii", headers=bearer)
        assert_problem(pii, 403, "SCOPE_MISSING")
        tampered = {"Authorization": f"Bearer {token[:-1]}{'0' if token[-1] != '0' else '1'}"}
        assert_problem(await raw.get(path, headers=tampered), 401, "TOKEN_INVALID")
        await client_admin.revoke_key(console.key_id)
        assert_problem(await raw.get(path, headers=bearer), 401, "KEY_REVOKED")
