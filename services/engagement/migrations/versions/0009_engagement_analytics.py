"""engagement: indexes for the journeys dashboard (enrollments by entry time, sends by enrollment)

Revision ID: 0009_engagement_analytics
Revises: 0008_engagement_durable_events
Create Date: 2026-12-04 20:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009_engagement_analytics"
down_revision: str | None = "0008_engagement_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "engagement"


def upgrade() -> None:
    op.create_index(op.f("ix_enrollments_entered_at"), "enrollments", ["entered_at"], schema=SCHEMA)
    op.create_index(op.f("ix_sends_enrollment_id"), "sends", ["enrollment_id"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index(op.f("ix_sends_enrollment_id"), table_name="sends", schema=SCHEMA)
    op.drop_index(op.f("ix_enrollments_entered_at"), table_name="enrollments", schema=SCHEMA)
