"""Bookkeeping past its retention is pruned (servicekit/retention.py), against
real PostgreSQL: old rows go in batches, recent ones stay, and nothing else is
touched. (Partitioned tables, every service's processed_events and
member.identify_requests, drop whole partitions instead:
tests/integration/test_partitioned_dedupe.py.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from servicekit.db import create_pool
from servicekit.retention import Pruner, Retention

from ..harness import Infra

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
async def pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(infra.database_url, 1, 3)
    yield p
    await p.close()


async def test_processed_events_past_retention_are_pruned(
    pool: asyncpg.Pool,
) -> None:
    # Every service's processed_events is partitioned now (dropped by day): a
    # plain table of the same shape stands for any table the pruner keeps.
    await pool.execute("CREATE SCHEMA IF NOT EXISTS pruner_probe")
    await pool.execute(
        "CREATE TABLE IF NOT EXISTS pruner_probe.processed_events (consumer text NOT NULL,"
        " event_id uuid NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(),"
        " PRIMARY KEY (consumer, event_id))"
    )
    consumer = f"retention-{uuid.uuid4().hex[:8]}"
    ages = [timedelta(days=d) for d in (30, 9, 8, 6, 1)] + [timedelta(days=8)] * 5
    await pool.executemany(
        "INSERT INTO pruner_probe.processed_events (consumer, event_id, processed_at)"
        " VALUES ($1, $2, $3)",
        [(consumer, uuid.uuid4(), NOW - age) for age in ages],
    )
    pruner = Pruner(
        pool,
        [
            Retention("pruner_probe.processed_events", "processed_at", timedelta(days=7)),
        ],
        interval_seconds=3600,
        clock=lambda: NOW,
        batch_rows=3,  # several batches for the 8 old events
    )
    deleted = await pruner.prune_once()

    left = await pool.fetch(
        "SELECT processed_at FROM pruner_probe.processed_events WHERE consumer = $1", consumer
    )
    assert sorted(NOW - r["processed_at"] for r in left) == [timedelta(days=1), timedelta(days=6)]
    # Other tests' rows may be old too: at least ours went, in more than one batch.
    assert deleted["pruner_probe.processed_events"] >= 8
    # A second round finds nothing more of ours.
    await pruner.prune_once()
    assert (
        len(
            await pool.fetch(
                "SELECT 1 FROM pruner_probe.processed_events WHERE consumer = $1", consumer
            )
        )
        == 2
    )


async def test_a_partitioned_table_is_left_to_its_partitions(pool: asyncpg.Pool) -> None:
    """The pruner's ctid batches would delete the rows of other partitions that
    share a ctid: it refuses a partitioned table (its partitions are dropped)."""
    consumer = f"retention-{uuid.uuid4().hex[:8]}"
    now = await pool.fetchval("SELECT now()")
    await pool.executemany(
        "INSERT INTO tiering.processed_events (consumer, event_id, processed_at, occurred_at)"
        " VALUES ($1, $2, $3, $3)",
        [(consumer, uuid.uuid4(), now - timedelta(days=d)) for d in (0, 1)],
    )
    pruner = Pruner(
        pool,
        [Retention("tiering.processed_events", "processed_at", timedelta(hours=1))],
        interval_seconds=3600,
        clock=lambda: now,
    )
    assert await pruner.prune_once() == {"tiering.processed_events": 0}
    left = await pool.fetchval(
        "SELECT count(*) FROM tiering.processed_events WHERE consumer = $1", consumer
    )
    assert left == 2
