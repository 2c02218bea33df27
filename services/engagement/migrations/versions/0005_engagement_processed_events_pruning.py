"""engagement: index processed_events by age, for the pruner
(servicekit/retention.py)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 16:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_processed_events_processed_at"),
        "processed_events",
        ["processed_at"],
        unique=False,
        schema="engagement",
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_processed_events_processed_at"), table_name="processed_events", schema="engagement"
    )
