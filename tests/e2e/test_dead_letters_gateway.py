"""Dead-lettered events through the gateway (scope admin:events): a real
consumer dead-letters an event, `GET /v1/admin/dead-letters` lists it with
its stream, group, id, type, error and attempts, and `POST
/v1/admin/dead-letters/redrive` re-publishes it (audited under the signed-in
operator) so the group applies it once; a second redrive is 404, a malformed
reference 422 naming its part, and a client without the scope is refused."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import Gateway
from gateway.auth.admin import ClientAdmin
from gateway.auth.client import HmacAuth
from gateway.auth.model import ADMIN_JOURNEYS, ClientKind
from gateway.principal import OPERATOR_USER_HEADER
from loyalty.events.v1 import events_pb2
from servicekit.consumer import EventConsumer, Subscription
from servicekit.db import Database, UnitOfWork, create_pool
from servicekit.deadletters import redrive_audit_stream
from servicekit.events import ENVELOPE_FIELD, ReceivedEvent, make_envelope, stream_name
from servicekit.redis_client import create_redis

from ..harness import Infra, eventually
from .doors import UNLIMITED

pytestmark = pytest.mark.e2e


@pytest.fixture
async def db(infra: Infra) -> AsyncIterator[Database]:
    pool = await create_pool(infra.database_url, 1, 3)
    database = Database(pool, "tiering", "dlq-e2e")
    yield database
    await database.close()


async def test_an_operator_lists_and_redrives_a_dead_letter_once(
    gateway: Gateway, client_admin: ClientAdmin, db: Database, infra: Infra
) -> None:
    tag = uuid.uuid4().hex[:8]
    producer, group = f"e2e-{tag}", f"grp-{tag}"
    stream = stream_name(infra.namespace, producer)
    console = await client_admin.create(
        ClientKind.OPERATOR_CONSOLE,
        "console (defaults)",
        client_id=f"dlq-console-{tag}",
        **UNLIMITED,  # type: ignore[arg-type]
    )
    calls: Counter[str] = Counter()
    broken = True

    async def handler(uow: UnitOfWork, event: ReceivedEvent) -> None:
        calls[event.envelope.event_id] += 1
        if broken:
            raise RuntimeError("tier table missing")

    redis = create_redis(infra.redis_url)
    consumer = EventConsumer(
        group,
        db,
        redis,
        infra.namespace,
        [Subscription(producer, events_pb2.OrderCompleted, handler)],
        max_attempts=2,
        retry_after_ms=100,
        block_ms=50,
    )
    envelope = make_envelope(producer, events_pb2.OrderCompleted(order_id="o1"), str(uuid.uuid4()))
    await redis.xadd(stream, {ENVELOPE_FIELD: envelope.SerializeToString()})
    task = asyncio.create_task(consumer.run())
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gateway.http_port}",
            auth=HmacAuth(console.key_id, console.secret),
            headers={OPERATOR_USER_HEADER: "li.wei"},
            timeout=10,
        ) as api:

            async def ours() -> list[dict[str, object]]:
                reply = await api.get("/v1/admin/dead-letters")
                assert reply.status_code == 200, reply.text
                return [d for d in reply.json()["dead_letters"] if d["stream"] == stream]

            [letter] = await eventually(ours, timeout=15)
            assert {k: letter[k] for k in ("group", "event_id", "event_type", "attempts")} == {
                "group": group,
                "event_id": envelope.event_id,
                "event_type": "loyalty.events.v1.OrderCompleted",
                "attempts": 2,
            }
            assert "tier table missing" in str(letter["error"])

            bad = await api.post(
                "/v1/admin/dead-letters/redrive",
                json={"stream": stream, "group": group, "id": "yesterday"},
            )
            assert bad.status_code == 422
            assert (bad.json()["code"], bad.json()["field"]) == ("INVALID_DEAD_LETTER_REF", "id")

            broken = False
            ref = {"stream": stream, "group": group, "id": letter["id"]}
            done = await api.post("/v1/admin/dead-letters/redrive", json=ref)
            assert done.status_code == 200, done.text
            assert done.json()["dead_letter"]["event_id"] == envelope.event_id
            await eventually(lambda: calls[envelope.event_id] == 3, timeout=15)
            assert await ours() == []
            again = await api.post("/v1/admin/dead-letters/redrive", json=ref)
            assert again.status_code == 404
            assert again.json()["code"] == "UNKNOWN_DEAD_LETTER"
        await asyncio.sleep(0.5)  # time for a second delivery to show
        assert calls[envelope.event_id] == 3  # two failed attempts, then applied once
        audit = await redis.xrange(redrive_audit_stream(stream))
        assert [f[b"operator"] for _, f in audit] == [f"{console.client_id}/li.wei".encode()]
    finally:
        consumer.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await redis.aclose()

    # A client without admin:events is refused both routes.
    journeys_only = await client_admin.create(
        ClientKind.OPERATOR_CONSOLE,
        "journeys only",
        client_id=f"dlq-journeys-{tag}",
        scopes=(ADMIN_JOURNEYS,),
        **UNLIMITED,  # type: ignore[arg-type]
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}",
        auth=HmacAuth(journeys_only.key_id, journeys_only.secret),
        timeout=10,
    ) as other:
        for reply in (
            await other.get("/v1/admin/dead-letters"),
            await other.post("/v1/admin/dead-letters/redrive", json=ref),
        ):
            assert reply.status_code == 403
            assert reply.json()["code"] == "SCOPE_MISSING"
