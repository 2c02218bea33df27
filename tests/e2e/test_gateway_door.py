"""The door's order of operations, through real gateways (issue 15 items 1-4,
12 and 16; issue 14 item 3): a caller that has not proven who it is writes
nothing to Redis and spends no real client's or store's budget; failed
sign-ins are budgeted per source address; bodies and POS messages are
bounded and refused by name; version 2 signatures cover the member and
Idempotency-Key headers; admin scopes go to operator kinds only; and a
Redis loss neither lets a captured request be replayed nor a retried
mutation run twice (Idempotency-Key records live in PostgreSQL, pruned in
batches).

Gateways here are built per test, most on a private redis-server
(tests/redis_servers.py) whose DBSIZE nothing else changes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth, StoreKeyInterceptor
from gateway.auth.crypto import SecretBox, sign
from gateway.auth.model import ADMIN_ALL, ADMIN_REWARDS, MEMBER_ANY, PII_READ, ClientKind
from gateway.idempotency import prune_expired
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import create_pool
from servicekit.errors import InvalidArgument, error_info
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp
from tests.harness import Infra

from ..redis_servers import RedisServer
from .conftest import gateway_settings
from .test_gateway_security import (
    adjustment,
    assert_problem,
    available,
    new_member,
    signed_headers,
)

pytestmark = pytest.mark.e2e

STORE, OTHER_STORE = "SH001", "SH002"
APP_ID = "wx-shop"


@dataclass
class DoorUnderTest:
    gateway: Gateway
    admin: ClientAdmin
    namespace: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    @property
    def pos_target(self) -> str:
        return f"127.0.0.1:{self.gateway.pos_grpc_port}"


MakeDoor = Callable[..., Awaitable[DoorUnderTest]]


@pytest.fixture(scope="module")
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def make_door(
    infra: Infra,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    demo_stores: list[str],
) -> AsyncIterator[MakeDoor]:
    """A gateway with the door, in front of the session's services, with a
    Redis namespace of its own and a ClientAdmin that registers for it."""
    made: list[tuple[Gateway, ClientAdmin, Any, Any]] = []

    async def make(redis_url: str | None = None, namespace: str = "", **overrides: Any):  # type: ignore[no-untyped-def]
        url = redis_url or infra.redis_url
        namespace = namespace or f"{infra.namespace}-door-{uuid.uuid4().hex[:6]}"
        gw = build(
            gateway_settings(
                member_addr=f"127.0.0.1:{member_app.port}",
                rewards_addr=f"127.0.0.1:{rewards_app.port}",
                tiering_addr=f"127.0.0.1:{tiering_app.port}",
                auth_enabled=True,
                database_url=infra.database_url,
                redis_url=url,
                redis_namespace=namespace,
                **overrides,
            )
        )
        await gw.start()
        pool = await create_pool(infra.database_url, min_size=1, max_size=2)
        redis = create_redis(url)
        admin = ClientAdmin(pool, redis, SecretBox(gw.settings.auth_secret_key), namespace)
        made.append((gw, admin, pool, redis))
        return DoorUnderTest(gw, admin, namespace)

    yield make
    for gw, _, pool, redis in reversed(made):
        await gw.stop()
        await redis.aclose()
        await pool.close()


def random_signed(target: str, key_id: str | None = None) -> dict[str, str]:
    """A request signed with a made-up secret, for a made-up (or given) key id."""
    ts, nonce = str(int(time.time())), secrets.token_hex(16)
    key_id = key_id or f"k_{secrets.token_hex(8)}"
    return {
        "X-Key-Id": key_id,
        "X-Timestamp": ts,
        "X-Nonce": nonce,
        "X-Signature": sign(secrets.token_urlsafe(32), "GET", target, ts, nonce, b""),
    }


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# ---- item 1: nothing before verification ------------------------------------------


async def test_an_unverified_caller_writes_nothing_and_spends_no_clients_budget(
    make_door: MakeDoor, private_redis: RedisServer
) -> None:
    door = await make_door(private_redis.url)
    # Two requests a lifetime: a single charge by someone else would show.
    victim = await door.admin.create(
        ClientKind.OPERATOR_CONSOLE, "victim", rate_per_second=0.001, burst=2
    )
    path = "/v1/admin/points/liability"
    before = await private_redis.dbsize()
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        refusals = []
        for _ in range(10):
            # The victim's key id, a guessed secret, fresh nonces.
            refusals.append(await raw.get(path, headers=random_signed(path, victim.key_id)))
            refusals.append(await raw.get(path, headers=random_signed(path)))
    assert {r.json()["code"] for r in refusals} == {"SIGNATURE_INVALID", "KEY_UNKNOWN"}
    assert all(r.status_code == 401 for r in refusals)
    assert await private_redis.dbsize() == before, "an unverified request wrote to Redis"
    async with httpx.AsyncClient(
        base_url=door.url, timeout=10, auth=HmacAuth(victim.key_id, victim.secret)
    ) as real:
        # Its whole burst is still there.
        assert [(await real.get(path)).status_code for _ in range(2)] == [200, 200]
    # Key ids and nonces beyond their documented bounds: refused before any lookup.
    before = await private_redis.dbsize()
    over_long_key = random_signed(path, "k_" + "x" * 80)
    over_long_nonce = random_signed(path, victim.key_id) | {"X-Nonce": "n" * 129}
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        assert_problem(await raw.get(path, headers=over_long_key), 401, "KEY_ID_INVALID")
        assert_problem(await raw.get(path, headers=over_long_nonce), 401, "NONCE_INVALID")
    assert await private_redis.dbsize() == before


async def test_another_stores_key_never_charges_this_stores_bucket(
    make_door: MakeDoor, private_redis: RedisServer
) -> None:
    door = await make_door(private_redis.url)
    mine = await door.admin.create(ClientKind.POS, "till of SH001", store_id=STORE)
    before = await private_redis.dbsize()
    request = pos_pb2.IdentifyMemberRequest(store_id=OTHER_STORE, card="C-nobody")
    for store, key, code in (
        # A valid key of SH001 presented for SH002.
        (OTHER_STORE, mine.api_key, "STORE_MISMATCH"),
        (OTHER_STORE, f"{mine.key_id}.guessed", "KEY_INVALID"),
        (OTHER_STORE, f"k_{secrets.token_hex(8)}.guessed", "KEY_UNKNOWN"),
    ):
        async with grpc.aio.insecure_channel(
            door.pos_target, interceptors=[StoreKeyInterceptor(store, key)]
        ) as channel:
            for _ in range(5):
                err = await rpc_error(
                    pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(request, timeout=10)
                )
                assert error_info(err)[0] == code
    # No nonce, no bucket of SH002 (nor of the SH001 till) was made.
    assert await private_redis.dbsize() == before


async def test_failed_sign_ins_are_budgeted_per_source_before_any_check(
    make_door: MakeDoor,
) -> None:
    """Item 3's token route: a guesser that used up its budget is refused
    before the secret is checked, so even the right secret tells it nothing."""
    door = await make_door(auth_failure_burst=3, auth_failure_rate_per_second=0.01)
    console = await door.admin.create(ClientKind.OPERATOR_CONSOLE, "guessed console")
    till = await door.admin.create(ClientKind.POS, "till", store_id=STORE)
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        for _ in range(3):
            wrong = await raw.post(
                "/v1/auth/token", json={"key_id": console.key_id, "secret": "guess"}
            )
            assert_problem(wrong, 401, "KEY_INVALID")
        right = await raw.post(
            "/v1/auth/token", json={"key_id": console.key_id, "secret": console.secret}
        )
        assert_problem(right, 429, "AUTH_FAILURES_LIMITED")
        assert int(right.headers["Retry-After"]) >= 1
        signed = await raw.get(
            "/v1/admin/points/liability",
            auth=HmacAuth(console.key_id, console.secret),
        )
        assert_problem(signed, 429, "AUTH_FAILURES_LIMITED")
    # The budget is the source's, whichever door it knocks on.
    async with grpc.aio.insecure_channel(
        door.pos_target, interceptors=[StoreKeyInterceptor(STORE, till.api_key)]
    ) as channel:
        err = await rpc_error(
            pos_pb2_grpc.PosServiceStub(channel).IdentifyMember(
                pos_pb2.IdentifyMemberRequest(store_id=STORE, card="C-1"), timeout=10
            )
        )
    assert (err.code(), error_info(err)[0]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "AUTH_FAILURES_LIMITED",
    )


async def test_five_thousand_unauthenticated_requests_leave_redis_unchanged(
    make_door: MakeDoor, private_redis: RedisServer
) -> None:
    """The Proof's load test: random key ids and nonces (half of them naming a
    real key with a guessed secret), 50 at a time; DBSIZE before = after."""
    door = await make_door(private_redis.url, auth_failure_burst=1_000_000)
    real = await door.admin.create(ClientKind.OPERATOR_CONSOLE, "real console")
    path = "/v1/admin/points/liability"
    total, parallel = 5000, 50
    before = await private_redis.dbsize()
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(
        base_url=door.url, timeout=30, limits=httpx.Limits(max_connections=parallel)
    ) as raw:

        async def one(n: int) -> None:
            async with gate:
                reply = await raw.get(
                    path, headers=random_signed(path, real.key_id if n % 2 else None)
                )
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1

        await asyncio.gather(*(one(n) for n in range(total)))
    after = await private_redis.dbsize()
    print(f"\n5000 unauthenticated requests: statuses {statuses}, DBSIZE {before} -> {after}")
    assert statuses == {401: total}
    assert after == before


# ---- item 2 and 16: bounded bodies and messages -----------------------------------


async def test_an_oversized_body_is_refused_before_authentication(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    limit = 1024 * 1024  # HTTP_MAX_BODY_BYTES's default
    big = b'{"x": "' + b"a" * (limit + 1) + b'"}'
    target = f"/v1/admin/members/{uuid.uuid4()}/points/adjustments"
    url = f"http://127.0.0.1:{gateway.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as raw:
        # Unsigned: refused by size, not by credentials (nothing was read).
        assert_problem(await raw.post(target, content=big), 413, "BODY_TOO_LARGE")
        # Without a Content-Length (chunked): refused once the stream passes the limit.

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 64 * 1024):
                yield big[start : start + 64 * 1024]

        assert_problem(await raw.post(target, content=chunks()), 413, "BODY_TOO_LARGE")
        # The public token route too.
        token = await raw.post("/v1/auth/token", content=big)
        assert_problem(token, 413, "BODY_TOO_LARGE")
    # Signed: still 413.
    assert_problem(await http.post(target, content=big), 413, "BODY_TOO_LARGE")
    # Under the limit the request goes on to its route.
    member_id, _ = await new_member(http)
    ok = await http.post(
        f"/v1/admin/members/{member_id}/points/adjustments",
        content=adjustment(2),
        headers={"Content-Type": "application/json"},
    )
    assert ok.status_code == 200, ok.text


async def test_an_oversized_pos_message_is_named_and_not_retryable(
    gateway: Gateway, pos: pos_pb2_grpc.PosServiceStub
) -> None:
    """10 MB: INVALID_ARGUMENT MESSAGE_TOO_LARGE, no RetryInfo (a till that
    retries RESOURCE_EXHAUSTED as rate limiting would retry forever)."""
    request = pos_pb2.IdentifyMemberRequest(store_id=STORE, card="c" * 10_000_000)
    err = await rpc_error(pos.IdentifyMember(request, timeout=30))
    assert (err.code(), error_info(err)[0]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "MESSAGE_TOO_LARGE",
    )
    assert "retry-after-ms" not in dict(err.trailing_metadata() or ())
    # Under the limit, the same RPC is served.
    small = pos_pb2.IdentifyMemberRequest(store_id=STORE, card=f"C-{uuid.uuid4().hex[:10]}")
    assert (await pos.IdentifyMember(small, timeout=10)).member_id


# ---- item 4: the member and Idempotency-Key headers are signed ----------------------


async def test_a_signed_request_cannot_be_retargeted_to_another_member(
    gateway: Gateway, http: httpx.AsyncClient, client_admin: ClientAdmin
) -> None:
    mp = await client_admin.create(
        ClientKind.MINIPROGRAM_BACKEND, "retarget mini-program", app_ids=[APP_ID]
    )
    mine, my_openid = await new_member(http)
    _, their_openid = await new_member(http)
    path = f"/v1/members/{mine}/points"
    headers = signed_headers(mp, "GET", path, b"", appid=APP_ID, openid=my_openid)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10
    ) as raw:
        # Changed on the path: another member asserted with the same signature.
        moved = headers | {"X-Member-Openid": their_openid}
        assert_problem(await raw.get(path, headers=moved), 401, "SIGNATURE_INVALID")
        assert (await raw.get(path, headers=headers)).status_code == 200


async def test_version_1_signatures_only_during_the_migration_window(
    make_door: MakeDoor, gateway: Gateway, client_admin: ClientAdmin
) -> None:
    path = "/v1/admin/points/liability"

    def v1(key: IssuedKey) -> dict[str, str]:
        ts, nonce = str(int(time.time())), secrets.token_hex(16)
        signature = sign(key.secret, "GET", path, ts, nonce, b"", version=1)
        return {"X-Key-Id": key.key_id, "X-Timestamp": ts, "X-Nonce": nonce} | {
            "X-Signature": signature
        }

    console = await client_admin.create(ClientKind.OPERATOR_CONSOLE, "v1 console")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as raw:
        assert_problem(await raw.get(path, headers=v1(console)), 401, "SIGNATURE_INVALID")
    window = await make_door(auth_accept_signature_v1=True)
    legacy = await window.admin.create(ClientKind.OPERATOR_CONSOLE, "v1 console, window")
    async with httpx.AsyncClient(base_url=window.url) as raw:
        assert (await raw.get(path, headers=v1(legacy))).status_code == 200


# ---- item 12: admin scopes only for operator kinds --------------------------------


@pytest.mark.parametrize(
    ("kind", "scopes"),
    [
        (ClientKind.POS, [ADMIN_REWARDS]),
        (ClientKind.MINIPROGRAM_BACKEND, [ADMIN_ALL]),
        (ClientKind.MINIPROGRAM_BACKEND, [PII_READ]),
    ],
)
async def test_admin_scopes_are_refused_to_other_kinds(
    client_admin: ClientAdmin, kind: ClientKind, scopes: list[str]
) -> None:
    store = {"store_id": STORE} if kind is ClientKind.POS else {}
    client_id = f"not-operator-{uuid.uuid4().hex[:6]}"
    with pytest.raises(InvalidArgument) as refused:
        await client_admin.create(kind, "no admin", client_id=client_id, scopes=scopes, **store)  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.field) == ("SCOPE_NOT_FOR_KIND", "scopes")
    # Nothing was registered.
    assert client_id not in {c.client_id for c in await client_admin.list()}
    operator = await client_admin.create(
        ClientKind.OPERATOR_CONSOLE, "operator", scopes=[MEMBER_ANY, *scopes]
    )
    assert operator.key_id


# ---- issue 14 item 3: a Redis loss replays nothing ----------------------------------


async def test_no_replay_and_no_second_run_after_the_nonce_store_is_lost(
    make_door: MakeDoor, private_redis: RedisServer, http: httpx.AsyncClient
) -> None:
    door = await make_door(private_redis.url)
    operator = await door.admin.create(
        ClientKind.OPERATOR_CONSOLE, "operator", scopes=[MEMBER_ANY, ADMIN_REWARDS]
    )
    member_id, _ = await new_member(http)
    target = f"/v1/admin/members/{member_id}/points/adjustments"
    body = adjustment(5)
    key = str(uuid.uuid4())
    captured = signed_headers(operator, "POST", target, body, idempotency_key=key)
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        first = await raw.post(target, content=body, headers=captured)
        assert first.status_code == 200, first.text
        await private_redis.flushall()
        # The captured request, byte for byte, within its ±300 s window.
        replay = await raw.post(target, content=body, headers=captured)
        assert_problem(replay, 401, "NONCE_STORE_RESET")
        # The client's retry after the loss (signed anew, same Idempotency-Key)
        # gets the first answer back; it does not run again.
        retry_headers = signed_headers(
            operator, "POST", target, body, idempotency_key=key, timestamp=int(time.time()) + 1
        )
        retry = await raw.post(target, content=body, headers=retry_headers)
        assert retry.status_code == 200, retry.text
        assert retry.headers.get("Idempotent-Replayed") == "true"
        assert retry.json() == first.json()
    assert await available(http, member_id) == 5
    # A gateway started on the emptied store trusts no earlier signature either.
    await door.gateway.stop()
    await private_redis.flushall()
    restarted = await make_door(private_redis.url, namespace=door.namespace)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as raw:
        again = await raw.post(target, content=body, headers=captured)
    assert_problem(again, 401, "NONCE_STORE_RESET")
    assert await available(http, member_id) == 5


async def test_expired_idempotency_records_are_pruned_in_batches(gateway: Gateway) -> None:
    assert gateway.door is not None and gateway.door.pool is not None
    pool = gateway.door.pool
    client = f"prune-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn:
        for n, expired in enumerate((True, True, True, False)):
            await conn.execute(
                "INSERT INTO gateway.idempotency_records (client_id, key_hash, fingerprint,"
                " state, locked_until, expires_at) VALUES ($1, $2, $3, 'done', now(),"
                " now() + $4 * interval '1 hour')",
                client,
                bytes([n]),
                b"f",
                -1 if expired else 1,
            )
    assert await prune_expired(pool, batch=2) >= 3
    async with pool.acquire() as conn:
        left = await conn.fetch(
            "SELECT key_hash FROM gateway.idempotency_records WHERE client_id = $1", client
        )
    assert [bytes(r["key_hash"]) for r in left] == [bytes([3])]


async def _limited_after_guesses(door: DoorUnderTest, guesser: str, other: str) -> int:
    """Three wrong secrets sent as from `guesser` (X-Forwarded-For); the status
    the right secret then gets as from `other`."""
    console = await door.admin.create(ClientKind.OPERATOR_CONSOLE, "console behind ingress")
    async with httpx.AsyncClient(base_url=door.url, timeout=10) as raw:
        for _ in range(3):
            wrong = await raw.post(
                "/v1/auth/token",
                json={"key_id": console.key_id, "secret": "guess"},
                headers={"X-Forwarded-For": guesser},
            )
            assert_problem(wrong, 401, "KEY_INVALID")
        right = await raw.post(
            "/v1/auth/token",
            json={"key_id": console.key_id, "secret": console.secret},
            headers={"X-Forwarded-For": other},
        )
        again = await raw.post(
            "/v1/auth/token",
            json={"key_id": console.key_id, "secret": console.secret},
            headers={"X-Forwarded-For": guesser},
        )
        assert_problem(again, 429, "AUTH_FAILURES_LIMITED")
        return right.status_code


async def test_behind_a_trusted_proxy_failed_sign_ins_count_per_forwarded_client(
    make_door: MakeDoor,
) -> None:
    """TRUSTED_PROXIES names the ingress (here the test's own peer): one client
    guessing behind it does not lock out another client behind it."""
    door = await make_door(
        auth_failure_burst=3, auth_failure_rate_per_second=0.01, trusted_proxies="127.0.0.1"
    )
    assert await _limited_after_guesses(door, "203.0.113.7", "198.51.100.9") == 200


async def test_without_trusted_proxies_a_forwarded_address_is_ignored(
    make_door: MakeDoor,
) -> None:
    """Default: the TCP peer is the source, whatever X-Forwarded-For claims, so
    a guesser cannot dodge its budget by inventing addresses."""
    door = await make_door(auth_failure_burst=3, auth_failure_rate_per_second=0.01)
    assert await _limited_after_guesses(door, "203.0.113.7", "198.51.100.9") == 429
