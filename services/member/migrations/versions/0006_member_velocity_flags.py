"""member: velocity flags: identifiers presented at too many stores within a
short window, flagged once per burst for operators (services/member/velocity.py)

Revision ID: 0006_member_velocity_flags
Revises: 0005_member_durable_events
Create Date: 2026-12-04 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_member_velocity_flags"
down_revision: str | None = "0005_member_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "member"


def upgrade() -> None:
    op.create_table(
        "velocity_flags",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("id_type", sa.Text(), nullable=False),
        sa.Column("namespace", sa.Text(), nullable=False),
        sa.Column("value_hash", sa.LargeBinary(), nullable=False),
        sa.Column("value_masked", sa.Text(), nullable=False),
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("store_count", sa.Integer(), nullable=False),
        sa.Column("store_ids", sa.ARRAY(sa.Text()), nullable=False),
        sa.Column("window_seconds", sa.Integer(), nullable=False),
        sa.Column("flagged_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_velocity_flags")),
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_velocity_flags_value_hash"),
        "velocity_flags",
        ["value_hash"],
        unique=False,
        schema=SCHEMA,
    )
    op.create_index(
        op.f("ix_velocity_flags_flagged_at_id"),
        "velocity_flags",
        ["flagged_at", "id"],
        unique=False,
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("velocity_flags", schema=SCHEMA)
