"""tiering: each member's store for the dashboards' store / region filter
(servicekit/metrics_definitions.py MEMBER_STORE): member_profiles keeps the
registration store (from member's MemberZoneSet) and the store of the member's
latest order with when it was placed (from OrderCompleted); the member's store
is the first, else the second. stage_transitions gains the store of the members
it counts, so lifecycle moves can be filtered too.

Back-fill: tiering has recorded neither a registration store nor an order's
store before this revision (tiering.orders has no store column, the events'
payloads are not kept), so existing profiles and transitions start with none:
they count brand-wide and under no store until the member's next MemberZoneSet
or order arrives. Adding nullable columns without a default rewrites no row.

Revision ID: 0012_tiering_member_store
Revises: 0011_tiering_orders_partitions
Create Date: 2026-12-05 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_tiering_member_store"
down_revision: str | None = "0011_tiering_orders_partitions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "tiering"


def upgrade() -> None:
    op.add_column(
        "member_profiles", sa.Column("registration_store_id", sa.Text()), schema=SCHEMA
    )
    op.add_column("member_profiles", sa.Column("order_store_id", sa.Text()), schema=SCHEMA)
    op.add_column(
        "member_profiles",
        sa.Column("order_store_at", sa.DateTime(timezone=True)),
        schema=SCHEMA,
    )
    op.add_column("stage_transitions", sa.Column("store_id", sa.Text()), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("stage_transitions", "store_id", schema=SCHEMA)
    op.drop_column("member_profiles", "order_store_at", schema=SCHEMA)
    op.drop_column("member_profiles", "order_store_id", schema=SCHEMA)
    op.drop_column("member_profiles", "registration_store_id", schema=SCHEMA)
