"""tiering: erased members; fact rows outlive their member anonymised (member_id NULL)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 11:55:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FACT_TABLES = ('orders', 'growth_ledger', 'tier_history')


def upgrade() -> None:
    op.create_table('erased_members',
    sa.Column('member_id', sa.Uuid(), nullable=False),
    sa.Column('erased_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('member_id', name=op.f('pk_erased_members')),
    schema='tiering'
    )
    for table in FACT_TABLES:
        op.alter_column(table, 'member_id', existing_type=sa.Uuid(), nullable=True, schema='tiering')


def downgrade() -> None:
    # Anonymised rows have no member to go back to.
    for table in FACT_TABLES:
        op.execute(f'DELETE FROM tiering.{table} WHERE member_id IS NULL')
        op.alter_column(table, 'member_id', existing_type=sa.Uuid(), nullable=False, schema='tiering')
    op.drop_table('erased_members', schema='tiering')
