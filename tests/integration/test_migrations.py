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
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                service,
            )
        }
    finally:
        await conn.close()
    assert {t.name for t in metadata.sorted_tables} | {"alembic_version"} == tables
