"""rewards: index processed_events by age, for the pruner
(servicekit/retention.py)

Revision ID: 0008_rewards_event_pruning
Revises: 0007_rewards_mall_shipping
Create Date: 2026-11-25 16:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_rewards_event_pruning"
down_revision: str | None = "0007_rewards_mall_shipping"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_processed_events_processed_at"),
        "processed_events",
        ["processed_at"],
        unique=False,
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_processed_events_processed_at"), table_name="processed_events", schema="rewards"
    )
