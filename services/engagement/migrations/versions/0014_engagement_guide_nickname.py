"""engagement: what templates and WeCom sends need of the member.

member_facts keeps the member's nickname (member's NicknameSet) for
`{nickname}`, and the member's exclusive guide (guides' GuideBound: the WeCom
userid of the staff member) who sends the member's 1-to-1 WeCom messages.
Existing members start empty and fill as the events arrive: a guide bound
before this ran is not known here until the member's next GuideBound, so their
WeCom sends go from WECOM_SENDER meanwhile (docs/journeys.md, "WeCom").

Revision ID: 0014_engagement_guide_nickname
Revises: 0013_engagement_sends_partitions
Create Date: 2026-12-05 03:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_engagement_guide_nickname"
down_revision: str | None = "0013_engagement_sends_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for name in ("nickname", "guide_userid"):
        op.add_column(
            "member_facts",
            sa.Column(name, sa.Text(), server_default="", nullable=False),
            schema="engagement",
        )


def downgrade() -> None:
    for name in ("guide_userid", "nickname"):
        op.drop_column("member_facts", name, schema="engagement")
