"""gateway: a mini-program backend client is bound to its WeChat app ids

A miniprogram_backend client may assert openids only of these apps (issue 15
item 5). Clients registered before hold none and speak for no app until an
operator binds them (`python -m gateway clients set-apps`).

CHECK constraints are reviewed by hand (Alembic never compares them): keep
them identical to gateway/schema.py.

Revision ID: 0003
Revises: 0001 (on this branch; 0002 once merged with the door's 0002)
Create Date: 2026-12-04 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
# Numbered after the door's concurrent 0002 (Idempotency-Key records): when both
# are merged, this must read "0002" so the chain has one head.
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "clients",
        sa.Column("app_ids", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        schema="gateway",
    )
    op.create_check_constraint(
        op.f("ck_clients_app_ids_miniprogram"),
        "clients",
        "kind = 'miniprogram_backend' OR cardinality(app_ids) = 0",
        schema="gateway",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("ck_clients_app_ids_miniprogram"), "clients", type_="check", schema="gateway"
    )
    op.drop_column("clients", "app_ids", schema="gateway")
