"""Table helpers shared by every service's schema module."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.sql.schema import SchemaItem

# Predictable constraint names, so Alembic migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def service_metadata(schema: str) -> MetaData:
    """Metadata for one service: its own Postgres schema, the naming convention."""
    return MetaData(schema=schema, naming_convention=NAMING_CONVENTION)


def add_event_tables(metadata: MetaData, partitioned: bool = False) -> tuple[Table, Table]:
    """The transactional outbox, the consumer's processed-event log and its
    per-producer cursors (durable events: docs/architecture.md "Events").

    partitioned: processed_events is RANGE-partitioned by month of
    processed_at (servicekit/partition_migrations.py converts it): its primary
    key carries processed_at, as PostgreSQL requires, and (consumer, event_id)
    stays unique across partitions by the first_only trigger; old partitions
    are dropped instead of rows pruned, so no processed_at index."""
    outbox = Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("event_id", Uuid, nullable=False, unique=True),
        Column("event_type", Text, nullable=False),
        Column("envelope", LargeBinary, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        # Given by the relay in commit order, gap-free per producer (servicekit/outbox.py).
        Column("seq", BigInteger, nullable=True, unique=True),
        # Set once in Redis; the row is kept for the retention window after that.
        Column("published_at", DateTime(timezone=True), nullable=True),
        Index("ix_outbox_unsequenced", "id", postgresql_where=text("seq IS NULL")),
        Index(
            "ix_outbox_unpublished",
            "seq",
            postgresql_where=text("seq IS NOT NULL AND published_at IS NULL"),
        ),
        Index(None, "published_at"),
    )
    keyed: tuple[SchemaItem, ...] = (
        (PrimaryKeyConstraint("consumer", "event_id", "processed_at"),)
        if partitioned
        # The pruner deletes by age (servicekit/retention.py).
        else (PrimaryKeyConstraint("consumer", "event_id"), Index(None, "processed_at"))
    )
    partitioning: dict[str, Any] = (
        {"postgresql_partition_by": "RANGE (processed_at)"} if partitioned else {}
    )
    processed = Table(
        "processed_events",
        metadata,
        Column("consumer", Text, nullable=False),
        Column("event_id", Uuid, nullable=False),
        Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        # Which producer's sequence the event had (NULL: published before sequences).
        Column("producer", Text, nullable=True),
        Column("seq", BigInteger, nullable=True),
        *keyed,
        # The cursor walks a consumer's applied sequence numbers (servicekit/consumer.py).
        Index(None, "consumer", "producer", "seq"),
        **partitioning,
    )
    Table(
        "event_cursors",
        metadata,
        Column("consumer", Text, nullable=False),
        Column("producer", Text, nullable=False),
        # Every event up to here is applied (or dead-lettered, or not subscribed to).
        Column("applied_seq", BigInteger, nullable=False, server_default="0"),
        # Last time applied_seq moved or caught up with the producer: a gap is
        # a cursor that stands still while events past it exist.
        Column("progressed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        # An open gap: the first missing sequence number and when its replay was asked for.
        Column("replay_from", BigInteger, nullable=True),
        Column("replay_requested_at", DateTime(timezone=True), nullable=True),
        Column("gaps_found", BigInteger, nullable=False, server_default="0"),
        Column("gaps_healed", BigInteger, nullable=False, server_default="0"),
        PrimaryKeyConstraint("consumer", "producer"),
    )
    return outbox, processed
