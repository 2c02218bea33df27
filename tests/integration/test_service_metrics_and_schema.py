"""What a deployment relies on from every service's shell (servicekit/server.py):
Prometheus metrics on their own port (servicekit/metrics.py), and the start-up
schema check that keeps a pod NOT_SERVING until its schema is at the code's
head revision (servicekit/schemacheck.py). Engagement is the subject."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from alembic.script import ScriptDirectory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from loyalty.engagement.v1 import engagement_pb2, engagement_pb2_grpc
from servicekit.db import Database, create_pool
from servicekit.events import dead_letter_stream
from servicekit.metrics import ServiceMetrics
from servicekit.migrations import alembic_config, upgrade
from servicekit.schemacheck import code_revisions
from servicekit.server import ServiceApp
from services.engagement.server import build

from ..harness import Infra, eventually, own_database, wait_until_serving

SERVING = health_pb2.HealthCheckResponse.SERVING


def own_namespace(infra: Infra, name: str) -> str:
    """Streams of this test's app alone: its consumer groups must not take the
    session services' events (the harness removes `<namespace>:*` at the end)."""
    return f"{infra.namespace}:{name}-{uuid.uuid4().hex[:6]}"


@contextlib.asynccontextmanager
async def started(app: ServiceApp) -> AsyncIterator[ServiceApp]:
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def find(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    for (n, lbls), value in samples.items():
        if n == name and all(dict(lbls).get(k) == v for k, v in labels.items()):
            return float(value)
    return None


async def test_a_service_serves_rpc_and_state_metrics_on_its_own_port(infra: Infra) -> None:
    namespace = own_namespace(infra, "metrics")
    app = build(
        infra.service_settings(metrics_sample_interval_seconds=0.2, redis_namespace=namespace)
    )
    async with started(app):
        await wait_until_serving(f"127.0.0.1:{app.port}")
        assert app.metrics.port not in (0, app.port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = engagement_pb2_grpc.EngagementServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetJourneyMetrics(
                    engagement_pb2.JourneyRef(journey_id="no-such-journey"), timeout=5
                )
        code = caught.value.code().name
        method = {"grpc_service": "loyalty.engagement.v1.EngagementService"}

        def ready() -> dict | None:  # type: ignore[type-arg]
            samples = scrape(app.metrics.port)
            # The first sampling ran: state gauges are present.
            if find(samples, "engagement_scheduler_due_timers") is None:
                return None
            return samples

        samples = await eventually(lambda: asyncio.to_thread(ready), timeout=10)
        assert (
            find(
                samples,
                "grpc_server_handled_total",
                grpc_method="GetJourneyMetrics",
                grpc_code=code,
                **method,
            )
            == 1.0
        )
        assert (
            find(samples, "grpc_server_handling_seconds_count", grpc_method="GetJourneyMetrics")
            == 1.0
        )
        # Health probes are not RPC traffic.
        assert not any(
            n == "grpc_server_handled_total"
            and dict(lbls).get("grpc_service") == "grpc.health.v1.Health"
            for n, lbls in samples
        )
        assert find(samples, "outbox_backlog_events") is not None
        assert find(samples, "outbox_oldest_event_age_seconds") is not None
        assert find(samples, "db_pool_max_connections") == float(app.settings.db_pool_max)
        assert find(samples, "db_pool_connections", state="in_use") is not None
        # Engagement's consumer group reads member, rewards and tiering.
        stream = f"{namespace}:events:rewards"
        assert (
            find(samples, "event_consumer_pending_events", stream=stream, group="engagement") == 0
        )
        dlq = dead_letter_stream(namespace, "rewards", "engagement")
        assert find(samples, "event_dead_letters", stream=dlq) == 0
    # The port is released with the service.
    with pytest.raises(OSError):
        scrape(app.metrics.port)


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=2
        )
        return reply.status


@pytest.fixture
async def fresh_database_url(infra: Infra) -> AsyncIterator[str]:
    async with own_database(infra, prefix="loyalty_schema") as url:
        yield url


async def test_a_service_stays_not_serving_until_its_schema_is_at_head(
    infra: Infra, fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    (head,) = code_revisions("engagement").heads
    # One revision short of head: what an old database looks like before the
    # release's migration Job ran. Every other schema is at head.
    for service in ("member", "tiering", "rewards", "gateway"):
        await asyncio.to_thread(upgrade, service, fresh_database_url)
    script = ScriptDirectory.from_config(alembic_config("engagement", ""))
    previous = script.get_revision(head).down_revision
    assert isinstance(previous, str)
    await asyncio.to_thread(upgrade, "engagement", fresh_database_url, previous)
    app = build(
        infra.service_settings(
            database_url=fresh_database_url, redis_namespace=own_namespace(infra, "schema")
        )
    )
    with caplog.at_level(logging.INFO, logger="servicekit.schemacheck"):
        async with started(app):
            # Several health polls (every 0.2 s while not ready): none serves.
            await asyncio.sleep(1.0)
            assert await _health(app.port) != SERVING
            lines = [r.getMessage() for r in caplog.records]
            assert any(
                "NOT_SERVING" in line
                and f"needs head {head}" in line
                and "python -m services.engagement migrate" in line
                for line in lines
            ), lines
            # The release step runs; the pod starts serving without a restart.
            await asyncio.to_thread(upgrade, "engagement", fresh_database_url)
            await eventually(lambda: _is_serving(app.port), timeout=10)
    assert any("at head revision" in r.getMessage() for r in caplog.records)


async def _is_serving(port: int) -> bool:
    return await _health(port) == SERVING


async def test_a_never_migrated_schema_is_not_served(infra: Infra, fresh_database_url: str) -> None:
    app = build(
        infra.service_settings(
            database_url=fresh_database_url, redis_namespace=own_namespace(infra, "schema")
        )
    )
    async with started(app):
        await asyncio.sleep(1.0)
        assert await _health(app.port) != SERVING


async def test_liveness_answers_while_readiness_waits_for_the_schema(
    infra: Infra, fresh_database_url: str
) -> None:
    app = build(
        infra.service_settings(
            database_url=fresh_database_url, redis_namespace=own_namespace(infra, "schema")
        )
    )
    async with started(app):
        await asyncio.sleep(0.5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            live = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=2)
            ready = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert live.status == SERVING
        assert ready.status != SERVING


async def test_the_outbox_gauges_count_only_events_not_yet_published(infra: Infra) -> None:
    """The relay keeps published events for replays (OUTBOX_RETENTION_DAYS):
    they are neither backlog nor lag. Counted, the lag alert (> 60 s) fired for
    good a minute after the first publish, and every sample scanned the table."""
    async with own_database(infra, "engagement", prefix="loyalty_outbox_gauges") as url:
        pool = await create_pool(url, 1, 2)
        try:
            db = Database(pool, "engagement", "engagement")
            metrics = ServiceMetrics("kit")

            async def gauges() -> tuple[float | None, float | None]:
                await metrics._sample_outbox(db)
                registry = metrics.registry
                return (
                    registry.get_sample_value("outbox_backlog_events"),
                    registry.get_sample_value("outbox_oldest_event_age_seconds"),
                )

            # Two events published an hour ago, kept for replays.
            await pool.execute(
                "INSERT INTO engagement.outbox"
                " (event_id, event_type, envelope, created_at, seq, published_at)"
                " SELECT gen_random_uuid(), 'Kept', '\\x00', now() - interval '2 hours',"
                " n, now() - interval '1 hour' FROM generate_series(1, 2) n"
            )
            assert await gauges() == (0.0, 0.0)
            # One committed 30 s ago, not published yet.
            await pool.execute(
                "INSERT INTO engagement.outbox (event_id, event_type, envelope, created_at)"
                " VALUES (gen_random_uuid(), 'Waiting', '\\x00', now() - interval '30 seconds')"
            )
            backlog, lag = await gauges()
            assert backlog == 1.0
            assert lag is not None and 30.0 <= lag < 600.0
        finally:
            await pool.close()
