"""Checkout without Redis (issue 14 item 2), through the real gateway, member
and rewards processes of this test, all on a private redis-server that the
test kills (as a crash: nothing saved) and restarts empty.

Steady POS load from several tills (IdentifyMember by card and by member
code, CompleteOrder, RefundOrder, UploadOfflineOrders) keeps being served
from the gateway's credential cache and per-instance token buckets, while a
signed HTTP request, which needs the shared nonce store, fails closed with
503 NONCE_STORE_UNAVAILABLE. Every acknowledged order exists exactly once.

The processes have a database of their own: a rewards relay of the session
would otherwise publish this test's orders to the session's Redis.

The outage lasts LOYALTY_OUTAGE_SECONDS (5 s by default; the figures in
docs/api.md were measured with 15).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import timestamp_pb2

from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin
from gateway.auth.client import HmacAuth, StoreKeyInterceptor
from gateway.auth.crypto import SecretBox
from gateway.auth.model import ClientKind
from loyalty.member.v1 import member_pb2, member_pb2_grpc
from loyalty.pos.v1 import pos_pb2, pos_pb2_grpc
from servicekit.db import asyncpg_dsn, create_pool
from servicekit.errors import error_info
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp
from tests.harness import Infra, wait_until_serving
from tests.harness import own_database as own_database_of

from ..redis_servers import RedisServer
from .conftest import gateway_settings
from .doors import UNLIMITED

pytestmark = pytest.mark.e2e

STORES = ("SH001", "SH002", "SH003")
OUTAGE_SECONDS = float(os.environ.get("LOYALTY_OUTAGE_SECONDS", "5"))
TILLS_PER_STORE = 2


@dataclass
class Platform:
    redis: RedisServer
    gateway: Gateway
    member: ServiceApp
    admin: ClientAdmin
    namespace: str


@pytest.fixture
async def own_database(infra: Infra) -> AsyncIterator[str]:
    from services.rewards.seed import seed_demo

    async with own_database_of(
        infra, "member", "rewards", "gateway", prefix="loyalty_outage"
    ) as url:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await seed_demo(conn)
        finally:
            await conn.close()
        yield url


@pytest.fixture
async def platform(
    infra: Infra, own_database: str, tiering_app: ServiceApp
) -> AsyncIterator[Platform]:
    from services.member.server import build as build_member
    from services.rewards.server import build as build_rewards

    redis = RedisServer()
    await redis.start()
    namespace = f"{infra.namespace}-outage"
    settings = infra.service_settings(
        database_url=own_database,
        redis_url=redis.url,
        redis_namespace=namespace,
        db_pool_max=4,  # the machine's PostgreSQL is shared by several test runs
    )
    member, rewards = build_member(settings), build_rewards(settings)
    for app in (member, rewards):
        await wait_until_serving(f"127.0.0.1:{await app.start()}")
    gw = build(
        gateway_settings(
            member_addr=f"127.0.0.1:{member.port}",
            rewards_addr=f"127.0.0.1:{rewards.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            auth_enabled=True,
            database_url=own_database,
            redis_url=redis.url,
            redis_namespace=namespace,
            store_rate_per_second=10_000.0,
            store_burst=10_000,
        )
    )
    await gw.start()
    pool = await create_pool(own_database, min_size=1, max_size=2)
    admin_redis = create_redis(redis.url)
    admin = ClientAdmin(pool, admin_redis, SecretBox(gw.settings.auth_secret_key), namespace)
    try:
        yield Platform(redis, gw, member, admin, namespace)
    finally:
        await gw.stop()
        for app in (rewards, member):
            await app.stop()
        await admin_redis.aclose()
        await pool.close()
        await redis.stop()


@dataclass
class Outcome:
    at: float
    op: str
    ok: bool
    code: str = ""


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    # (store, pos transaction id) -> order id, for every acknowledged CompleteOrder.
    acknowledged: dict[tuple[str, str], str] = field(default_factory=dict)

    async def call(self, op: str, rpc: Callable[[], Awaitable[object]]) -> object | None:
        try:
            reply = await rpc()
        except grpc.aio.AioRpcError as exc:
            self.outcomes.append(Outcome(time.monotonic(), op, False, error_info(exc)[0]))
            return None
        self.outcomes.append(Outcome(time.monotonic(), op, True))
        return reply


def timestamp(at: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(at)
    return out


async def till(
    stub: pos_pb2_grpc.PosServiceStub,
    store: str,
    cards: list[str],
    codes: asyncio.Queue[str],
    load: Load,
    stop: asyncio.Event,
    codes_now: asyncio.Event,
) -> None:
    """One till's loop: identify (card, or a member code once `codes_now` is
    set and one is waiting), order, refund it, upload an offline order."""
    n = 0
    while not stop.is_set():
        n += 1
        if codes_now.is_set() and not codes.empty():
            code = codes.get_nowait()
            request = pos_pb2.IdentifyMemberRequest(store_id=store, member_code=code)
            op = "identify_code"
        else:
            request = pos_pb2.IdentifyMemberRequest(store_id=store, card=cards[n % len(cards)])
            op = "identify_card"
        found = await load.call(op, lambda r=request: stub.IdentifyMember(r, timeout=5))
        if not isinstance(found, pos_pb2.IdentifyMemberResponse):
            continue
        txn = f"T-{uuid.uuid4().hex[:12]}"
        order = pos_pb2.CompleteOrderRequest(
            store_id=store,
            pos_transaction_id=txn,
            member_id=found.member_id,
            paid_amount_fen=1800,
            gross_amount_fen=1800,
        )
        done = await load.call("complete", lambda o=order: stub.CompleteOrder(o, timeout=5))
        if isinstance(done, pos_pb2.CompleteOrderResponse):
            load.acknowledged[(store, txn)] = done.order_id
            refund = pos_pb2.RefundOrderRequest(
                store_id=store,
                pos_transaction_id=txn,
                refund_transaction_id=f"R-{txn}",
                refunded_amount_fen=600,
            )
            await load.call("refund", lambda r=refund: stub.RefundOrder(r, timeout=5))
        offline_txn = f"O-{uuid.uuid4().hex[:12]}"
        upload = pos_pb2.UploadOfflineOrdersRequest(
            store_id=store,
            orders=[
                pos_pb2.OfflineOrder(
                    order=pos_pb2.CompleteOrderRequest(
                        store_id=store,
                        pos_transaction_id=offline_txn,
                        member_id=found.member_id,
                        paid_amount_fen=900,
                        ordered_at=timestamp(datetime.now(UTC) - timedelta(minutes=5)),
                    )
                )
            ],
        )
        uploaded = await load.call(
            "upload", lambda u=upload: stub.UploadOfflineOrders(u, timeout=5)
        )
        if isinstance(uploaded, pos_pb2.UploadOfflineOrdersResponse):
            assert uploaded.results[0].outcome == pos_pb2.OFFLINE_ORDER_OUTCOME_APPLIED
            load.acknowledged[(store, offline_txn)] = uploaded.results[0].order_id


async def test_checkout_keeps_working_while_redis_is_down(
    platform: Platform, own_database: str
) -> None:
    gw = platform.gateway
    target = f"127.0.0.1:{gw.pos_grpc_port}"
    keys = {
        store: await platform.admin.create(
            ClientKind.POS,
            f"outage till {store}",
            store_id=store,
            **UNLIMITED,  # type: ignore[arg-type]
        )
        for store in STORES
    }
    operator = await platform.admin.create(ClientKind.OPERATOR_CONSOLE, "outage operator")
    channels = {
        store: grpc.aio.insecure_channel(
            target, interceptors=[StoreKeyInterceptor(store, keys[store].api_key)]
        )
        for store in STORES
    }
    stubs = {store: pos_pb2_grpc.PosServiceStub(ch) for store, ch in channels.items()}
    # Known cards (enrolled before the outage: enrolling writes the member cache).
    cards = {store: [f"C-{uuid.uuid4().hex[:10]}" for _ in range(5)] for store in STORES}
    members = []
    for store in STORES:
        for card in cards[store]:
            reply = await stubs[store].IdentifyMember(
                pos_pb2.IdentifyMemberRequest(store_id=store, card=card), timeout=10
            )
            members.append(reply.member_id)
    # Member codes issued before the outage, shown at the till during it.
    codes: dict[str, asyncio.Queue[str]] = {store: asyncio.Queue() for store in STORES}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{platform.member.port}") as channel:
        member_stub = member_pb2_grpc.MemberServiceStub(channel)
        for n, member_id in enumerate(members):
            issued = await member_stub.IssueMemberCode(
                member_pb2.IssueMemberCodeRequest(member_id=member_id), timeout=5
            )
            codes[STORES[n % len(STORES)]].put_nowait(issued.code)

    load, stop, codes_now = Load(), asyncio.Event(), asyncio.Event()
    workers = [
        asyncio.create_task(
            till(stubs[store], store, cards[store], codes[store], load, stop, codes_now)
        )
        for store in STORES
        for _ in range(TILLS_PER_STORE)
    ]
    http_url = f"http://127.0.0.1:{gw.http_port}"
    async with httpx.AsyncClient(
        base_url=http_url, timeout=10, auth=HmacAuth(operator.key_id, operator.secret)
    ) as http:
        try:
            await asyncio.sleep(1.5)
            assert (await http.get("/v1/admin/points/liability")).status_code == 200
            down_at = time.monotonic()
            await platform.redis.stop()
            codes_now.set()  # the codes are shown at the tills during the outage
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            # Signed HTTP needs the shared nonce store: fail closed, by name.
            closed = await http.get("/v1/admin/points/liability")
            assert closed.status_code == 503, closed.text
            assert closed.json()["code"] == "NONCE_STORE_UNAVAILABLE"
            await asyncio.sleep(OUTAGE_SECONDS / 2)
            await platform.redis.start()  # same port, empty
            up_at = time.monotonic()
            await asyncio.sleep(2.0)
            # Signed HTTP is back once Redis is: the store's new epoch is the
            # moment it was found empty, so a request signed after it passes.
            later = HmacAuth(operator.key_id, operator.secret, clock=lambda: time.time() + 1)
            back = await http.get("/v1/admin/points/liability", auth=later)
            assert back.status_code == 200, back.text
        finally:
            stop.set()
            await asyncio.gather(*workers)
            for ch in channels.values():
                await ch.close()

    during = [o for o in load.outcomes if down_at <= o.at <= up_at]
    failed = [o for o in during if not o.ok]
    by_op: dict[str, tuple[int, int]] = {}
    for o in during:
        ok, total = by_op.get(o.op, (0, 0))
        by_op[o.op] = (ok + o.ok, total + 1)
    rate = 1 - len(failed) / len(during)
    print(
        f"\nRedis down {up_at - down_at:.1f} s: {len(during)} POS calls, "
        f"{len(during) - len(failed)} ok ({rate:.2%}); by call {by_op}; "
        f"failures {[(round(o.at - down_at, 2), o.op, o.code) for o in failed][:10]}"
    )
    assert len(during) >= 50, "too little load to measure"
    assert {"identify_card", "identify_code", "complete", "refund", "upload"} <= set(by_op)
    assert rate >= 0.99
    # Failures, if any, only in the first second (connections noticing the loss).
    assert all(o.at - down_at < 1.0 for o in failed), failed

    # Every acknowledged order exists exactly once.
    conn = await asyncpg.connect(asyncpg_dsn(own_database))
    try:
        rows = await conn.fetch(
            "SELECT store_id, pos_transaction_id, id::text AS order_id, count(*)"
            " OVER (PARTITION BY store_id, pos_transaction_id) AS copies"
            " FROM rewards.orders WHERE pos_transaction_id = ANY($1::text[])",
            [txn for _, txn in load.acknowledged],
        )
    finally:
        await conn.close()
    stored = {(r["store_id"], r["pos_transaction_id"]): r["order_id"] for r in rows}
    assert all(r["copies"] == 1 for r in rows)
    assert stored == load.acknowledged
