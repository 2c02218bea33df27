"""member: index for the dashboards' registration range scans

Revision ID: 0006_member_analytics
Revises: 0005_member_durable_events
Create Date: 2026-12-04 20:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_member_analytics"
down_revision: str | None = "0005_member_durable_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "member"


def upgrade() -> None:
    op.create_index(op.f("ix_members_registered_at"), "members", ["registered_at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index(op.f("ix_members_registered_at"), table_name="members", schema=SCHEMA)
