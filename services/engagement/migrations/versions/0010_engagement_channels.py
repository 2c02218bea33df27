"""engagement: real channel sends. A send keeps its rendered provider payload,
the provider's error code and when a delivery receipt was applied; the status
gains `sending`, `no_credit` and `unknown`. An enrollment keeps the attributes
of the event that entered it (the variables of its templates).

Revision ID: 0010_engagement_channels
Revises: 0009_engagement_analytics
Create Date: 2026-12-04 20:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_engagement_channels"
down_revision: str | None = "0009_engagement_analytics"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sends",
        sa.Column("payload", postgresql.JSONB(), server_default="{}", nullable=False),
        schema="engagement",
    )
    op.add_column(
        "sends",
        sa.Column("error_code", sa.Text(), server_default="", nullable=False),
        schema="engagement",
    )
    op.add_column(
        "sends",
        sa.Column("receipt_at", sa.DateTime(timezone=True), nullable=True),
        schema="engagement",
    )
    op.add_column(
        "enrollments",
        sa.Column("entry_attributes", postgresql.JSONB(), server_default="{}", nullable=False),
        schema="engagement",
    )
    # Leases of sends in flight, found when they expire (a dispatcher died mid-call).
    op.create_index(
        "ix_sends_in_flight",
        "sends",
        ["next_attempt_at"],
        schema="engagement",
        postgresql_where=sa.text("status = 'sending'"),
    )
    # The operators' list of sends whose outcome nobody knows.
    op.create_index(
        "ix_sends_unknown",
        "sends",
        ["journey_id", "updated_at"],
        schema="engagement",
        postgresql_where=sa.text("status = 'unknown'"),
    )


def downgrade() -> None:
    op.drop_index("ix_sends_unknown", table_name="sends", schema="engagement")
    op.drop_index("ix_sends_in_flight", table_name="sends", schema="engagement")
    op.drop_column("enrollments", "entry_attributes", schema="engagement")
    for name in ("receipt_at", "error_code", "payload"):
        op.drop_column("sends", name, schema="engagement")
