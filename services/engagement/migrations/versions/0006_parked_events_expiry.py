"""engagement: index parked_events by parked_at, for their expiry
(ENGAGEMENT_PARKED_TTL_DAYS; docs/journeys.md, "Events in, parking, identity")

Revision ID: 0006_engagement_parked_expiry
Revises: 0005
Create Date: 2026-12-04 17:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_engagement_parked_expiry"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_parked_events_parked_at",
        "parked_events",
        ["parked_at"],
        unique=False,
        schema="engagement",
    )


def downgrade() -> None:
    op.drop_index("ix_parked_events_parked_at", table_name="parked_events", schema="engagement")
