"""member: index processed_events and identify_requests by age, for the pruner
(servicekit/retention.py)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 16:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_processed_events_processed_at"),
        "processed_events",
        ["processed_at"],
        unique=False,
        schema="member",
    )
    op.create_index(
        op.f("ix_identify_requests_created_at"),
        "identify_requests",
        ["created_at"],
        unique=False,
        schema="member",
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_identify_requests_created_at"), table_name="identify_requests", schema="member"
    )
    op.drop_index(
        op.f("ix_processed_events_processed_at"), table_name="processed_events", schema="member"
    )
