"""Alembic, once for every service: each service keeps its own migration
scripts (services/<name>/migrations) and its own version table inside its own
Postgres schema, so services migrate independently.

Run as a release step (`python -m services.<name> migrate`, a Kubernetes Job),
never at pod start.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from pathlib import Path

from alembic import command, context
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from .db import sqlalchemy_url

ROOT = Path(__file__).resolve().parent.parent
# The gateway keeps its own schema too (clients and keys), migrated the same way;
# so does the operator console (its operator accounts).
SERVICES = ("member", "tiering", "engagement", "rewards", "guides", "gateway", "console")
# Schema owners that are top-level packages rather than services.<name>.
TOP_LEVEL_OWNERS = frozenset({"gateway", "console"})


def _package(service: str) -> str:
    """The Python package holding `schema.py` and `migrations/` of a schema owner."""
    return service if service in TOP_LEVEL_OWNERS else f"services.{service}"


def alembic_config(service: str, database_url: str) -> Config:
    cfg = Config()
    location = ROOT.joinpath(*_package(service).split("."), "migrations")
    cfg.set_main_option("script_location", str(location))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["database_url"] = database_url
    cfg.attributes["service"] = service
    return cfg


def metadata_of(service: str) -> MetaData:
    return importlib.import_module(f"{_package(service)}.schema").metadata  # type: ignore[no-any-return]


def _partitions(connection: Connection, schema: str) -> set[str]:
    """The partitions of the schema's partitioned tables: the models declare the
    parent only (servicekit/partitions.py makes the partitions)."""
    rows = connection.execute(
        text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = :schema AND c.relispartition"
        ),
        {"schema": schema},
    )
    return {r[0] for r in rows}


def _include_name(schema: str, partitions: set[str]) -> Callable[[str | None, str, object], bool]:
    def include(name: str | None, type_: str, parent: object) -> bool:
        if type_ == "schema":
            return name == schema
        return not (type_ == "table" and name in partitions)

    return include


def _configure(connection: Connection, metadata: MetaData) -> None:
    schema = metadata.schema
    assert schema is not None
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=schema,
        include_schemas=True,
        include_name=_include_name(schema, _partitions(connection, schema)),
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_env() -> None:
    """Body of every service's migrations/env.py."""
    cfg = context.config
    metadata = metadata_of(cfg.attributes["service"])
    engine = create_async_engine(sqlalchemy_url(cfg.attributes["database_url"]))

    async def go() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(_configure, metadata)
        await engine.dispose()

    asyncio.run(go())


def upgrade(service: str, database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(service, database_url), revision)


def upgrade_all(database_url: str) -> None:
    for service in SERVICES:
        upgrade(service, database_url)


def pending_changes(service: str, database_url: str) -> list[object]:
    """What the models declare that the migrations do not create (`alembic check`)."""
    metadata = metadata_of(service)
    engine = create_async_engine(sqlalchemy_url(database_url))
    schema = metadata.schema
    assert schema is not None

    def diff(connection: Connection) -> list[object]:
        ctx = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": _include_name(schema, _partitions(connection, schema)),
                "compare_type": True,
                "version_table_schema": schema,
            },
        )
        return list(compare_metadata(ctx, metadata))

    async def go() -> list[object]:
        async with engine.connect() as conn:
            result = await conn.run_sync(diff)
        await engine.dispose()
        return result

    return asyncio.run(go())


def new_revision(service: str, database_url: str, message: str) -> None:
    """Autogenerate the next migration of a service from its schema module."""
    cfg = alembic_config(service, database_url)
    upgrade(service, database_url)
    command.revision(cfg, message=message, autogenerate=True)
