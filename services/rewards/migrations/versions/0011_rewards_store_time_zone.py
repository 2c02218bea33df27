"""rewards: a store's time zone (stores are operator-managed data: PutStore,
SetStoreStatus, `python -m services.rewards stores ...`)

Revision ID: 0011_rewards_store_time_zone
Revises: 0010_rewards_mall_payment
Create Date: 2026-12-04 17:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_rewards_store_time_zone"
down_revision: str | None = "0010_rewards_mall_payment"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "stores",
        sa.Column("time_zone", sa.Text(), server_default="Asia/Shanghai", nullable=False),
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_column("stores", "time_zone", schema="rewards")
