"""Table helpers shared by every service's schema module."""

from __future__ import annotations

from datetime import UTC, datetime
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

from loyalty.events.v1 import events_pb2

# The dedupe time of an event whose envelope has no occurred_at (published
# before it was set): fixed, so every redelivery finds the first's row. No
# partition covers it (they are made from now on), so such rows live in the
# default partition and expire there by processed_at.
NO_EVENT_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def event_time(envelope: events_pb2.EventEnvelope) -> datetime:
    """processed_events.occurred_at for an envelope: the producer's
    occurred_at, identical on every redelivery and replay."""
    if not envelope.HasField("occurred_at"):
        return NO_EVENT_TIME
    return envelope.occurred_at.ToDatetime(tzinfo=UTC)


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

    partitioned: processed_events is RANGE-partitioned by day of the event's
    own occurred_at (servicekit/partition_migrations.py converts it; the
    insert passes `event_time(envelope)`): the primary key (consumer,
    event_id, occurred_at) is unique as on the plain table, since every
    delivery of an event carries the same occurred_at; old days are dropped
    instead of rows pruned, so no processed_at index but on the default
    partition (the migration's)."""
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
        (
            Column("occurred_at", DateTime(timezone=True), nullable=False),
            PrimaryKeyConstraint("consumer", "event_id", "occurred_at"),
        )
        if partitioned
        # The pruner deletes by age (servicekit/retention.py).
        else (PrimaryKeyConstraint("consumer", "event_id"), Index(None, "processed_at"))
    )
    partitioning: dict[str, Any] = (
        {"postgresql_partition_by": "RANGE (occurred_at)"} if partitioned else {}
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
