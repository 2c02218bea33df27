"""Every service's models match its migrations (the `alembic check` of CI), and
each service's tables live in its own schema."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from servicekit.db import asyncpg_dsn
from servicekit.migrations import SERVICES, metadata_of, pending_changes

from ..harness import Infra


@pytest.mark.parametrize("service", SERVICES)
async def test_models_match_migrations(infra: Infra, service: str) -> None:
    diff = await asyncio.to_thread(pending_changes, service, infra.database_url)
    assert diff == [], f"{service}: models and migrations differ: {diff}"


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_owns_its_schema(infra: Infra, service: str) -> None:
    metadata = metadata_of(service)
    assert metadata.schema == service
    conn = await asyncpg.connect(asyncpg_dsn(infra.database_url))
    try:
        # Partitions are the parent's storage (servicekit/partitions.py), not tables of their own.
        tables = {
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
                service,
            )
        }
    finally:
        await conn.close()
    assert {t.name for t in metadata.sorted_tables} | {"alembic_version"} == tables
