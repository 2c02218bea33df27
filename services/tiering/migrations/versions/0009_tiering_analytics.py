"""tiering: the dashboards' data: stage_transitions (lifecycle moves per
recompute) and an index on tier_history.changed_at (range scans)

Revision ID: 0009_tiering_analytics
Revises: 0008_tiering_durable_events
Create Date: 2026-12-04 20:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_tiering_analytics"
down_revision: str | None = "0008_tiering_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "tiering"


def upgrade() -> None:
    op.create_table(
        "stage_transitions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_stage", sa.Text(), nullable=False),
        sa.Column("to_stage", sa.Text(), nullable=False),
        sa.Column("members", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_transitions")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_stage_transitions_as_of"), "stage_transitions", ["as_of"], schema=SCHEMA
    )
    op.create_index(
        "ix_tier_history_changed_at", "tier_history", ["changed_at"], schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_index("ix_tier_history_changed_at", table_name="tier_history", schema=SCHEMA)
    op.drop_index(
        op.f("ix_stage_transitions_as_of"), table_name="stage_transitions", schema=SCHEMA
    )
    op.drop_table("stage_transitions", schema=SCHEMA)
