"""Tables of the tiering schema (Alembic reads this; queries live in repository.py)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB

from servicekit.tables import add_event_tables, service_metadata

SCHEMA = "tiering"
metadata = service_metadata(SCHEMA)

# One row per programme version. A new version takes over from its
# effective_from; older versions stay untouched so past evaluations can be
# explained with the rules that applied then.
tier_programmes = Table(
    "tier_programmes",
    metadata,
    Column("programme_id", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("effective_from", DateTime(timezone=True), nullable=False),
    Column("qualifying_metric", Text, nullable=False),
    Column("window_months", Integer, nullable=False),
    # Ordered tiers: [{code, name, threshold, benefits: {...}}]; validated by domain.parse_ladder.
    Column("ladder", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("programme_id", "version"),
    CheckConstraint(
        "qualifying_metric IN ('growth_value', 'paid_spend', 'order_count')",
        name="qualifying_metric",
    ),
    CheckConstraint("version >= 1", name="version_positive"),
    CheckConstraint("window_months BETWEEN 1 AND 36", name="window_months"),
    CheckConstraint("jsonb_typeof(ladder) = 'array'", name="ladder_is_array"),
)

# Kept by the OrderCompleted consumer; lifetime totals per member.
member_spend = Table(
    "member_spend",
    metadata,
    Column("member_id", Uuid, primary_key=True),
    Column("total_paid_fen", BigInteger, nullable=False, server_default="0"),
    Column("order_count", BigInteger, nullable=False, server_default="0"),
    Column("last_order_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("total_paid_fen >= 0", name="total_paid_fen_non_negative"),
    CheckConstraint("order_count >= 0", name="order_count_non_negative"),
)

outbox, processed_events = add_event_tables(metadata)
