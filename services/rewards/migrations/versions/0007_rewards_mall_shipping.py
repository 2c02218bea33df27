"""rewards: goods exchanges ship (carrier, tracking number, shipped_at) and the
operators' fulfilment queue index

The CHECK constraint is written by hand (Alembic never compares CHECK
constraints): keep it identical to services/rewards/schema.py.

Revision ID: 0007_rewards_mall_shipping
Revises: 0006_rewards_member_merges
Create Date: 2026-11-25 15:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_rewards_mall_shipping"
down_revision: str | None = "0006_rewards_member_merges"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in (
        sa.Column("carrier", sa.Text(), nullable=True),
        sa.Column("tracking_number", sa.Text(), nullable=True),
        sa.Column("shipped_at", sa.DateTime(timezone=True), nullable=True),
    ):
        op.add_column("mall_exchanges", column, schema="rewards")
    op.create_check_constraint(
        op.f("ck_mall_exchanges_shipped_has_shipment"),
        "mall_exchanges",
        "(fulfilment = 'shipped') = (shipped_at IS NOT NULL AND carrier IS NOT NULL"
        " AND tracking_number IS NOT NULL)",
        schema="rewards",
    )
    op.create_index(
        op.f("ix_mall_exchanges_fulfilment_seq"),
        "mall_exchanges",
        ["fulfilment", "seq"],
        unique=False,
        schema="rewards",
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_mall_exchanges_fulfilment_seq"), table_name="mall_exchanges", schema="rewards"
    )
    op.drop_constraint(
        op.f("ck_mall_exchanges_shipped_has_shipment"),
        "mall_exchanges",
        type_="check",
        schema="rewards",
    )
    for name in ("shipped_at", "tracking_number", "carrier"):
        op.drop_column("mall_exchanges", name, schema="rewards")
