"""tiering: member_profiles keeps 30% of each page free for HOT updates

The batch recompute rewrites segment/stage columns (none indexed) of many
members at a period end; with free space on the page PostgreSQL updates in
place (HOT) instead of adding a primary-key entry per changed row. Applies to
pages written from now on; `VACUUM FULL tiering.member_profiles` in a quiet
hour repacks existing ones.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 12:45:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE tiering.member_profiles SET (fillfactor = 70)")


def downgrade() -> None:
    op.execute("ALTER TABLE tiering.member_profiles RESET (fillfactor)")
