"""engagement: each member's store for the journeys dashboard's store / region
filter (servicekit/metrics_definitions.py MEMBER_STORE). member_facts.store_id
already holds the registration store (member's MemberZoneSet); order_store_id
adds the store of the latest order engagement was told of (OrderCompleted, in
the order rewards' stream delivers them). The member's store is the first,
else the second.

Back-fill: the registration stores are there already; engagement has kept no
order's store before this revision, so order_store_id starts empty and fills
with each member's next order. A nullable column without a default rewrites no
row.

Revision ID: 0015_engagement_member_store
Revises: 0014_engagement_guide_nickname
Create Date: 2026-12-05 03:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_engagement_member_store"
down_revision: str | None = "0014_engagement_guide_nickname"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "engagement"


def upgrade() -> None:
    op.add_column("member_facts", sa.Column("order_store_id", sa.Text()), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("member_facts", "order_store_id", schema=SCHEMA)
