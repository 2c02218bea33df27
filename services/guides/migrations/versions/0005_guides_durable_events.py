"""guides: durable events: the outbox keeps published events (gap-free
per-producer sequence, published_at for the retention window) and consumers
keep a cursor per producer (servicekit/outbox.py, servicekit/consumer.py)

Revision ID: 0005_guides_durable_events
Revises: 0004
Create Date: 2026-12-04 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_guides_durable_events"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "guides"


def upgrade() -> None:
    op.add_column("outbox", sa.Column("seq", sa.BigInteger(), nullable=True), schema=SCHEMA)
    op.add_column(
        "outbox",
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    op.create_unique_constraint(op.f("uq_outbox_seq"), "outbox", ["seq"], schema=SCHEMA)
    op.create_index(
        "ix_outbox_unsequenced",
        "outbox",
        ["id"],
        unique=False,
        schema=SCHEMA,
        postgresql_where=sa.text("seq IS NULL"),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["seq"],
        unique=False,
        schema=SCHEMA,
        postgresql_where=sa.text("seq IS NOT NULL AND published_at IS NULL"),
    )
    op.create_index(
        op.f("ix_outbox_published_at"), "outbox", ["published_at"], unique=False, schema=SCHEMA
    )
    op.add_column(
        "processed_events", sa.Column("producer", sa.Text(), nullable=True), schema=SCHEMA
    )
    op.add_column(
        "processed_events", sa.Column("seq", sa.BigInteger(), nullable=True), schema=SCHEMA
    )
    op.create_index(
        op.f("ix_processed_events_consumer_producer_seq"),
        "processed_events",
        ["consumer", "producer", "seq"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_table(
        "event_cursors",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("producer", sa.Text(), nullable=False),
        sa.Column("applied_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "progressed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("replay_from", sa.BigInteger(), nullable=True),
        sa.Column("replay_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("gaps_found", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("gaps_healed", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("consumer", "producer", name=op.f("pk_event_cursors")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("event_cursors", schema=SCHEMA)
    op.drop_index(
        op.f("ix_processed_events_consumer_producer_seq"),
        table_name="processed_events",
        schema=SCHEMA,
    )
    op.drop_column("processed_events", "seq", schema=SCHEMA)
    op.drop_column("processed_events", "producer", schema=SCHEMA)
    op.drop_index(op.f("ix_outbox_published_at"), table_name="outbox", schema=SCHEMA)
    op.drop_index("ix_outbox_unpublished", table_name="outbox", schema=SCHEMA)
    op.drop_index("ix_outbox_unsequenced", table_name="outbox", schema=SCHEMA)
    op.drop_constraint(op.f("uq_outbox_seq"), "outbox", schema=SCHEMA, type_="unique")
    op.drop_column("outbox", "published_at", schema=SCHEMA)
    op.drop_column("outbox", "seq", schema=SCHEMA)
