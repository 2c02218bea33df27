"""End-to-end fixtures: the gateway in-process on port 0, in front of the real
member, rewards and tiering services (tests/conftest.py), with demo stores.

Tests talk to the gateway only through its doors: an httpx client on the
HTTP port and a PosService stub on the POS gRPC port.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import grpc
import httpx
import pytest

from gateway.app import Gateway, build
from gateway.auth.admin import ClientAdmin, IssuedKey
from gateway.auth.client import HmacAuth
from gateway.auth.crypto import SecretBox
from gateway.auth.model import ClientKind
from gateway.settings import GatewaySettings
from gateway.wechat_fake import FakeWeChat, FakeWeChatServer
from loyalty.pos.v1 import pos_pb2_grpc
from servicekit.db import asyncpg_dsn, create_pool
from servicekit.redis_client import create_redis
from servicekit.server import ServiceApp
from services.rewards.points.audit import audit_ledger
from tests.conftest import stopping
from tests.harness import Infra

from .doors import TRUSTED_SCOPES, UNLIMITED, PerStoreKeyInterceptor, StoreKeys

# A store that exists but is closed: it must be refused like an unknown one.
CLOSED_STORE_ID = "SH999"


def gateway_settings(**overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "http_host": "127.0.0.1",
        "http_port": 0,
        "pos_grpc_host": "127.0.0.1",
        "pos_grpc_port": 0,
        "metrics_port": 0,
        "engagement_addr": "",  # not part of this slice: readiness ignores it
        "downstream_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 1.0,
        "shutdown_delay_seconds": 0.0,
        "log_json": False,
        # Gateways a test builds for itself (degradation, shutdown) go without
        # the door; the session gateway has it (tests/e2e/test_gateway_security.py).
        "auth_enabled": False,
        # The machine's PostgreSQL is shared by several test runs (100 connections).
        "door_db_pool_max": 3,
    }
    values.update(overrides)
    return GatewaySettings(**values)  # type: ignore[arg-type]


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
async def demo_stores(infra: Infra, rewards_app: ServiceApp) -> list[str]:
    from services.rewards.orders import repository as rewards_repo
    from services.rewards.seed import DEMO_STORES, seed_demo

    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        await seed_demo(conn)
        await rewards_repo.upsert_stores(
            conn,
            [
                rewards_repo.StoreRecord(
                    store_id=CLOSED_STORE_ID,
                    name="已闭店",
                    city="上海",
                    address="上海市黄浦区南京东路1号",
                    latitude=Decimal("31.240000"),
                    longitude=Decimal("121.490000"),
                    status="closed",
                )
            ],
        )
    finally:
        await conn.close()
    return [s.store_id for s in DEMO_STORES]


# The mini-program apps the session gateway holds WeChat credentials for.
WECHAT_APPS = {"wx-shop": "e2e-wechat-secret-shop", "wx-other": "e2e-wechat-secret-other"}


@pytest.fixture(scope="session")
async def wechat() -> AsyncIterator[FakeWeChatServer]:
    """The local fake of WeChat's API (gateway/wechat_fake.py) on a loopback port."""
    server = FakeWeChatServer(FakeWeChat(apps=dict(WECHAT_APPS)))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def gateway(
    infra: Infra,
    member_app: ServiceApp,
    rewards_app: ServiceApp,
    tiering_app: ServiceApp,
    demo_stores: list[str],
    wechat: FakeWeChatServer,
) -> AsyncIterator[Gateway]:
    gw = build(
        gateway_settings(
            wechat_api_base=wechat.base_url,
            wechat_apps=WECHAT_APPS,
            member_addr=f"127.0.0.1:{member_app.port}",
            rewards_addr=f"127.0.0.1:{rewards_app.port}",
            tiering_addr=f"127.0.0.1:{tiering_app.port}",
            auth_enabled=True,
            database_url=infra.database_url,
            redis_url=infra.redis_url,
            redis_namespace=infra.namespace,
            # The contract fuzz's unauthenticated runs fail thousands of sign-ins
            # from 127.0.0.1; the budget itself is tested on gateways of its own
            # (tests/e2e/test_gateway_door.py).
            auth_failure_burst=1_000_000,
        )
    )
    await gw.start()
    yield gw
    await stopping("gateway", gw.stop())


@pytest.fixture(scope="session")
async def client_admin(gateway: Gateway, infra: Infra) -> AsyncIterator[ClientAdmin]:
    """Registers clients in the session gateway's own store (gateway/auth/admin.py)."""
    pool = await create_pool(infra.database_url, min_size=1, max_size=2)
    redis = create_redis(infra.redis_url)
    box = SecretBox(gateway.settings.auth_secret_key)
    yield ClientAdmin(pool, redis, box, infra.namespace)
    await redis.aclose()
    await pool.close()


@pytest.fixture(scope="session")
async def trusted_key(client_admin: ClientAdmin) -> IssuedKey:
    return await client_admin.create(
        ClientKind.OPS_TOOLING,
        "e2e trusted",
        scopes=TRUSTED_SCOPES,
        **UNLIMITED,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
async def http(gateway: Gateway, trusted_key: IssuedKey) -> AsyncIterator[httpx.AsyncClient]:
    """Signs every request and gives mutating ones an Idempotency-Key."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}",
        timeout=10,
        auth=HmacAuth(trusted_key.key_id, trusted_key.secret),
    ) as client:
        yield client


@pytest.fixture(scope="session")
async def store_keys(client_admin: ClientAdmin) -> StoreKeys:
    return StoreKeys(client_admin)


@pytest.fixture(scope="session")
async def pos(
    gateway: Gateway, store_keys: StoreKeys
) -> AsyncIterator[pos_pb2_grpc.PosServiceStub]:
    """Each call carries the key of the store its request names."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.pos_grpc_port}", interceptors=[PerStoreKeyInterceptor(store_keys)]
    ) as channel:
        yield pos_pb2_grpc.PosServiceStub(channel)


@pytest.fixture(scope="module", autouse=True)
async def ledger_audit(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """After every end-to-end module that ran the rewards service: the whole
    points ledger audits clean (what `python -m services.rewards audit` checks)."""
    yield
    infra = request.getfixturevalue("infra")
    c = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        # Before any module started rewards, there is no ledger to audit yet.
        if await c.fetchval("SELECT to_regclass('rewards.points_transactions') IS NULL"):
            return
        report = await audit_ledger(c)
    finally:
        await c.close()
    assert report.ok, report
