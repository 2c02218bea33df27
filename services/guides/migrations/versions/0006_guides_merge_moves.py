"""guides: merge moves: what a OneID merge moved (contacts, orders, notes,
tags, bindings), so MemberUnmerged moves exactly that back

Revision ID: 0006_guides_merge_moves
Revises: 0005_guides_durable_events
Create Date: 2026-12-04 21:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_guides_merge_moves"
down_revision: str | None = "0005_guides_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "guides"


def upgrade() -> None:
    op.create_table(
        "merge_moves",
        sa.Column("merge_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("ref", sa.Text(), nullable=False),
        sa.Column(
            "detail",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("merge_id", "kind", "ref", name=op.f("pk_merge_moves")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("merge_moves", schema=SCHEMA)
