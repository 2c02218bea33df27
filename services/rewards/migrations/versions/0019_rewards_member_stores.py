"""rewards: member_stores, each member's store for the dashboards' store /
region filter (servicekit/metrics_definitions.py MEMBER_STORE) on rewards'
per-member figures (points liability and expiry, points not tied to an order,
coupons issued, referrals): the registration store (member's MemberZoneSet)
and the store of the member's latest settled order with its time (rewards'
own OrderCompleted, only moving forward). The member's store is the first,
else the second.

Back-fill, set-based: every member's latest settled order in rewards.orders
(one INSERT ... SELECT DISTINCT ON); registration stores arrive with the next
MemberZoneSet (rewards has kept none before).

Revision ID: 0019_rewards_member_stores
Revises: 0018_rewards_order_partitions
Create Date: 2026-12-05 03:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_rewards_member_stores"
down_revision: str | None = "0018_rewards_order_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "rewards"


def upgrade() -> None:
    op.create_table(
        "member_stores",
        sa.Column("member_id", sa.Uuid(), nullable=False),
        sa.Column("registration_store_id", sa.Text()),
        sa.Column("order_store_id", sa.Text()),
        sa.Column("order_store_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("member_id", name=op.f("pk_member_stores")),
        schema=SCHEMA,
    )
    op.execute(
        "INSERT INTO rewards.member_stores (member_id, order_store_id, order_store_at)"
        " SELECT DISTINCT ON (member_id) member_id, store_id, ordered_at FROM rewards.orders"
        " WHERE status = 'settled' ORDER BY member_id, ordered_at DESC, id DESC"
    )


def downgrade() -> None:
    op.drop_table("member_stores", schema=SCHEMA)
