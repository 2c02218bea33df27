"""engagement: what member says of a member's zone (profile zone, registration
store) beside the zone it resolves to (member_facts.tz), from MemberZoneSet

Revision ID: 0007_engagement_member_zone
Revises: 0006_engagement_parked_expiry
Create Date: 2026-12-04 17:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_engagement_member_zone"
down_revision: str | None = "0006_engagement_parked_expiry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for name in ("profile_tz", "store_id"):
        op.add_column(
            "member_facts",
            sa.Column(name, sa.Text(), server_default="", nullable=False),
            schema="engagement",
        )


def downgrade() -> None:
    for name in ("store_id", "profile_tz"):
        op.drop_column("member_facts", name, schema="engagement")
